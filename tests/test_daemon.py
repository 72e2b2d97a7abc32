"""The real daemon, end to end: real processes, real files, real children killed from outside."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest

from tests.conftest import Daemon, cer, gone_or_zombie, make_image, run_watcherd, wait_until
from tests.engines import HANG_WIDTH, SEGFAULT_WIDTH
from watcherd.core import config_file
from watcherd.daemon.service import STOP_GRACE_S, Service


def test_samples_are_read_by_the_embedded_engine(daemon_factory, samples: Path) -> None:
    daemon = daemon_factory(ocr={"engine": "rapidocr", "timeout_s": 120}).start()
    truth = json.loads((samples / "truth.json").read_text())
    for name in truth:
        shutil.copy(samples / name, daemon.inbox / name)
    for name, pages in truth.items():
        result = daemon.wait_json(name, daemon.outbox, timeout=120)
        assert result["status"] == "ok"
        assert result["engine"] == "rapidocr"
        assert [p["page"] for p in result["pages"]] == list(range(1, len(pages) + 1))
        for expected, page in zip(pages, result["pages"], strict=True):
            assert cer(expected, page["text"]) <= 0.02, (name, page["text"])
        wait_until((daemon.archive / name).exists, 10, "the original archived after its JSON")
        assert result["sha256"] == hashlib.sha256((daemon.archive / name).read_bytes()).hexdigest()
        assert result["image_path"] == str(daemon.archive / name)
        assert (daemon.outbox / f"{name}.md").read_text() == result["text"]
        assert not (daemon.inbox / name).exists()
    assert daemon.alive()


def test_a_hung_engine_costs_one_file_and_its_whole_process_group(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Hang", "timeout_s": 2}).start()
    child = psutil.Process(daemon.child_pid())
    make_image(daemon.inbox / "hang.png", width=HANG_WIDTH)
    grandchildren = wait_until(lambda: child.children(recursive=True), 30, "the hung engine's grandchild")
    started = time.monotonic()
    error = daemon.wait_json("hang.png", daemon.failed, timeout=30)
    assert time.monotonic() - started < 2 + 5
    assert error["error_code"] == "timeout"
    assert error["error"] == "OCR timed out (2 s); try a smaller image or raise ocr.timeout_s"
    assert error["attempts"] == 1
    assert (daemon.failed / "hang.png").exists()
    wait_until(lambda: all(gone_or_zombie(p.pid) for p in [child, *grandchildren]), 10, "the child's group to die")
    make_image(daemon.inbox / "next.png", width=40)
    assert daemon.wait_json("next.png")["text"] == "echo 40x48"
    assert daemon.alive()


def test_timeout_message_is_the_seed_wording_in_zh_tw(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Hang", "timeout_s": 1}, output={"locale": "zh-TW"})
    daemon.start(env={"OCR_TIMEOUT": "1.5"})
    make_image(daemon.inbox / "hang.png", width=HANG_WIDTH)
    error = daemon.wait_json("hang.png", daemon.failed)
    assert error["error"] == "OCR 處理超時 (1.5 秒)，請嘗試使用更小的圖片或增加超時設定"


def test_a_segfaulting_engine_is_retried_once_then_fails_and_the_daemon_serves_on(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Segfault"}).start()
    make_image(daemon.inbox / "crash.png", width=SEGFAULT_WIDTH)
    error = daemon.wait_json("crash.png", daemon.failed)
    assert error["error_code"] == "child_crashed"
    assert "SIGSEGV" in error["detail"]
    assert error["attempts"] == 2
    wait_until(lambda: len(daemon.child_pids()) >= 3, 10, "a third child")  # first, the retry's, the next
    make_image(daemon.inbox / "fine.png", width=30)
    assert daemon.wait_json("fine.png")["status"] == "ok"
    assert daemon.alive()


def test_kill_9_of_the_daemon_mid_file_then_restart_gives_exactly_one_result(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Slow"}).start()
    make_image(daemon.inbox / "inflight.png", width=50)
    wait_until(lambda: "inflight.png: OCR started" in daemon.log(), 30, "the file to reach the child")
    child = daemon.child_pid()
    assert (daemon.inbox / ".watcherd" / "processing" / "inflight.png").exists()
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: gone_or_zombie(child), 10, "the orphaned child to die with its parent")

    daemon.configure(ocr={"engine": "tests.engines:Echo"})
    daemon.start()
    result = daemon.wait_json("inflight.png", daemon.outbox)
    assert result["text"] == "echo 50x48"
    assert daemon.results() == [daemon.outbox / "inflight.png.json"]
    assert daemon.results(daemon.failed) == []
    assert places_of("inflight.png", daemon) == [daemon.archive / "inflight.png"]


def places_of(name: str, daemon: Daemon) -> list[Path]:
    return sorted(p for root in (daemon.inbox, daemon.archive, daemon.failed) for p in root.rglob(name))


def test_a_file_written_slowly_is_processed_once_when_complete(daemon_factory, samples: Path) -> None:
    daemon = daemon_factory(watch={"settle_s": 0.4}).start()
    data = (samples / "receipt_zh.jpg").read_bytes()
    target = daemon.inbox / "slow.jpg"
    chunks = [data[i : i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]

    def scanner() -> None:
        with open(target, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                time.sleep(0.6)  # the scanner's pace, longer than settle_s: only completeness holds it

    writer = threading.Thread(target=scanner)
    writer.start()
    result = daemon.wait_json("slow.jpg")
    writer.join()
    assert result["status"] == "ok"
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert daemon.results() == [daemon.outbox / "slow.jpg.json"]
    assert daemon.results(daemon.failed) == []


def bomb_png(path: Path, side: int = 30000) -> None:
    """A tiny PNG whose header claims side x side pixels."""
    make_image(path, 8, 8)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_bad_inputs_get_the_right_error_code(daemon_factory, samples: Path, tmp_path: Path) -> None:
    daemon = daemon_factory(watch={"settle_s": 0.2}).start()
    inbox = daemon.inbox
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "truncated.jpg").write_bytes((samples / "receipt_zh.jpg").read_bytes()[:5000])
    (inbox / "notes.jpg").write_text("this is a text file\n")
    bomb_png(inbox / "bomb.png")
    secret = tmp_path / "outside.jpg"
    shutil.copy(samples / "receipt_zh.jpg", secret)
    (inbox / "link.jpg").symlink_to(secret)
    os.mkfifo(inbox / "pipe.jpg")
    (inbox / "folder.jpg").mkdir()
    expected = {
        "empty.jpg": "unreadable",
        "truncated.jpg": "unreadable",
        "notes.jpg": "unsupported_type",
        "bomb.png": "too_large",
        "link.jpg": "not_regular_file",
        "pipe.jpg": "not_regular_file",
        "folder.jpg": "not_regular_file",
    }
    for name, code in expected.items():
        error = daemon.wait_json(name, daemon.failed)
        assert error["status"] == "failed"
        assert error["error_code"] == code, (name, error)
        assert error["error"] and error["detail"]
        assert os.path.lexists(daemon.failed / name)
        assert not os.path.lexists(inbox / name)
    assert (daemon.failed / "link.jpg").is_symlink() and secret.exists()  # moved, never followed
    assert daemon.results() == []
    make_image(inbox / "good.png")
    assert daemon.wait_json("good.png")["status"] == "ok"
    assert daemon.alive()


def test_names_survive_the_round_trip(daemon_factory) -> None:
    daemon = daemon_factory().start()
    make_image(daemon.inbox / "收據 2024 年.png", 20, 10)
    make_image(daemon.inbox / "scans" / "with space.png", 21, 10)
    raw = os.fsencode(daemon.inbox) + b"/caf\xe9.png"  # Latin-1 name from an old share
    make_image(Path(os.fsdecode(raw)), 22, 10)

    assert daemon.wait_json("收據 2024 年.png")["source"] == "收據 2024 年.png"
    assert daemon.wait_json("scans/with space.png")["source"] == "scans/with space.png"
    assert (daemon.archive / "scans" / "with space.png").exists()
    json_path = Path(os.fsdecode(os.fsencode(daemon.outbox) + b"/caf\xe9.png.json"))
    wait_until(json_path.exists, 30, "the non-UTF-8 name's JSON")
    document = json.loads(json_path.read_bytes().decode("utf-8"))  # strict UTF-8: valid JSON
    assert document["source"] == "caf\\xe9.png"
    assert document["source_b64"] == "Y2Fm6S5wbmc="
    archived = os.fsdecode(os.fsencode(daemon.archive) + b"/caf\xe9.png")
    wait_until(lambda: os.path.exists(archived), 10, "the non-UTF-8 original archived")  # it moves after its JSON


def test_the_same_name_twice_overwrites_nothing(daemon_factory) -> None:
    daemon = daemon_factory().start()
    make_image(daemon.inbox / "a.png", 31, 10)
    first = daemon.wait_json("a.png")
    make_image(daemon.inbox / "a.png", 32, 10)
    second = daemon.wait_json("a_1.png")
    assert first["text"] == "echo 31x10" and second["text"] == "echo 32x10"
    assert second["source"] == "a.png"
    assert second["image_path"] == str(daemon.archive / "a_1.png")
    assert second["text_path"] == str(daemon.outbox / "a_1.png.md")
    assert json.loads((daemon.outbox / "a.png.json").read_bytes()) == first
    # The JSON is published first, then the original moves (its claimed name is a.png, so
    # wait_json's "left the work area" check cannot see it): wait for the move.
    wait_until(lambda: sorted(p.name for p in daemon.archive.iterdir()) == ["a.png", "a_1.png"], 10, "a_1.png archived")


def test_files_present_at_startup_and_repeated_events_are_queued_once(daemon_factory) -> None:
    daemon = daemon_factory()
    for i in range(5):
        make_image(daemon.inbox / f"early{i}.png", 40 + i, 10)
    daemon.start()
    for i in range(5):
        daemon.wait_json(f"early{i}.png")
    target = make_image(daemon.inbox / "touched.png", 50, 10)
    for _ in range(20):  # a NAS touching metadata over and over
        os.utime(target)
        os.chmod(target, 0o644)
    daemon.wait_json("touched.png")
    wait_until(lambda: "touched.png: 1 page" in daemon.log(), 10)
    assert daemon.log().count("touched.png: OCR started") == 1
    assert len(daemon.results()) == 6


def test_polling_mode_sees_new_files_and_ignores_temporary_names(daemon_factory) -> None:
    daemon = daemon_factory(watch={"mode": "polling", "poll_interval_s": 0.2, "settle_s": 0.2}).start()
    assert "(polling)" in daemon.log()
    make_image(daemon.inbox / "deep" / "er" / "polled.PNG")
    (daemon.inbox / "upload.png.part").write_bytes(b"partial")
    make_image(daemon.inbox / ".hidden.png")
    make_image(daemon.inbox / "@eaDir" / "thumb.png")
    assert daemon.wait_json("deep/er/polled.PNG")["status"] == "ok"
    assert (daemon.inbox / "upload.png.part").exists() and (daemon.inbox / ".hidden.png").exists()
    assert (daemon.inbox / "@eaDir" / "thumb.png").exists()
    assert len(daemon.results()) == 1


def test_delete_on_success_removes_the_original_after_its_json(daemon_factory) -> None:
    daemon = daemon_factory(output={"on_success": "delete", "text_file": "txt"}).start()
    make_image(daemon.inbox / "gone.png", 25, 10)
    result = daemon.wait_json("gone.png")
    assert result["image_path"] is None
    assert (daemon.outbox / "gone.png.txt").read_text() == "echo 25x10"
    wait_until(lambda: not (daemon.inbox / ".watcherd" / "processing" / "gone.png").exists(), 10)
    assert not daemon.archive.exists() or not any(daemon.archive.iterdir())


class MovableClock:
    """time.monotonic, moved on at will: a grace period passes without being waited out."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.mark.slow  # a real daemon, if in this process (conftest marks those of daemon_factory)
def test_sigterm_while_a_file_is_in_the_child_returns_it_to_the_inbox(tmp_path: Path, caplog) -> None:
    """The page outlasts the stop grace: its child is killed and the file goes back to the inbox,
    never to failed. The daemon runs in this process on a clock the test moves past the grace;
    the child, the signal and the folders are real."""
    caplog.set_level(logging.INFO, logger="watcherd")
    daemon = Daemon(tmp_path, ocr={"engine": "tests.engines:Slow", "timeout_s": 300})  # its config, not its process
    settings = config_file.load(daemon.config_path)
    settings.require_paths()
    for folder in (daemon.outbox, daemon.failed, daemon.archive):
        folder.mkdir()
    daemon.state.mkdir(mode=0o700)
    clock = MovableClock()
    service = Service(settings, clock=clock)
    make_image(daemon.inbox / "busy.png")
    children: list[int] = []
    problems: list[BaseException] = []

    def stop_past_the_grace() -> None:
        try:
            flights = wait_until(lambda: [(s.pid, f) for s in service.pool.active for f in s.flights], 30, "the child")
            children.extend(pid for pid, _ in flights if pid is not None)
        except BaseException as exc:  # still stop the daemon below, or run() never returns
            problems.append(exc)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        try:
            wait_until(lambda: service.stopping_since is not None, 10, "the SIGTERM to be taken")
        except BaseException as exc:
            problems.append(exc)
        clock.offset += STOP_GRACE_S

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGIO)}
    driver = threading.Thread(target=stop_past_the_grace)
    driver.start()
    started = time.monotonic()
    try:
        assert service.run() == 0
    finally:
        driver.join()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert not problems, problems
    assert time.monotonic() - started < STOP_GRACE_S  # the grace was the clock's, not waited out
    assert children and all(gone_or_zombie(pid) for pid in children)
    assert f"killed by watcherd (stopping after the {STOP_GRACE_S:g} s grace)" in caplog.text
    assert (daemon.inbox / "busy.png").exists()
    assert daemon.results(daemon.failed) == [] and daemon.results() == []


def test_an_engine_that_never_loads_stops_the_daemon_with_the_reason(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Broken"})
    make_image(daemon.inbox / "waiting.png")
    daemon.start(wait_ready=False)
    assert daemon.proc.wait(timeout=120) == 1  # after retries with backoff 1, 2, 4, 8 s
    assert "keeps failing to load, giving up: FileNotFoundError: model folder /nonexistent not found" in daemon.log()
    assert daemon.log().count("retrying in") == 4
    assert (daemon.inbox / "waiting.png").exists()


def test_a_second_daemon_on_the_same_inbox_is_refused_with_a_restartable_exit(daemon_factory) -> None:
    first = daemon_factory().start()
    second = run_watcherd("run", "--config", str(first.config_path))
    assert second.returncode == 75  # EX_TEMPFAIL: restartable, the other one may go away
    assert f"another watcherd (pid {first.proc.pid}) already serves" in second.stderr
    make_image(first.inbox / "still.png")
    assert first.wait_json("still.png")["status"] == "ok"


def test_a_non_utf8_name_in_flight_shows_in_the_status(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo", "options": {"delay_s": 3}})
    daemon.start()
    make_image(Path(os.fsdecode(os.fsencode(daemon.inbox) + b"/r\xe9sum\xe9.png")))
    status = daemon.status_path
    wait_until(lambda: status.exists() and "r\\\\xe9sum\\\\xe9.png" in status.read_text(), 30, "the status")
    json_path = Path(os.fsdecode(os.fsencode(daemon.outbox) + b"/r\xe9sum\xe9.png.json"))
    wait_until(json_path.exists, 30, "the result")
    assert daemon.alive()


def test_an_idle_child_killed_from_outside_is_replaced_and_files_flow(daemon_factory) -> None:
    daemon = daemon_factory().start()
    victim = daemon.child_pid()
    os.kill(victim, signal.SIGKILL)
    make_image(daemon.inbox / "after-kill.png")
    assert daemon.wait_json("after-kill.png")["status"] == "ok"
    assert daemon.child_pid() != victim and daemon.alive()
