"""The embedded default engine: RapidOCR (PP-OCR det + cls + rec on onnxruntime, CPU).

The `rapidocr` wheel carries its model files, so this works offline on a fresh machine. It reads
Traditional Chinese and English. Boxes come back one per text run; they are regrouped into lines
(same row → joined with a space, rows top to bottom) so receipts and tables stay readable.

The page comes back as a PageText: one Line per text run, in that reading order, with its
detection box and recognition score, and its words from `return_word_box` (a box per word for
Latin and digits, per character for Chinese). Its `text` is the regrouped rows, exactly as before
positions existed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from . import Box, Line, PageText, Word, box_from_points

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

    def ocr(self, image: Image.Image) -> PageText:
        # Word boxes cost a few ms a page: they come from the recogniser's CTC steps, no second pass.
        result: Any = self._ocr(np.asarray(image.convert("RGB"))[:, :, ::-1], return_word_box=True)  # BGR
        if result.boxes is None or result.txts is None:
            return PageText(lines=(), text="")
        texts = tuple(result.txts)
        rows = _rows(result.boxes)
        words = _words_per_run(texts, result.word_results, image.size)
        lines = tuple(
            Line(
                text=texts[i],
                box=_clip(box_from_points(result.boxes[i]), image.size),
                score=float(result.scores[i]),
                words=words[i],
            )
            for row in rows
            for i in row
        )
        return PageText(lines=lines, text="\n".join(" ".join(texts[i] for i in row) for row in rows))


def _rows(boxes: Any) -> list[list[int]]:
    """Group text runs (indices into `boxes`) into rows: a run joins a row when its vertical centre
    lies inside the row's first run. Rows top to bottom, runs left to right."""
    runs = []
    for index, box in enumerate(boxes):
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        runs.append((min(ys), max(ys), min(xs), index))
    runs.sort()
    rows: list[list[tuple[float, float, float, int]]] = []
    for run in runs:
        centre = (run[0] + run[1]) / 2
        if rows and rows[-1][0][0] <= centre <= rows[-1][0][1]:
            rows[-1].append(run)
        else:
            rows.append([run])
    return [[r[3] for r in sorted(row, key=lambda r: r[2])] for row in rows]


def _words_per_run(texts: tuple[str, ...], word_results: Any, size: tuple[int, int]) -> list[tuple[Word, ...]]:
    """Each run's words. RapidOCR drops the runs it found no word boxes for from `word_results`
    (so the two lists can differ in length): a group belongs to a run when its words spell the
    run's text (spaces aside); a run without such a group gets no words."""
    groups = [g for g in (word_results or ()) if g and all(len(w) == 3 and w[2] is not None for w in g)]
    out: list[tuple[Word, ...]] = []
    cursor = 0
    for text in texts:
        words: tuple[Word, ...] = ()
        if cursor < len(groups) and _spelling("".join(w[0] for w in groups[cursor])) == _spelling(text):
            words = tuple(
                Word(text=str(w[0]), box=_clip(box_from_points(w[2]), size), score=float(w[1])) for w in groups[cursor]
            )
            cursor += 1
        out.append(words)
    return out


def _spelling(text: str) -> str:
    return "".join(text.split())


def _clip(box: Box, size: tuple[int, int]) -> Box:
    """Detection boxes are padded (unclip) and may reach a pixel or two past the image's edges."""
    width, height = size
    return box_from_points([(min(max(x, 0.0), width), min(max(y, 0.0), height)) for x, y in box])
