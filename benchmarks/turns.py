"""Head-of-line: how long a one-page scan waits while a 100-page file is being read, with the long
file read whole (`ocr.turn_pages: 0`, as before turns) and in turns of 16 and 4 pages.

An engine that takes 100 ms a page (`tests.engines:Echo` with `delay_s`), so the numbers are the
scheduling, not the OCR. Prints a markdown table.

    .venv/bin/python benchmarks/turns.py
"""

from __future__ import annotations

import json
import time

from harness import BenchDaemon, wait_for
from PIL import Image

PAGES = 100
DELAY_S = 0.1


def tiff(path, widths: list[int]) -> None:  # type: ignore[no-untyped-def]
    frames = [Image.new("RGB", (w, 10), "white") for w in widths]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def run(turn_pages: int) -> tuple[float, float]:
    daemon = BenchDaemon(
        {
            "engine": "tests.engines:Echo",
            "turn_pages": turn_pages,
            "auto_rotate": False,
            "options": {"delay_s": DELAY_S},
        }
    ).start()
    try:
        tiff(daemon.inbox / "long.tif", [100 + i % 50 for i in range(PAGES)])
        wait_for(lambda: "long.tif: OCR started" in daemon.log.read_text(errors="replace"), 30, "long file claimed")
        time.sleep(1.0)  # the long file is well into its pages when the short one arrives
        dropped = time.monotonic()
        tiff(daemon.inbox / "short.tif", [7])
        short = daemon.outbox / "short.tif.json"
        wait_for(short.exists, 120, "short result")
        waited = time.monotonic() - dropped
        long = daemon.outbox / "long.tif.json"
        wait_for(long.exists, 120, "long result")
        total = json.loads(long.read_bytes())["processing_time"]
        return waited, total
    finally:
        daemon.stop()


def main() -> None:
    print(
        f"| `ocr.turn_pages` | one-page scan dropped 1 s into a {PAGES}-page file: waited (s) | the long file's processing_time (s) |"
    )
    print("|---|---|---|")
    for turn in (0, 16, 4):
        waited, total = run(turn)
        label = "0 (whole file, as before)" if turn == 0 else str(turn)
        print(f"| {label} | {waited:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
