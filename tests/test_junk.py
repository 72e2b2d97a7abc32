"""Folder shapes and piles of junk against the real daemon: a tree 1,100 levels deep,
tens of thousands of empty folders or junk files moved in at once, and a subfolder swapped for a
symlink (design §9). The daemon must stay up, keep its main loop turning (measured from outside
as the gaps between its WATCHDOG=1 pings on a real notify socket), never follow a link, and
still serve a real scan dropped after the junk.

Counts are reduced so the suite stays fast; benchmarks/junk.py runs the full-size piles."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_image, wait_until
from tests.test_sdnotify import Receiver
from watcherd.intake.filter import MAX_DEPTH

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
    """design §9: a share user replaces a subfolder the poller knows with a symlink to a folder
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


class WatchdogPings:
    """systemd's side of the notify socket: records when each WATCHDOG=1 arrives, on a thread."""

    def __init__(self, tmp_path: Path):
        path = str(tmp_path / "notify.sock")
        self.receiver = Receiver(path, path)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                lines = self.receiver.messages()
            except (TimeoutError, OSError):
                continue
            if "WATCHDOG=1" in lines:
                self.times.append(time.monotonic())

    def max_gap(self, since: float) -> float:
        times = [t for t in self.times if t >= since]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.receiver.close()


@pytest.fixture
def pings(tmp_path: Path) -> Iterator[WatchdogPings]:
    p = WatchdogPings(tmp_path)
    yield p
    p.close()


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Idle:
    """A wait_until condition: true once the daemon used under 25 % of a core over the last
    second or more, i.e. it has digested what it was given (sampled at each call, no sleep)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[tuple[float, float]] = []

    def __call__(self) -> bool:
        now, cpu = time.monotonic(), cpu_seconds(self.pid)
        self.samples.append((now, cpu))
        old = [(t, c) for t, c in self.samples if now - t >= 1.0]
        if not old:
            return False
        t, c = old[-1]
        return (cpu - c) / (now - t) < 0.25  # the poller alone may use up to POLL_DUTY (10 %)


WATCHDOG_USEC = 2_000_000  # pings every 1 s: a stall of 1 s (WatchdogSec/2) shows as a 2 s gap
FOLDERS = int(os.environ.get("JUNK_FOLDERS", "20000"))
FILES = int(os.environ.get("JUNK_FILES", "20000"))


def junk_piles(staging: Path) -> list[Path]:
    """FOLDERS empty folders in one folder, FILES files the filter skips in another."""
    folders, files = staging / "empty-folders", staging / "junk-files"
    folders.mkdir(parents=True)
    files.mkdir()
    for i in range(FOLDERS):
        os.mkdir(folders / f"f{i:06d}")
    for i in range(FILES):
        # a mix of what the filter skips: other documents, Office lock files, partial downloads
        name = (f"doc{i}.txt", f"~$scan{i}.jpg", f"scan{i}.jpg.part")[i % 3]
        (files / name).write_bytes(b"")
    return [folders, files]


@pytest.mark.parametrize("mode", ["events", "polling"])
def test_piles_of_junk_never_stall_the_main_loop_and_a_real_scan_still_gets_through(
    tmp_path: Path, daemon_factory, pings: WatchdogPings, mode: str
) -> None:
    daemon = daemon_factory(watch={"mode": mode, "settle_s": 0.3, "poll_interval_s": 0.5})
    env = pings.receiver.env(WATCHDOG_USEC=str(WATCHDOG_USEC))
    daemon.start(env=env)
    wait_until(lambda: len(pings.times) >= 2, 10, "the first WATCHDOG=1 pings")
    piles = junk_piles(tmp_path / "staging")
    since = time.monotonic()
    for pile in piles:
        os.rename(pile, daemon.inbox / pile.name)  # one mv each, as a share user would
    make_image(daemon.inbox / "real.png", 40, 10)
    assert daemon.wait_json("real.png", timeout=30)["text"] == "echo 40x10"
    served = time.monotonic() - since
    wait_until(Idle(daemon.proc.pid), 120, "the daemon to digest the junk")
    wait_until(lambda: len([t for t in pings.times if t >= since]) >= 4, 10, "pings over the whole time")
    digested = time.monotonic() - since
    gap = pings.max_gap(since)
    print(f"{mode}: real scan served after {served:.1f} s, junk digested in {digested:.1f} s, longest gap {gap:.2f} s")
    assert gap <= WATCHDOG_USEC / 1e6, f"the main loop stalled: {gap:.2f} s between WATCHDOG=1 pings"
    assert daemon.alive() and len(pings.times) >= digested / 2
