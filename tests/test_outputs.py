"""Outputs besides the JSON: text files, positions in the original's pixels, and the
searchable PDF, hOCR and ALTO written by the child and published with the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import cer, make_image


def test_lines_are_published_in_the_original_pages_pixels(daemon_factory: Any, tmp_path: Path) -> None:
    """The engine saw a shrunk image (ocr.max_side_px); its boxes come back scaled to the file as
    dropped. A line whose box is NaN is dropped, not a crash. md and txt are both written."""
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Lines", "max_side_px": 200, "auto_rotate": False},
        output={"formats": ["json", "md", "txt"]},
    ).start()
    make_image(daemon.inbox / "wide.png", 400, 300)
    result = daemon.wait_json("wide.png")
    assert result["status"] == "ok", result
    (page,) = result["pages"]
    assert page["size"] == [200, 150] and page["resized_from"] == [400, 300]
    assert page["source"] == "ocr" and "rotated" not in page
    (line,) = page["lines"]
    assert line == {
        "text": "echo 200x150",
        "score": 0.75,
        "box": [[0.0, 0.0], [400.0, 0.0], [400.0, 300.0], [0.0, 300.0]],
        "words": [
            {"text": "echo", "score": 0.5, "box": [[0.0, 0.0], [200.0, 0.0], [200.0, 300.0], [0.0, 300.0]]},
            {"text": "200x150", "score": 1.0, "box": [[200.0, 0.0], [400.0, 0.0], [400.0, 300.0], [200.0, 300.0]]},
        ],
    }
    assert result["text"] == "echo 200x150"
    assert Path(result["text_path"]).read_text() == "echo 200x150"
    assert Path(result["txt_path"]).read_text() == "echo 200x150"
    assert result["text_path"].endswith("wide.png.md") and result["txt_path"].endswith("wide.png.txt")


# -- with the real embedded engine, the real renderers and the shared samples -------------------

ALL_FORMATS = ["json", "md", "txt", "pdf", "hocr", "alto"]


def pdf_text(path: Path) -> list[str]:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(path))
    try:
        return [page.get_textpage().get_text_range() for page in document]
    finally:
        document.close()


def test_every_format_from_the_samples_with_the_embedded_engine(
    daemon_factory: Any, samples: Path, tmp_path: Path
) -> None:
    """The searchable PDF, hOCR and ALTO come out beside the JSON for each sample, the PDF's text
    layer reads back as the truth (Chinese included), and the JSON names every file."""
    import json
    import shutil

    truth = json.loads((samples / "truth.json").read_text())
    daemon = daemon_factory(ocr={"engine": "rapidocr"}, output={"formats": ALL_FORMATS}).start()
    for name in truth:
        shutil.copy(samples / name, daemon.inbox / name)
    for name, pages in truth.items():
        result = daemon.wait_json(name, timeout=120)
        assert result["status"] == "ok", result
        assert "output_errors" not in result, result["output_errors"]
        for fmt in ("pdf", "hocr", "alto"):
            assert Path(result[f"{fmt}_path"]).is_file(), (fmt, result)
            extension = "alto.xml" if fmt == "alto" else fmt
            assert result[f"{fmt}_path"] == str(daemon.outbox / f"{name}.{extension}")
        assert all(page["lines"] for page in result["pages"])
        extracted = pdf_text(Path(result["pdf_path"]))
        assert len(extracted) == len(pages)
        for got, want in zip(extracted, pages, strict=True):
            assert cer(want, got) <= 0.02, (name, got, want)
        mode = Path(result["pdf_path"]).stat().st_mode & 0o777
        assert mode == 0o640, oct(mode)
    state_render = list((daemon.state).glob("*.render/*"))
    assert state_render == [], state_render  # every scratch file was published (moved), none left


def test_a_born_digital_pdf_is_finished_without_the_engine(daemon_factory: Any, tmp_path: Path) -> None:
    """ocr.pdf_text: use (the default): a PDF whose pages carry text never reaches the engine
    (this one fails when called), and its text comes from the PDF itself."""
    from fpdf import FPDF

    pdf = FPDF()
    for text in ("Invoice 2026-0042", "Total due: 900 TWD"):
        pdf.add_page()
        pdf.set_font("helvetica", size=16)
        pdf.cell(text=text)
    daemon = daemon_factory(ocr={"engine": "tests.engines:Refuse"}, output={"formats": ALL_FORMATS}).start()
    pdf.output(str(tmp_path / "digital.pdf"))
    (tmp_path / "digital.pdf").rename(daemon.inbox / "digital.pdf")
    result = daemon.wait_json("digital.pdf")
    assert result["status"] == "ok", result
    assert [p["source"] for p in result["pages"]] == ["pdf_text", "pdf_text"]
    assert [p["text"].strip() for p in result["pages"]] == ["Invoice 2026-0042", "Total due: 900 TWD"]
    assert all(p["lines"] for p in result["pages"])
    assert [t.strip() for t in pdf_text(Path(result["pdf_path"]))] == ["Invoice 2026-0042", "Total due: 900 TWD"]


def test_pages_scanned_sideways_come_out_right(daemon_factory: Any, samples: Path) -> None:
    """Each sample turned 90, 180 and 270 degrees, with no EXIF tag: read like the upright one,
    with `rotated` recorded and the boxes in the pixels of the file as dropped."""
    import json

    from PIL import Image

    truth = json.loads((samples / "truth.json").read_text())
    daemon = daemon_factory(ocr={"engine": "rapidocr"}).start()
    expected = {}
    for name in ("receipt_zh.jpg", "memo_en.png"):
        image = Image.open(samples / name).convert("RGB")
        for angle in (90, 180, 270):
            turned = f"{angle}_{name.rsplit('.', 1)[0]}.png"
            # PIL rotates counter-clockwise: a page turned `angle` clockwise is rotate(-angle).
            image.rotate(-angle, expand=True).save(daemon.inbox / turned)
            expected[turned] = (angle, truth[name][0], image.size if angle == 180 else image.size[::-1])
    for turned, (angle, want, size) in expected.items():
        result = daemon.wait_json(turned, timeout=120)
        assert result["status"] == "ok", result
        (page,) = result["pages"]
        assert page["rotated"] == angle, (turned, page["rotated"])
        assert cer(want, page["text"]) <= 0.02, (turned, page["text"], want)
        width, height = size
        for line in page["lines"]:
            for x, y in line["box"]:
                assert -2 <= x <= width + 2 and -2 <= y <= height + 2, (turned, line)


def test_a_mixed_pdf_ocrs_only_its_scanned_pages(daemon_factory: Any, tmp_path: Path) -> None:
    """A born-digital page and a scanned (image-only) page in one PDF: the first keeps its own
    text, only the second reaches the engine, and the searchable PDF gets a layer on it alone."""
    from fpdf import FPDF
    from PIL import Image

    scan = tmp_path / "scan.png"
    Image.new("RGB", (300, 200), "white").save(scan)
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=16)
    pdf.cell(text="Typed cover letter")
    pdf.add_page()
    pdf.image(str(scan), x=0, y=0, w=210)
    daemon = daemon_factory(ocr={"engine": "tests.engines:Lines"}, output={"formats": ["json", "pdf"]}).start()
    pdf.output(str(tmp_path / "mixed.pdf"))
    (tmp_path / "mixed.pdf").rename(daemon.inbox / "mixed.pdf")
    result = daemon.wait_json("mixed.pdf")
    assert result["status"] == "ok", result
    first, second = result["pages"]
    assert (first["source"], first["text"].strip()) == ("pdf_text", "Typed cover letter")
    assert second["source"] == "ocr" and second["text"].startswith("echo "), second
    assert [t.strip() for t in pdf_text(Path(result["pdf_path"]))] == ["Typed cover letter", second["text"]]
