"""Folder shapes and piles of junk against the real daemon (issue 10): a tree 1,100 levels deep,
tens of thousands of empty folders or junk files moved in at once, and a subfolder swapped for a
symlink (DESIGN §9). The daemon must stay up, keep its main loop turning (measured from outside
as the gaps between its WATCHDOG=1 pings on a real notify socket), never follow a link, and
still serve a real scan dropped after the junk.

Counts are reduced so the suite stays fast; benchmarks/junk.py runs the full-size piles."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image, wait_until
from watcherd.intake import MAX_DEPTH

DEPTH = 1100  # past Python's recursion limit (1,000): os.walk in 3.11 recursed once per level


def deep_tree(top: Path, depth: int = DEPTH, name: str = "d") -> Path:
    """`top/d/d/.../d`, `depth` levels, made with openat so no path gets long on the way;
    returns the deepest folder."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return top.joinpath(*[name] * depth)


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest's own clean-up (shutil.rmtree) recurses once per level too and would fail on these
    trees in a later run: remove them here, after the daemons are gone (autouse: torn down last)."""
    yield
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path)], check=False)


def test_a_tree_too_deep_for_watchdog_at_start_is_polled_instead(tmp_path: Path, daemon_factory) -> None:
    daemon = daemon_factory(watch={"mode": "events", "settle_s": 0.3, "poll_interval_s": 0.5})
    deep_tree(daemon.inbox / "deep")
    daemon.start()  # exited 1 (RecursionError) at every start before
    log = daemon.log()
    assert "Watch mode: polling (the inbox holds a folder tree too deep" in log, log
    assert log.count("inotify failed:") == 1
    make_image(daemon.inbox / "after.png", 31, 10)
    assert daemon.wait_json("after.png")["text"] == "echo 31x10"
    assert daemon.alive()


def test_a_tree_too_deep_moved_in_while_running_does_not_leave_the_daemon_blind(tmp_path: Path, daemon_factory) -> None:
    """watchdog's thread dies on it (RecursionError in its os.walk); the daemon notices from its
    loop and polls instead, so the next file is found in seconds, not at the 300 s rescan."""
    daemon = daemon_factory(watch={"mode": "events", "settle_s": 0.3, "poll_interval_s": 0.5}).start()
    assert "Watch mode: events" in daemon.log()
    bottom = deep_tree(tmp_path / "staging" / "deep")
    make_image(bottom.parents[DEPTH - 3] / "shallow.png", 32, 10)  # 3 levels down: taken
    make_image(bottom / "bottom.png", 33, 10)  # 1,100 levels down: past MAX_DEPTH, left alone
    os.rename(tmp_path / "staging" / "deep", daemon.inbox / "deep")
    wait_until(lambda: "a watchdog thread died" in daemon.log(), 30, "the dead watchdog thread to be noticed")
    make_image(daemon.inbox / "after.png", 34, 10)
    assert daemon.wait_json("after.png", timeout=20)["text"] == "echo 34x10"
    assert daemon.wait_json("deep/d/d/shallow.png", timeout=20)["text"] == "echo 32x10"
    log = daemon.log()
    assert log.count("inotify failed:") == 1 and "polling instead" in log
    assert f"Folders more than {MAX_DEPTH} levels below" in log
    assert os.path.exists(daemon.inbox.joinpath("deep", *["d"] * DEPTH, "bottom.png"))
    assert daemon.alive()


def test_polling_never_follows_a_subfolder_swapped_for_a_symlink(tmp_path: Path, daemon_factory) -> None:
    """DESIGN §9: a share user replaces a subfolder the poller knows with a symlink to a folder
    outside the inbox. The poller stat'ed folders with os.stat, followed the link, and every
    file below it was claimed (moved out of its place) and OCR'd."""
    outside = tmp_path / "elsewhere"
    secret = make_image(outside / "secret.png", 35, 10)
    daemon = daemon_factory(
        watch={"mode": "polling", "settle_s": 0.3, "poll_interval_s": 0.2, "rescan_interval_s": 0.5}
    ).start()
    make_image(daemon.inbox / "sub" / "first.png", 36, 10)
    assert daemon.wait_json("sub/first.png")["text"] == "echo 36x10"  # the poller knows sub/ now
    shutil.rmtree(daemon.inbox / "sub")
    (daemon.inbox / "sub").symlink_to(outside, target_is_directory=True)
    # Each marker is found by a later poller pass than the one before it, and a pass looks at
    # sub/ after the inbox itself: the second result means a whole pass saw the symlink.
    for i in range(2):
        make_image(daemon.inbox / f"marker{i}.png", 37 + i, 10)
        assert daemon.wait_json(f"marker{i}.png")["status"] == "ok"
    assert secret.exists() and (outside / "secret.png").read_bytes() == secret.read_bytes()
    assert not (daemon.outbox / "sub" / "secret.png.json").exists()
    assert not (daemon.failed / "sub" / "secret.png.json").exists()
    assert "secret.png" not in daemon.log()
    assert (daemon.inbox / "sub").is_symlink()
    assert daemon.alive()
