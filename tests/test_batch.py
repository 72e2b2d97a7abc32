"""Pages in flight: an engine with `ocr_batch` gets up to `ocr.batch_pages` pages per
call, of one file and of the files queued behind it, under one deadline; a batch that runs over
time, dies or fails is read again a page at a time (each file alone), so only a page that is too
slow, deadly or unreadable on its own fails its file, and the others succeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import wait_until
from tests.engines import ERROR_WIDTH, HANG_WIDTH, SEGFAULT_WIDTH


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


def queued_behind_a_loading_child(daemon_factory: Any, tmp_path: Path, files: dict[str, list[int]], **ocr: Any) -> Any:
    """A daemon whose Batch engine loads only once `files` (name → page widths) are all queued:
    the child then finds them waiting together, as a GPU does behind a busy queue."""
    gate = tmp_path / "gate"
    options = {"gate": str(gate), **ocr.pop("options", {})}
    daemon = daemon_factory(ocr={"engine": "tests.engines:Batch", "options": options, **ocr}).start(wait_ready=False)
    for name, widths in files.items():
        tiff(daemon.inbox / name, widths)

    wait_until(lambda: queued(daemon) == len(files), 30, f"{len(files)} files queued")
    gate.touch()
    return daemon


def queued(daemon: Any) -> int:
    """Files waiting for a child, from the status file (-1 before it is first written)."""
    try:
        queue = json.loads(daemon.status_path.read_text())["queue"]
    except (OSError, ValueError):
        return -1
    return int(queue["ready"] + queue["claimed"])


def test_one_page_scans_queued_together_share_a_batch(daemon_factory: Any, tmp_path: Path) -> None:
    files = {"a.tif": [51], "b.tif": [52], "c.tif": [53, 54]}
    daemon = queued_behind_a_loading_child(daemon_factory, tmp_path, files, batch_pages=4)
    results = {name: daemon.wait_json(name) for name in files}
    assert [p["text"] for p in results["a.tif"]["pages"]] == ["echo 51x10 (batch of 4)"]
    assert [p["text"] for p in results["b.tif"]["pages"]] == ["echo 52x10 (batch of 4)"]
    assert [p["text"] for p in results["c.tif"]["pages"]] == ["echo 53x10 (batch of 4)", "echo 54x10 (batch of 4)"]
    for result in results.values():
        assert result["status"] == "ok" and result["attempts"] == 1, result
        assert all(p["batch_pages"] == 4 for p in result["pages"])


def test_a_batch_fills_from_the_next_files_and_each_file_ends_with_its_last_page(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Three pages, then two: a batch of 2 takes a file's last page and the next file's first."""
    files = {"three.tif": [61, 62, 63], "two.tif": [64, 65]}
    daemon = queued_behind_a_loading_child(daemon_factory, tmp_path, files, batch_pages=2)
    three, two = daemon.wait_json("three.tif"), daemon.wait_json("two.tif")
    assert [p["text"] for p in three["pages"]] == [f"echo {w}x10 (batch of 2)" for w in (61, 62, 63)]
    assert [p["text"] for p in two["pages"]] == ["echo 64x10 (batch of 2)", "echo 65x10 (alone)"]
    assert [p["page"] for p in three["pages"]] == [1, 2, 3] and [p["page"] for p in two["pages"]] == [1, 2]


def test_a_page_that_hangs_in_a_batch_of_several_files_fails_only_its_file(daemon_factory: Any, tmp_path: Path) -> None:
    files = {"before.tif": [71], "hangs.tif": [HANG_WIDTH], "after.tif": [73]}
    daemon = queued_behind_a_loading_child(daemon_factory, tmp_path, files, batch_pages=4, timeout_s=2)
    hangs = daemon.wait_json("hangs.tif", timeout=60)
    assert hangs["status"] == "failed" and hangs["error_code"] == "timeout", hangs
    assert hangs["detail"].startswith("page 1,"), hangs["detail"]
    for name, width in (("before.tif", 71), ("after.tif", 73)):
        result = daemon.wait_json(name, timeout=60)
        assert result["status"] == "ok" and result["attempts"] == 1, result
        assert [p["text"] for p in result["pages"]] == [f"echo {width}x10 (alone)"]
    assert "reading it again a page at a time" in daemon.log()


def test_a_page_that_kills_the_child_in_a_batch_of_several_files_fails_only_its_file(
    daemon_factory: Any, tmp_path: Path
) -> None:
    files = {"before.tif": [81], "kills.tif": [SEGFAULT_WIDTH], "after.tif": [83]}
    daemon = queued_behind_a_loading_child(daemon_factory, tmp_path, files, batch_pages=4)
    kills = daemon.wait_json("kills.tif", timeout=60)
    assert kills["status"] == "failed" and kills["error_code"] == "child_crashed", kills
    assert "SIGSEGV" in kills["detail"], kills["detail"]
    for name, width in (("before.tif", 81), ("after.tif", 83)):
        result = daemon.wait_json(name, timeout=60)
        assert result["status"] == "ok", result
        assert [p["text"] for p in result["pages"]] == [f"echo {width}x10 (alone)"]


def test_an_engine_error_in_a_batch_of_several_files_fails_only_its_file(daemon_factory: Any, tmp_path: Path) -> None:
    """The child narrows it down itself, a page at a time: no child is lost for it."""
    files = {"before.tif": [91], "bad.tif": [ERROR_WIDTH], "after.tif": [93]}
    daemon = queued_behind_a_loading_child(daemon_factory, tmp_path, files, batch_pages=4)
    bad = daemon.wait_json("bad.tif")
    assert bad["status"] == "failed" and bad["error_code"] == "engine_error", bad
    assert f"cannot read a page {ERROR_WIDTH} pixels wide" in bad["detail"]
    for name, width in (("before.tif", 91), ("after.tif", 93)):
        result = daemon.wait_json(name)
        assert result["status"] == "ok" and result["attempts"] == 1, result
        assert [p["text"] for p in result["pages"]] == [f"echo {width}x10 (alone)"]
    assert len(daemon.child_pids()) == 1, daemon.log()


def test_typed_pages_between_scanned_ones_keep_their_order_while_batches_are_decoded_ahead(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A PDF of scanned and typed (text layer) pages, then a one-page scan, in batches of 2: the
    child decodes each next batch while the engine reads one, and reports typed pages without the
    engine; every page still lands in its own file, in order, and the searchable PDF has them all."""
    from fpdf import FPDF

    kinds = ["scan", "scan", "scan", "typed", "scan", "scan", "typed", "scan"]
    pdf = FPDF()
    for n, kind in enumerate(kinds, 1):
        pdf.add_page()
        if kind == "typed":
            pdf.set_font("helvetica", size=16)
            pdf.cell(text=f"Typed page {n}")
        else:
            scan = tmp_path / f"scan{n}.png"
            Image.new("RGB", (300 + n, 200), "white").save(scan)
            pdf.image(str(scan), x=0, y=0, w=210)
    pdf.output(str(tmp_path / "mixed.pdf"))
    gate = tmp_path / "gate"
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Batch", "batch_pages": 2, "options": {"gate": str(gate)}},
        output={"formats": ["json", "pdf"]},
    ).start(wait_ready=False)
    (tmp_path / "mixed.pdf").rename(daemon.inbox / "mixed.pdf")
    tiff(daemon.inbox / "one.tif", [99])
    wait_until(lambda: queued(daemon) == 2, 30, "both files queued")
    gate.touch()
    mixed, one = daemon.wait_json("mixed.pdf"), daemon.wait_json("one.tif")
    assert mixed["status"] == "ok" and one["status"] == "ok", (mixed, one)
    assert [p["page"] for p in mixed["pages"]] == list(range(1, 9))
    assert [p["source"] for p in mixed["pages"]] == ["pdf_text" if k == "typed" else "ocr" for k in kinds]
    for n, (page, kind) in enumerate(zip(mixed["pages"], kinds, strict=True), 1):
        assert page["text"].strip() == f"Typed page {n}" if kind == "typed" else page["text"].startswith("echo "), page
    assert [p["text"] for p in one["pages"]] == ["echo 99x10 (batch of 2)"]  # beside page 3: page 4 waits
    with open(mixed["pdf_path"], "rb") as f:
        assert f.read(5) == b"%PDF-"


def test_a_scan_dropped_while_a_batch_engine_reads_a_file_joins_the_request_in_progress(
    daemon_factory: Any,
) -> None:
    """The child is kept fed: a file that arrives while it reads another joins that request, so
    the odd last page of a 41-page file (read whole, turn_pages 0) shares its batch with the
    newcomer instead of going alone, and the newcomer does not wait for a request of its own."""
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Batch", "batch_pages": 2, "turn_pages": 0, "options": {"delay_s": 0.2}}
    ).start()
    tiff(daemon.inbox / "long.tif", [200 + i for i in range(41)])

    def long_in_flight() -> bool:
        try:
            status = json.loads(daemon.status_path.read_text())
        except (OSError, ValueError):
            return False
        return any(f["source"] == "long.tif" for f in status["in_flight"])

    wait_until(long_in_flight, 30, "the long file in the child")
    tiff(daemon.inbox / "short.tif", [7])
    short, long = daemon.wait_json("short.tif", timeout=60), daemon.wait_json("long.tif", timeout=60)
    assert short["status"] == "ok" and long["status"] == "ok", (short, long)
    assert [p["text"] for p in long["pages"]] == [f"echo {200 + i}x10 (batch of 2)" for i in range(41)]
    assert [p["text"] for p in short["pages"]] == ["echo 7x10 (batch of 2)"]
    assert long["attempts"] == 1 and len(daemon.child_pids()) == 1


def test_a_long_file_alone_in_a_batch_engine_reads_on_past_its_turn(daemon_factory: Any) -> None:
    """Turns are for files that wait; a batch engine is sent every file queued, so when the long
    file is all it holds, the next turn follows at once in full batches (with turns of 3 pages and
    batches of 2, pages 3 and 6 would otherwise go alone)."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Batch", "batch_pages": 2, "turn_pages": 3}).start()
    tiff(daemon.inbox / "nine.tif", [300 + i for i in range(9)])
    result = daemon.wait_json("nine.tif")
    assert result["status"] == "ok" and result["attempts"] == 1, result
    assert [p["text"] for p in result["pages"]] == [f"echo {300 + i}x10 (batch of 2)" for i in range(8)] + [
        "echo 308x10 (alone)"
    ]
