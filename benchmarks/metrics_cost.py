"""What metrics and retention cost: the loop's snapshot, a scrape, a retention sweep.

    .venv/bin/python benchmarks/metrics_cost.py [--queued 10000 100000] [--files 20000]

- snapshot: `Status.snapshot` (run on the main loop about once a second) with N files ready,
  N still settling and N/10 claimed, in ms per call (the median of 20);
- scrape: rendering the whole registry (what /metrics and each textfile write do) after 10,000
  finished files, in ms;
- sweep: `Retention.sweep` over a tree of F files in F/100 folders, half of them older than the
  limit, on its own thread in the daemon: seconds and files looked at per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from harness import REPO, machine, table

sys.path.insert(0, str(REPO))

from prometheus_client import generate_latest  # noqa: E402

from watcherd.core import config_file
from watcherd.core import settings as settings_mod  # noqa: E402
from watcherd.core.naming import now_iso  # noqa: E402
from watcherd.core.records import Job  # noqa: E402
from watcherd.daemon.status import Status  # noqa: E402
from watcherd.intake.readiness import StabilityTracker  # noqa: E402
from watcherd.ops.metrics import Metrics  # noqa: E402
from watcherd.ops.retention import DAY_S, Retention  # noqa: E402
from watcherd.work.backlog import Backlog  # noqa: E402


def snapshot_ms(n: int) -> float:
    st = os.stat(__file__)
    tracker = StabilityTracker(2.0, lstat=lambda p: st, complete=lambda p: True, busy=lambda p: False)
    backlog = Backlog()
    for i in range(n):
        tracker.track(Path(f"/inbox/settling/{i}.png"))
        backlog.add_ready(Path(f"/inbox/ready/{i}.png"), (0, i, i))
    backlog.add_claimed(Job(rel=f"c/{i}.png", path=Path(f"/w/{i}"), received_at=now_iso()) for i in range(n // 10))
    fake = types.SimpleNamespace(
        clock=time.monotonic,
        backlog=backlog,
        arrivals=types.SimpleNamespace(tracker=tracker),
        pool=types.SimpleNamespace(all=list, remote_workers=dict),
        publisher=types.SimpleNamespace(held=[]),
        handoff=types.SimpleNamespace(hooks=None, webhook=None),
        settler=types.SimpleNamespace(gpu_by_device={}),
        ready=True,
    )
    times = []
    for _ in range(20):
        start = time.perf_counter()
        Status.snapshot(fake)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def scrape_ms() -> float:
    metrics = Metrics(settings_mod.MetricsSettings())
    for i in range(10000):
        ok = i % 10 != 0
        document = (
            {"status": "ok", "pages": [{"processing_time": 0.5}, {"processing_time": 1.5}], "finished_at": now_iso()}
            if ok
            else {"status": "failed", "error_code": "timeout"}
        )
        metrics.finished(document)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        generate_latest(metrics.registry)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def sweep(files: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="watcherd-bench-") as tmp:
        root = Path(tmp)
        archive = root / "archive"
        old = time.time() - 40 * DAY_S
        for i in range(files):
            folder = archive / f"d{i // 100:04}"
            if i % 100 == 0:
                folder.mkdir(parents=True)
            path = folder / f"{i}.png"
            path.write_bytes(b"x")
            if i % 2:
                os.utime(path, (old, old))
        s = config_file.from_dict(
            {
                "paths": {k: str(root / k) for k in ("inbox", "outbox", "failed", "archive", "state")},
                "retention": {"archive_days": 30, "age_from": "mtime"},
            },
            env={},
        )
        retention = Retention(s)
        start = time.perf_counter()
        result = retention.sweep()
        return time.perf_counter() - start, len(result.removed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--files", type=int, default=20000)
    args = parser.parse_args()
    import logging

    logging.getLogger("watcherd").setLevel(logging.WARNING)  # one "removed" line per file otherwise
    rows = [
        [f"snapshot, {n:,} ready + {n:,} settling + {n // 10:,} claimed", f"{snapshot_ms(n):.1f} ms"]
        for n in args.queued
    ]
    rows.append(["scrape (render the registry) after 10,000 files", f"{scrape_ms():.2f} ms"])
    seconds, removed = sweep(args.files)
    rows.append(
        [
            f"retention sweep, {args.files:,} files in {args.files // 100} folders, {removed:,} removed",
            f"{seconds:.2f} s ({args.files / seconds:,.0f} files/s)",
        ]
    )
    print(table(f"Metrics and retention cost ({machine()})", ["what", "cost"], rows))


if __name__ == "__main__":
    main()
