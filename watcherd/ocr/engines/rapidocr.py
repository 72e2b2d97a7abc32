"""The embedded default engine: RapidOCR (PP-OCR det + cls + rec on onnxruntime, CPU).

The `rapidocr` wheel carries its model files, so this works offline on a fresh machine. It reads
Traditional Chinese and English. Boxes come back one per text run; they are regrouped into lines
(same row → joined with a space, rows top to bottom) so receipts and tables stay readable.

The page comes back as a PageText: one Line per text run, in that reading order, with its
detection box and recognition score, and its words from `return_word_box` (a box per word for
Latin and digits, per character for Chinese). Its `text` is the regrouped rows.

Text lines are read as they stand on the page (`line_orientation`). RapidOCR's own per-line
classifier turns every second or third line of a dense upright page upside down before reading it
(a quarter of an A4 page's text lost), and the daemon already turns the whole page upright
(`ocr.auto_rotate`). So by default (`check`) a line is read upright, and read again at 180° only
where its upright reading scores low; the reading with the higher recognition score wins.
`off` never reads a line at 180°; `on` is RapidOCR's classifier as it is.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from watcherd.core.text import Box, Line, PageText, Word, box_from_points
from watcherd.ocr.engines import EngineConfigError

# onnxruntime's threads within one operator; read when the sessions start (on the first page).
THREADS_PARAM = "EngineConfig.onnxruntime.intra_op_num_threads"
LINE_ORIENTATIONS = ("off", "check", "on")
# An upright line of print reads at 0.98 or more; one upside down at 0.7-0.8 (measured on
# generated A4 pages, benchmarks/fullpage.py).
RECHECK_BELOW = 0.9


class RapidOcrEngine:
    name = "rapidocr"

    def __init__(
        self,
        *,
        model: str | None = None,
        prompt: str | None = None,
        device: str | None = None,
        line_orientation: str = "check",
        **options: Any,
    ):
        from rapidocr import RapidOCR

        if line_orientation not in LINE_ORIENTATIONS:
            raise EngineConfigError(
                f"ocr.options.line_orientation: {line_orientation!r} is not one of {', '.join(LINE_ORIENTATIONS)}"
            )
        self.line_orientation = line_orientation
        # The other `options` go to RapidOCR's params, e.g. {"Global.text_score": 0.5}.
        params = dict(options)
        threads = os.environ.get("WATCHERD_OCR_THREADS")  # ocr.workers: this child's share of the cores
        if threads:
            params.setdefault(THREADS_PARAM, int(threads))
        self._ocr = RapidOCR(params=params or None)
        self.model = model or "PP-OCR (rapidocr built-in)"

    def ocr(self, image: Image.Image) -> PageText:
        # Word boxes cost a few ms a page: they come from the recogniser's CTC steps, no second pass.
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        result: Any = self._ocr(bgr, use_cls=self.line_orientation == "on", return_word_box=True)
        if result.boxes is None or result.txts is None:
            return PageText(lines=(), text="")
        texts = list(result.txts)
        scores = [float(s) for s in result.scores]
        words = _words_per_run(tuple(texts), result.word_results, image.size)
        if self.line_orientation == "check":
            for i, (text, score) in self._upside_down(bgr, result.boxes, scores).items():
                texts[i], scores[i], words[i] = text, score, ()  # word boxes were read the other way up
        rows = _rows(result.boxes)
        lines = tuple(
            Line(
                text=texts[i],
                box=_clip(box_from_points(result.boxes[i]), image.size),
                score=scores[i],
                words=words[i],
            )
            for row in rows
            for i in row
        )
        return PageText(lines=lines, text="\n".join(" ".join(texts[i] for i in row) for row in rows))

    def _upside_down(self, bgr: Any, boxes: Any, scores: list[float]) -> dict[int, tuple[str, float]]:
        """The lines that read better at 180°: index → (text, score). Only lines whose upright
        reading scores below `RECHECK_BELOW` are read again, so a clean page costs nothing more.
        RapidOCR's classifier is not asked: it squeezes a line into 192×48 pixels, and on a long
        line its answer is a coin toss, both ways. This uses RapidOCR's recogniser object
        (`_load_rec_model`), which is why rapidocr is pinned exactly."""
        from rapidocr.ch_ppocr_rec.typings import TextRecInput
        from rapidocr.utils.process_img import get_rotate_crop_image

        doubtful = [i for i, score in enumerate(scores) if score < RECHECK_BELOW]
        if not doubtful:
            return {}
        turned = [np.rot90(get_rotate_crop_image(bgr, np.array(boxes[i], dtype=np.float32)), 2) for i in doubtful]
        again: Any = self._ocr._load_rec_model()(TextRecInput(img=[np.ascontiguousarray(c) for c in turned]))
        return {
            i: (text, float(score))
            for i, text, score in zip(doubtful, again.txts, again.scores, strict=True)
            if text.strip() and float(score) > scores[i]
        }


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
