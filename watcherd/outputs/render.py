"""Searchable PDF, hOCR and ALTO from a file's bytes and the text found on its pages (issue #12).

Runs in the child, after OCR: the writers take the original file and one `RenderedPage` per page,
whose boxes are in the pixels of the page as displayed (images: full resolution, EXIF orientation
applied; PDF pages: rendered at `RenderedPage.dpi`, normally `pages.PDF_DPI`).

The PDF text layer is OCRmyPDF's fpdf2 renderer (`ocrmypdf.fpdf_renderer`, fed an `OcrElement`
tree) and pikepdf places it over each page; neither calls Tesseract or Ghostscript. The text is
invisible (render mode 3) and each word is stretched to its box. All of it is set in OCRmyPDF's
bundled glyphless font (Occulta, cut down per document: `_DocumentFonts` says why), never a font
found on the system, so the output is the same on every machine; ToUnicode maps make search and
copy/paste return the characters, Chinese and characters beyond the BMP included.

- Images: one PDF page per frame, sized from the frame's DPI (`image_dpi`). A JPEG's bytes are
  embedded unchanged (DCTDecode); an EXIF orientation other than 1 is applied by the placement
  matrix, not by re-encoding, so the page shows the image as displayed and the boxes (displayed
  orientation) need no turning. Other formats are decoded by Pillow and stored losslessly
  (Flate; alpha as an SMask; 16-bit grey kept at 16 bits).
- PDFs: the original pages are kept, their content and images unchanged (pikepdf rewrites the
  file around them); a page whose source is "ocr" gets the layer drawn after its content, which
  is wrapped in q/Q (mapped through its CropBox and /Rotate); "pdf_text" pages get none.
- Text-only pages (an engine without boxes): the text is laid out in rows over the page, so
  search and copy find it; the positions are made up and say nothing about where the text is.
- `pdfa=True`: pikepdf's own PDF/A-2b conversion (sRGB output intent, XMP) and validation of the
  bytes written; a document it cannot make conform raises `PdfaError`.

Threat model: the text comes from an engine reading a hostile scan, the file name from a hostile
share user. Characters XML cannot carry become U+FFFD in every output (lxml escapes the rest),
boxes are clipped to the page, empty and zero-size boxes are tolerated.
"""

from __future__ import annotations

import functools
import io
import math
import re
import tempfile
import textwrap
import typing
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from watcherd.core.images import to_rgb
from watcherd.core.text import Line, Word, box_from_rect

if typing.TYPE_CHECKING:
    import pikepdf
    from ocrmypdf.models.ocr_element import OcrElement

DEFAULT_DPI = 300.0  # an image that does not say (or says nonsense): a common scanner setting
MIN_DPI, MAX_DPI = 50.0, 4800.0  # a fax is 98 dpi; 1 or 72 000 dpi is a bug in the writer
LAYOUT_COLUMNS = 100  # text-only pages: characters per laid-out row
LAYOUT_MAX_ROWS = 60  # ... and at most this many rows' height each (fewer rows are not taller)

_PDFA_FLAVOUR = "2b"


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


class PdfaError(RenderError):
    """PDF/A was asked for and this document cannot be made to conform without Ghostscript (for
    example a PDF input with fonts that are not embedded); `reasons` says why."""

    def __init__(self, reasons: str):
        super().__init__(f"cannot be written as PDF/A-{_PDFA_FLAVOUR.upper()}: {reasons}")
        self.reasons = reasons


# -- DPI -----------------------------------------------------------------------------------------


def image_dpi(image: Image.Image) -> float:
    """The resolution a page image says it has (`info["dpi"]`, horizontal), when it is a number
    between MIN_DPI and MAX_DPI; otherwise DEFAULT_DPI. The PDF page size comes from it."""
    return _dpi_xy(image)[0]


def _dpi_xy(image: Image.Image) -> tuple[float, float]:
    """(horizontal, vertical) dpi; both fall back together, so a page is never half-guessed.
    Fax images have non-square pixels (204 x 98): their page keeps its real proportions."""
    raw: typing.Any = image.info.get("dpi")
    try:
        x, y = (float(raw[0]), float(raw[1])) if isinstance(raw, tuple | list) else (float(raw), float(raw))
    except (TypeError, ValueError, IndexError):  # absent (None), or something that is no number
        return DEFAULT_DPI, DEFAULT_DPI
    if all(math.isfinite(v) and MIN_DPI <= v <= MAX_DPI for v in (x, y)):
        return x, y
    return DEFAULT_DPI, DEFAULT_DPI


# -- text and boxes, shared by the three writers -------------------------------------------------

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _clean(text: str) -> str:
    """Text any XML 1.0 document and the PDF text layer can carry: control characters (except tab
    and newline) and non-characters become U+FFFD, so a character is never silently dropped."""
    return _NOT_XML.sub("\ufffd", text)


Rect = tuple[float, float, float, float]  # left, top, right, bottom, in page pixels


@dataclass(frozen=True)
class _Token:
    text: str
    rect: Rect
    score: float | None


@dataclass(frozen=True)
class _Row:
    """A line as the writers use it: clipped to the page, cut into whitespace-separated tokens."""

    rect: Rect
    angle: float  # degrees counter-clockwise, from the box's top edge
    score: float | None
    tokens: tuple[_Token, ...]


def _rect(box: typing.Any, page: RenderedPage) -> Rect:
    """The axis-aligned envelope of a box, clipped to the page and at least 1 px each way (an
    engine's zero-size box still carries text that search must find)."""
    xs = [min(max(_finite(p[0]), 0.0), page.width) for p in box]
    ys = [min(max(_finite(p[1]), 0.0), page.height) for p in box]
    left, right, top, bottom = min(xs), max(xs), min(ys), max(ys)
    if right - left < 1:
        left = min(left, page.width - 1.0)
        right = left + 1.0
    if bottom - top < 1:
        top = min(top, page.height - 1.0)
        bottom = top + 1.0
    return (max(left, 0.0), max(top, 0.0), right, bottom)


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


def _tokens(line: Line, rect: Rect, page: RenderedPage) -> tuple[_Token, ...]:
    """The line's text cut at whitespace. When the engine's words (or CJK characters) spell the
    same text, each token gets the union of its words' boxes; otherwise the line's box is shared
    out by character count."""
    parts = _clean(line.text).split()
    if not parts:
        return ()
    words = [w for w in line.words if w.text.strip()]
    spans = _word_spans(parts, words)
    if spans is not None:
        tokens = []
        for part, span in zip(parts, spans, strict=True):
            rects = [_rect(w.box, page) for w in span]
            union = (
                min(r[0] for r in rects),
                min(r[1] for r in rects),
                max(r[2] for r in rects),
                max(r[3] for r in rects),
            )
            scores = [w.score for w in span if w.score is not None]
            tokens.append(_Token(part, union, min(scores) if scores else line.score))
        return tuple(tokens)
    left, top, right, bottom = rect
    total = sum(len(p) for p in parts) + len(parts) - 1  # a space between tokens counts one
    per_char = (right - left) / total
    tokens, x = [], left
    for part in parts:
        end = x + per_char * len(part)
        tokens.append(_Token(part, (x, top, max(end, x + 1.0), bottom), line.score))
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
            word_text = "".join(_clean(words[index].text).split())
            spelled += word_text
            span.append(words[index])
            index += 1
        if spelled != part:
            return None
        spans.append(span)
    return spans if index == len(words) else None


def _by_number(pages: Sequence[RenderedPage]) -> dict[int, RenderedPage]:
    """The pages by number; two with one number would give two elements one ID (and one PDF page
    two text layers)."""
    by_number = {page.number: page for page in pages}
    if len(by_number) != len(pages):
        raise RenderError(f"two RenderedPages have the same number: {sorted(p.number for p in pages)}")
    return by_number


def _rows(page: RenderedPage) -> list[_Row]:
    """The page's lines as rows; a page without lines gets its text laid out (see module doc)."""
    if not page.lines:
        return _layout(page)
    rows = []
    for line in page.lines:
        rect = _rect(line.box, page)
        tokens = _tokens(line, rect, page)
        if tokens:
            rows.append(_Row(rect, _angle(line.box), line.score, tokens))
    return rows


def _layout(page: RenderedPage) -> list[_Row]:
    """Text without positions, laid out in rows from the top of the page, so that a searchable PDF
    finds it (and hOCR/ALTO carry it). Long lines (a markdown paragraph is one) are wrapped, so a
    row's text is never squeezed beyond what viewers can select."""
    texts: list[str] = []
    for raw in _clean(page.text).splitlines():
        texts.extend(textwrap.wrap(raw, LAYOUT_COLUMNS, break_long_words=True, break_on_hyphens=False))
    if not texts or page.width < 2 or page.height < 2:
        return []
    margin = page.width * 0.05
    row_height = page.height * 0.9 / max(len(texts), LAYOUT_MAX_ROWS)
    rows = []
    for index, text in enumerate(texts):
        top = page.height * 0.05 + index * row_height
        width = (page.width - 2 * margin) * min(1.0, len(text) / LAYOUT_COLUMNS * 1.6)
        box = box_from_rect(margin, top, margin + max(width, 1.0), top + row_height)
        line = Line(text=text, box=box, score=None)
        rect = _rect(box, page)
        rows.append(_Row(rect, 0.0, None, _tokens(line, rect, page)))
    return rows


def _confidence_percent(score: float | None) -> int | None:
    if score is None or not math.isfinite(score):
        return None
    return round(min(max(score, 0.0), 1.0) * 100)


# -- hOCR ------------------------------------------------------------------------------------------

_XHTML = "http://www.w3.org/1999/xhtml"


def hocr(pages: Sequence[RenderedPage], *, title: str) -> bytes:
    """hOCR 1.2 (XHTML): one ocr_page per page, ocr_line per line, ocrx_word per token, each with
    its bbox in page pixels; x_wconf (0-100) where the engine gave a score."""
    from lxml import etree

    _by_number(pages)
    html = etree.Element(f"{{{_XHTML}}}html", nsmap={None: _XHTML})
    html.set("{http://www.w3.org/XML/1998/namespace}lang", "und")
    html.set("lang", "und")
    head = etree.SubElement(html, f"{{{_XHTML}}}head")
    etree.SubElement(head, f"{{{_XHTML}}}title").text = _clean(title)
    for attrs in (
        {"http-equiv": "Content-Type", "content": "text/html;charset=utf-8"},
        {"name": "ocr-system", "content": "watcherd"},
        {"name": "ocr-capabilities", "content": "ocr_page ocr_carea ocr_par ocr_line ocrx_word"},
        {"name": "ocr-number-of-pages", "content": str(len(pages))},
    ):
        etree.SubElement(head, f"{{{_XHTML}}}meta", attrs)
    body = etree.SubElement(html, f"{{{_XHTML}}}body")
    for page in pages:
        n = page.number
        page_el = etree.SubElement(body, f"{{{_XHTML}}}div", {"class": "ocr_page", "id": f"page_{n}"})
        dpi = round(page.dpi) if math.isfinite(page.dpi) and page.dpi > 0 else round(DEFAULT_DPI)
        page_el.set("title", f"bbox 0 0 {page.width} {page.height}; ppageno {n - 1}; scan_res {dpi} {dpi}")
        rows = _rows(page)
        if not rows:
            continue
        area = etree.SubElement(page_el, f"{{{_XHTML}}}div", {"class": "ocr_carea", "id": f"block_{n}_1"})
        area.set("title", f"bbox {_bbox(_union(r.rect for r in rows))}")
        par = etree.SubElement(area, f"{{{_XHTML}}}p", {"class": "ocr_par", "id": f"par_{n}_1"})
        par.set("title", area.get("title"))
        for i, row in enumerate(rows, 1):
            line_el = etree.SubElement(par, f"{{{_XHTML}}}span", {"class": "ocr_line", "id": f"line_{n}_{i}"})
            props = [f"bbox {_bbox(row.rect)}"]
            if row.angle:
                props.append(f"textangle {row.angle:.1f}")
            line_el.set("title", "; ".join(props))
            for j, token in enumerate(row.tokens, 1):
                word = etree.SubElement(line_el, f"{{{_XHTML}}}span", {"class": "ocrx_word", "id": f"word_{n}_{i}_{j}"})
                props = [f"bbox {_bbox(token.rect)}"]
                conf = _confidence_percent(token.score)
                if conf is not None:
                    props.append(f"x_wconf {conf}")
                word.set("title", "; ".join(props))
                word.text = token.text
                word.tail = " " if j < len(row.tokens) else None
            line_el.tail = "\n"
    doctype = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">'
    )
    return etree.tostring(html, xml_declaration=True, encoding="UTF-8", doctype=doctype)


def _pixels(rect: Rect) -> tuple[int, int, int, int]:
    """Whole pixels, rounded outwards: hOCR and ALTO give a box the same four numbers."""
    left, top, right, bottom = rect
    return math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)


def _bbox(rect: Rect) -> str:
    return " ".join(str(v) for v in _pixels(rect))


def _union(rects: typing.Iterable[Rect]) -> Rect:
    rs = list(rects)
    return (min(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs), max(r[3] for r in rs))


# -- ALTO ------------------------------------------------------------------------------------------

ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"


def alto(pages: Sequence[RenderedPage], *, filename: str) -> bytes:
    """ALTO 4 XML, MeasurementUnit pixel: Page > PrintSpace > TextBlock > TextLine > String/SP,
    with HPOS/VPOS/WIDTH/HEIGHT from the same boxes as the hOCR and the PDF, WC (0-1) where the
    engine gave a score."""
    from lxml import etree

    if not pages:
        raise RenderError("ALTO needs at least one page")
    _by_number(pages)

    def el(parent: typing.Any, tag: str, **attrs: str) -> typing.Any:
        return etree.SubElement(parent, f"{{{ALTO_NS}}}{tag}", attrs)

    root = etree.Element(f"{{{ALTO_NS}}}alto", nsmap={None: ALTO_NS, "xsi": _XSI})
    root.set(f"{{{_XSI}}}schemaLocation", f"{ALTO_NS} http://www.loc.gov/standards/alto/v4/alto-4-2.xsd")
    description = el(root, "Description")
    el(description, "MeasurementUnit").text = "pixel"
    el(el(description, "sourceImageInformation"), "fileName").text = _clean(filename)
    layout = el(root, "Layout")
    for page in pages:
        n = page.number
        page_el = el(
            layout, "Page", ID=f"page_{n}", PHYSICAL_IMG_NR=str(n), WIDTH=str(page.width), HEIGHT=str(page.height)
        )
        space = el(page_el, "PrintSpace", HPOS="0", VPOS="0", WIDTH=str(page.width), HEIGHT=str(page.height))
        rows = _rows(page)
        if not rows:
            continue
        block = el(space, "TextBlock", ID=f"block_{n}_1", **_position(_union(r.rect for r in rows)))
        for i, row in enumerate(rows, 1):
            # No ROTATION: ALTO 4 has it on blocks, not lines; the box is the tilted line's envelope.
            line_el = el(block, "TextLine", ID=f"line_{n}_{i}", **_position(row.rect))
            for j, token in enumerate(row.tokens, 1):
                if j > 1:
                    after = _pixels(row.tokens[j - 2].rect)[2]
                    gap = max(_pixels(token.rect)[0] - after, 0)
                    el(line_el, "SP", WIDTH=str(gap), HPOS=str(after), VPOS=str(_pixels(row.rect)[1]))
                string = el(line_el, "String", ID=f"string_{n}_{i}_{j}", CONTENT=token.text, **_position(token.rect))
                conf = _confidence_percent(token.score)
                if conf is not None:
                    string.set("WC", f"{conf / 100:.2f}")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _position(rect: Rect) -> dict[str, str]:
    left, top, right, bottom = _pixels(rect)
    return {"HPOS": str(left), "VPOS": str(top), "WIDTH": str(right - left), "HEIGHT": str(bottom - top)}


# -- the PDF text layer ----------------------------------------------------------------------------


@functools.cache
def _builtin_fonts() -> typing.Any:
    """OCRmyPDF's bundled fonts (no system font scan: the output is the same on every machine),
    its fpdf2 patch (CMap blocks of at most 100 entries), and Occulta's bytes and character map;
    once per process."""
    from fontTools.ttLib import TTFont
    from ocrmypdf.font.font_provider import BuiltinFontProvider
    from ocrmypdf.fpdf_renderer.fpdf2_patches import install_fpdf2_patches

    install_fpdf2_patches()
    provider = BuiltinFontProvider()
    occulta = provider.get_fallback_font().font_path.read_bytes()
    return provider, occulta, TTFont(io.BytesIO(occulta)).getBestCmap()


class _DocumentFonts:
    """OCRmyPDF's font provider (get_font / get_available_fonts / get_fallback_font) whose glyphless
    fallback, Occulta, is cut down to the characters of one document; `_glyphless_only` makes the
    renderer use it for every word.

    Why: fpdf2 parses and subsets each font a document uses, per document. For Occulta (all 65,536
    BMP code points mapped to 6 blank glyphs) that was 0.3 s, for NotoSans (layout tables) 0.1 s,
    up to a quarter of a page's OCR time here. The text is invisible, so glyph shapes do not matter
    (Tesseract's own PDF renderer writes all text in a glyphless font): the cut-down copy has
    Occulta's glyphs and widths and its mapping for the characters used (characters beyond the
    BMP, which Occulta lacks, get its full-width blank), and the renderer stretches every word to
    its box anyway. NotoSans stays available: the renderer takes its baseline metrics from it."""

    def __init__(self, folder: str, codepoints: set[int]):
        from fontTools.ttLib import TTFont, newTable
        from fontTools.ttLib.tables._c_m_a_p import CmapSubtable
        from ocrmypdf.font.font_manager import FontManager

        self._builtin, occulta, full_map = _builtin_fonts()
        font = TTFont(io.BytesIO(occulta))
        subtable = CmapSubtable.newSubtable(12)
        subtable.platformID, subtable.platEncID, subtable.language = 3, 10, 0
        subtable.cmap = {cp: full_map.get(cp, "blank2") for cp in codepoints | {0x20, 0xA0}}
        cmap = newTable("cmap")
        cmap.tableVersion = 0
        cmap.tables = [subtable]
        font["cmap"] = cmap
        path = Path(folder) / "Occulta.ttf"  # fpdf2 names the font after the file
        font.save(str(path))
        self._glyphless = FontManager(path)

    def get_font(self, font_name: str) -> typing.Any:
        return self._glyphless if font_name == "Occulta" else self._builtin.get_font(font_name)

    def get_available_fonts(self) -> list[str]:
        return list(self._builtin.get_available_fonts())

    def get_fallback_font(self) -> typing.Any:
        return self._glyphless


@functools.cache
def _glyphless_only(base: type) -> type:
    class GlyphlessFonts(base):  # type: ignore[valid-type, misc]
        def select_font_for_word(self, word_text: str, line_language: str | None) -> typing.Any:
            return self.font_provider.get_fallback_font()

    return GlyphlessFonts


def _ocr_tree(page: RenderedPage) -> OcrElement:
    from ocrmypdf.models.ocr_element import BoundingBox, OcrClass, OcrElement

    def bbox(rect: Rect) -> BoundingBox:
        return BoundingBox(left=rect[0], top=rect[1], right=rect[2], bottom=rect[3])

    lines = []
    for row in _rows(page):
        words = [OcrElement(ocr_class=OcrClass.WORD, text=t.text, bbox=bbox(t.rect)) for t in row.tokens]
        lines.append(
            OcrElement(ocr_class=OcrClass.LINE, bbox=bbox(row.rect), textangle=row.angle or None, children=words)
        )
    return OcrElement(ocr_class=OcrClass.PAGE, bbox=BoundingBox(0, 0, page.width, page.height), children=lines)


def _text_layer(pages: Sequence[tuple[RenderedPage, float]]) -> bytes:
    """One PDF page of invisible text per (page, width in points), by OCRmyPDF's multi-page
    renderer (fpdf2: render mode 3, text shaping, no cell margin, one font resource)."""
    from ocrmypdf.font.multi_font_manager import MultiFontManager
    from ocrmypdf.fpdf_renderer.renderer import Fpdf2MultiPageRenderer

    trees = [(page.number, _ocr_tree(page), page.width * 72.0 / width_pt) for page, width_pt in pages]
    codepoints = {ord(c) for _, tree, _ in trees for word in tree.words for c in word.text}
    with tempfile.TemporaryDirectory(prefix="watcherd-render-") as folder:
        fonts = _glyphless_only(MultiFontManager)(font_provider=_DocumentFonts(folder, codepoints))
        path = Path(folder) / "layer.pdf"
        Fpdf2MultiPageRenderer(pages_data=trees, multi_font_manager=fonts, invisible_text=True).render(path)
        return path.read_bytes()


def warm_up() -> None:
    """Import the PDF libraries and load the fonts now (0.6-1.5 s and about 80 MB here, once per
    process), so that the child's first searchable PDF does not pay it inside a page's time."""
    import pikepdf  # noqa: F401
    from ocrmypdf.fpdf_renderer.renderer import Fpdf2MultiPageRenderer  # noqa: F401

    _builtin_fonts()


# -- the searchable PDF ----------------------------------------------------------------------------


def write_pdf(
    out: typing.BinaryIO, *, data: bytes, kind: str, pages: Sequence[RenderedPage], pdfa: bool = False
) -> None:
    """Write the original file (`data`, of `formats.sniff` kind `kind`) as a searchable PDF to
    `out`: its pages, or one page per image frame, each with the invisible text of the
    RenderedPage of the same number. Pages without a RenderedPage are kept without text."""
    import pikepdf

    by_number = _by_number(pages)
    try:
        pdf = _open_pdf(data, pikepdf) if kind == "pdf" else _image_pdf(data, kind, pikepdf)
    except (pikepdf.PdfError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RenderError(f"{kind or 'file'} cannot be read for the PDF: {type(exc).__name__}: {exc}") from None
    try:
        with pdf:
            _add_layers(pdf, by_number, pikepdf)
            if pdfa:
                _save_pdfa(pdf, out, pikepdf)
            else:
                pdf.save(out, compress_streams=True, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    except pikepdf.PdfError as exc:  # a page tree or content that opened but breaks on use
        raise RenderError(f"the PDF cannot be rewritten: {exc}") from None


def _add_layers(pdf: typing.Any, by_number: dict[int, RenderedPage], pikepdf: typing.Any) -> None:
    """Draw each OCR'd page's text layer over its page of `pdf`."""
    if max(by_number, default=0) > len(pdf.pages) or min(by_number, default=1) < 1:
        raise RenderError(f"page numbers {sorted(by_number)} do not fit a document of {len(pdf.pages)} pages")
    targets = []
    for number in sorted(by_number):
        page = by_number[number]
        if page.source != "ocr" or page.width < 1 or page.height < 1 or not _rows(page):
            continue  # text from the PDF itself, or nothing to add
        geometry = _Geometry.of(pdf.pages[number - 1], pikepdf)
        if geometry.width > 0 and geometry.height > 0:  # a page of zero size shows nothing to search
            targets.append((page, geometry))
    if targets:
        layer = pikepdf.open(io.BytesIO(_text_layer([(page, g.width) for page, g in targets])))
        with layer:
            for (page, geometry), text_page in zip(targets, layer.pages, strict=True):
                _overlay(pdf, pdf.pages[page.number - 1], text_page, geometry, pikepdf)


def _open_pdf(data: bytes, pikepdf: typing.Any) -> pikepdf.Pdf:
    pdf = pikepdf.open(io.BytesIO(data))
    if pdf.is_encrypted:
        pdf.close()
        raise RenderError("the PDF is encrypted: its pages cannot be rewritten with a text layer")
    return pdf


@dataclass(frozen=True)
class _Geometry:
    """Where a page's displayed rectangle lies in its user space: CropBox origin and size, and
    /Rotate (clockwise, a multiple of 90). `width`/`height` are the displayed size in points."""

    x0: float
    y0: float
    crop_w: float
    crop_h: float
    rotate: int

    @classmethod
    def of(cls, page: typing.Any, pikepdf: typing.Any) -> _Geometry:
        box = [float(v) for v in page.cropbox]  # CropBox, or MediaBox when absent (inherited too)
        x0, y0, x1, y1 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
        rotate = _inherited(page.obj, "/Rotate", pikepdf)
        try:
            degrees = int(rotate) % 360 if rotate is not None else 0
        except (TypeError, ValueError):
            degrees = 0
        if degrees % 90:
            degrees = 0  # not allowed by the spec; viewers ignore it, as pdfium does
        return cls(x0, y0, x1 - x0, y1 - y0, degrees)

    @property
    def width(self) -> float:
        return self.crop_h if self.rotate in (90, 270) else self.crop_w

    @property
    def height(self) -> float:
        return self.crop_w if self.rotate in (90, 270) else self.crop_h

    def matrix(self) -> tuple[float, float, float, float, float, float]:
        """From displayed points (origin bottom left of what the viewer shows) to user space."""
        x0, y0, w, h = self.x0, self.y0, self.crop_w, self.crop_h
        return {
            0: (1.0, 0.0, 0.0, 1.0, x0, y0),
            90: (0.0, 1.0, -1.0, 0.0, x0 + w, y0),
            180: (-1.0, 0.0, 0.0, -1.0, x0 + w, y0 + h),
            270: (0.0, -1.0, 1.0, 0.0, x0, y0 + h),
        }[self.rotate]


def _inherited(obj: typing.Any, key: str, pikepdf: typing.Any) -> typing.Any:
    """A page attribute, looked up the page tree like a viewer does (bounded: a hostile file may
    make /Parent a loop)."""
    for _ in range(64):
        if key in obj:
            return obj[key]
        parent = obj.get("/Parent")
        if not isinstance(parent, pikepdf.Dictionary):
            return None
        obj = parent
    return None


def _overlay(
    pdf: typing.Any, page: typing.Any, text_page: typing.Any, geometry: _Geometry, pikepdf: typing.Any
) -> None:
    """Draw `text_page` (sized to the page as displayed) over `page`'s content. The content is
    wrapped in q/Q first, so whatever graphics state it leaves behind cannot move the text."""
    form = pdf.copy_foreign(text_page.as_form_xobject())
    text_w, text_h = (float(v) for v in text_page.mediabox[2:4])
    if "/Resources" not in page.obj:  # inherited: the page gets its own copy, plus our form
        inherited = _inherited(page.obj, "/Resources", pikepdf)
        page.obj.Resources = pikepdf.Dictionary(inherited) if inherited is not None else pikepdf.Dictionary()
    name = page.add_resource(form, pikepdf.Name.XObject, prefix="WatcherdText")
    a, b, c, d, e, f = geometry.matrix()
    sx, sy = geometry.width / text_w, geometry.height / text_h
    place = pikepdf.Matrix(sx, 0, 0, sy, 0, 0) @ pikepdf.Matrix(a, b, c, d, e, f)
    page.contents_add(b"q\n", prepend=True)
    page.contents_add(b"\nQ\nq " + _matrix_bytes(place) + b" cm " + bytes(name.unparse()) + b" Do Q\n")


def _matrix_bytes(m: typing.Any) -> bytes:
    return " ".join(f"{v:.6f}" for v in (m.a, m.b, m.c, m.d, m.e, m.f)).encode()


# -- image inputs ----------------------------------------------------------------------------------

# EXIF orientation -> where a stored pixel (s, t) (0-1, from the top left) is displayed (X, Y).
_ORIENT = {
    1: lambda s, t: (s, t),
    2: lambda s, t: (1 - s, t),
    3: lambda s, t: (1 - s, 1 - t),
    4: lambda s, t: (s, 1 - t),
    5: lambda s, t: (t, s),
    6: lambda s, t: (1 - t, s),
    7: lambda s, t: (1 - t, 1 - s),
    8: lambda s, t: (t, 1 - s),
}


def _image_pdf(data: bytes, kind: str, pikepdf: typing.Any) -> pikepdf.Pdf:
    pdf = pikepdf.new()
    image = Image.open(io.BytesIO(data))
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        orientation = image.getexif().get(0x0112, 1)
        orientation = orientation if orientation in _ORIENT else 1
        if kind == "jpeg" and index == 0:
            xobject = _jpeg_xobject(pdf, data, image, pikepdf)
            stored = image.size
        else:
            frame = ImageOps.exif_transpose(image)  # pixels: turning them is lossless
            orientation = 1
            xobject = _pixels_xobject(pdf, frame, pikepdf)
            stored = frame.size
        displayed = stored if orientation < 5 else (stored[1], stored[0])
        dpi_x, dpi_y = _dpi_xy(image)
        if orientation >= 5:
            dpi_x, dpi_y = dpi_y, dpi_x
        width, height = displayed[0] * 72.0 / dpi_x, displayed[1] * 72.0 / dpi_y
        page = pdf.add_blank_page(page_size=(width, height))
        name = page.add_resource(xobject, pikepdf.Name.XObject, prefix="Im")
        m = _placement(orientation, width, height)
        page.contents_add(b"q " + _matrix_bytes(m) + b" cm " + bytes(name.unparse()) + b" Do Q\n")
    return pdf


def _placement(orientation: int, width: float, height: float) -> typing.Any:
    """The matrix that draws the stored image (PDF unit square: first row at the top) so that the
    page shows it as displayed (EXIF orientation applied)."""
    import pikepdf

    def to_page(u: float, v: float) -> tuple[float, float]:
        x, y = _ORIENT[orientation](u, 1 - v)  # unit square point -> stored (s, t) -> displayed
        return x * width, (1 - y) * height

    e, f = to_page(0, 0)
    ax, by = to_page(1, 0)
    cx, dy = to_page(0, 1)
    return pikepdf.Matrix(ax - e, by - f, cx - e, dy - f, e, f)


def _jpeg_xobject(pdf: typing.Any, data: bytes, image: Image.Image, pikepdf: typing.Any) -> typing.Any:
    """The JPEG's bytes as they are (DCTDecode), described to the PDF reader."""
    spaces = {"L": pikepdf.Name.DeviceGray, "RGB": pikepdf.Name.DeviceRGB, "CMYK": pikepdf.Name.DeviceCMYK}
    if image.mode not in spaces:
        raise RenderError(f"JPEG in mode {image.mode} cannot be embedded")
    xobject = pikepdf.Stream(pdf, data)
    xobject.Type = pikepdf.Name.XObject
    xobject.Subtype = pikepdf.Name.Image
    xobject.Width, xobject.Height = image.size
    xobject.BitsPerComponent = 8
    xobject.Filter = pikepdf.Name.DCTDecode
    xobject.ColorSpace = _colour_space(pdf, image, spaces[image.mode], pikepdf)
    if image.mode == "CMYK" and "adobe" in image.info:  # Adobe's CMYK JPEGs store inverted ink
        xobject.Decode = pikepdf.Array([1, 0] * 4)
    return xobject


def _pixels_xobject(pdf: typing.Any, frame: Image.Image, pikepdf: typing.Any) -> typing.Any:
    """A decoded frame as a Flate image: bilevel, 8- or 16-bit grey, RGB or CMYK as stored; alpha
    becomes a soft mask; palettes and other modes become RGB (colours kept exactly)."""
    alpha = None
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        rgba = frame.convert("RGBA" if frame.mode != "LA" else "LA")
        alpha = rgba.getchannel("A")
        frame = rgba.convert("RGB" if rgba.mode == "RGBA" else "L")
    if frame.mode in ("I;16", "I;16B", "I;16L"):
        raw, bits, space = frame.tobytes("raw", "I;16B"), 16, pikepdf.Name.DeviceGray
    elif frame.mode == "1":
        raw, bits, space = frame.tobytes(), 1, pikepdf.Name.DeviceGray
    elif frame.mode == "L":
        raw, bits, space = frame.tobytes(), 8, pikepdf.Name.DeviceGray
    elif frame.mode == "CMYK":
        raw, bits, space = frame.tobytes(), 8, pikepdf.Name.DeviceCMYK
    else:
        frame = frame if frame.mode == "RGB" else _to_rgb(frame)
        raw, bits, space = frame.tobytes(), 8, pikepdf.Name.DeviceRGB
    xobject = _flate_image(pdf, raw, frame.size, bits, _colour_space(pdf, frame, space, pikepdf), pikepdf)
    if alpha is not None:
        xobject.SMask = _flate_image(pdf, alpha.tobytes(), alpha.size, 8, pikepdf.Name.DeviceGray, pikepdf)
    return xobject


def _to_rgb(frame: Image.Image) -> Image.Image:
    if frame.mode in ("I", "F"):  # 32-bit grey: the child OCRs it scaled the same way
        return to_rgb(frame)
    return frame.convert("RGB")


def _flate_image(
    pdf: typing.Any, raw: bytes, size: tuple[int, int], bits: int, space: typing.Any, pikepdf: typing.Any
) -> typing.Any:
    xobject = pikepdf.Stream(pdf, zlib.compress(raw, 6))
    xobject.Type = pikepdf.Name.XObject
    xobject.Subtype = pikepdf.Name.Image
    xobject.Width, xobject.Height = size
    xobject.BitsPerComponent = bits
    xobject.ColorSpace = space
    xobject.Filter = pikepdf.Name.FlateDecode
    return xobject


def _colour_space(pdf: typing.Any, image: Image.Image, device: typing.Any, pikepdf: typing.Any) -> typing.Any:
    """The image's ICC profile when it has one whose channel count fits, else the device space."""
    profile = image.info.get("icc_profile")
    channels = {"/DeviceGray": 1, "/DeviceRGB": 3, "/DeviceCMYK": 4}[str(device)]
    if not isinstance(profile, bytes) or len(profile) < 132 or len(profile) > 4 * 1024 * 1024:
        return device
    declared = {b"GRAY": 1, b"RGB ": 3, b"CMYK": 4}.get(profile[16:20])
    if declared != channels:
        return device  # a profile for another space would make the reader refuse the image
    stream = pikepdf.Stream(pdf, profile)
    stream.N = channels
    stream.Alternate = device
    return pikepdf.Array([pikepdf.Name.ICCBased, stream])


# -- PDF/A -----------------------------------------------------------------------------------------


def _save_pdfa(pdf: typing.Any, out: typing.BinaryIO, pikepdf: typing.Any) -> None:
    """pikepdf's PDF/A path: it adds the sRGB output intent and XMP, repairs what it can, writes,
    then validates the bytes written; nothing reaches `out` unless they pass."""
    from pikepdf import pdfa as pikepdf_pdfa

    buffer = io.BytesIO()
    try:
        pikepdf_pdfa.save(pdf, buffer, _PDFA_FLAVOUR, output_intent="sRGB")
    except pikepdf_pdfa.PdfaError as exc:
        raise PdfaError(_pdfa_reasons(exc)) from None
    out.write(buffer.getvalue())


def _pdfa_reasons(exc: typing.Any) -> str:
    report = getattr(exc, "report", None)
    findings = getattr(report, "findings", None) or getattr(report, "errors", None) or ()
    texts = [unicodedata.normalize("NFC", str(f)) for f in list(findings)[:3]]
    return "; ".join(texts) if texts else str(exc)
