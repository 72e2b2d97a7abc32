"""`ocr.workers`: how many OCR children share a CPU host, and how many threads each one gets.

On a GPU host there is one child per device (`ocr.devices`). On the CPU, one embedded-engine child
runs one page at a time and its libraries' thread pools do not scale to many cores, so several
children, each pinned to its share of the cores, OCR several files at once. Oversubscription is
what to avoid: N children each starting as many threads as there are cores fight over the caches
and the scheduler, so each child's intra-op thread count is set to cores // N.
"""

from __future__ import annotations

import os

# `auto`: one child per this many cores. Measured with benchmarks/throughput.py (docs/cpu-workers.md,
# "CPU workers"): on the 2-core build machine two single-threaded children beat one child with two
# threads, because PP-OCR's small det/rec models parallelise poorly inside one page.
AUTO_CORES_PER_WORKER = 1
AUTO_MAX_WORKERS = 32


def cores() -> int:
    """The cores this process may run on (a cgroup or taskset limit counts, os.cpu_count does not)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan(workers: object, available: int | None = None) -> tuple[int, int | None]:
    """(children, intra-op threads each) for `ocr.workers` on a CPU host. One child keeps the
    libraries' own default (None): that is how watcherd always ran."""
    available = available or cores()
    if workers == "auto":
        count = max(1, min(AUTO_MAX_WORKERS, available // AUTO_CORES_PER_WORKER))
    else:
        assert isinstance(workers, int), workers  # settings.py let only "auto" or an int >= 1 through
        count = workers
    if count == 1:
        return 1, None
    return count, max(1, available // count)
