"""The text layer a PDF page already carries, as a PageText, without rendering the page.

Runs in the child only (`Document.text_layer`), like all PDF parsing: the file is hostile until
proven otherwise. pdfium does the reading; the work here is one pass over the page's characters,
capped at MAX_TEXT_CHARS, and every pdfium error becomes an InputError.
"""

from __future__ import annotations

import ctypes
import math
import unicodedata
from typing import Any

from watcherd.core.records import InputError
from watcherd.core.text import Box, Line, PageText, box_from_rect

MAX_TEXT_CHARS = 100_000  # a dense A4 page holds ~6,000; more is a crafted file, not a document
SUBPIXEL = 8  # pdfium maps to whole device pixels: map onto a grid 8x finer, then divide
_BREAKS = {"\r", "\n"}  # pdfium's own line breaks between the lines it found


def read_text_layer(pdf: Any, index: int, dpi: int) -> PageText | None:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        page = pdf[index]
        textpage = page.get_textpage()
        count = textpage.count_chars()
        if count <= 0:
            return None
        if count > MAX_TEXT_CHARS:
            detail = f"PDF page {index + 1} has {count} characters of text, more than {MAX_TEXT_CHARS}"
            raise InputError("too_large", detail)
        width_pt, height_pt = page.get_size()  # as displayed: /Rotate swaps them
        scale = dpi / 72
        # The grid page.render(scale=...) draws on: it rounds the page's size up.
        grid = (math.ceil(width_pt * scale) * SUBPIXEL, math.ceil(height_pt * scale) * SUBPIXEL)
        x, y = ctypes.c_int(), ctypes.c_int()

        def to_pixels(page_x: float, page_y: float) -> tuple[float, float]:
            pdfium_c.FPDF_PageToDevice(page, 0, 0, *grid, 0, page_x, page_y, ctypes.byref(x), ctypes.byref(y))
            return x.value / SUBPIXEL, y.value / SUBPIXEL

        found: list[tuple[str, Box | None]] = []
        chars: list[str] = []
        corners: list[tuple[float, float]] = []
        for i in range(count + 1):
            char = _char(pdfium_c.FPDFText_GetUnicode(textpage, i)) if i < count else "\n"
            if char in _BREAKS:
                _end_line(found, chars, corners)
                continue
            chars.append(char)
            if char.strip():
                left, bottom, right, top = textpage.get_charbox(i, loose=True)
                if right > left and top > bottom:
                    corners += [to_pixels(left, top), to_pixels(right, bottom)]
        textpage.close()
        page.close()
    except pdfium.PdfiumError as exc:
        raise InputError("unreadable", f"PDF page {index + 1}: text layer cannot be read: {exc}") from None
    if not found:
        return None
    # A line whose characters all lack a box (a crafted font) still counts for the text.
    lines = tuple(Line(text=text, box=box) for text, box in found if box is not None)
    return PageText(lines=lines, text="\n".join(text for text, _ in found))


def _end_line(found: list[tuple[str, Box | None]], chars: list[str], corners: list[tuple[float, float]]) -> None:
    text = "".join(chars).strip()
    if text:
        box = None
        if corners:
            xs = [p[0] for p in corners]
            ys = [p[1] for p in corners]
            box = box_from_rect(min(xs), min(ys), max(xs), max(ys))
        found.append((text, box))
    chars.clear()
    corners.clear()


def _char(code: int) -> str:
    """One character of the layer, made safe to publish: a crafted ToUnicode map can yield
    surrogates, NULs and control characters, which would break the UTF-8 JSON or forge log
    lines. Those become U+FFFD; pdfium's marker for a hyphen it joined at a line end (0x02)
    becomes a hyphen."""
    if code == 0x02:
        return "-"
    if code in (0x0D, 0x0A):
        return chr(code)
    if code == 0x09:
        return " "
    try:
        char = chr(code)
    except (ValueError, OverflowError):
        return "\ufffd"
    if unicodedata.category(char) in ("Cs", "Cc", "Cn", "Co"):
        return "\ufffd"
    return char
