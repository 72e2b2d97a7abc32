"""Intake's pieces on their own: the watch-mode decision, the poller's cost and correctness,
overflow handling, the open-for-writing probe. Real folders, injected clock and stat counters."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tests.conftest import wait_until
from watcherd.core.settings import WatchSettings
from watcherd.intake import mounts
from watcherd.intake.filter import PathFilter
from watcherd.intake.poller import MTIME_GRANULARITY_S, Poller
from watcherd.intake.readiness import open_for_writing
from watcherd.intake.watch import Intake

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /srv/scans rw,relatime shared:2 - nfs4 nas:/export/scans rw,vers=4.2
41 22 0:41 / /srv/local\\040inbox rw,relatime shared:3 - xfs /dev/sdb1 rw
42 41 0:42 / /srv/local\\040inbox/scanner2 rw - cifs //nas/scan rw
43 22 0:43 / /mnt/fuse rw - fuse.sshfs host:/x rw
44 22 0:44 / /mnt/bind rw - fuse /tmp/back rw
"""


def test_auto_mode_polls_network_and_fuse_filesystems_and_says_why(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    for path, mode, fstype in [
        ("/srv/scans/in", "polling", "nfs4"),
        ("/mnt/fuse/in", "polling", "fuse.sshfs"),
        ("/mnt/bind", "polling", "fuse"),
        ("/var/inbox", "events", "ext4"),
    ]:
        plan = mounts.choose_watch_mode(Path(path), "auto", mountinfo=str(info))
        assert (plan.mode, plan.fstype) == (mode, fstype), plan
        assert fstype in plan.reason and "watch.mode: auto" in plan.reason
    plan = mounts.choose_watch_mode(Path("/srv/local inbox"), "auto", mountinfo=str(info))
    assert plan.mode == "events" and plan.poll_also == (Path("/srv/local inbox/scanner2"),)
    assert "/srv/local inbox/scanner2 (cifs)" in plan.reason
    assert mounts.choose_watch_mode(Path("/srv/scans"), "events", mountinfo=str(info)).mode == "events"
    assert mounts.choose_watch_mode(Path("/x"), "auto", mountinfo=str(tmp_path / "missing")).mode == "polling"


class Counting:
    """os.stat and os.scandir that count their calls."""

    def __init__(self) -> None:
        self.stats = 0
        self.listings = 0

    def stat(self, path: str) -> os.stat_result:
        self.stats += 1
        return os.stat(path)

    def scandir(self, path: str):  # type: ignore[no-untyped-def]
        self.listings += 1
        return os.scandir(path)


def make_poller(inbox: Path, counting: Counting, clock: list[float]) -> tuple[Poller, list[Path]]:
    found: list[Path] = []
    poller = Poller(
        inbox,
        [inbox],
        PathFilter(WatchSettings()),
        interval_s=1.0,
        emit=found.append,
        clock=lambda: clock[0],
        stat_fn=counting.stat,
        scandir=counting.scandir,
    )
    return poller, found


def test_the_poller_stats_each_folder_once_and_lists_only_changed_ones(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for i in range(20):
        folder = inbox / "library" / f"box{i}"
        folder.mkdir(parents=True)
        for j in range(50):
            (folder / f"doc{j}.txt").write_bytes(b"x")
    (inbox / "@eaDir" / "deep").mkdir(parents=True)  # ignored: never polled
    counting, clock = Counting(), [1000.0]
    poller, found = make_poller(inbox, counting, clock)

    poller.poll()
    assert len(poller) == 22 and found == []  # inbox, library, 20 boxes
    clock[0] += MTIME_GRANULARITY_S + 1
    poller.poll()  # listings are trusted once the timestamp tick has passed
    counting.stats = counting.listings = 0
    clock[0] += 1
    poller.poll()
    assert (counting.stats, counting.listings) == (22, 0)  # 1,000 files: 22 stats, no listing

    (inbox / "library" / "box7" / "new.JPG").write_bytes(b"scan")
    (inbox / "library" / "box7" / "ignored.txt").write_bytes(b"x")
    clock[0] += 1
    poller.poll()
    assert found == [inbox / "library" / "box7" / "new.JPG"]
    assert counting.listings == 1


def test_the_poller_relists_a_folder_until_its_mtime_can_be_trusted(tmp_path: Path) -> None:
    """A file created in the same timestamp tick as a listing leaves the folder's mtime unchanged;
    the folder is listed again until MTIME_GRANULARITY_S has passed, so it is still found."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    counting, clock = Counting(), [1000.0]
    poller, found = make_poller(inbox, counting, clock)
    (inbox / "a.png").write_bytes(b"1")
    poller.poll()
    assert found == [inbox / "a.png"]
    before = os.stat(inbox)
    (inbox / "b.png").write_bytes(b"2")
    os.utime(inbox, ns=(before.st_atime_ns, before.st_mtime_ns))  # same tick: mtime looks unchanged
    # ctime moved too (utime sets it): forge the worst case by making the poller ignore ctime
    poller._dirs[str(inbox)].key = hash((before.st_mtime_ns, os.stat(inbox).st_ctime_ns, before.st_ino, before.st_dev))
    found.clear()
    clock[0] += 0.5
    poller.poll()
    assert inbox / "b.png" in found


def test_the_poller_follows_new_and_removed_folders(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    counting, clock = Counting(), [1000.0]
    poller, found = make_poller(inbox, counting, clock)
    poller.poll()
    (inbox / "scanner" / "2024").mkdir(parents=True)
    (inbox / "scanner" / "2024" / "p1.pdf").write_bytes(b"%PDF-")
    clock[0] += 1
    poller.poll()
    assert found == [inbox / "scanner" / "2024" / "p1.pdf"]
    assert len(poller) == 3
    (inbox / "scanner" / "2024" / "p1.pdf").unlink()
    (inbox / "scanner" / "2024").rmdir()
    (inbox / "scanner").rmdir()
    clock[0] += 1
    poller.poll()
    assert len(poller) == 1


def test_an_unlistable_folder_is_reported_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    (inbox / "locked").mkdir(parents=True)
    counting, clock = Counting(), [1000.0]

    def scandir(path: str):  # type: ignore[no-untyped-def]
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return os.scandir(path)

    poller = Poller(
        inbox,
        [inbox],
        PathFilter(WatchSettings()),
        interval_s=1.0,
        emit=lambda p: None,
        clock=lambda: clock[0],
        stat_fn=counting.stat,
        scandir=scandir,
    )
    with caplog.at_level(logging.WARNING, "watcherd"):
        for _ in range(5):
            clock[0] += 1
            poller.poll()
    assert [r.getMessage() for r in caplog.records].count(
        f"Cannot list {inbox / 'locked'}: Permission denied; files in it are not seen until this is fixed"
    ) == 1


def test_an_overflow_becomes_one_rescan_and_one_warning(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "sub" / "lost.png").write_bytes(b"x")
    woken = threading.Event()
    intake = Intake(inbox, WatchSettings(mode="events"), wake=woken.set)
    intake.start()
    try:
        watchdog_log = logging.getLogger("watchdog.observers.inotify_c")
        with caplog.at_level(logging.INFO):
            watchdog_log.warning("Inotify queue overflowed; filesystem events were lost")
            watchdog_log.warning("Inotify queue overflowed; filesystem events were lost")
        assert woken.is_set()
        assert list(intake.drain()) == [inbox / "sub" / "lost.png"]
        assert list(intake.drain()) == []  # one rescan per request, not one per drain
        messages = [r.getMessage() for r in caplog.records]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "overflowed" in r.getMessage()]
        assert len(warnings) == 1
        assert not any(m.startswith("Inotify queue overflowed") for m in messages)
    finally:
        intake.stop()


def test_open_for_writing_sees_a_local_writer(tmp_path: Path) -> None:
    import signal

    path = tmp_path / "upload.jpg"
    path.write_bytes(b"")
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        with open(path, "ab") as writer:
            writer.write(b"x")
            assert open_for_writing(path) is True
        assert open_for_writing(path) is False
        with open(path, "rb"):
            assert open_for_writing(path) is False  # readers do not count
    finally:
        signal.signal(signal.SIGIO, previous)
    assert open_for_writing(path) is None or previous != signal.SIG_DFL  # never probes with SIGIO fatal


def test_folders_created_after_start_are_watched(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    intake = Intake(inbox, WatchSettings(mode="events"))
    intake.start()
    try:
        (inbox / "new" / "deeper").mkdir(parents=True)
        (inbox / "new" / "deeper" / "a.png").write_bytes(b"x")
        seen: set[Path] = set()
        wait_until(lambda: seen.update(intake.drain()) or inbox / "new" / "deeper" / "a.png" in seen, 10)
    finally:
        intake.stop()
