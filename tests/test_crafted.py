"""Crafted bytes, names and engine output (issue 10): no file, name or reply can crash or stall
the daemon, forge its logs or leave invalid UTF-8 in a JSON (DESIGN §9). Real daemons throughout."""

from __future__ import annotations

from tests import crafted
from tests.conftest import make_image, wait_until


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
