"""The PDF text layer: one page of invisible text per OCR'd page, as a separate little PDF that
`pdf.write_pdf` then lays over the original pages.

Writes it with OCRmyPDF's fpdf2 renderer (`ocrmypdf.fpdf_renderer`, fed an `OcrElement` tree of
`layout.rows`); neither Tesseract nor Ghostscript is called. The text is invisible (render mode 3)
and each word is stretched to its box. All of it is set in OCRmyPDF's bundled glyphless font
(Occulta, cut down per document: `_DocumentFonts` says why), never a font found on the system, so
the output is the same on every machine; ToUnicode maps make search and copy/paste return the
characters, Chinese and characters beyond the BMP included. Trusts the rows to be clean and inside
the page (`layout` sees to it); the fonts are read from OCRmyPDF's own package, once per process.
"""

from __future__ import annotations

import functools
import io
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path

from watcherd.outputs.render.layout import Rect, RenderedPage, rows

if typing.TYPE_CHECKING:
    from ocrmypdf.models.ocr_element import OcrElement


def text_layer(pages: Sequence[tuple[RenderedPage, float]]) -> bytes:
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
    for row in rows(page):
        words = [OcrElement(ocr_class=OcrClass.WORD, text=t.text, bbox=bbox(t.rect)) for t in row.tokens]
        lines.append(
            OcrElement(ocr_class=OcrClass.LINE, bbox=bbox(row.rect), textangle=row.angle or None, children=words)
        )
    return OcrElement(ocr_class=OcrClass.PAGE, bbox=BoundingBox(0, 0, page.width, page.height), children=lines)
