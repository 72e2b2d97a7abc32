"""Crafted bytes, names and engine output: no file, name or reply can crash or stall
the daemon, forge its logs or leave invalid UTF-8 in a JSON (design §9). Real daemons throughout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests import crafted
from tests.conftest import REPO, gone_or_zombie, make_image, wait_until
from tests.engines import (
    GARBAGE_MISSING_FIELDS,
    GARBAGE_NOT_JSON,
    GARBAGE_NOT_OBJECT,
    GARBAGE_OVERSIZED,
    GARBAGE_PARTIAL,
    HANG_WIDTH,
)


def test_names_cannot_forge_log_lines_or_reach_the_terminal(daemon_factory) -> None:
    daemon = daemon_factory(logging={"target": "stderr"}).start()
    forged = "line1\nINFO fake.png: 1 page(s) in 0.01 s.png"
    terminal = "esc\x1b[2J\x1b]0;pwned\x07\x9b31m.png"
    make_image(daemon.inbox / forged, 21, 10)
    make_image(daemon.inbox / terminal, 22, 10)
    assert daemon.wait_json(forged)["source"] == forged  # the JSON keeps the real name
    assert daemon.wait_json(terminal)["source"] == terminal
    wait_until(lambda: daemon.log().count(": 1 page(s) in") >= 2, 10, "both done lines")
    log = daemon.log()
    assert not any(line.startswith("INFO fake.png") for line in log.splitlines()), log
    assert "line1\\nINFO fake.png: 1 page(s) in 0.01 s.png: 1 page(s)" in log
    assert "\x1b" not in log and "\x07" not in log and "\x9b" not in log
    assert "esc\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m.png: OCR started" in log
    assert daemon.alive()


def test_crafted_tiffs_neither_crash_nor_stall_the_parent(daemon_factory) -> None:
    """A 104-byte BigTIFF claiming 2^44 entries once killed the parent with MemoryError (the file
    stayed in the inbox: a crash loop); 600 chained 65,535-entry IFDs held the loop for 13 s."""
    daemon = daemon_factory().start()
    (daemon.inbox / "bomb.tif").write_bytes(crafted.bigtiff_bomb())
    (daemon.inbox / "chain.tif").write_bytes(crafted.ifd_chain_of_giants())
    for name in ("bomb.tif", "chain.tif"):
        error = daemon.wait_json(name, daemon.failed, timeout=30)
        assert error["error_code"] in ("unreadable", "too_large"), error
    make_image(daemon.inbox / "after.png", 33, 10)
    assert daemon.wait_json("after.png")["text"] == "echo 33x10"
    assert daemon.alive()
    assert "Traceback" not in daemon.log().split("OCR child")[0]  # nothing raised in the parent


def test_engine_text_with_lone_surrogates_is_published_as_valid_utf8(daemon_factory) -> None:
    """It raised UnicodeEncodeError at publication, and again at every restart (recovery)."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Surrogates"}).start()
    make_image(daemon.inbox / "odd.png", 30, 10)
    daemon.wait_json("odd.png", daemon.outbox)
    raw = (daemon.outbox / "odd.png.json").read_bytes()
    document = json.loads(raw.decode("utf-8"))  # strict UTF-8
    assert document["text"] == "before \ufffd after \U0001f600 end \ufffd"
    assert document["pages"][0]["replaced_characters"] == 2
    assert (daemon.outbox / "odd.png.md").read_text("utf-8") == document["text"]
    assert daemon.alive()


def test_a_child_that_breaks_the_protocol_costs_its_file_only(daemon_factory) -> None:
    """Garbage on the protocol pipe is a child crash (retried once, then child_crashed), never an
    exception in the parent; half a message followed by silence is a timeout, not a stalled loop."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Garbage", "timeout_s": 3}).start()
    cases = {
        "notjson.png": (GARBAGE_NOT_JSON, "not JSON"),
        "oversized.png": (GARBAGE_OVERSIZED, "over the 67,108,864-byte cap"),
        "notobject.png": (GARBAGE_NOT_OBJECT, "not a JSON object"),
        "fields.png": (GARBAGE_MISSING_FIELDS, "field 'files_done' missing or not int"),
    }
    for name, (width, words) in cases.items():
        make_image(daemon.inbox / name, width, 10)
        error = daemon.wait_json(name, daemon.failed)
        assert error["error_code"] == "child_crashed" and error["attempts"] == 2, error
        assert "broke the protocol" in error["detail"] and words in error["detail"], error
        make_image(daemon.inbox / f"ok-after-{name}", 30, 10)  # resets the crash backoff
        assert daemon.wait_json(f"ok-after-{name}")["status"] == "ok"
    make_image(daemon.inbox / "partial.png", GARBAGE_PARTIAL, 10)
    started = time.monotonic()
    error = daemon.wait_json("partial.png", daemon.failed)
    assert error["error_code"] == "timeout"
    assert time.monotonic() - started < 3 + 5  # the loop kept its clock while half a message sat in the pipe
    make_image(daemon.inbox / "last.png", 30, 10)
    assert daemon.wait_json("last.png")["status"] == "ok"
    assert daemon.alive()


def test_a_timeout_names_where_the_engine_hung(daemon_factory) -> None:
    """Before the SIGKILL the child is asked for its Python stacks (faulthandler on SIGUSR1)."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Stuck", "timeout_s": 2}).start()
    make_image(daemon.inbox / "stuck.png", HANG_WIDTH, 10)
    started = time.monotonic()
    error = daemon.wait_json("stuck.png", daemon.failed)
    assert time.monotonic() - started < 2 + 5
    assert error["error_code"] == "timeout"
    assert "hung in spin_inside_the_model (tests/engines.py:" in error["detail"], error
    assert "← ocr (tests/engines.py:" in error["detail"]
    assert "Python stacks of OCR child" in daemon.log() and "in spin_inside_the_model" in daemon.log()
    make_image(daemon.inbox / "next.png", 30, 10)
    assert daemon.wait_json("next.png")["status"] == "ok"


def test_a_child_with_signals_blocked_gives_no_stack_and_dies_on_time(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Hang", "timeout_s": 2}).start()
    make_image(daemon.inbox / "native.png", HANG_WIDTH, 10)
    started = time.monotonic()
    error = daemon.wait_json("native.png", daemon.failed)
    assert time.monotonic() - started < 2 + 5
    assert error["error_code"] == "timeout" and "no Python stack" in error["detail"], error


def test_the_child_runs_in_root_without_the_working_directory_on_its_path(daemon_factory, tmp_path: Path) -> None:
    """`python -c` puts the working directory first on sys.path: a PIL planted in the daemon's
    working directory would have run inside the child (the parent never imports PIL)."""
    workdir = tmp_path / "workdir"
    planted = workdir / "PIL"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-was-imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n")
    daemon = daemon_factory()
    daemon.start(cwd=workdir, env={"PYTHONPATH": str(REPO)})
    assert os.readlink(f"/proc/{daemon.child_pid()}/cwd") == "/"
    make_image(daemon.inbox / "fine.png", 30, 10)
    assert daemon.wait_json("fine.png")["text"] == "echo 30x10"
    assert not marker.exists()


def test_a_page_over_the_memory_limit_fails_alone(daemon_factory) -> None:
    """ocr.memory_max_mb: RLIMIT_DATA in the child. A 48-megapixel page needs ~600 MB to decode."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo", "memory_max_mb": 250}).start()
    child = daemon.child_pid()
    make_image(daemon.inbox / "huge.png", 8000, 6000)
    error = daemon.wait_json("huge.png", daemon.failed, timeout=60)
    assert error["error_code"] == "too_large", error
    assert "memory limit ocr.memory_max_mb = 250 MB exceeded" in error["detail"]
    make_image(daemon.inbox / "small.png", 30, 10)
    assert daemon.wait_json("small.png")["status"] == "ok"
    assert daemon.child_pid() == child  # a MemoryError costs the file, not the child


def test_a_reload_whose_engine_imports_slowly_does_not_stop_the_loop(daemon_factory) -> None:
    """SIGHUP probes the new engine before switching; the probe once ran synchronously for up to
    ocr.load_timeout_s (600 s, ten times WatchdogSec). Files go on being served meanwhile."""
    daemon = daemon_factory().start(env={"WATCHERD_TEST_IMPORT_S": "6"})
    status = daemon.status_path
    daemon.configure(ocr={"engine": "tests.slow_import_engine:SlowImport"})
    daemon.proc.send_signal(signal.SIGHUP)
    make_image(daemon.inbox / "during.png", 30, 10)
    result = daemon.wait_json("during.png")
    assert result["text"] == "echo 30x10"  # the running engine served it, while the probe ran
    assert "Configuration reloaded" not in daemon.log()
    first = json.loads(status.read_text())["updated_at"]
    wait_until(lambda: json.loads(status.read_text())["updated_at"] != first, 10, "the status file to move on")
    assert "Configuration reloaded" not in daemon.log()  # still probing: the loop was not waiting on it
    wait_until(lambda: "Configuration reloaded" in daemon.log(), 30, "the probe to answer")
    wait_until(lambda: daemon.log().count(" ready: ") >= 2, 30, "the new engine to load")
    make_image(daemon.inbox / "after.png", 31, 10)
    assert daemon.wait_json("after.png")["text"] == "new engine echo 31x10"
    wait_until(lambda: all(gone_or_zombie(pid) for pid in daemon.child_pids()[:1]), 10, "the old child reaped")
    assert daemon.alive()


def test_the_one_decode_site_refuses_what_is_not_a_message() -> None:
    from watcherd.ocr import protocol

    bad = {
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "not a JSON object",
        b'{"op": "launch"}': "unknown op",
        b'{"op": "ready", "pid": true, "load_time": 1, "engine": null}': "'pid' missing or not int",
        b'{"op": "failed", "id": 1, "code": "rm -rf", "detail": ""}': "unknown error code",
        b"[" * 100_000: "not JSON",
    }
    for raw, words in bad.items():
        try:
            protocol.decode(raw)
        except protocol.ProtocolError as exc:
            assert words in str(exc), (raw[:40], exc)
        else:
            raise AssertionError(f"accepted {raw[:40]!r}")
    page = protocol.decode(b'{"op": "page", "id": 1, "page": 1, "text": "a\\udce9b", "processing_time": 0, "size": []}')
    assert isinstance(page, protocol.Page) and page.text == "a\ufffdb" and page.replaced_characters == 1
    assert protocol.valid_text("\ud83d\ude00 \udc80") == ("\U0001f600 \ufffd", 1)


def test_the_reader_returns_whole_frames_and_refuses_oversized_ones() -> None:
    import struct

    from watcherd.ocr import framing

    r, w = os.pipe()
    reader = framing.Reader(r)
    try:
        os.write(w, struct.pack("!i", 5) + b"hel")
        assert reader.read() == ([], False)  # half a frame: nothing yet, and no waiting for the rest
        os.write(w, b"lo" + struct.pack("!i", 2) + b"ok")
        assert reader.read() == ([b"hello", b"ok"], False)
        os.write(w, struct.pack("!iQ", -1, framing.MAX_MESSAGE_BYTES + 1))
        try:
            reader.read()
        except framing.ProtocolError as exc:
            assert "cap" in str(exc)
        else:
            raise AssertionError("an oversized frame was accepted")
        os.close(w)
        w = -1
        reader.buffer.clear()
        assert reader.read() == ([], True)
    finally:
        reader.close()
        if w >= 0:
            os.close(w)


def test_journald_keeps_the_exact_name_and_the_message_escapes_it(daemon_factory, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.test_systemd_integration import JOURNAL_SCRIPT

    assert os.geteuid() == 0, "needs root for unshare -m and journald (CI runs as root)"
    assert Path("/lib/systemd/systemd-journald").exists(), "systemd-journald missing: run scripts/setup --test"
    daemon = daemon_factory(logging={"target": "journal"})
    names = [b"a\nINFO b.png", b"caf\xe9.png", b"esc\x1b[2J.png"]
    for i, name in enumerate(names):
        make_image(Path(os.fsdecode(os.fsencode(daemon.inbox) + b"/" + name)), 20 + i, 10)
    wait_for_three = '[ "$(ls "$WORK/outbox" 2>/dev/null | grep -c "json$")" -lt 3 ]'
    script = JOURNAL_SCRIPT.replace(
        '[ ! -e "$WORK/outbox/good.png.json" ] || [ ! -e "$WORK/failed/bad.jpg.json" ]', wait_for_three
    )
    assert script != JOURNAL_SCRIPT
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG": str(daemon.config_path), "WORK": str(tmp_path)}
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO, env=env, timeout=120)
    entries = [json.loads(line) for line in (tmp_path / "journal.json").read_text().splitlines()]
    done = [e for e in entries if e.get("WATCHERD_EVENT") == "done"]

    def raw(value: str | list[int]) -> bytes:  # journalctl -o json: binary fields are byte arrays
        return bytes(value) if isinstance(value, list) else value.encode()

    assert sorted(raw(e["WATCHERD_SOURCE"]) for e in done) == sorted(names)
    messages = " ".join(raw(e["MESSAGE"]).decode() for e in done)
    assert "a\\nINFO b.png: 1 page(s)" in messages and "caf\\xe9.png" in messages and "esc\\x1b[2J.png" in messages
    assert not any(b"\x1b" in raw(e["MESSAGE"]) or b"\n" in raw(e["MESSAGE"]) for e in done)


def test_a_child_that_will_not_exit_is_killed_later_without_holding_the_loop(daemon_factory) -> None:
    """Replacing children (SIGHUP with new ocr.* settings) asks the idle one to exit; it once
    waited up to 5 s for it in the loop (and 10 s more after a SIGKILL)."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:SlowClose"}).start()
    old = daemon.child_pid()
    daemon.configure(ocr={"engine": "tests.engines:SlowClose", "options": {"delay_s": 0.01}})
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(daemon.child_pids()) >= 2, 10, "the new child")
    make_image(daemon.inbox / "meanwhile.png", 30, 10)
    assert daemon.wait_json("meanwhile.png")["status"] == "ok"
    assert f"OCR child {old} killed" not in daemon.log()  # served while the old one lingered
    wait_until(lambda: f"OCR child {old} killed by watcherd (stopping)" in daemon.log(), 15, "the old child killed")
    wait_until(lambda: gone_or_zombie(old), 10, "the old child reaped")
    assert daemon.alive()
