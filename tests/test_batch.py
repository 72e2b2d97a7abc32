"""Pages in flight (issue #14): an engine with `ocr_batch` gets up to `ocr.batch_pages` pages of a
file per call, under one deadline; a batch that runs over time or dies is read again a page at a
time, so only a page that is too slow on its own fails its file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import wait_until
from tests.engines import HANG_WIDTH


def tiff(path: Path, widths: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (w, 10), "white") for w in widths]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def test_pages_go_to_the_engine_in_batches_with_honest_times(daemon_factory: Any) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Batch", "batch_pages": 2}).start()
    tiff(daemon.inbox / "five.tif", [21, 22, 23, 24, 25])
    result = daemon.wait_json("five.tif")
    assert result["status"] == "ok", result
    texts = [p["text"] for p in result["pages"]]
    assert texts == [
        "echo 21x10 (batch of 2)",
        "echo 22x10 (batch of 2)",
        "echo 23x10 (batch of 2)",
        "echo 24x10 (batch of 2)",
        "echo 25x10 (alone)",
    ]
    first, second, *_, last = result["pages"]
    assert first["batch_pages"] == 2 and first["batch_time"] == second["batch_time"]
    assert first["processing_time"] <= first["batch_time"]
    assert "batch_pages" not in last


def test_a_batch_over_time_is_read_again_page_by_page(daemon_factory: Any) -> None:
    """Each page alone is quick; two at once take longer than the deadline. The file is not failed
    for it: the batch is cut, and the file read again a page at a time."""
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Batch", "batch_pages": 4, "timeout_s": 2, "options": {"slow_batches_s": 60}}
    ).start()
    tiff(daemon.inbox / "three.tif", [31, 32, 33])
    result = daemon.wait_json("three.tif", timeout=60)
    assert result["status"] == "ok", result
    assert [p["text"] for p in result["pages"]] == ["echo 31x10 (alone)", "echo 32x10 (alone)", "echo 33x10 (alone)"]
    assert result["attempts"] == 1
    assert "reading it again a page at a time" in daemon.log()


def test_a_page_that_hangs_alone_fails_its_file_and_the_next_file_is_read(daemon_factory: Any) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Batch", "batch_pages": 4, "timeout_s": 2}).start()
    tiff(daemon.inbox / "guilty.tif", [31, HANG_WIDTH, 33])
    failed = daemon.wait_json("guilty.tif", timeout=60)
    assert failed["status"] == "failed" and failed["error_code"] == "timeout", failed
    assert failed["detail"].startswith("page 2,"), failed["detail"]
    tiff(daemon.inbox / "next.tif", [41, 42])
    assert daemon.wait_json("next.tif")["status"] == "ok"


def test_a_scan_dropped_during_a_long_file_waits_for_one_turn_not_the_whole_file(daemon_factory: Any) -> None:
    """ocr.turn_pages: a long file is read a turn at a time, other files going in between; its
    result still has every page, in order, as one attempt."""
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Announce", "turn_pages": 4, "options": {"delay_s": 0.1}}
    ).start()
    tiff(daemon.inbox / "long.tif", [100 + i for i in range(20)])
    wait_until(lambda: "announce 101x10" in daemon.log(), 30, "the long file to start")
    tiff(daemon.inbox / "short.tif", [7])
    short = daemon.wait_json("short.tif")
    long = daemon.wait_json("long.tif", timeout=60)
    assert short["status"] == "ok" and long["status"] == "ok", (short, long)
    assert [p["page"] for p in long["pages"]] == list(range(1, 21))
    assert [p["text"] for p in long["pages"]] == [f"echo {100 + i}x10" for i in range(20)]
    assert long["attempts"] == 1
    assert long["processing_time"] >= sum(p["processing_time"] for p in long["pages"])
    order = [line.split()[-1] for line in daemon.log().splitlines() if line.startswith("announce ")]
    short_at = order.index("7x10")
    assert short_at < 12, order  # after the turn in progress (pages 1-4 or 5-8), not after page 20
