"""What `dedupe: skip` costs and saves: files/s with it off and on, copies/s, hashing speed.

    cd benchmarks && ../.venv/bin/python dedupe.py [--files 200] [--hash-mb 256] [--rounds 3]

- distinct files: N different images through the daemon with an engine that returns at once
  (tests.engines:Echo), dedupe off, then skip (every file hashed on the dedupe thread, looked up,
  and its result inserted with an fsync): files/s from the first claim to the last result, best
  of --rounds runs each, off and skip alternating;
- copies: N copies of one image already OCR'd, dedupe skip: each becomes a duplicate JSON with no
  OCR; copies/s, and how often the engine ran;
- hashing: `watcherd.work.dedupe`'s hash of a file of --hash-mb MB (page cache warm), in MB/s: the time
  a big file waits on the dedupe thread before it goes to a child.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, BenchDaemon, iso, machine, table, wait_for
from PIL import Image

sys.path.insert(0, str(REPO))
from watcherd.work import dedupe  # noqa: E402


def drop_distinct(daemon: BenchDaemon, n: int) -> None:
    staging = daemon.inbox.parent / "staging"
    staging.mkdir()
    for i in range(n):
        Image.new("RGB", (20 + i, 10), "white").save(staging / f"d{i:05}.png")
    for i in range(n):
        (staging / f"d{i:05}.png").rename(daemon.inbox / f"d{i:05}.png")


def distinct(n: int, mode: str) -> float:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo"}, dedupe={"mode": mode}).start()
    try:
        drop_distinct(daemon, n)
        wait_for(lambda: len(daemon.results()) == n, 600, f"{n} results")
        docs = daemon.documents()
    finally:
        daemon.stop()
    assert all(d["status"] == "ok" for d in docs)
    return n / (max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs))


def copies(n: int) -> tuple[float, int]:
    calls = Path(tempfile.mkdtemp(prefix="watcherd-bench-calls-")) / "calls.txt"
    daemon = BenchDaemon(
        ocr={"engine": "tests.engines:Counting", "options": {"calls_file": str(calls)}}, dedupe={"mode": "skip"}
    ).start()
    try:
        source = daemon.inbox.parent / "one.png"
        Image.new("RGB", (64, 48), "white").save(source)
        data = source.read_bytes()
        (daemon.inbox / "first.png").write_bytes(data)
        wait_for(lambda: len(daemon.results()) == 1, 60, "the first result")
        staging = daemon.inbox.parent / "staging"
        staging.mkdir()
        for i in range(n):
            (staging / f"c{i:05}.png").write_bytes(data)
        for i in range(n):
            (staging / f"c{i:05}.png").rename(daemon.inbox / f"c{i:05}.png")
        wait_for(lambda: len(daemon.results()) == n + 1, 600, f"{n} duplicates")
        docs = [d for d in daemon.documents() if d["status"] == "duplicate"]
    finally:
        daemon.stop()
    assert len(docs) == n
    rate = n / (max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs))
    return rate, len(calls.read_text().splitlines())


def hashing(megabytes: int) -> float:
    with tempfile.NamedTemporaryFile(prefix="watcherd-bench-hash-") as f:
        f.write(os.urandom(1 << 20) * megabytes)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        dedupe._hash(os.open(f.name, os.O_RDONLY), 1 << 40)  # warm the page cache
        started = time.perf_counter()
        dedupe._hash(fd, 1 << 40)
        return megabytes / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--hash-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Off and skip alternate, best of --rounds each: on a shared machine the noise is one-sided.
    offs, skips = [], []
    for _ in range(args.rounds):
        offs.append(distinct(args.files, "off"))
        skips.append(distinct(args.files, "skip"))
    off, skip = max(offs), max(skips)
    rate, engine_calls = copies(args.files)
    mb_s = hashing(args.hash_mb)
    rows = [
        [f"{args.files} distinct files, instant engine", "off", f"{off:.0f} files/s", ""],
        [f"{args.files} distinct files, instant engine", "skip", f"{skip:.0f} files/s", f"{skip / off:.2f} of off"],
        [f"{args.files} copies of a file already OCR'd", "skip", f"{rate:.0f} files/s", f"engine ran {engine_calls}×"],
        [f"hashing a {args.hash_mb} MB file (dedupe thread)", "skip", f"{mb_s:.0f} MB/s", ""],
    ]
    print(table(f"dedupe ({machine()})", ["measure", "dedupe", "result", "note"], rows))


if __name__ == "__main__":
    main()
