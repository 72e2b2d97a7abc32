"""The embedded default engine: RapidOCR (PP-OCR det + cls + rec on onnxruntime, CPU).

The `rapidocr` wheel carries its model files, so this works offline on a fresh machine. It reads
Traditional Chinese and English. Boxes come back one per text run; they are regrouped into lines
(same row → joined with a space, rows top to bottom) so receipts and tables stay readable.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

# onnxruntime's threads within one operator; read when the sessions start (on the first page).
THREADS_PARAM = "EngineConfig.onnxruntime.intra_op_num_threads"


class RapidOcrEngine:
    name = "rapidocr"

    def __init__(
        self, *, model: str | None = None, prompt: str | None = None, device: str | None = None, **options: Any
    ):
        from rapidocr import RapidOCR

        # `options` go to RapidOCR's params, e.g. {"Global.text_score": 0.5}.
        params = dict(options)
        threads = os.environ.get("WATCHERD_OCR_THREADS")  # ocr.workers: this child's share of the cores
        if threads:
            params.setdefault(THREADS_PARAM, int(threads))
        self._ocr = RapidOCR(params=params or None)
        self.model = model or "PP-OCR (rapidocr built-in)"

    def ocr(self, image: Image.Image) -> str:
        result: Any = self._ocr(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RapidOCR wants BGR arrays
        if result.boxes is None or result.txts is None:
            return ""
        return "\n".join(_lines(result.boxes, result.txts))


def _lines(boxes: Any, texts: tuple[str, ...]) -> list[str]:
    """Group text runs into rows: a run joins a row when its vertical centre lies inside it."""
    runs = []
    for box, text in zip(boxes, texts, strict=True):
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        runs.append((min(ys), max(ys), min(xs), text))
    runs.sort()
    rows: list[list[tuple[float, float, float, str]]] = []
    for run in runs:
        centre = (run[0] + run[1]) / 2
        if rows and rows[-1][0][0] <= centre <= rows[-1][0][1]:
            rows[-1].append(run)
        else:
            rows.append([run])
    return [" ".join(r[3] for r in sorted(row, key=lambda r: r[2])) for row in rows]
