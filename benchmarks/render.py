"""What the searchable PDF, hOCR and ALTO cost per page, next to the page's OCR time.

    cd benchmarks && PYTHONPATH=.. ../.venv/bin/python render.py [--repeat 5]

In this process, as the child will do it: each sample decoded (`pages.Document`), OCR'd by RapidOCR
with word boxes (what the embedded engine runs once it returns positions), then timed separately:
the JSON (json.dumps of the page with its lines), the PDF (`render.write_pdf`), hOCR + ALTO. Each
step runs `--repeat` times after one warm-up; the median is reported. The first-use cost (the
first PDF loads OCRmyPDF's renderer, fpdf2, pikepdf and the fonts; the second does not) is
measured in a fresh process, with its memory, because each child pays it once. Inputs: the shared samples and a two-page image-only PDF made from them.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
from harness import REPO, SAMPLES, machine, table
from PIL import Image

from watcherd.core.text import Line, Word, box_from_points
from watcherd.ocr.child.decode import PDF_DPI, Document
from watcherd.outputs import render

NAMES = ["memo_en.png", "receipt_zh.jpg", "two_pages.tif", "two_pages.pdf"]

FIRST_USE = """
import io, resource, time
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
from watcherd.outputs import render
from watcherd.core.text import Line, box_from_rect
t1 = time.perf_counter()
page = render.RenderedPage(1, 1000, 700, 300.0, (Line("First use", box_from_rect(50, 50, 400, 90), 0.9),), "First use")
data = open(%r, "rb").read()
render.write_pdf(io.BytesIO(), data=data, kind="png", pages=[page])
t2 = time.perf_counter()
render.write_pdf(io.BytesIO(), data=data, kind="png", pages=[page])
t3 = time.perf_counter()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(t1 - t0, t2 - t1, t3 - t2, before / 1024, after / 1024)
"""


def two_page_pdf() -> bytes:
    images = [Image.open(SAMPLES / name).convert("RGB") for name in ("memo_en.png", "receipt_zh.jpg")]
    out = io.BytesIO()
    images[0].save(out, "PDF", save_all=True, append_images=images[1:], resolution=150.0)
    return out.getvalue()


def median_s(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    imports_s, first_pdf_s, second_pdf_s, rss_before, rss_after = (
        float(v)
        for v in subprocess.run(
            [sys.executable, "-c", FIRST_USE % str(SAMPLES / "memo_en.png")],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )

    from rapidocr import RapidOCR

    engine = RapidOCR()
    rows = []
    totals = {"ocr": 0.0, "json": 0.0, "pdf": 0.0, "xml": 0.0, "pages": 0}
    for name in NAMES:
        data = two_page_pdf() if name.endswith(".pdf") else (SAMPLES / name).read_bytes()
        doc = Document(data, max_side_px=4096, max_pages=500)
        frames = None if doc.kind == "pdf" else Image.open(io.BytesIO(data))
        pages: list[render.RenderedPage] = []
        ocr_s = 0.0
        for page in doc:
            array = np.asarray(page.image.convert("RGB"))[:, :, ::-1]

            def ocr(array: Any = array) -> Any:
                return engine(array, return_word_box=True)

            ocr_s += median_s(ocr, args.repeat)
            result = ocr()
            lines = tuple(
                Line(t, box_from_points(b), float(s), tuple(Word(w[0], box_from_points(w[2]), float(w[1])) for w in ws))
                for b, t, s, ws in zip(result.boxes, result.txts, result.scores, result.word_results, strict=True)
            )
            if frames is not None:
                frames.seek(page.number - 1)
            dpi = render.image_dpi(frames) if frames is not None else PDF_DPI
            text = "\n".join(line.text for line in lines)
            pages.append(render.RenderedPage(page.number, page.image.width, page.image.height, dpi, lines, text))
        kind = doc.kind or ""

        def to_json() -> bytes:
            return json.dumps({"pages": [asdict(p) for p in pages]}, ensure_ascii=False).encode()

        def to_pdf() -> int:
            out = io.BytesIO()
            render.write_pdf(out, data=data, kind=kind, pages=pages)
            return len(out.getvalue())

        def to_xml() -> None:
            render.hocr(pages, title=name)
            render.alto(pages, filename=name)

        n = len(pages)
        json_s, pdf_s, xml_s = (median_s(fn, args.repeat) for fn in (to_json, to_pdf, to_xml))
        pdf_size = to_pdf()
        rows.append(
            [
                name,
                n,
                f"{ocr_s / n:.3f}",
                f"{json_s / n * 1000:.2f} ms",
                f"{pdf_s / n:.3f} ({pdf_s / ocr_s:.0%})",
                f"{xml_s / n * 1000:.1f} ms ({xml_s / ocr_s:.1%})",
                f"{len(data) // 1024} KiB → {pdf_size // 1024} KiB",
            ]
        )
        for key, value in (("ocr", ocr_s), ("json", json_s), ("pdf", pdf_s), ("xml", xml_s)):
            totals[key] += value
        totals["pages"] += n
    n = int(totals["pages"])
    rows.append(
        [
            "**all**",
            n,
            f"{totals['ocr'] / n:.3f}",
            f"{totals['json'] / n * 1000:.2f} ms",
            f"{totals['pdf'] / n:.3f} ({totals['pdf'] / totals['ocr']:.0%})",
            f"{totals['xml'] / n * 1000:.1f} ms ({totals['xml'] / totals['ocr']:.1%})",
            "",
        ]
    )
    header = ["input", "pages", "OCR s/page", "+ JSON /page", "+ PDF s/page (% of OCR)", "+ hOCR + ALTO /page", "size"]
    print(table(f"Outputs per page, median of {args.repeat} ({machine()})", header, rows))
    print()
    print(
        table(
            "First use in a fresh process (the child pays it once)",
            ["import watcherd.outputs.render", "first PDF", "second PDF", "peak RSS"],
            [
                [
                    f"{imports_s:.2f} s",
                    f"{first_pdf_s:.2f} s",
                    f"{second_pdf_s:.2f} s",
                    f"{rss_before:.0f} MiB → {rss_after:.0f} MiB",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
