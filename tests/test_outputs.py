"""Outputs besides the JSON (issue #12): text files, positions in the original's pixels, and the
searchable PDF, hOCR and ALTO written by the child and published with the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import make_image


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
