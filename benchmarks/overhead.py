"""What the daemon costs around its engine: overhead ratio, files/s, recovery, backlog, idle.

    .venv/bin/python benchmarks/overhead.py [--files 200] [--backlog 10000]

All rows are measured in one run, one after the other, so their ratios hold on a noisy machine.
- overhead ratio: files through the daemon with an engine that sleeps 100 ms a page; wall time
  from the first claim to the last result ÷ the engine's own time (files × 100 ms);
- instant engine: the same with an engine that returns at once, in files/s;
- recovery: from the timeout kill of a hung child to the next file starting on a new child
  (the fake engine has no model to load, so this is the respawn itself);
- backlog: files already in the inbox at start → time from process start to the first result,
  and the parent's RSS once all are queued;
- idle: the parent's RSS and CPU over 10 s with nothing to do.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime

import psutil
from harness import BenchDaemon, iso, machine, table, wait_for
from PIL import Image

HANG_WIDTH = 17  # tests.engines.Hang hangs on pages this wide


def drop(daemon: BenchDaemon, n: int, prefix: str, width: int = 20) -> None:
    source = daemon.inbox.parent / f"{prefix}.png"
    Image.new("RGB", (width, 10), "white").save(source)
    data = source.read_bytes()
    for i in range(n):
        (daemon.inbox / f"{prefix}{i:05}.png").write_bytes(data)


def run_batch(engine_options: dict, n: int) -> tuple[float, float]:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo", "options": engine_options}).start()
    try:
        drop(daemon, n, "f")
        wait_for(lambda: len(daemon.results()) == n, 600, f"{n} results")
        docs = daemon.documents()
    finally:
        daemon.stop()
    wall = max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs)
    in_engine = sum(p["processing_time"] for d in docs for p in d["pages"])
    return wall, in_engine


def log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def recovery() -> float:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Hang", "timeout_s": 1}).start()
    try:
        drop(daemon, 1, "hang", width=HANG_WIDTH)
        wait_for(lambda: "exceeded ocr.timeout_s" in daemon.log.read_text(), 60, "the timeout")
        drop(daemon, 1, "next")
        wait_for(lambda: "next00000.png: OCR started" in daemon.log.read_text(), 60, "the next file")
        lines = daemon.log.read_text().splitlines()
    finally:
        daemon.stop()
    killed = log_time(next(line for line in lines if "exceeded ocr.timeout_s" in line))
    started = log_time(next(line for line in lines if "next00000.png: OCR started" in line))
    return started - killed


def backlog(n: int) -> tuple[float, float]:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo"})
    drop(daemon, n, "b")
    started = time.time()
    daemon.start()
    try:
        wait_for(lambda: daemon.results(), 120, "the first result")
        first = time.time() - started
        rss = psutil.Process(daemon.proc.pid).memory_info().rss / 2**20
    finally:
        daemon.stop()
    return first, rss


def idle() -> tuple[float, float]:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo"}).start()
    try:
        proc = psutil.Process(daemon.proc.pid)
        time.sleep(2)  # let start-up settle before measuring
        before = proc.cpu_times()
        time.sleep(10)
        after = proc.cpu_times()
        cpu = 100 * ((after.user + after.system) - (before.user + before.system)) / 10
        rss = proc.memory_info().rss / 2**20
    finally:
        daemon.stop()
    return rss, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--backlog", type=int, default=10_000)
    args = parser.parse_args()

    wall, in_engine = run_batch({"delay_s": 0.1}, args.files)
    instant_wall, _ = run_batch({}, args.files)
    recover_s = recovery()
    first_s, backlog_rss = backlog(args.backlog)
    idle_rss, idle_cpu = idle()
    rows = [
        [
            f"overhead ratio, {args.files} files, engine 100 ms/page",
            f"{wall:.2f} s / {in_engine:.2f} s = {wall / in_engine:.3f}",
            "≤ 1.05",
        ],
        [f"instant engine, {args.files} files", f"{args.files / instant_wall:.0f} files/s", "≥ 100 files/s"],
        ["recovery: timeout kill → next file started", f"{recover_s:.2f} s", "≤ 1 s"],
        [f"backlog of {args.backlog:,} files: start → first result", f"{first_s:.2f} s", "≤ 3 s"],
        [f"backlog of {args.backlog:,} files: parent RSS", f"{backlog_rss:.0f} MB", "≤ 100 MB"],
        ["idle: parent RSS", f"{idle_rss:.0f} MB", ""],
        ["idle: parent CPU", f"{idle_cpu:.2f} % of a core", ""],
    ]
    print(table(f"Daemon overhead, {machine()}", ["measure", "result", "target"], rows))


if __name__ == "__main__":
    main()
