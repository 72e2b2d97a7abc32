"""Turn a file's bytes into page images. Runs in the child only: decoding hostile files is work
that may crash or blow up memory, and the child is the process we can afford to lose.

Decoding is by content (`sniff.sniff`), so a PNG named `.jpg` still works and a text file named
`.jpg` is `unsupported_type`. Pillow's decompression-bomb guard is strict here (its warning is an
error), and `max_pages` / `max_side_px` bound the work per file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from struct import error as struct_error
from typing import Any  # Pillow lets it escape on some damaged headers

from PIL import Image, ImageOps

from watcherd.core import sniff
from watcherd.core.images import to_rgb
from watcherd.core.records import InputError
from watcherd.core.text import PageText

PDF_DPI = 200  # enough for OCR of 8-10 pt text; A4 renders at 1654 x 2339
DEFAULT_DPI = 300  # an image that does not say (most scanners write it)


@dataclass
class Page:
    number: int
    image: Image.Image
    size: tuple[int, int]
    resized_from: tuple[int, int] | None
    dpi: float = DEFAULT_DPI  # of the original page's pixel grid (`resized_from or size`)

    @property
    def original_size(self) -> tuple[int, int]:
        return self.resized_from or self.size


def image_dpi(info: Mapping[Any, Any]) -> float:
    """An image's resolution from its metadata (the horizontal one), DEFAULT_DPI when it gives
    none or nonsense (0, 1 or 72 "dpi" from cameras and screenshots is not a scan's)."""
    dpi = info.get("dpi")
    try:
        value = float(dpi[0])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return DEFAULT_DPI
    return value if 100 <= value <= 2400 else DEFAULT_DPI


class Document:
    """An opened file: `len(doc)` pages, iterated lazily so a 500-page PDF is never all in memory."""

    def __init__(self, data: bytes, *, max_side_px: int, max_pages: int):
        self.max_side_px = max_side_px
        if not data:
            raise InputError("unreadable", "empty file (0 bytes)")
        self.kind = sniff.sniff(data[: sniff.SNIFF_BYTES])
        self._pdf = None
        self._image: Image.Image | None = None
        if self.kind == "pdf":
            self._open_pdf(data)
        else:
            self._open_image(data)
        if self.count > max_pages:
            raise InputError("too_large", f"{self.count} pages, more than ocr.max_pages ({max_pages})")

    def _open_pdf(self, data: bytes) -> None:
        import pypdfium2 as pdfium

        try:
            self._pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            raise InputError("unreadable", f"PDF cannot be opened: {exc}") from None
        self.count = len(self._pdf)
        if self.count == 0:
            raise InputError("unreadable", "PDF has no pages")

    def _open_image(self, data: bytes) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._image = Image.open(io.BytesIO(data))
                self.count = getattr(self._image, "n_frames", 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError("too_large", str(exc)) from None
        except Image.UnidentifiedImageError:
            if self.kind is None:
                start = data[:16]
                raise InputError("unsupported_type", f"not an image or PDF (starts with {start!r})") from None
            raise InputError("unreadable", f"{self.kind.upper()} header is damaged") from None
        except (OSError, ValueError, SyntaxError, struct_error) as exc:
            raise InputError("unreadable", f"{type(exc).__name__}: {exc}") from None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Page]:
        for index in range(self.count):
            yield self.page(index)

    def nominal_size(self, index: int) -> tuple[int, int]:
        """A PDF page's size in pixels at PDF_DPI, without rendering it."""
        assert self._pdf is not None
        width_pt, height_pt = self._pdf[index].get_size()
        return round(width_pt * PDF_DPI / 72), round(height_pt * PDF_DPI / 72)

    def page_dpi(self, index: int) -> float:
        """The resolution of page `index`'s pixel grid, without decoding it."""
        if self._pdf is not None:
            return float(PDF_DPI)
        assert self._image is not None
        self._image.seek(index)
        return image_dpi(self._image.info)

    def page(self, index: int) -> Page:
        """Page `index` (0-based), decoded or rendered now."""
        return self._render_pdf(index) if self._pdf is not None else self._decode_frame(index)

    def text_layer(self, index: int) -> PageText | None:
        """The text a PDF page already carries (born-digital, or OCR'd before), with a Line per
        line of it; None when the page has none (or only whitespace), or the document is an image:
        such a page is to be rendered and OCR'd. The page is not rendered, which is what this saves.

        Boxes are in the pixels of the page rendered at PDF_DPI, before any `max_side_px`
        shrinking: the grid `resized_from` names when the page was shrunk (that one is rounded
        where the render rounds up, under a pixel's difference). pdfium maps them (y flipped,
        the page box's origin and /Rotate honoured) with the same matrix it renders with. Lines
        are pdfium's own, in its reading order; `text` is the lines joined by newlines. Each box
        is the union of the line's loose character boxes (the font's ascent to descent); the PDF
        gives no confidence, so `score` is None.

        Work is bounded: a page with more than MAX_TEXT_CHARS characters is `too_large`.
        """
        if self._pdf is None:
            return None
        from watcherd.ocr.child.pdftext import read_text_layer

        return read_text_layer(self._pdf, index, PDF_DPI)

    def _render_pdf(self, index: int) -> Page:
        import pypdfium2 as pdfium

        assert self._pdf is not None
        try:
            page = self._pdf[index]
            width_pt, height_pt = page.get_size()
            scale = PDF_DPI / 72
            nominal = (round(width_pt * scale), round(height_pt * scale))
            resized_from = None
            if max(nominal) > self.max_side_px:
                scale = self.max_side_px / max(width_pt, height_pt)
                resized_from = nominal
            image = page.render(scale=scale).to_pil().convert("RGB")
        except pdfium.PdfiumError as exc:
            raise InputError("unreadable", f"PDF page {index + 1} cannot be rendered: {exc}") from None
        return Page(index + 1, image, image.size, resized_from, PDF_DPI)

    def _decode_frame(self, index: int) -> Page:
        assert self._image is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._image.seek(index)
                frame = ImageOps.exif_transpose(self._image)  # scanners and phones rotate by EXIF
                frame = to_rgb(frame)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError("too_large", str(exc)) from None
        except (OSError, ValueError, SyntaxError, EOFError, struct_error) as exc:
            raise InputError("unreadable", f"page {index + 1}: {type(exc).__name__}: {exc}") from None
        resized_from = None
        if max(frame.size) > self.max_side_px:
            resized_from = frame.size
            frame.thumbnail((self.max_side_px, self.max_side_px), Image.Resampling.LANCZOS)
        return Page(index + 1, frame, frame.size, resized_from, image_dpi(self._image.info))
