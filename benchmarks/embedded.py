"""The embedded engine through the daemon vs. calling it directly, on the same pages.

    .venv/bin/python benchmarks/embedded.py [--copies 5]

Direct: RapidOcrEngine.ocr() in a loop in this process (pages decoded beforehand, one warm-up
page). Daemon: the same files dropped into a running daemon's inbox at once; time from the first
claim (received_at) to the last result (finished_at), so settle time is not counted, only what
the daemon adds around the engine: claim, hand-over, decode, JSON, archive.
"""

from __future__ import annotations

import argparse
import shutil
import time

from harness import SAMPLES, BenchDaemon, iso, machine, table, wait_for

from watcherd.ocr.child.decode import Document
from watcherd.ocr.engines.rapidocr import RapidOcrEngine

NAMES = ["memo_en.png", "receipt_zh.jpg", "two_pages.tif"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=5)
    args = parser.parse_args()

    pages = []
    for _ in range(args.copies):
        for name in NAMES:
            doc = Document((SAMPLES / name).read_bytes(), max_side_px=4096, max_pages=500)
            pages.extend(page.image for page in doc)
    engine = RapidOcrEngine()
    engine.ocr(pages[0])  # warm-up, as the daemon's child is warm
    started = time.perf_counter()
    for image in pages:
        engine.ocr(image)
    direct_s = time.perf_counter() - started
    del engine

    daemon = BenchDaemon(ocr={"engine": "rapidocr"}).start()
    try:
        warm = daemon.inbox / "warmup.png"
        shutil.copy(SAMPLES / "memo_en.png", warm)
        wait_for(lambda: len(daemon.results()) == 1, 120, "warm-up result")
        for i in range(args.copies):
            for name in NAMES:
                shutil.copy(SAMPLES / name, daemon.inbox / f"{i}-{name}")
        wait_for(lambda: len(daemon.results()) == 1 + args.copies * len(NAMES), 600, "all results")
        docs = [d for d in daemon.documents() if d["source"] != "warmup.png"]
    finally:
        daemon.stop()
    daemon_pages = sum(len(d["pages"]) for d in docs)
    assert daemon_pages == len(pages) and all(d["status"] == "ok" for d in docs)
    daemon_s = max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs)
    in_engine_s = sum(p["processing_time"] for d in docs for p in d["pages"])

    rows = [
        [
            "rapidocr called directly",
            len(pages),
            f"{direct_s / len(pages):.3f}",
            f"{60 * len(pages) / direct_s:.0f}",
            "1.00",
        ],
        [
            "through the daemon",
            daemon_pages,
            f"{daemon_s / daemon_pages:.3f}",
            f"{60 * daemon_pages / daemon_s:.0f}",
            f"{direct_s / daemon_s:.2f}",
        ],
        ["  of which inside engine.ocr()", daemon_pages, f"{in_engine_s / daemon_pages:.3f}", "", ""],
    ]
    print(table(f"Embedded engine, {machine()}", ["path", "pages", "s/page", "pages/min", "speed vs direct"], rows))


if __name__ == "__main__":
    main()
