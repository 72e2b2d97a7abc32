"""Many hosts: a dispatcher and two workers as real processes, on a private RabbitMQ
node started from Debian's `rabbitmq-server`, with the fake engines of tests/engines.py.

Each test gets its own queue names on the shared node, so a message left over by one test never
reaches another. Skipped, naming the binary, where `rabbitmq-server` is not installed
(`scripts/setup --test` installs it). CLUSTER_CHAOS_ITERATIONS sets the dispatcher kill -9 loop's
length (default 20).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.cluster_engines import KILL_WORKER_WIDTH
from tests.conftest import REPO, Daemon, gone_or_zombie, make_image, run_watcherd, wait_until
from tests.engines import HANG_WIDTH
from tests.rabbit import RABBITMQ, Rabbit
from tests.test_chaos import audit, record, wait_all

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(RABBITMQ is None, reason="rabbitmq-server is not installed (scripts/setup --test)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="rabbitmq-server must start as root to switch to its user"),
]

CHAOS_ITERATIONS = int(os.environ.get("CLUSTER_CHAOS_ITERATIONS", "20"))


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Rabbit]:
    node = Rabbit()
    try:
        node.start()
        yield node
    finally:
        node.close()


class WorkerProcess:
    """One `watcherd worker` (a Celery worker) in its own process group."""

    def __init__(self, root: Path, name: str, config: dict[str, Any], prefix: tuple[str, ...] = ()):
        self.name = name
        self.prefix = prefix  # e.g. `ip netns exec NS`
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")
        self._log_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "watcherd", "worker", "--config", str(self.config_path)]
            + ["--name", self.name],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_bytes()[self._log_start :].decode("utf-8", "replace")

    def wait_ready(self) -> None:
        wait_until(lambda: " ready: " in self.log() or self.proc.poll() is not None, 90, f"{self.name} to load")
        assert self.proc is not None and self.proc.poll() is None, self.log()

    def started(self, name: str) -> bool:
        return f"{name}: attempt " in self.log()

    def pool_pids(self) -> list[int]:
        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def all_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            return [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_group(self) -> None:
        assert self.proc is not None
        pids = self.all_pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        wait_until(lambda: all(gone_or_zombie(p) for p in pids), 15, f"{self.name}'s processes to die")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = self.all_pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()
        wait_until(lambda: all(gone_or_zombie(p) for p in pids), 15, f"{self.name}'s OCR child to die")


class Cluster:
    def __init__(self, root: Path, rabbit: Rabbit):
        self.root = root
        self.rabbit = rabbit
        self.queue = f"t{uuid.uuid4().hex[:12]}"
        self.workers: list[WorkerProcess] = []
        self.daemon: Daemon | None = None

    def cluster_keys(self, role: str, **extra: Any) -> dict[str, Any]:
        return {"role": role, "broker_url": self.rabbit.url, "queue": self.queue, "max_deliveries": 3, **extra}

    def start(
        self,
        *,
        engine: str = "tests.engines:Echo",
        options: dict[str, Any] | None = None,
        workers: int = 2,
        timeout_s: float = 20,
        turn_pages: int = 16,
        metrics: dict[str, Any] | None = None,
        **cluster: Any,
    ) -> Cluster:
        self.ocr = {"engine": engine, "options": options or {}, "timeout_s": timeout_s, "turn_pages": turn_pages}
        self.shared = {k: v for k, v in cluster.items() if k == "max_deliveries"}
        for i in range(workers):
            self.add_worker(f"w{i + 1}")
        ocr = self.ocr
        dispatcher = {"max_in_flight": 2, "progress_grace_s": 30, **cluster}
        self.daemon = Daemon(
            self.root,
            ocr=ocr,
            cluster=self.cluster_keys("dispatcher", **dispatcher),
            watch={"settle_s": 0.1},
            **({"metrics": metrics} if metrics else {}),
        )
        for w in self.workers:
            w.wait_ready()
        self.daemon.start()
        return self

    def add_worker(self, name: str, *, url: str | None = None, prefix: tuple[str, ...] = ()) -> WorkerProcess:
        keys = self.cluster_keys("worker", **self.shared) | ({"broker_url": url} if url else {})
        config = {"ocr": self.ocr, "cluster": keys, "logging": {"level": "info"}}
        worker = WorkerProcess(self.root, name, config, prefix).start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.alive():
            self.daemon.stop(signal.SIGKILL)
        for w in self.workers:
            w.stop()

    def worker_with(self, name: str) -> WorkerProcess:
        return wait_until(lambda: next((w for w in self.workers if w.started(name)), None), 30, f"{name} to start")


@pytest.fixture
def cluster(tmp_path: Path, rabbit: Rabbit) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        c = Cluster(tmp_path, rabbit)
        made.append(c)
        return c.start(**kwargs)

    yield make
    for c in made:
        c.stop()


def drop(daemon: Daemon, name: str, width: int = 40) -> str:
    make_image(daemon.inbox / name, width, 30)
    return name


def test_files_spread_over_two_workers_each_published_once(cluster) -> None:
    from tests.test_metrics import free_port, scrape, value

    port = free_port()
    c = cluster(options={"delay_s": 0.3}, max_in_flight=2, metrics={"listen": f"127.0.0.1:{port}"})
    d = c.daemon
    names = [drop(d, f"f{i}.png", 30 + i) for i in range(6)]
    docs = [d.wait_json(n, d.outbox, timeout=60) for n in names]
    assert [doc["text"] for doc in docs] == [f"echo {30 + i}x30" for i in range(6)]
    assert all(doc["attempts"] == 1 for doc in docs)
    assert audit(d, names) == (0, 0)
    assert all(any(w.started(n) for n in names) for w in c.workers), "both workers served files"

    def status() -> dict[str, Any] | None:  # written once a second
        doc = json.loads(run_watcherd("status", "--json", "--config", str(d.config_path)).stdout)
        workers = doc["cluster"]["workers"]
        return doc if sum(w["files_done"] for w in workers) == 6 else None

    doc = wait_until(status, 10, "the status file to count six files")
    assert {w["host"] for w in doc["cluster"]["workers"]} == {"w1", "w2"}
    assert "guest:***@" in doc["cluster"]["broker"]
    shown = run_watcherd("status", "--config", str(d.config_path)).stdout
    assert "worker w1" in shown and "worker w2" in shown, shown
    assert ":guest@" not in d.log(), "the broker password is never logged"
    # Per-worker series on the dispatcher's /metrics: files each worker finished, six in all.
    found = wait_until(
        lambda: (
            (f := scrape(port))
            and sum(value(f, "watcherd_cluster_worker_files_total", worker=w) or 0 for w in ("w1", "w2")) == 6
            and f
        ),
        15,
        "per-worker metrics",
    )
    assert all(value(found, "watcherd_cluster_worker_last_heard_timestamp_seconds", worker=w) for w in ("w1", "w2"))


def test_a_long_file_read_in_turns_on_a_worker_is_one_result(cluster) -> None:
    """ocr.turn_pages on a worker: its turns run one after another inside the task, and the
    dispatcher gets one outcome with every page in order."""
    from PIL import Image

    c = cluster(turn_pages=3, workers=1)
    d = c.daemon
    frames = [Image.new("RGB", (50 + i, 30), "white") for i in range(10)]
    tmp = d.root / "long.tif"
    frames[0].save(tmp, save_all=True, append_images=frames[1:])
    tmp.rename(d.inbox / "long.tif")
    doc = d.wait_json("long.tif", d.outbox, timeout=60)
    assert doc["status"] == "ok", doc
    assert [p["text"] for p in doc["pages"]] == [f"echo {50 + i}x30" for i in range(10)]
    assert doc["attempts"] == 1


def placed(d: Any, host: str, name: str) -> bool:
    """Has the dispatcher heard that `name` started on `host`? (Its status: about once a second.)"""
    doc = json.loads(run_watcherd("status", "--json", "--config", str(d.config_path)).stdout or "{}")
    workers = doc.get("cluster", {}).get("workers", [])
    return any(w["host"] == host and w["in_flight"] == [name] for w in workers)


def test_worker_group_killed_mid_file_is_finished_by_the_other(cluster) -> None:
    c = cluster(options={"delay_s": 4})
    d = c.daemon
    name = drop(d, "long.png")
    victim = c.worker_with(name)
    wait_until(lambda: placed(d, victim.name, name), 30, "the dispatcher to hear where the file started")
    victim.kill_group()
    doc = d.wait_json(name, d.outbox, timeout=60)
    assert doc["status"] == "ok"
    assert [w for w in c.workers if w is not victim][0].started(name)
    assert audit(d, [name]) == (0, 0)
    assert "started again on" in d.log()


def test_pool_process_killed_is_requeued_not_lost(cluster) -> None:
    c = cluster(options={"delay_s": 4}, workers=1)
    d = c.daemon
    name = drop(d, "oom.png")
    worker = c.worker_with(name)
    (pool,) = worker.pool_pids()
    os.kill(pool, signal.SIGKILL)  # the OOM killer's choice: the process holding the model
    doc = d.wait_json(name, d.outbox, timeout=90)
    assert doc["status"] == "ok"
    assert worker.proc is not None and worker.proc.poll() is None, "the worker itself lives on"
    assert worker.log().count(f"{name}: attempt ") == 2
    assert audit(d, [name]) == (0, 0)


def test_a_file_that_kills_every_worker_ends_as_child_crashed(cluster) -> None:
    c = cluster(engine="tests.cluster_engines:KillsItsWorker", max_deliveries=2)
    d = c.daemon
    poison = drop(d, "poison.png", KILL_WORKER_WIDTH)
    doc = d.wait_json(poison, d.failed, timeout=120)
    assert doc["error_code"] == "child_crashed"
    assert "max_deliveries" in doc["detail"] and ("w1" in doc["detail"] or "w2" in doc["detail"]), doc["detail"]
    after = [drop(d, f"after{i}.png", 40 + i) for i in range(2)]
    for n in after:
        assert d.wait_json(n, d.outbox, timeout=60)["status"] == "ok"
    assert all(w.proc is not None and w.proc.poll() is None for w in c.workers), "workers keep serving"
    assert audit(d, [poison, *after]) == (0, 0)


def test_native_hang_in_a_worker_is_a_timeout_and_the_worker_serves_on(cluster) -> None:
    c = cluster(engine="tests.engines:Hang", workers=1, timeout_s=2)
    d = c.daemon
    hang = drop(d, "hang.png", HANG_WIDTH)
    doc = d.wait_json(hang, d.failed, timeout=60)
    assert doc["error_code"] == "timeout"
    good = drop(d, "next.png")
    assert d.wait_json(good, d.outbox, timeout=60)["status"] == "ok"
    assert audit(d, [hang, good]) == (0, 0)


def test_a_worker_short_of_gpu_memory_defers_to_the_dispatcher_s_backoff(cluster, tmp_path: Path) -> None:
    memory = tmp_path / "free_mb"
    memory.write_text("200")  # below gpu.min_free_mb (500) on the worker
    c = cluster(engine="tests.engines:ScriptedMemory", options={"memory_file": str(memory)}, workers=1)
    d = c.daemon
    name = drop(d, "big.png")
    wait_until(lambda: "big.png: waiting for GPU memory (200 MB free" in d.log(), 30, "the deferral")
    wait_until(lambda: c.workers[0].log().count("big.png: attempt ") >= 2, 30, "a retry after the backoff")
    memory.write_text("8000")
    doc = d.wait_json(name, d.outbox, timeout=60)
    assert doc["status"] == "ok" and doc["attempts"] == 1  # waiting for memory is not an attempt
    assert doc["gpu_info_before"]["free_mb"] == 8000


def test_broker_restart_during_a_long_file_loses_and_duplicates_nothing(cluster, rabbit: Rabbit) -> None:
    c = cluster(options={"delay_s": 6}, max_deliveries=4)
    d = c.daemon
    names = [drop(d, "long1.png", 41), drop(d, "long2.png", 42)]
    c.worker_with(names[0])
    rabbit.stop()
    rabbit.start()
    for n in names:
        assert d.wait_json(n, d.outbox, timeout=120)["status"] == "ok"
    assert audit(d, names) == (0, 0)
    assert d.alive() and all(w.proc is not None and w.proc.poll() is None for w in c.workers)


def test_a_frozen_worker_s_file_is_resubmitted_after_the_progress_grace(cluster) -> None:
    """A host frozen on a dead NFS mount: its processes are stopped, its TCP connection stays up
    (the kernel still answers), so the broker redelivers nothing for a while. The dispatcher
    hears no progress for cluster.progress_grace_s and submits the file again; the frozen
    worker's late result, once it thaws, is dropped."""
    c = cluster(options={"delay_s": 3}, progress_grace_s=2)
    d = c.daemon
    name = drop(d, "frozen.png")
    frozen = c.worker_with(name)
    assert frozen.proc is not None
    os.killpg(frozen.proc.pid, signal.SIGSTOP)
    try:
        doc = d.wait_json(name, d.outbox, timeout=60)
        assert doc["status"] == "ok"
        assert "progress_grace_s" in d.log()
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    wait_until(lambda: "Dropping the outcome reply for frozen.png" in d.log(), 30, "the late result to be dropped")
    assert audit(d, [name]) == (0, 0)


class Netns:
    """A network namespace joined to ours by a veth pair, and a TCP relay on our side of it to
    the broker on 127.0.0.1 (the test node listens on loopback only). `cut()` takes the link
    down: packets vanish both ways, no RST, no FIN — a worker host cut off by the network."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.peer_if = f"wd{tag}", f"wdh{tag}", f"wdp{tag}"
        net = random.randrange(1, 250)
        self.host_ip, self.peer_ip = f"10.213.{net}.1", f"10.213.{net}.2"
        self.relay: socket.socket | None = None

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        self.ip("link", "set", self.peer_if, "netns", self.name)
        self.ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.ip("link", "set", self.host_if, "up")
        for args in (("addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if), ("link", "set", self.peer_if, "up")):
            self.ip("netns", "exec", self.name, "ip", *args)
        self.ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def relay_to(self, port: int) -> int:
        self.relay = socket.create_server((self.host_ip, 0))
        threading.Thread(target=self._accept, args=(port,), daemon=True).start()
        return int(self.relay.getsockname()[1])

    def _accept(self, port: int) -> None:
        assert self.relay is not None
        while True:
            try:
                inner, _ = self.relay.accept()
            except OSError:
                return
            outer = socket.create_connection(("127.0.0.1", port))
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.ip("link", "set", self.host_if, "down")

    def delete(self) -> None:
        if self.relay is not None:
            self.relay.close()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    try:
        ns.create()
    except (OSError, subprocess.CalledProcessError) as exc:
        ns.delete()
        pytest.skip(f"cannot make a network namespace with a veth pair here: {exc}")
    yield ns
    ns.delete()


def test_a_worker_cut_off_in_its_own_network_namespace_is_resubmitted(cluster, rabbit: Rabbit, netns: Netns) -> None:
    c = cluster(options={"delay_s": 3}, workers=0, progress_grace_s=3)
    d = c.daemon
    relay = netns.relay_to(rabbit.port)
    url = f"amqp://guest:guest@{netns.host_ip}:{relay}//"
    cut_off = c.add_worker("island", url=url, prefix=("ip", "netns", "exec", netns.name))
    cut_off.wait_ready()
    name = drop(d, "island.png")

    wait_until(lambda: placed(d, "island", name), 30, "the file to start on the worker in the namespace")
    netns.cut()
    other = c.add_worker("mainland")
    other.wait_ready()
    doc = d.wait_json(name, d.outbox, timeout=60)
    assert doc["status"] == "ok"
    assert other.started(name)
    assert "no word from island" in d.log()
    assert audit(d, [name]) == (0, 0)


def test_dispatcher_kill9_at_random_moments(cluster, request) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    c = cluster(options={"delay_s": 0.2}, max_in_flight=2)
    d = c.daemon
    assert d is not None
    d.stop(signal.SIGKILL)
    names: list[str] = []
    claimed = 0  # kills that caught files claimed (in flight on a worker, or queued for one)
    processing = d.inbox / ".watcherd" / "processing"
    for i in range(CHAOS_ITERATIONS):
        for j in range(3):
            names.append(drop(d, f"k{i:03}_{j}.png", 20 + j))
        d.start(wait_ready=rng.random() < 0.7)
        time.sleep(rng.uniform(0, 1.5))  # the random moment of the kill is the point of this test
        d.stop(signal.SIGKILL)
        claimed += processing.exists() and any(processing.iterdir())
    d.start()
    wait_all(d, names, timeout=180)
    wait_until(lambda: not any((d.inbox / ".watcherd" / "processing").iterdir()), 30, "the work area to empty")
    lost, duplicated = audit(d, names)
    record(
        request,
        f"dispatcher kill -9 at random moments, two workers busy (seed {seed})",
        CHAOS_ITERATIONS,
        (len(names), lost, duplicated),
        f"restarted each time; {claimed} kills caught files claimed",
    )
    assert (lost, duplicated) == (0, 0), f"seed {seed}"


def test_a_message_that_is_not_json_on_the_reply_queue_is_refused_and_files_still_publish(cluster) -> None:
    """Anyone who can publish to the broker can put bytes on the reply queue. Unacknowledged, a
    message the consumer cannot decode came back first after every reconnect, for ever, and no
    later reply was read: each file was OCR'd, resubmitted every progress_grace_s, never published."""
    from kombu import Connection

    from watcherd.core.records import inbox_id

    c = cluster(workers=1)
    d = c.daemon
    replies = f"{c.queue}.reply.{inbox_id(d.inbox)}"
    with Connection(c.rabbit.url) as conn:
        producer = conn.Producer()
        producer.publish(b"\x80\x04not json", routing_key=replies, content_type="application/x-python-serialize")
        producer.publish(b"{nor is this", routing_key=replies, content_type="application/json")
        producer.publish({"kind": "started", "host": "forged", "device": "x" * 10_000}, routing_key=replies)
    wait_until(lambda: "Refusing messages on the reply queue" in d.log(), 30, "the refusal")
    name = drop(d, "after.png")
    assert d.wait_json(name, d.outbox, timeout=60)["status"] == "ok"

    def status() -> dict[str, Any] | None:  # written about once a second
        doc = json.loads(run_watcherd("status", "--json", "--config", str(d.config_path)).stdout)
        return doc if doc["cluster"]["refused_messages"] >= 3 else None

    doc = wait_until(status, 15, "the status file to count the refused messages")
    assert doc["cluster"]["refused_messages"] == 3
    assert {w["host"] for w in doc["cluster"]["workers"]} == {"w1"}  # the forged host is not listed
    assert d.log().count("Refusing messages on the reply queue") == 1  # said once, not per message
    assert "unreachable" not in d.log()  # no reconnect loop
