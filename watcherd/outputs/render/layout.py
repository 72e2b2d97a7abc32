"""What the three writers share: the page record, its errors, and the page's lines as rows of
positioned words.

Writes nothing itself. `rows` turns a `RenderedPage`'s lines into `Row`s of `Token`s in page pixels,
which the PDF text layer, the hOCR and the ALTO all draw from, so the three give a word the same box.
It trusts nothing of what it is given: the text comes from an engine reading a hostile scan, so
characters XML cannot carry become U+FFFD (`clean`), boxes are clipped to the page and made at least
a pixel each way, NaN and infinite coordinates count as 0, and words that do not spell their line are
ignored in favour of the line's box shared out by character count.

Text-only pages (an engine without boxes): the text is laid out in rows over the page, so search and
copy find it; the positions are made up and say nothing about where the text is.
"""

from __future__ import annotations

import math
import re
import textwrap
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from watcherd.core.text import Line, Word, box_from_rect

DEFAULT_DPI = 300.0  # an image that does not say (or says nonsense): a common scanner setting
LAYOUT_COLUMNS = 100  # text-only pages: characters per laid-out row
LAYOUT_MAX_ROWS = 60  # ... and at most this many rows' height each (fewer rows are not taller)


@dataclass(frozen=True)
class RenderedPage:
    number: int  # 1-based
    width: int  # the coordinate space of the boxes = the original page in pixels
    height: int  #   (images: full-resolution pixels as displayed, EXIF orientation applied;
    dpi: float  #    PDF pages: rendered at `dpi` = watcherd.ocr.child.decode.PDF_DPI = 200)
    lines: tuple[Line, ...]  # may be empty (text-only engine: then lay `text` out over the page)
    text: str  # the page's full text
    source: str = "ocr"  # "pdf_text": the PDF page already has a text layer: add none to it


class RenderError(Exception):
    """The outputs cannot be written for this file (the pages do not match it, or the PDF
    libraries refuse it). The file is not the problem of the engine: report, do not retry."""


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def clean(text: str) -> str:
    """Text any XML 1.0 document and the PDF text layer can carry: control characters (except tab
    and newline) and non-characters become U+FFFD, so a character is never silently dropped."""
    return _NOT_XML.sub("\ufffd", text)


Rect = tuple[float, float, float, float]  # left, top, right, bottom, in page pixels


@dataclass(frozen=True)
class Token:
    text: str
    rect: Rect
    score: float | None


@dataclass(frozen=True)
class Row:
    """A line as the writers use it: clipped to the page, cut into whitespace-separated tokens."""

    rect: Rect
    angle: float  # degrees counter-clockwise, from the box's top edge
    score: float | None
    tokens: tuple[Token, ...]


def by_number(pages: Sequence[RenderedPage]) -> dict[int, RenderedPage]:
    """The pages by number; two with one number would give two elements one ID (and one PDF page
    two text layers)."""
    numbered = {page.number: page for page in pages}
    if len(numbered) != len(pages):
        raise RenderError(f"two RenderedPages have the same number: {sorted(p.number for p in pages)}")
    return numbered


def rows(page: RenderedPage) -> list[Row]:
    """The page's lines as rows; a page without lines gets its text laid out (see module doc)."""
    if not page.lines:
        return _layout(page)
    found = []
    for line in page.lines:
        rect = _rect(line.box, page)
        tokens = _tokens(line, rect, page)
        if tokens:
            found.append(Row(rect, _angle(line.box), line.score, tokens))
    return found


def union(rects: Iterable[Rect]) -> Rect:
    rs = list(rects)
    return (min(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs), max(r[3] for r in rs))


def pixels(rect: Rect) -> tuple[int, int, int, int]:
    """Whole pixels, rounded outwards: hOCR and ALTO give a box the same four numbers."""
    left, top, right, bottom = rect
    return math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)


def confidence_percent(score: float | None) -> int | None:
    if score is None or not math.isfinite(score):
        return None
    return round(min(max(score, 0.0), 1.0) * 100)


def _rect(box: typing.Any, page: RenderedPage) -> Rect:
    """The axis-aligned envelope of a box, clipped to the page and at least 1 px each way (an
    engine's zero-size box still carries text that search must find)."""
    left, right = _extent([p[0] for p in box], page.width)
    top, bottom = _extent([p[1] for p in box], page.height)
    return (left, top, right, bottom)


def _extent(values: list[typing.Any], limit: float) -> tuple[float, float]:
    """The span of one axis's coordinates, clipped to 0..limit and at least 1 px long."""
    clipped = [min(max(_finite(v), 0.0), limit) for v in values]
    low, high = min(clipped), max(clipped)
    if high - low < 1:
        low = min(low, limit - 1.0)
        high = low + 1.0
    return max(low, 0.0), high


def _finite(value: float) -> float:
    """A coordinate as a float; NaN or infinity (a buggy engine's box) becomes 0, then clipped."""
    number = float(value)
    return number if math.isfinite(number) else 0.0


def _angle(box: typing.Any) -> float:
    (x0, y0), (x1, y1) = ((_finite(x), _finite(y)) for x, y in box[:2])
    if x0 == x1 and y0 == y1:
        return 0.0
    angle = -math.degrees(math.atan2(y1 - y0, x1 - x0))
    return angle if abs(angle) >= 1.0 else 0.0  # scanner skew below a degree: the box says enough


def _tokens(line: Line, rect: Rect, page: RenderedPage) -> tuple[Token, ...]:
    """The line's text cut at whitespace. When the engine's words (or CJK characters) spell the
    same text, each token gets the union of its words' boxes; otherwise the line's box is shared
    out by character count."""
    parts = clean(line.text).split()
    if not parts:
        return ()
    words = [w for w in line.words if w.text.strip()]
    spans = _word_spans(parts, words)
    if spans is not None:
        tokens = []
        for part, span in zip(parts, spans, strict=True):
            scores = [w.score for w in span if w.score is not None]
            rect_of_span = union(_rect(w.box, page) for w in span)
            tokens.append(Token(part, rect_of_span, min(scores) if scores else line.score))
        return tuple(tokens)
    left, top, right, bottom = rect
    total = sum(len(p) for p in parts) + len(parts) - 1  # a space between tokens counts one
    per_char = (right - left) / total
    tokens, x = [], left
    for part in parts:
        end = x + per_char * len(part)
        tokens.append(Token(part, (x, top, max(end, x + 1.0), bottom), line.score))
        x = end + per_char
    return tuple(tokens)


def _word_spans(parts: list[str], words: list[Word]) -> list[list[Word]] | None:
    """Group the engine's words into the line's tokens, or None when they do not spell them."""
    if not words:
        return None
    spans: list[list[Word]] = []
    index = 0
    for part in parts:
        span: list[Word] = []
        spelled = ""
        while index < len(words) and len(spelled) < len(part):
            word_text = "".join(clean(words[index].text).split())
            spelled += word_text
            span.append(words[index])
            index += 1
        if spelled != part:
            return None
        spans.append(span)
    return spans if index == len(words) else None


def _layout(page: RenderedPage) -> list[Row]:
    """Text without positions, laid out in rows from the top of the page, so that a searchable PDF
    finds it (and hOCR/ALTO carry it). Long lines (a markdown paragraph is one) are wrapped, so a
    row's text is never squeezed beyond what viewers can select."""
    texts: list[str] = []
    for raw in clean(page.text).splitlines():
        texts.extend(textwrap.wrap(raw, LAYOUT_COLUMNS, break_long_words=True, break_on_hyphens=False))
    if not texts or page.width < 2 or page.height < 2:
        return []
    margin = page.width * 0.05
    row_height = page.height * 0.9 / max(len(texts), LAYOUT_MAX_ROWS)
    laid_out = []
    for index, text in enumerate(texts):
        top = page.height * 0.05 + index * row_height
        width = (page.width - 2 * margin) * min(1.0, len(text) / LAYOUT_COLUMNS * 1.6)
        box = box_from_rect(margin, top, margin + max(width, 1.0), top + row_height)
        line = Line(text=text, box=box, score=None)
        rect = _rect(box, page)
        laid_out.append(Row(rect, 0.0, None, _tokens(line, rect, page)))
    return laid_out
