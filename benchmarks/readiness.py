"""Worst-case cost of the parent's readiness check (`sniff.looks_complete`) on crafted files.

    .venv/bin/python benchmarks/readiness.py [--runs 20] [--before REV]

The corpus (tests/crafted.py) holds the files that taught the budget (a 104-byte BigTIFF claiming
2^44 entries, 600 chained IFDs of 65,535 entries), structures at each cap, truncated and random
files, and 500 MB sparse files. Each file is checked `--runs` times; the table shows the worst
time. `--before REV` also times sniff.py as it was at git revision REV, each file in its own
process with a 60 s limit (the old walker raised MemoryError or took seconds).
Targets: <= 50 ms for any file up to 1 MB, and a small fraction of WatchdogSec (60 s) for any file.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import crafted  # noqa: E402
from watcherd.core import sniff  # noqa: E402

OLD_RUNNER = """
import sys, time, types
module = types.ModuleType("old_formats")
exec(compile(sys.stdin.read(), "old_formats.py", "exec"), module.__dict__)
started = time.perf_counter()
try:
    module.looks_complete(sys.argv[1])
    outcome = "returned"
except BaseException as exc:
    outcome = type(exc).__name__
print(f"{(time.perf_counter() - started) * 1000:.1f} ms ({outcome})")
"""


def outcome_of(path: Path) -> str:
    try:
        return "complete" if sniff._looks_complete(path) else "incomplete"
    except sniff.OverBudget:
        return "over budget: handed to the child"
    except Exception as exc:  # noqa: BLE001 - what looks_complete turns into "complete"
        return f"{type(exc).__name__}: handed to the child"


def before(rev: str, path: Path) -> str:
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:watcherd/formats.py"], capture_output=True, text=True, check=True
    ).stdout
    try:
        result = subprocess.run(
            [sys.executable, "-c", OLD_RUNNER, str(path)], input=source, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return "> 60 s"
    return result.stdout.strip() or result.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also time formats.py (its name before watcherd/core/sniff.py) as of this git revision",
    )
    args = parser.parse_args()
    header = ["file", "size", "outcome", "worst", "median"] + (["before"] if args.before else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    worst_small = worst_any = 0.0
    with tempfile.TemporaryDirectory(prefix="watcherd-readiness-") as tmp:
        for name in crafted.names():
            path = crafted.write(Path(tmp), name)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                sniff.looks_complete(path)
                times.append(time.perf_counter() - started)
            size = path.stat().st_size
            worst = max(times)
            worst_any = max(worst_any, worst)
            if size <= 1 << 20:
                worst_small = max(worst_small, worst)
            shown = f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size:,} B"
            row = [name, shown, outcome_of(path), f"{worst * 1000:.2f} ms", f"{statistics.median(times) * 1000:.2f} ms"]
            if args.before:
                row.append(before(args.before, path))
            print("| " + " | ".join(row) + " |", flush=True)
    print()
    print(f"worst, files up to 1 MB: {worst_small * 1000:.2f} ms (target <= 50 ms)")
    print(f"worst, any file: {worst_any * 1000:.2f} ms (WatchdogSec is 60 s)")


if __name__ == "__main__":
    main()
