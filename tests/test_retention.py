"""Retention, end to end: a real daemon sweeps archive/ and failed/ at start and every
`retention.interval_s`, removing exactly the files older than N days (times set in the past with
os.utime), without following links, leaving the work area and hidden names alone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import PATHS, assert_config_error, make_image, wait_until

DAY = 86400.0


def aged(path: Path, days: float, content: bytes = b"scan") -> Path:
    """A file (or, for an existing folder, the folder) whose mtime and atime are `days` old."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    when = time.time() - days * DAY
    os.utime(path, (when, when), follow_symlinks=False)
    return path


def sweeps_done(log: str) -> int:
    return log.count("Retention sweep done")


def test_exactly_the_old_files_go_and_links_are_not_followed(daemon_factory, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = aged(outside / "secret.png", 400)
    d = daemon_factory(
        retention={"archive_days": 10, "failed_days": 5, "age_from": "mtime", "interval_s": 3600},
        logging={"level": "debug"},
        paths={"work": str(tmp_path / "archive" / "workarea")},  # inside a swept root: never touched
    )
    old = [
        aged(d.archive / "2024" / "01" / "old.png", 20),
        aged(d.archive / "scanner1" / "old.pdf", 10.5),
        aged(d.failed / "bad.png", 6),
    ]
    kept = [
        aged(d.archive / "scanner1" / "recent.png", 9),
        aged(d.archive / "fresh.png", 0),
        aged(d.failed / "bad.png.json", 6),  # error JSON stays without retention.remove_json
        aged(d.failed / "young.png", 4),
        aged(d.archive / ".partial.tmp", 30),  # hidden: watcherd's own temp files look like this
        aged(d.failed / ".retried" / "x.png.json", 30),
        aged(d.archive / "workarea" / "keep.png", 30),
    ]
    (d.archive / "link-to-outside").symlink_to(outside)  # a planted folder link
    (d.archive / "old-link.png").symlink_to(secret)  # a planted file link, itself old
    aged(d.archive / "old-link.png", 40)
    for folder in (d.archive / "2024" / "01", d.archive / "2024"):  # a date folder untouched for long
        aged(folder, 20)
    d.start()
    wait_until(lambda: sweeps_done(d.log()) >= 1, 30, "the sweep at start")
    assert [p for p in old if os.path.lexists(p)] == []
    assert [p for p in kept if not p.exists()] == []
    assert secret.exists() and (d.archive / "old-link.png").is_symlink()
    assert (d.archive / "link-to-outside").is_symlink()
    assert not (d.archive / "2024").exists()  # emptied date folders are pruned, deepest first
    assert (d.archive / "scanner1").is_dir()  # still holds a file
    for name in ("archive/2024/01/old.png", "archive/scanner1/old.pdf", "failed/bad.png"):
        assert f"Retention: removed {name} (" in d.log()
    # The daemon works on as before: a new file is archived and kept.
    make_image(d.inbox / "new.png")
    assert d.wait_json("new.png")["status"] == "ok"
    wait_until(lambda: (d.archive / "new.png").exists(), 10, "new.png in the archive")


def test_remove_json_takes_old_error_json_too(daemon_factory) -> None:
    d = daemon_factory(
        retention={"failed_days": 1, "remove_json": True, "age_from": "mtime"}, logging={"level": "debug"}
    )
    aged(d.failed / "a.png", 2)
    aged(d.failed / "a.png.json", 2)
    aged(d.failed / "b.png.json", 0.5)
    aged(d.archive / "c.png", 50)  # archive_days 0: kept forever
    d.start()
    wait_until(lambda: sweeps_done(d.log()) >= 1, 30, "the sweep at start")
    assert not (d.failed / "a.png").exists() and not (d.failed / "a.png.json").exists()
    assert (d.failed / "b.png.json").exists() and (d.archive / "c.png").exists()


def test_sweeps_repeat_every_interval(daemon_factory) -> None:
    d = daemon_factory(
        retention={"archive_days": 1, "age_from": "mtime", "interval_s": 0.5}, logging={"level": "debug"}
    )
    d.start()
    wait_until(lambda: sweeps_done(d.log()) >= 1, 30, "the sweep at start")
    late = aged(d.archive / "late" / "old.png", 3)  # appears after the first sweep
    wait_until(lambda: not late.exists(), 30, "a later sweep to remove it")
    assert (d.archive / "late").is_dir()  # just emptied: pruned only once untouched for interval_s
    wait_until(lambda: not (d.archive / "late").exists(), 30, "the emptied folder to be pruned")


def test_ctime_default_keeps_an_old_scan_that_was_just_archived(daemon_factory, tmp_path: Path) -> None:
    """A scan copied in with its 2019 mtime kept is not removed at once: by default the age counts
    from when it reached the archive (the inode's ctime, which a rename sets and utime cannot set
    back)."""
    d = daemon_factory(retention={"archive_days": 1, "interval_s": 0.5}, logging={"level": "debug"})
    d.start()
    scan = make_image(tmp_path / "old-scan.png")
    aged(scan, 2000)
    os.rename(scan, d.inbox / "old-scan.png")
    assert d.wait_json("old-scan.png")["status"] == "ok"
    done = sweeps_done(d.log())
    wait_until(lambda: sweeps_done(d.log()) >= done + 2, 30, "two more sweeps")
    assert (d.archive / "old-scan.png").exists()
    assert os.stat(d.archive / "old-scan.png").st_mtime < time.time() - 1000 * DAY


def test_sighup_turns_retention_on_at_once(daemon_factory) -> None:
    d = daemon_factory(logging={"level": "debug"})
    old = aged(d.archive / "old.png", 30)
    d.start()
    d.configure(retention={"archive_days": 7, "age_from": "mtime"}, logging={"level": "debug"})
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not old.exists(), 30, "the sweep with the new settings")
    assert "Retention: removed archive/old.png (30.0 days old)" in d.log()


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("retention: {archive_days: -1}", "retention.archive_days", "must not be negative"),
        ("retention: {failed_days: soon}", "retention.failed_days", "expected a number"),
        ("retention: {failed_days: .inf}", "retention.failed_days", "must be a finite number"),
        ("retention: {age_from: atime}", "retention.age_from", "must be one of ctime | mtime"),
        ("retention: {interval_s: 0}", "retention.interval_s", "greater than 0"),
        ("retention: {remove_json: maybe}", "retention.remove_json", "expected true or false"),
        ("retention: {outbox_days: 3}", "retention.outbox_days", "unknown key"),
    ],
)
def test_bad_retention_settings_exit_78_naming_the_key(tmp_path: Path, extra: str, key: str, words: str) -> None:
    assert_config_error(tmp_path, PATHS + extra, key, words)
