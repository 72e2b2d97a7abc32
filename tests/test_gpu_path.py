"""GPU path without a GPU: scripted memory readings through the engine's gpu_info() seam, cache
clears counted by the engine, one child per device, recycling, and `ocr.python`."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import psutil

from tests.conftest import gone_or_zombie, make_image, wait_until


def test_a_file_waits_for_gpu_memory_then_runs_when_it_frees(daemon_factory, tmp_path: Path) -> None:
    memory = tmp_path / "free_mb"
    memory.write_text("200")  # below the seed's default of 500 MB
    daemon = daemon_factory(ocr={"engine": "tests.engines:ScriptedMemory", "options": {"memory_file": str(memory)}})
    daemon.start()
    make_image(daemon.inbox / "big.png", 60, 10)
    wait_until(lambda: "big.png: waiting for GPU memory (200 MB free" in daemon.log(), 30, "the deferral")
    assert (daemon.inbox / ".watcherd" / "processing" / "big.png").exists()  # claimed, still queued
    memory.write_text("700")  # 700 MB free is 95.6 % used: over the default max_usage_percent of 95
    wait_until(lambda: daemon.log().count("big.png: OCR started") >= 3, 30, "a retry at 95.6 % usage")
    assert daemon.results() == []
    memory.write_text("8000")
    result = daemon.wait_json("big.png", daemon.outbox)
    assert result["status"] == "ok"
    assert result["gpu_info_before"]["free_mb"] == 8000
    assert result["attempts"] == 1  # waiting for memory is not an attempt
    assert daemon.log().count("waiting for GPU memory") == 1  # logged once, not every retry


def test_a_file_that_never_finds_memory_fails_with_the_seed_message(daemon_factory, tmp_path: Path) -> None:
    memory = tmp_path / "free_mb"
    memory.write_text("256")
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:ScriptedMemory", "options": {"memory_file": str(memory)}},
        gpu={"wait_for_memory_s": 1},
        output={"locale": "zh-TW"},
    ).start()
    make_image(daemon.inbox / "never.png")
    error = daemon.wait_json("never.png", daemon.failed)
    assert error["error_code"] == "vram_insufficient"
    assert error["error"] == "GPU 記憶體不足，可用記憶體: 256 MB，建議至少有 500 MB 可用記憶體"
    assert error["gpu_info"]["free_mb"] == 256
    assert (daemon.failed / "never.png").exists()


def test_cache_is_cleared_every_five_files_and_when_the_queue_drains(daemon_factory, tmp_path: Path) -> None:
    clears = tmp_path / "clears.log"
    daemon = daemon_factory(ocr={"engine": "tests.engines:CountingClears", "options": {"log": str(clears)}})
    daemon.start()
    for i in range(12):
        make_image(daemon.inbox / f"f{i:02}.png", 20 + i, 10)
    wait_until(lambda: len(daemon.results()) == 12, 60, "12 results")
    wait_until(lambda: clears.exists() and clears.read_text().split()[-1:] == ["12"], 10, "a clear after the last file")
    counts = [int(n) for n in clears.read_text().split()]
    assert 5 in counts and 10 in counts, counts
    assert all(n % 5 == 0 or n == 12 or n < 12 for n in counts)


def test_one_child_per_gpu_serves_in_parallel_and_survives_the_other(daemon_factory) -> None:
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:DeviceEcho", "devices": [0, 1], "options": {"delay_s": 1.5}}
    ).start()
    loaded = " ready: tests.engines:DeviceEcho"
    wait_until(lambda: len(daemon.child_pids()) == 2 and daemon.log().count(loaded) == 2, 30, "two children")
    for i in range(4):
        make_image(daemon.inbox / f"p{i}.png", 30 + i, 10)
    wait_until(lambda: daemon.log().count("OCR started") >= 2 and not daemon.results(), 30, "two files at once")
    texts = [daemon.wait_json(f"p{i}.png")["text"] for i in range(4)]
    assert {t.split()[1] for t in texts} == {"0", "1"}  # each child got its own CUDA_VISIBLE_DEVICES

    first, second = daemon.child_pids()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: gone_or_zombie(first), 10)
    for i in range(4, 8):
        make_image(daemon.inbox / f"p{i}.png", 30 + i, 10)
    for i in range(4, 8):
        assert daemon.wait_json(f"p{i}.png")["status"] == "ok"
    assert psutil.pid_exists(second) and not gone_or_zombie(second)  # never disturbed
    assert daemon.alive()


def test_the_child_is_recycled_after_n_files_without_losing_any(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:DeviceEcho", "recycle_after_files": 2}).start()
    for i in range(5):
        make_image(daemon.inbox / f"r{i}.png", 30 + i, 10)
    pids = {daemon.wait_json(f"r{i}.png")["text"].split()[-1] for i in range(5)}
    assert len(pids) == 3  # files 1-2, 3-4, 5
    assert daemon.results(daemon.failed) == []


def test_ocr_python_chooses_the_childs_interpreter(daemon_factory, tmp_path: Path) -> None:
    marker = tmp_path / "wrapper-ran"
    wrapper = tmp_path / "python-for-model"
    wrapper.write_text(f'#!/bin/sh\necho "$$" > {marker}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    daemon = daemon_factory(ocr={"engine": "tests.engines:DeviceEcho", "python": str(wrapper)}).start()
    make_image(daemon.inbox / "w.png")
    result = daemon.wait_json("w.png")
    assert result["status"] == "ok"
    assert marker.read_text().strip() == result["text"].split()[-1]  # the exec'd wrapper is the child
