"""Full office pages through the embedded engine: a dense A4 page at 300 dpi is read whole.

RapidOCR's per-line orientation classifier turned every second or third line of such a page
upside down before reading it; these pages are generated (tests/pagegen.py), so the truth is exact.
"""

from __future__ import annotations

import pytest

from tests.conftest import cer
from tests.pagegen import dense_page, turn_lines
from watcherd.ocr.engines import EngineConfigError
from watcherd.ocr.engines.rapidocr import RapidOcrEngine


def test_a_dense_a4_page_is_read_whole_by_the_daemon(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "rapidocr", "timeout_s": 120}).start()
    page, truth = dense_page(seed=0, dpi=300, pt=10, lines=40)
    page.save(daemon.inbox / "letter.png")
    result = daemon.wait_json("letter.png", daemon.outbox, timeout=180)
    assert result["status"] == "ok"
    assert cer(truth, result["text"]) < 0.005, result["text"]


@pytest.fixture(scope="module")
def engines() -> dict[str, RapidOcrEngine]:
    return {mode: RapidOcrEngine(line_orientation=mode) for mode in ("off", "check")}


def test_a_line_printed_upside_down_is_read_at_180_only_where_that_reads_better(engines) -> None:
    page, truth = dense_page(seed=5, lines=12)
    lines = truth.split("\n")
    turned = turn_lines(page, 12, (3, 7))
    checked = engines["check"].ocr(turned)
    assert cer(truth, checked.text) < 0.005, checked.text
    upright = {line.text for line in engines["off"].ocr(turned).lines}
    assert lines[3] not in upright and lines[7] not in upright  # read only one way, they are lost
    # Lines read at 180° keep no word boxes: those were measured the other way up.
    by_text = {line.text: line for line in checked.lines}
    assert by_text[lines[3]].words == () and by_text[lines[0]].words


def test_an_unknown_line_orientation_names_the_key() -> None:
    with pytest.raises(EngineConfigError, match=r"ocr\.options\.line_orientation"):
        RapidOcrEngine(line_orientation="sideways")
