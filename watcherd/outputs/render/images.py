"""Image inputs as PDF pages: one page per frame, the frame as its only content, for `pdf.write_pdf`
to put the text layer over.

Writes pikepdf pages: each sized from the frame's DPI (`image_dpi`; both axes, so a fax's
non-square pixels keep their real proportions). A JPEG's bytes are embedded unchanged (DCTDecode);
an EXIF orientation other than 1 is applied by the placement matrix, not by re-encoding, so the
page shows the image as displayed and the boxes (displayed orientation) need no turning. Other
formats are decoded by Pillow and stored losslessly (Flate; alpha as an SMask; 16-bit grey kept at
16 bits). Trusts only what Pillow decodes: a DPI outside MIN_DPI..MAX_DPI becomes DEFAULT_DPI, an
unknown EXIF orientation counts as 1, and an ICC profile is embedded only when its colour space fits
the pixels (else the device space), since a reader refuses an image whose profile does not fit.
"""

from __future__ import annotations

import io
import math
import typing
import zlib

from PIL import Image, ImageOps

from watcherd.core.images import to_rgb
from watcherd.outputs.render.layout import DEFAULT_DPI, RenderError

if typing.TYPE_CHECKING:
    import pikepdf

MIN_DPI, MAX_DPI = 50.0, 4800.0  # a fax is 98 dpi; 1 or 72 000 dpi is a bug in the writer

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


def image_dpi(image: Image.Image) -> float:
    """The resolution a page image says it has (`info["dpi"]`, horizontal), when it is a number
    between MIN_DPI and MAX_DPI; otherwise DEFAULT_DPI. The PDF page size comes from it."""
    return _dpi_xy(image)[0]


def image_pdf(data: bytes, kind: str, pikepdf: typing.Any) -> pikepdf.Pdf:
    """A new PDF with one page per frame of the image `data` (of `formats.sniff` kind `kind`)."""
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
        page.contents_add(paint(_placement(orientation, width, height), name))
    return pdf


def paint(matrix: typing.Any, name: typing.Any) -> bytes:
    """Content that paints the XObject `name` through `matrix` (a pikepdf.Matrix), in a graphics
    state of its own (q ... Q), so nothing it sets leaks into what comes after."""
    numbers = " ".join(f"{v:.6f}" for v in (matrix.a, matrix.b, matrix.c, matrix.d, matrix.e, matrix.f))
    return b"q " + numbers.encode() + b" cm " + bytes(name.unparse()) + b" Do Q\n"


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
    space = _colour_space(pdf, image, spaces[image.mode], pikepdf)
    xobject = _image_xobject(pdf, data, image.size, 8, space, pikepdf.Name.DCTDecode, pikepdf)
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
        frame = frame if frame.mode == "RGB" else to_rgb(frame)  # 32-bit grey: scaled as the child OCRs it
        raw, bits, space = frame.tobytes(), 8, pikepdf.Name.DeviceRGB
    flate = pikepdf.Name.FlateDecode
    space = _colour_space(pdf, frame, space, pikepdf)
    xobject = _image_xobject(pdf, zlib.compress(raw, 6), frame.size, bits, space, flate, pikepdf)
    if alpha is not None:
        mask = zlib.compress(alpha.tobytes(), 6)
        xobject.SMask = _image_xobject(pdf, mask, alpha.size, 8, pikepdf.Name.DeviceGray, flate, pikepdf)
    return xobject


def _image_xobject(
    pdf: typing.Any,
    encoded: bytes,
    size: tuple[int, int],
    bits: int,
    space: typing.Any,
    encoding: typing.Any,
    pikepdf: typing.Any,
) -> typing.Any:
    """An image XObject of `encoded` bytes (compressed by the filter `encoding`)."""
    xobject = pikepdf.Stream(pdf, encoded)
    xobject.Type = pikepdf.Name.XObject
    xobject.Subtype = pikepdf.Name.Image
    xobject.Width, xobject.Height = size
    xobject.BitsPerComponent = bits
    xobject.ColorSpace = space
    xobject.Filter = encoding
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
