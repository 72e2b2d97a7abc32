"""The searchable PDF: the original file's pages with the invisible text layer over them.

Writes one PDF with pikepdf. Images become one page per frame (`images.image_pdf`). A PDF's own
pages are kept, their content and images unchanged (pikepdf rewrites the file around them); a page
whose source is "ocr" gets the layer (`textlayer.text_layer`) drawn after its content, which is
wrapped in q/Q, mapped through its CropBox and /Rotate; "pdf_text" pages get none. `pdfa=True`:
pikepdf's own PDF/A-2b conversion (sRGB output intent, XMP) and validation of the bytes written; a
document it cannot make conform raises `PdfaError`.

Trusts neither the file nor the pages: an encrypted or unreadable PDF, an image Pillow cannot open
and page numbers the document does not have raise `RenderError`; page attributes are looked up the
page tree with a bound (a hostile /Parent loop), a /Rotate that is no multiple of 90 is ignored as
viewers ignore it, and a page of zero size gets no layer.
"""

from __future__ import annotations

import io
import typing
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from watcherd.outputs.render.images import image_pdf, paint
from watcherd.outputs.render.layout import RenderedPage, RenderError, by_number, rows
from watcherd.outputs.render.textlayer import text_layer

if typing.TYPE_CHECKING:
    import pikepdf

_PDFA_FLAVOUR = "2b"


class PdfaError(RenderError):
    """PDF/A was asked for and this document cannot be made to conform without Ghostscript (for
    example a PDF input with fonts that are not embedded); `reasons` says why."""

    def __init__(self, reasons: str):
        super().__init__(f"cannot be written as PDF/A-{_PDFA_FLAVOUR.upper()}: {reasons}")
        self.reasons = reasons


def write_pdf(
    out: typing.BinaryIO, *, data: bytes, kind: str, pages: Sequence[RenderedPage], pdfa: bool = False
) -> None:
    """Write the original file (`data`, of `formats.sniff` kind `kind`) as a searchable PDF to
    `out`: its pages, or one page per image frame, each with the invisible text of the
    RenderedPage of the same number. Pages without a RenderedPage are kept without text."""
    import pikepdf

    numbered = by_number(pages)
    try:
        pdf = _open_pdf(data, pikepdf) if kind == "pdf" else image_pdf(data, kind, pikepdf)
    except (pikepdf.PdfError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RenderError(f"{kind or 'file'} cannot be read for the PDF: {type(exc).__name__}: {exc}") from None
    try:
        with pdf:
            _add_layers(pdf, numbered, pikepdf)
            if pdfa:
                _save_pdfa(pdf, out)
            else:
                pdf.save(out, compress_streams=True, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    except pikepdf.PdfError as exc:  # a page tree or content that opened but breaks on use
        raise RenderError(f"the PDF cannot be rewritten: {exc}") from None


def _add_layers(pdf: typing.Any, numbered: dict[int, RenderedPage], pikepdf: typing.Any) -> None:
    """Draw each OCR'd page's text layer over its page of `pdf`."""
    if max(numbered, default=0) > len(pdf.pages) or min(numbered, default=1) < 1:
        raise RenderError(f"page numbers {sorted(numbered)} do not fit a document of {len(pdf.pages)} pages")
    targets = []
    for number in sorted(numbered):
        page = numbered[number]
        if page.source != "ocr" or page.width < 1 or page.height < 1 or not rows(page):
            continue  # text from the PDF itself, or nothing to add
        geometry = _Geometry.of(pdf.pages[number - 1], pikepdf)
        if geometry.width > 0 and geometry.height > 0:  # a page of zero size shows nothing to search
            targets.append((page, geometry))
    if targets:
        layer = pikepdf.open(io.BytesIO(text_layer([(page, g.width) for page, g in targets])))
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
    page.contents_add(b"\nQ\n" + paint(place, name))


def _save_pdfa(pdf: typing.Any, out: typing.BinaryIO) -> None:
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
