"""`ocr.workers`: several OCR children on a CPU host, each with its share of the cores."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import psutil
import pytest

from tests.conftest import gone_or_zombie, make_image, run_watcherd, wait_until
from tests.test_config import GOOD, write
from watcherd.core.config_file import from_dict
from watcherd.core.settings import ConfigError
from watcherd.ocr import workers


def in_flight(daemon) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    path = daemon.status_path
    return json.loads(path.read_text())["in_flight"] if path.exists() else []


def two_in_flight(daemon) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Wait until the status file shows two files being OCR'd at once."""

    def two() -> list[dict[str, Any]] | None:
        files = in_flight(daemon)
        return files if len(files) == 2 else None

    return wait_until(two, 30, "two files in flight")


def test_two_workers_ocr_two_files_at_once(daemon_factory) -> None:
    daemon = daemon_factory(
        ocr={"engine": "tests.worker_engines:Threads", "workers": 2, "options": {"delay_s": 4}}
    ).start()
    wait_until(lambda: daemon.log().count(" ready: tests.worker_engines:Threads") == 2, 30, "two children")
    make_image(daemon.inbox / "a.png")
    make_image(daemon.inbox / "b.png", 70)
    both = two_in_flight(daemon)
    assert {f["source"] for f in both} == {"a.png", "b.png"}
    assert len({f["child_pid"] for f in both}) == 2
    texts = [daemon.wait_json(n)["text"] for n in ("a.png", "b.png")]
    pids = {t.split()[1] for t in texts}
    assert len(pids) == 2  # two children did the work
    share = max(1, workers.cores() // 2)
    assert all(f"omp {share} threads {share}" in t for t in texts)


def test_one_worker_keeps_the_libraries_defaults(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.worker_engines:Threads"}).start()
    make_image(daemon.inbox / "one.png")
    text = daemon.wait_json("one.png")["text"]
    assert "threads None" in text and len(daemon.child_pids()) == 1


def test_torch_engines_get_their_share_of_the_cores(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.worker_engines:TorchThreads", "workers": 2}).start()
    make_image(daemon.inbox / "t.png")
    assert daemon.wait_json("t.png")["text"] == f"torch threads {max(1, workers.cores() // 2)}"


def test_killing_one_worker_costs_only_its_file(daemon_factory) -> None:
    daemon = daemon_factory(
        ocr={"engine": "tests.worker_engines:Threads", "workers": 2, "options": {"delay_s": 3}}
    ).start()
    wait_until(lambda: daemon.log().count(" ready: tests.worker_engines:Threads") == 2, 30, "two children")
    make_image(daemon.inbox / "victim.png")
    make_image(daemon.inbox / "bystander.png", 70)
    both = two_in_flight(daemon)
    victim = next(int(f["child_pid"]) for f in both if f["source"] == "victim.png")
    bystander = next(int(f["child_pid"]) for f in both if f["source"] == "bystander.png")
    os.kill(victim, signal.SIGKILL)
    other = daemon.wait_json("bystander.png")
    assert other["status"] == "ok" and other["attempts"] == 1 and f"pid {bystander} " in other["text"]
    retried = daemon.wait_json("victim.png")
    assert retried["status"] == "ok" and retried["attempts"] == 2  # the crash rule: retried once on a new child
    assert gone_or_zombie(victim) and psutil.pid_exists(bystander) and not gone_or_zombie(bystander)
    assert len(daemon.child_pids()) == 3 and daemon.alive()


@pytest.mark.parametrize(
    ("value", "words"),
    [("0", "at least 1 or auto"), ("-2", "at least 1 or auto"), ("many", "at least 1 or auto"), ("1.5", "at least 1")],
)
def test_bad_worker_counts_exit_78(tmp_path, value: str, words: str) -> None:  # type: ignore[no-untyped-def]
    config = write(tmp_path, GOOD + f"ocr: {{workers: {value}}}")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and f"{config}: ocr.workers:" in result.stderr and words in result.stderr


def test_workers_with_gpus_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = write(tmp_path, GOOD + "ocr: {workers: 2, devices: [0, 1]}")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and "ocr.workers: must be 1 or auto with ocr.devices" in result.stderr


def test_auto_and_counts_parse() -> None:
    base = {"paths": {"inbox": "/tmp/in"}}
    assert from_dict({**base, "ocr": {"workers": "auto"}}).ocr.workers == "auto"
    assert from_dict({**base, "ocr": {"workers": 3}}).ocr.workers == 3
    assert from_dict({**base, "ocr": {"workers": "auto", "devices": [0]}}).ocr.workers == "auto"  # one per GPU
    with pytest.raises(ConfigError, match="ocr.workers"):
        from_dict({**base, "ocr": {"workers": True}})


def test_the_plan_shares_the_cores() -> None:
    assert workers.plan(1, available=16) == (1, None)
    assert workers.plan(4, available=16) == (4, 4)
    assert workers.plan(3, available=2) == (3, 1)
    count, threads = workers.plan("auto", available=16)
    assert count * (threads or 1) <= 16 and count >= 1
