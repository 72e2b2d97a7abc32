"""The searchable PDF, hOCR and ALTO writers (`watcherd/outputs/render/`) on the shared samples.

Positions come from the real embedded engine (RapidOCR, called directly with word boxes); the PDF is
read back with pypdfium2 (text, character boxes, renderings) and pikepdf (raw image streams), the
hOCR with lxml and hocr-spec, the ALTO with lxml against `tests/data/alto-4-subset.xsd` (why not the
official XSD: that file's header).
"""

from __future__ import annotations

import ctypes
import io
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
import pytest
from lxml import etree
from PIL import Image, ImageOps

from tests import conftest
from tests.conftest import SAMPLES
from watcherd.core.text import Line, Word, box_from_points, box_from_rect
from watcherd.ocr.child.decode import PDF_DPI, Document
from watcherd.outputs import render
from watcherd.outputs.render import RenderedPage

DATA = Path(__file__).parent / "data"
MAX_CER = 0.02
MIN_IOU = 0.5


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth() -> dict[str, list[str]]:
    return json.loads((SAMPLES / "truth.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def engine() -> Any:
    from rapidocr import RapidOCR

    return RapidOCR()


def ocr_lines(engine: Any, image: Image.Image) -> tuple[Line, ...]:
    """RapidOCR's lines, with its word boxes (words for Latin, characters for Chinese)."""
    result = engine(np.asarray(image.convert("RGB"))[:, :, ::-1], return_word_box=True)
    if result.boxes is None:
        return ()
    lines = []
    for box, text, score, words in zip(result.boxes, result.txts, result.scores, result.word_results, strict=True):
        word_tuple = tuple(Word(w[0], box_from_points(w[2]), float(w[1])) for w in words)
        lines.append(Line(text, box_from_points(box), float(score), word_tuple))
    return tuple(lines)


def rendered_pages(engine: Any, data: bytes) -> list[RenderedPage]:
    """What the child will hand the writers: each page as displayed, OCR'd, at its DPI."""
    doc = Document(data, max_side_px=20_000, max_pages=10)
    frames = None if doc.kind == "pdf" else Image.open(io.BytesIO(data))
    pages = []
    for page in doc:
        if frames is not None:
            frames.seek(page.number - 1)
            dpi = render.image_dpi(frames)
        else:
            dpi = PDF_DPI
        lines = ocr_lines(engine, page.image)
        text = "\n".join(line.text for line in lines)
        pages.append(RenderedPage(page.number, page.image.width, page.image.height, dpi, lines, text))
    return pages


def write(data: bytes, pages: list[RenderedPage], **kwargs: Any) -> bytes:
    out = io.BytesIO()
    kind = Document(data, max_side_px=20_000, max_pages=10).kind
    render.write_pdf(out, data=data, kind=kind or "", pages=pages, **kwargs)
    return out.getvalue()


_CJK = r"[\u3000-\u9fff\uff00-\uffef]"


def normalise(text: str) -> str:
    """For CER: NFKC, whitespace runs as one space, and no space next to a Chinese character
    (Chinese has none; the engine drops the ones in truth.json, pdfium adds line-end ones)."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()
    return re.sub(rf"(?<={_CJK}) | (?={_CJK})", "", text)


def cer(got: str, want: str) -> float:
    return conftest.cer(want, got, normalise=normalise)


def pdf_texts(pdf_bytes: bytes) -> list[str]:
    doc = pdfium.PdfDocument(pdf_bytes)
    return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]


def device_rect(page: Any, textpage: Any, start: int, count: int, size: tuple[int, int]) -> tuple[float, ...] | None:
    """The union of the characters' boxes, in the pixels of the page rendered at `size` (pdfium's
    own page-to-device mapping: CropBox and /Rotate included)."""
    xs: list[float] = []
    ys: list[float] = []
    for index in range(start, start + count):
        if not textpage.get_text_range(index, 1).strip():
            continue  # a space pdfium generated between words has no box of its own
        left, bottom, right, top = textpage.get_charbox(index, loose=True)
        for x, y in ((left, bottom), (right, top)):
            dx, dy = ctypes.c_int(), ctypes.c_int()
            pdfium_c.FPDF_PageToDevice(page.raw, 0, 0, size[0], size[1], 0, x, y, ctypes.byref(dx), ctypes.byref(dy))
            xs.append(dx.value)
            ys.append(dy.value)
    return (min(xs), min(ys), max(xs), max(ys)) if xs else None


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_lines_on_their_boxes(pdf_bytes: bytes, pages: list[RenderedPage]) -> None:
    doc = pdfium.PdfDocument(pdf_bytes)
    for rp in pages:
        page = doc[rp.number - 1]
        textpage = page.get_textpage()
        for line in rp.lines:
            needle = " ".join(line.text.split())
            found = textpage.search(needle, match_case=True).get_next()
            assert found is not None, f"page {rp.number}: {needle!r} not found in the text layer"
            got = device_rect(page, textpage, found[0], found[1], (rp.width, rp.height))
            assert got is not None
            xs = [p[0] for p in line.box]
            ys = [p[1] for p in line.box]
            want = (min(xs), min(ys), max(xs), max(ys))
            assert iou(got, want) >= MIN_IOU, f"page {rp.number} {needle!r}: text at {got}, engine box {want}"


def render_page(pdf_bytes: bytes, index: int, size: tuple[int, int]) -> np.ndarray:
    page = pdfium.PdfDocument(pdf_bytes)[index]
    width_pt, _ = page.get_size()
    image = page.render(scale=size[0] / width_pt).to_pil().convert("RGB")
    assert abs(image.width - size[0]) <= 1 and abs(image.height - size[1]) <= 1, (image.size, size)
    return np.asarray(image.resize(size), dtype=np.int16)


def without_text(pages: list[RenderedPage]) -> list[RenderedPage]:
    return [RenderedPage(p.number, p.width, p.height, p.dpi, (), "") for p in pages]


def assert_invisible(out: bytes, data: bytes, pages: list[RenderedPage], originals: list[Image.Image] | None) -> None:
    """The output renders exactly like the same PDF without the text layer, and (images) like the
    original pixels within JPEG-decoder noise."""
    bare = write(data, without_text(pages))
    for rp in pages:
        size = (rp.width, rp.height)
        got = render_page(out, rp.number - 1, size)
        assert np.abs(got - render_page(bare, rp.number - 1, size)).max() == 0, f"page {rp.number}: layer visible"
        if originals is not None:
            want = np.asarray(originals[rp.number - 1].convert("RGB"), dtype=np.int16)
            assert np.abs(got - want).mean() <= 2.0, f"page {rp.number} differs from the original image"


def two_page_pdf() -> bytes:
    """An image-only two-page PDF, as a scanner writes it (Pillow: JPEG pages at 150 dpi)."""
    images = [Image.open(SAMPLES / name).convert("RGB") for name in ("memo_en.png", "receipt_zh.jpg")]
    out = io.BytesIO()
    images[0].save(out, "PDF", save_all=True, append_images=images[1:], resolution=150.0)
    return out.getvalue()


# -- searchable PDF from each input kind ------------------------------------------------------------


@pytest.mark.parametrize("name", ["memo_en.png", "receipt_zh.jpg", "two_pages.tif"])
def test_searchable_pdf_from_each_sample(name: str, engine: Any, truth: dict[str, list[str]]) -> None:
    data = (SAMPLES / name).read_bytes()
    pages = rendered_pages(engine, data)
    out = write(data, pages)

    texts = pdf_texts(out)
    assert len(texts) == len(truth[name])
    for got, want in zip(texts, truth[name], strict=True):
        assert cer(got, want) <= MAX_CER, (got, want)
    assert_lines_on_their_boxes(out, pages)
    originals = [ImageOps.exif_transpose(frame.copy()) for frame in _frames(data)]
    assert_invisible(out, data, pages, originals)

    # One page per frame, sized from the image's DPI (two_pages.tif says 1 dpi: 300 is used).
    doc = pdfium.PdfDocument(out)
    for rp in pages:
        width_pt, height_pt = doc[rp.number - 1].get_size()
        dpi = render.image_dpi(_frames(data)[rp.number - 1])
        assert (width_pt, height_pt) == pytest.approx((rp.width * 72 / dpi, rp.height * 72 / dpi))


def _frames(data: bytes) -> list[Image.Image]:
    image = Image.open(io.BytesIO(data))
    frames = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        frames.append(image.copy())
    return frames


def _modes() -> list[tuple[str, Image.Image, str]]:
    memo = Image.open(SAMPLES / "memo_en.png").convert("RGB").resize((200, 140))
    rgba = memo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(memo.size))
    grey16 = Image.fromarray((np.asarray(memo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return [
        ("bilevel TIFF (G4)", memo.convert("1"), "TIFF"),
        ("grey PNG", memo.convert("L"), "PNG"),
        ("16-bit grey PNG", grey16, "PNG"),
        ("palette PNG", memo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        ("RGBA PNG", rgba, "PNG"),
        ("CMYK TIFF", memo.convert("CMYK"), "TIFF"),
    ]


@pytest.mark.parametrize("label,image,fmt", _modes(), ids=[m[0] for m in _modes()])
def test_png_and_tiff_pixels_are_embedded_losslessly(label: str, image: Image.Image, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"compression": "group4"} if image.mode == "1" else {}))
    data = buffer.getvalue()
    page = RenderedPage(
        1, image.width, image.height, 300.0, (Line("MEMO", box_from_rect(10, 10, 80, 30), 0.9),), "MEMO"
    )
    out = write(data, [page])
    with pikepdf.open(io.BytesIO(out)) as pdf:
        (xobject,) = pdf.pages[0].get_images().values()
        got = pikepdf.PdfImage(xobject)
        want = Image.open(io.BytesIO(data))
        if want.mode == "P":
            want = want.convert("RGB")
        if want.mode == "RGBA":  # the alpha channel is the image's soft mask
            alpha = pikepdf.PdfImage(xobject.SMask).as_pil_image()
            assert np.array_equal(np.asarray(alpha), np.asarray(want.getchannel("A")))
        pixels = got.as_pil_image() if got.bits_per_component != 16 else None
        if pixels is None:  # Pillow has no 16-bit grey reader for PDF streams: compare the samples
            samples = np.frombuffer(xobject.read_bytes(), dtype=">u2").reshape(image.height, image.width)
            assert np.array_equal(samples, np.asarray(want, dtype=np.uint16))
        else:
            assert pixels.mode == want.mode
            assert np.array_equal(np.asarray(pixels), np.asarray(want))  # RGBA: pikepdf applies the SMask
    assert "MEMO" in pdf_texts(out)[0]


def test_chinese_copied_out_equals_the_truth(engine: Any, truth: dict[str, list[str]]) -> None:
    data = (SAMPLES / "receipt_zh.jpg").read_bytes()
    out = write(data, rendered_pages(engine, data))
    got = [normalise(line) for line in pdf_texts(out)[0].splitlines()]
    assert got == [normalise(line) for line in truth["receipt_zh.jpg"][0].splitlines()]
    textpage = pdfium.PdfDocument(out)[0].get_textpage()
    assert textpage.search("高雄市立圖書館").get_next() is not None


def test_jpeg_bytes_are_embedded_unchanged(engine: Any) -> None:
    data = (SAMPLES / "receipt_zh.jpg").read_bytes()
    out = write(data, rendered_pages(engine, data))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        images = list(pdf.pages[0].get_images().values())
        assert len(images) == 1
        assert images[0].Filter == pikepdf.Name.DCTDecode
        assert images[0].read_raw_bytes() == data


def test_jpeg_with_exif_orientation_is_passed_through_and_shown_upright(
    engine: Any, truth: dict[str, list[str]], tmp_path: Path
) -> None:
    # Stored sideways, EXIF 6 ("turn 90° clockwise to display"): displayed, it is the receipt.
    upright = Image.open(SAMPLES / "receipt_zh.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes(), dpi=(200, 200))
    data = buffer.getvalue()

    pages = rendered_pages(engine, data)
    assert (pages[0].width, pages[0].height) == upright.size  # boxes are in displayed orientation
    out = write(data, pages)
    assert cer(pdf_texts(out)[0], truth["receipt_zh.jpg"][0]) <= MAX_CER
    assert_lines_on_their_boxes(out, pages)
    assert_invisible(out, data, pages, [ImageOps.exif_transpose(Image.open(io.BytesIO(data)))])
    with pikepdf.open(io.BytesIO(out)) as pdf:
        (image,) = pdf.pages[0].get_images().values()
        assert image.read_raw_bytes() == data
        assert "/Rotate" not in pdf.pages[0].obj  # the placement matrix turns it, not the page
    assert pdfium.PdfDocument(out)[0].get_size() == pytest.approx((upright.width * 72 / 200, upright.height * 72 / 200))


def test_two_page_pdf_keeps_its_pages_and_gains_text(engine: Any, truth: dict[str, list[str]]) -> None:
    data = two_page_pdf()
    pages = rendered_pages(engine, data)
    out = write(data, pages)
    want = truth["two_pages.tif"]
    texts = pdf_texts(out)
    assert len(texts) == 2
    for got, expected in zip(texts, want, strict=True):
        assert cer(got, expected) <= MAX_CER, (got, expected)
    assert_lines_on_their_boxes(out, pages)
    originals = [pdfium.PdfDocument(data)[i].render(scale=PDF_DPI / 72).to_pil() for i in range(2)]
    assert_invisible(out, data, pages, originals)
    with pikepdf.open(io.BytesIO(data)) as before, pikepdf.open(io.BytesIO(out)) as after:
        for old, new in zip(before.pages, after.pages, strict=True):
            (old_image,) = old.get_images().values()
            (new_image,) = new.get_images().values()
            assert new_image.read_raw_bytes() == old_image.read_raw_bytes()
            assert list(new.mediabox) == list(old.mediabox)


@pytest.mark.parametrize("inherited", [False, True], ids=["on the page", "inherited from /Pages"])
def test_rotated_page_with_offset_cropbox(inherited: bool, engine: Any, truth: dict[str, list[str]]) -> None:
    """A page whose content is drawn sideways and turned upright by /Rotate 90, with its boxes away
    from the origin, and content that leaves its coordinate system scaled: the text must still
    land on the words as displayed. Also with /Rotate, /CropBox and /Resources inherited."""
    memo = Image.open(SAMPLES / "memo_en.png").convert("RGB")
    w, h = memo.width * 72 / 150, memo.height * 72 / 150
    x0, y0 = 100.0, 50.0
    pdf = pikepdf.new()
    page = pdf.add_blank_page(page_size=(h, w))
    page.obj.MediaBox = pikepdf.Array([x0 - 20, y0 - 30, x0 + h + 20, y0 + w + 30])
    jpeg = io.BytesIO()
    memo.save(jpeg, "JPEG", quality=95)
    image = pikepdf.Stream(pdf, jpeg.getvalue())
    image.Type, image.Subtype, image.Filter = pikepdf.Name.XObject, pikepdf.Name.Image, pikepdf.Name.DCTDecode
    image.Width, image.Height, image.BitsPerComponent = memo.width, memo.height, 8
    image.ColorSpace = pikepdf.Name.DeviceRGB
    name = page.add_resource(image, pikepdf.Name.XObject)
    # Drawn turned 90° counter-clockwise in user space; /Rotate 90 (clockwise) shows it upright.
    # The trailing `cm` outside q/Q is legal and would shrink anything drawn after it.
    page.contents_add(f"q 0 {w} {-h} 0 {x0 + h} {y0} cm {name} Do Q 0.5 0 0 0.5 0 0 cm".encode())
    holder = pdf.Root.Pages if inherited else page.obj
    holder.CropBox = pikepdf.Array([x0, y0, x0 + h, y0 + w])
    holder.Rotate = 90
    if inherited:
        pdf.Root.Pages.Resources = page.obj.Resources
        del page.obj.Resources
    buffer = io.BytesIO()
    pdf.save(buffer)
    data = buffer.getvalue()

    pages = rendered_pages(engine, data)
    assert pages[0].width > pages[0].height  # displayed upright (landscape, like the memo)
    out = write(data, pages)
    assert cer(pdf_texts(out)[0], truth["memo_en.png"][0]) <= MAX_CER
    assert_lines_on_their_boxes(out, pages)
    assert_invisible(out, data, pages, None)


def test_pdf_text_pages_get_no_second_layer(engine: Any) -> None:
    from fpdf import FPDF

    born = FPDF(unit="pt", format=(300, 200))
    born.add_page()
    born.set_font("helvetica", size=14)
    born.text(20, 40, "Born digital invoice 77")
    data = bytes(born.output())
    before = pdf_texts(data)[0]
    page = RenderedPage(
        1,
        833,
        556,
        PDF_DPI,
        (Line("Born digital invoice 77", box_from_rect(55, 85, 400, 115), 1.0),),
        before,
        "pdf_text",
    )
    out = write(data, [page])
    assert pdf_texts(out)[0] == before


def test_text_only_pages_are_searchable(truth: dict[str, list[str]]) -> None:
    data = (SAMPLES / "two_pages.tif").read_bytes()
    pages = [RenderedPage(i + 1, 1000, 700, 300.0, (), text) for i, text in enumerate(truth["two_pages.tif"])]
    out = write(data, pages)
    for got, want in zip(pdf_texts(out), truth["two_pages.tif"], strict=True):
        assert cer(got, want) <= MAX_CER, (got, want)
    doc = pdfium.PdfDocument(out)
    assert doc[0].get_textpage().search("scanning schedule").get_next() is not None
    assert doc[1].get_textpage().search("新臺幣").get_next() is not None
    assert_invisible(out, data, pages, None)


def test_a_long_paragraph_without_boxes_stays_searchable() -> None:
    data = (SAMPLES / "memo_en.png").read_bytes()
    words = [f"word{i}" for i in range(400)]
    page = RenderedPage(1, 1000, 700, 300.0, (), "# Title\n\n" + " ".join(words))
    text = normalise(pdf_texts(write(data, [page]))[0])
    assert all(word in text.split() for word in words)


# -- hostile and degenerate input -------------------------------------------------------------------

HOSTILE = 'a<b>&c"d\x00e\x1bf\ud800g]]>h'


def hostile_pages() -> list[RenderedPage]:
    lines = (
        Line(HOSTILE, box_from_rect(10, 10, 300, 40), 0.9),
        Line("outside the page", box_from_rect(-500, 650, 5000, 9000), None),  # clipped
        Line("zero", box_from_rect(50, 100, 50, 100), 0.5),  # a point
        Line("   ", box_from_rect(10, 200, 300, 240), 0.5),  # nothing to write
        Line("tilted line", ((100.0, 300.0), (400.0, 250.0), (410.0, 290.0), (110.0, 340.0)), float("nan")),
        Line("beyond 𠀋 BMP", box_from_rect(500, 400, 900, 440), 0.8),  # CJK Extension B
        Line("not a number", ((float("nan"), 500.0), (float("inf"), 500.0), (300.0, 540.0), (10.0, 540.0)), 0.7),
    )
    return [
        RenderedPage(1, 1000, 700, 300.0, lines, "\n".join(line.text for line in lines)),
        RenderedPage(2, 1000, 700, 300.0, (), ""),  # empty page
    ]


def test_hostile_text_and_boxes_still_make_every_output() -> None:
    data = (SAMPLES / "two_pages.tif").read_bytes()
    pages = hostile_pages()
    out = write(data, pages)
    text = pdf_texts(out)[0]
    for word in ("a<b>&c", "outside the page", "zero", "tilted line", "beyond 𠀋 BMP", "not a number"):
        assert word in text, (word, text)
    assert pdf_texts(out)[1].strip() == ""
    hocr_doc = etree.fromstring(render.hocr(pages, title=HOSTILE))
    alto_doc = etree.fromstring(render.alto(pages, filename=HOSTILE))
    assert validate_alto(render.alto(pages, filename=HOSTILE)) is None
    assert HOSTILE.replace("\x00", "\ufffd").replace("\x1b", "\ufffd").replace("\ud800", "\ufffd") in "".join(
        hocr_doc.itertext()
    )
    for rect in hocr_boxes(hocr_doc):
        assert 0 <= rect[0] <= rect[2] <= 1000 and 0 <= rect[1] <= rect[3] <= 700, rect
    assert alto_doc is not None


def test_page_numbers_must_fit_the_document() -> None:
    data = (SAMPLES / "memo_en.png").read_bytes()
    with pytest.raises(render.RenderError, match="page numbers"):
        write(data, [RenderedPage(2, 1000, 700, 300.0, (), "x")])
    twice = [RenderedPage(1, 1000, 700, 300.0, (), "x")] * 2
    for make in (
        lambda: write(data, twice),
        lambda: render.hocr(twice, title="t"),
        lambda: render.alto(twice, filename="f"),
    ):
        with pytest.raises(render.RenderError, match="same number"):
            make()


def test_encrypted_and_broken_pdfs_are_refused_with_a_render_error() -> None:
    with pikepdf.open(io.BytesIO(two_page_pdf())) as pdf:
        locked = io.BytesIO()
        pdf.save(locked, encryption=pikepdf.Encryption(owner="secret", user=""))
    page = RenderedPage(1, 1000, 700, PDF_DPI, (), "x")
    with pytest.raises(render.RenderError, match="encrypted"):
        render.write_pdf(io.BytesIO(), data=locked.getvalue(), kind="pdf", pages=[page])
    with pytest.raises(render.RenderError, match="cannot be read"):
        render.write_pdf(io.BytesIO(), data=b"%PDF-1.7\n garbage", kind="pdf", pages=[page])


def test_image_dpi_rule() -> None:
    image = Image.new("L", (10, 10))
    assert render.image_dpi(image) == render.DEFAULT_DPI
    for dpi, want in (((200, 200), 200.0), ((1, 1), 300.0), ((72000, 72000), 300.0), ((float("nan"), 300), 300.0)):
        image.info["dpi"] = dpi
        assert render.image_dpi(image) == want, dpi


# -- hOCR and ALTO -----------------------------------------------------------------------------------


def validate_alto(xml: bytes) -> str | None:
    schema = etree.XMLSchema(etree.parse(str(DATA / "alto-4-subset.xsd")))
    doc = etree.fromstring(xml)
    return None if schema.validate(doc) else str(schema.error_log)


def hocr_boxes(doc: Any) -> list[tuple[int, ...]]:
    boxes = []
    for el in doc.iter("{http://www.w3.org/1999/xhtml}span"):
        match = re.search(r"bbox (\d+) (\d+) (\d+) (\d+)", el.get("title", ""))
        assert match, el.get("title")
        boxes.append(tuple(int(v) for v in match.groups()))
    return boxes


def hocr_words(xml: bytes) -> list[tuple[str, tuple[int, ...], int | None]]:
    doc = etree.fromstring(xml)
    words = []
    for el in doc.iter("{http://www.w3.org/1999/xhtml}span"):
        if el.get("class") != "ocrx_word":
            continue
        title = el.get("title", "")
        bbox = tuple(int(v) for v in re.search(r"bbox (\d+) (\d+) (\d+) (\d+)", title).groups())  # type: ignore[union-attr]
        conf = re.search(r"x_wconf (\d+)", title)
        words.append((el.text or "", bbox, int(conf.group(1)) if conf else None))
    return words


def alto_words(xml: bytes) -> list[tuple[str, tuple[int, ...], int | None]]:
    ns = {"a": render.ALTO_NS}
    words = []
    for el in etree.fromstring(xml).iterfind(".//a:String", ns):
        x, y, w, h = (int(el.get(k)) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))
        bbox = (x, y, x + w, y + h)
        wc = el.get("WC")
        words.append((el.get("CONTENT"), bbox, round(float(wc) * 100) if wc is not None else None))
    return words


def hocr_spec_errors(xml: bytes, tmp_path: Path) -> list[str]:
    from hocr_spec import HocrValidator

    path = tmp_path / "page.hocr"
    path.write_bytes(xml)
    report = HocrValidator("standard").validate(str(path))
    return [f"{item.level} {item.message}" for item in report.items if item.level in ("ERROR", "FATAL")]


@pytest.mark.parametrize("name", ["memo_en.png", "receipt_zh.jpg", "two_pages.tif"])
def test_hocr_and_alto_validate_and_carry_the_same_words(
    name: str, engine: Any, truth: dict[str, list[str]], tmp_path: Path
) -> None:
    data = (SAMPLES / name).read_bytes()
    pages = rendered_pages(engine, data)
    hocr_xml = render.hocr(pages, title=name)
    alto_xml = render.alto(pages, filename=name)

    assert hocr_spec_errors(hocr_xml, tmp_path) == []
    assert validate_alto(alto_xml) is None
    assert hocr_words(hocr_xml) == alto_words(alto_xml)
    words = [w[0] for w in hocr_words(hocr_xml)]
    assert cer(" ".join(words), " ".join(truth[name])) <= MAX_CER
    doc = etree.fromstring(hocr_xml)
    page_titles = [
        el.get("title") for el in doc.iter("{http://www.w3.org/1999/xhtml}div") if el.get("class") == "ocr_page"
    ]
    assert page_titles == [f"bbox 0 0 {p.width} {p.height}; ppageno {p.number - 1}; scan_res 300 300" for p in pages]


def test_hocr_and_alto_of_hostile_and_empty_pages_validate(tmp_path: Path) -> None:
    pages = hostile_pages()
    assert hocr_spec_errors(render.hocr(pages, title=HOSTILE), tmp_path) == []
    assert validate_alto(render.alto(pages, filename=HOSTILE)) is None
    assert hocr_words(render.hocr(pages, title="t")) == alto_words(render.alto(pages, filename="f"))


# -- no external programs ---------------------------------------------------------------------------

NO_PROGRAMS = """
import io, sys
started = []
sys.addaudithook(lambda event, args: started.append((event, args)) if event in (
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty") else None)
from watcherd.outputs import render
from watcherd.core.text import Line, box_from_rect
page = render.RenderedPage(1, 1000, 700, 300.0, (Line("收據 MEMO", box_from_rect(50, 50, 400, 90), 0.9),), "x")
data = open(sys.argv[1], "rb").read()
render.write_pdf(io.BytesIO(), data=data, kind="jpeg", pages=[page])
render.write_pdf(io.BytesIO(), data=data, kind="jpeg", pages=[page], pdfa=True)
assert not started, started
print("ok")
"""


def test_needs_neither_tesseract_nor_ghostscript() -> None:
    """The PDF and PDF/A paths start no program at all (an audit hook sees every exec, spawn and
    fork), and work with an empty PATH, whether Tesseract and Ghostscript are installed or not."""
    result = subprocess.run(
        [sys.executable, "-c", NO_PROGRAMS, str(SAMPLES / "receipt_zh.jpg")],
        cwd=Path(__file__).parent.parent,
        env={"PATH": "/nonexistent", "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- PDF/A -------------------------------------------------------------------------------------------


def test_pdfa_from_an_image(engine: Any, truth: dict[str, list[str]]) -> None:
    data = (SAMPLES / "receipt_zh.jpg").read_bytes()
    out = write(data, rendered_pages(engine, data), pdfa=True)
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert pdf.Root.OutputIntents[0].S == pikepdf.Name.GTS_PDFA1
        with pdf.open_metadata() as meta:
            assert meta.pdfa_status == "2B"
    assert cer(pdf_texts(out)[0], truth["receipt_zh.jpg"][0]) <= MAX_CER


@pytest.mark.parametrize(
    "label,image,fmt", [m for m in _modes() if m[1].mode != "CMYK"], ids=lambda v: v if isinstance(v, str) else ""
)
def test_pdfa_from_each_image_mode(label: str, image: Image.Image, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    page = RenderedPage(
        1, image.width, image.height, 300.0, (Line("MEMO", box_from_rect(10, 10, 80, 30), 0.9),), "MEMO"
    )
    out = write(buffer.getvalue(), [page], pdfa=True)
    with pikepdf.open(io.BytesIO(out)) as pdf, pdf.open_metadata() as meta:
        assert meta.pdfa_status == "2B"
    assert "MEMO" in pdf_texts(out)[0]


def test_pdfa_refused_for_a_cmyk_image_without_profile() -> None:
    """PDF/A forbids DeviceCMYK under an sRGB output intent; converting the pixels would not be
    lossless, so the writer says so instead."""
    buffer = io.BytesIO()
    Image.open(SAMPLES / "receipt_zh.jpg").convert("CMYK").save(buffer, "JPEG")
    page = RenderedPage(1, 1000, 700, 300.0, (Line("收據", box_from_rect(60, 66, 130, 107), 0.9),), "收據")
    with pytest.raises(render.PdfaError, match="DeviceCMYK"):
        write(buffer.getvalue(), [page], pdfa=True)
    assert "收據" in pdf_texts(write(buffer.getvalue(), [page]))[0]  # without PDF/A it is fine


def test_pdfa_refused_when_a_font_is_not_embedded() -> None:
    from fpdf import FPDF

    born = FPDF(unit="pt", format=(300, 200))
    born.add_page()
    born.set_font("helvetica", size=14)  # a standard-14 font: fpdf2 does not embed it
    born.text(20, 40, "Born digital")
    data = bytes(born.output())
    page = RenderedPage(1, 833, 556, PDF_DPI, (), "Born digital", "pdf_text")
    with pytest.raises(render.PdfaError, match="PDF/A"):
        write(data, [page], pdfa=True)
