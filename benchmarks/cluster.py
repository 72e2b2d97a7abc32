"""Many hosts through a real RabbitMQ node: throughput with 1 and 2 workers, per-file overhead
through the broker, and how long a dead worker's file takes to restart elsewhere.

    .venv/bin/python benchmarks/cluster.py [--files 40]      (as root: the node runs as rabbitmq)

- files/s: `--files` files through a dispatcher and N workers (`watcherd worker`) with an engine
  that sleeps 200 ms a page, from the first claim to the last result; the speed-up of 2 workers
  over 1 (target >= 1.9x);
- per-file overhead: files one at a time (cluster.max_in_flight 1, one worker) minus the 200 ms,
  against the same on a single host (standalone): the difference is what the broker costs;
- worker death to restart elsewhere: the worker holding a file is SIGKILLed (its whole process
  group) and the clock runs until the other worker starts the same file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from harness import REPO, BenchDaemon, iso, machine, table, wait_for
from PIL import Image

sys.path.insert(0, str(REPO))
from tests.rabbit import Rabbit  # noqa: E402

ENGINE_S = 0.2


class BenchWorker:
    def __init__(self, root: Path, name: str, queue: str, url: str, options: dict[str, Any]):
        self.log = root / f"{name}.log"
        config = root / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "ocr": {"engine": "tests.engines:Echo", "options": options},
                    "cluster": {"role": "worker", "broker_url": url, "queue": queue},
                }
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcherd", "worker", "--config", str(config), "--name", name],
            cwd=REPO,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        wait_for(lambda: " ready: " in self.text(), 120, "worker ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def drop(daemon: BenchDaemon, n: int, prefix: str) -> None:
    source = daemon.inbox.parent / f"{prefix}.png"
    Image.new("RGB", (20, 10), "white").save(source)
    data = source.read_bytes()
    for i in range(n):
        (daemon.inbox / f"{prefix}{i:05}.png").write_bytes(data)


def run(
    rabbit: Rabbit | None, workers: int, files: int, *, in_flight: int, options: dict[str, Any] | None = None
) -> tuple[float, BenchDaemon, list[BenchWorker]]:
    """Wall seconds for `files` files (rabbit None: a single host); leaves the processes running."""
    options = options or {"delay_s": ENGINE_S}
    queue = f"bench{uuid.uuid4().hex[:8]}"
    sections: dict[str, Any] = {}
    if rabbit is not None:
        sections["cluster"] = {
            "role": "dispatcher",
            "broker_url": rabbit.url,
            "queue": queue,
            "max_in_flight": in_flight,
        }
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo", "options": options}, **sections)
    root = daemon.inbox.parent
    started = [BenchWorker(root, f"w{i + 1}", queue, rabbit.url, options) for i in range(workers)] if rabbit else []
    for w in started:
        w.wait_ready()
    daemon.start()
    if not files:
        return 0.0, daemon, started
    drop(daemon, files, "f")
    wait_for(lambda: len(daemon.results()) == files, 600, f"{files} results")
    docs = daemon.documents()
    wall = max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs)
    return wall, daemon, started


def finish(daemon: BenchDaemon, workers: list[BenchWorker]) -> None:
    for w in workers:
        w.kill()
    daemon.stop()


def log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def restart_elsewhere(rabbit: Rabbit) -> float:
    _, daemon, workers = run(rabbit, 2, 0, in_flight=2, options={"delay_s": 5})
    try:
        drop(daemon, 1, "long")
        name = "long00000.png: attempt "
        victim = wait_for(lambda: next((w for w in workers if name in w.text()), None), 60, "the file to start")
        killed_at = time.time()
        victim.kill()
        other = next(w for w in workers if w is not victim)
        line = wait_for(
            lambda: next((x for x in other.text().splitlines() if name in x), None), 120, "the restart elsewhere"
        )
        return log_time(line) - killed_at
    finally:
        finish(daemon, workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=40)
    args = parser.parse_args()
    rabbit = Rabbit()
    rabbit.start()
    try:
        rows = []
        rates = {}
        for n in (1, 2):
            wall, daemon, workers = run(rabbit, n, args.files, in_flight=2 * n)
            finish(daemon, workers)
            rates[n] = args.files / wall
            rows.append([f"{n} worker(s), {ENGINE_S * 1000:.0f} ms engine", args.files, f"{rates[n]:.2f} files/s"])
        rows.append(["speed-up, 2 workers over 1", "", f"{rates[2] / rates[1]:.2f}x (target >= 1.9x)"])
        sequential = max(10, args.files // 4)
        wall, daemon, workers = run(rabbit, 1, sequential, in_flight=1)
        assert daemon.proc is not None
        dispatcher = psutil.Process(daemon.proc.pid)
        dispatcher.cpu_percent()
        time.sleep(10)  # idle: what the broker thread's polling costs
        idle_cpu = dispatcher.cpu_percent()
        finish(daemon, workers)
        cluster_ms = (wall / sequential - ENGINE_S) * 1000
        wall, daemon, _ = run(None, 0, sequential, in_flight=1)
        daemon.stop()
        single_ms = (wall / sequential - ENGINE_S) * 1000
        rows.append(["per-file overhead, one at a time, through the broker", sequential, f"{cluster_ms:.0f} ms"])
        rows.append(["per-file overhead, one at a time, single host", sequential, f"{single_ms:.0f} ms"])
        rows.append(["what the broker adds per file", "", f"{cluster_ms - single_ms:.0f} ms"])
        rows.append(["dispatcher idle CPU over 10 s (one core = 100 %)", "", f"{idle_cpu:.1f} %"])
        rows.append(
            ["worker SIGKILLed -> its file started on the other worker", 1, f"{restart_elsewhere(rabbit):.2f} s"]
        )
    finally:
        rabbit.close()
    print(table(f"Many hosts ({machine()}, RabbitMQ on loopback)", ["measure", "files", "result"], rows))


if __name__ == "__main__":
    main()
