"""The embedded engine on full office pages, by `ocr.options.line_orientation`.

    .venv/bin/python benchmarks/fullpage.py [--pages 4]

Pages: tests/pagegen.py's dense A4 pages (40 lines of 10-point English at 300 dpi), and the same
pages with two lines printed upside down. RapidOcrEngine.ocr() called in this process, one
warm-up page per mode; CER with spaces removed, as the tests count it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness import REPO, machine, table

sys.path.insert(0, str(REPO))
from tests.conftest import cer  # noqa: E402
from tests.pagegen import dense_page, turn_lines  # noqa: E402
from watcherd.ocr.engines.rapidocr import RapidOcrEngine  # noqa: E402

MODES = ("on", "off", "check")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=4)
    args = parser.parse_args()
    pages = [dense_page(seed) for seed in range(args.pages)]
    kinds = {
        "dense A4, upright": pages,
        "dense A4, 2 lines upside down": [(turn_lines(page, 40, (9, 26)), truth) for page, truth in pages],
    }
    rows = []
    for mode in MODES:
        engine = RapidOcrEngine(line_orientation=mode)
        engine.ocr(pages[0][0])
        for kind, items in kinds.items():
            errors, seconds = [], []
            for page, truth in items:
                started = time.perf_counter()
                text = engine.ocr(page).text
                seconds.append(time.perf_counter() - started)
                errors.append(cer(truth, text))
            rows.append(
                [
                    mode,
                    kind,
                    len(items),
                    f"{statistics.mean(errors):.4f}",
                    f"{max(errors):.4f}",
                    f"{statistics.mean(seconds):.2f}",
                    f"{60 / statistics.mean(seconds):.1f}",
                ]
            )
    print(
        table(
            f"line_orientation on full pages ({machine()})",
            ["line_orientation", "pages", "n", "CER mean", "CER max", "s/page", "pages/min"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
