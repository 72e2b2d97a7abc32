"""Intake benchmark: pickup latency and idle CPU of the real daemon, events vs polling.

    .venv/bin/python benchmarks/intake.py                      # 10,000 and 100,000 files
    .venv/bin/python benchmarks/intake.py --sizes 10000 --idle-s 10

The watched tree is what a real share looks like next to a scanner inbox: folders of other
documents the daemon must not touch (100 `.docx`/`.txt` files per folder, which `watch.include`
does not match), so every folder is watched or polled but none of its files is processed. For
each tree size and mode the daemon (`tests.engines:Echo`, so OCR costs nothing) is started on the
tree, left idle for `--idle-s` seconds while psutil reads its CPU time, then fed `--samples` files,
one at a time. A file is written under a temp name outside the inbox and renamed in, so "complete"
is one instant; "claimed" is the timestamp of the daemon's `<name>: OCR started` line, logged as
the file is renamed into the processing area. "latency" drops each file 1 s after the previous
result appeared (an idle daemon); "back-to-back" drops it the moment the previous result appears.

For comparison, the last rows run watchdog's PollingObserver (what intake used before) on the same
trees in this process, with nothing else running, and report its CPU.

Not a test: timings depend on the machine. Prints a markdown table and the command line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Daemon, make_image, wait_until  # noqa: E402

PER_FOLDER = 100
CLAIMED = re.compile(r"^(\S+ \S+) INFO (\S+): OCR started", re.M)


def build_tree(inbox: Path, files: int) -> int:
    """`files` non-matching documents in folders of PER_FOLDER; returns the number of folders."""
    folders = 0
    for i in range(0, files, PER_FOLDER):
        folder = inbox / "library" / f"{i // 10_000:02d}" / f"box{i // PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        folders += 1
        for j in range(min(PER_FOLDER, files - i)):
            (folder / f"doc{i + j:06d}.{'docx' if j % 2 else 'txt'}").write_bytes(b"x")
    return folders


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def idle_cpu(pid: int, seconds: float) -> float:
    """Percent of one core the process used over `seconds` (threads included)."""
    proc = psutil.Process(pid)
    before, start = cpu_seconds(proc), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(proc) - before) / (time.monotonic() - start)


def latencies(daemon: Daemon, staging: Path, samples: int, tag: str, gap_s: float) -> list[float]:
    """Drop `samples` files one at a time, `gap_s` after the previous one's result appeared."""
    out = []
    for i in range(samples):
        time.sleep(gap_s)
        name = f"{tag}-{i}.png"
        tmp = make_image(staging / name, 40 + i, 10)
        complete = datetime.now()
        os.rename(tmp, daemon.inbox / name)
        line = wait_until(
            lambda: next((m for m in CLAIMED.finditer(daemon.log()) if m.group(2) == name), None),
            60,
            f"{name} to be claimed",
        )
        claimed = datetime.strptime(line.group(1), "%Y-%m-%d %H:%M:%S,%f")
        out.append((claimed - complete).total_seconds())
        daemon.wait_json(name)
    return out


def run_daemon(root: Path, mode: str, args: argparse.Namespace, staging: Path, files: int) -> dict[str, str]:
    watch = {"mode": mode, "settle_s": args.settle_s, "poll_interval_s": args.poll_s, "rescan_interval_s": 300}
    daemon = Daemon(root, watch=watch, logging={"level": "info"})
    started = time.monotonic()
    daemon.start()
    ready_s = time.monotonic() - started
    try:
        assert f"Watch mode: {mode}" in daemon.log(), daemon.log()
        time.sleep(2)  # let the startup scan and the poller's first pass finish before measuring idle
        cpu = idle_cpu(daemon.proc.pid, args.idle_s)
        lat = latencies(daemon, staging, args.samples, f"{mode}{files}", gap_s=1.0)
        b2b = latencies(daemon, staging, args.samples, f"{mode}{files}b", gap_s=0.0)
    finally:
        daemon.stop()
    target = args.settle_s + (args.poll_s if mode == "polling" else 0) + 0.2
    return {
        "files": f"{files:,}",
        "mode": mode,
        "ready": f"{ready_s:.1f} s",
        "idle CPU": f"{cpu:.2f} %",
        "latency median": f"{statistics.median(lat):.2f} s",
        "latency max": f"{max(lat):.2f} s",
        "back-to-back median": f"{statistics.median(b2b):.2f} s",
        "target": f"≤ {target:.1f} s, ≤ {1 if mode == 'events' else 5} % CPU",
    }


def watchdog_polling(inbox: Path, args: argparse.Namespace, files: int) -> dict[str, str]:
    """watchdog's PollingObserver on the same tree, alone in this process."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers.polling import PollingObserver

    observer = PollingObserver(timeout=args.poll_s)
    observer.schedule(FileSystemEventHandler(), str(inbox), recursive=True)
    started = time.monotonic()
    observer.start()  # takes the first snapshot (a stat of every file) before returning
    ready_s = time.monotonic() - started
    try:
        time.sleep(args.poll_s)
        me = psutil.Process()
        before, t0 = cpu_seconds(me), time.monotonic()
        time.sleep(args.idle_s)
        cpu = 100 * (cpu_seconds(me) - before) / (time.monotonic() - t0)
    finally:
        observer.stop()
        observer.join()
    return {
        "files": f"{files:,}",
        "mode": "watchdog PollingObserver (before)",
        "ready": f"{ready_s:.1f} s",
        "idle CPU": f"{cpu:.2f} %",
        "latency median": "",
        "latency max": "",
        "back-to-back median": "",
        "target": "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="files in the watched tree, comma-separated")
    parser.add_argument("--modes", default="events,polling")
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--no-watchdog", action="store_true", help="skip the PollingObserver comparison")
    parser.add_argument("--dir", default=None, help="where to build the trees (default: a temp folder)")
    args = parser.parse_args()

    rows = []
    base = Path(tempfile.mkdtemp(prefix="watcherd-bench-", dir=args.dir))
    try:
        staging = base / "staging"
        staging.mkdir()
        for files in (int(s) for s in args.sizes.split(",")):
            root = base / f"tree{files}"
            t0 = time.monotonic()
            folders = build_tree(root / "inbox", files)
            print(f"built {files:,} files in {folders:,} folders in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            for mode in args.modes.split(","):
                rows.append(run_daemon(root, mode, args, staging, files))
                print(rows[-1], file=sys.stderr)
            if not args.no_watchdog:
                rows.append(watchdog_polling(root / "inbox", args, files))
                print(rows[-1], file=sys.stderr)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    cpu = psutil.cpu_count(logical=True)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"\nsettle_s {args.settle_s:g}, poll_interval_s {args.poll_s:g}, idle CPU over {args.idle_s:g} s "
        f"(daemon process, all threads; % of one core), {args.samples} latency samples; "
        f"{cpu} CPUs ({model}), Python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}\n"
    )
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")
    print(f"\nCommand: .venv/bin/python benchmarks/intake.py {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "benchmark"
    raise SystemExit(main())
