"""Duplicates (`dedupe: skip`): the same bytes are OCR'd once; later copies get a `duplicate` JSON
pointing at the first result. Real daemons; the engine counts its calls in a file."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PATHS, Daemon, assert_config_error, gone_or_zombie, make_image, run_watcherd, wait_until
from watcherd.core import config_file
from watcherd.work import dedupe


def counting(daemon_factory, tmp_path: Path, *, mode: object = "skip", delay_s: float = 0, **dedupe_extra) -> Daemon:
    calls = tmp_path / "calls.txt"
    return daemon_factory(
        ocr={"engine": "tests.engines:Counting", "options": {"calls_file": str(calls), "delay_s": delay_s}},
        dedupe={"mode": mode, **dedupe_extra},
    )


def calls(daemon: Daemon) -> int:
    path = daemon.root / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def index_of(daemon: Daemon) -> Path:
    return dedupe.index_path(config_file.load(daemon.config_path))


def test_the_same_bytes_three_times_are_ocrd_once(daemon_factory, tmp_path: Path) -> None:
    daemon = counting(daemon_factory, tmp_path).start()
    scan = make_image(tmp_path / "scan.png", width=40)
    shutil.copy(scan, daemon.inbox / "a.png")
    first = daemon.wait_json("a.png")
    assert first["status"] == "ok" and calls(daemon) == 1
    shutil.copy(scan, daemon.inbox / "a.png")  # the same name again: a_1
    again = daemon.wait_json("a_1.png")
    shutil.copy(scan, daemon.inbox / "renamed.png")
    other = daemon.wait_json("renamed.png")
    assert calls(daemon) == 1, "the engine ran again for bytes it had read"
    sha = hashlib.sha256(scan.read_bytes()).hexdigest()
    for doc, source, archived in ((again, "a.png", "a_1.png"), (other, "renamed.png", "renamed.png")):
        assert doc["status"] == "duplicate"
        assert doc["duplicate_of"] == str(daemon.outbox / "a.png.json")
        assert doc["sha256"] == first["sha256"] == sha
        assert doc["source"] == source and doc["image_path"] == str(daemon.archive / archived)
        assert {"received_at", "finished_at", "watcherd_version", "attempts"} <= doc.keys()
        assert "text" not in doc and "text_path" not in doc
        assert (daemon.archive / archived).read_bytes() == scan.read_bytes()
    assert not (daemon.outbox / "a_1.png.md").exists() and not (daemon.outbox / "renamed.png.md").exists()
    # The line is logged once the publication has ended, just after the JSON appears.
    wait_until(lambda: daemon.log().count("not OCR'd again") >= 2, 10, "both duplicates logged")
    assert daemon.log().count("not OCR'd again") == 2

    wait_until(lambda: json.loads(daemon.status_path.read_text())["counts"]["duplicate"] == 2, 10, "the status")
    status = json.loads(daemon.status_path.read_text())
    assert status["counts"] == {"ok": 1, "failed": 0, "duplicate": 2}
    assert "2 duplicate" in status["summary"]
    shown = run_watcherd("status", "--config", str(daemon.config_path))
    assert shown.returncode == 0 and "1 ok, 0 failed, 2 duplicate" in shown.stdout, shown.stdout


def test_a_duplicate_original_is_deleted_with_on_success_delete(daemon_factory, tmp_path: Path) -> None:
    daemon = counting(daemon_factory, tmp_path)
    daemon.configure(
        ocr={"engine": "tests.engines:Counting", "options": {"calls_file": str(tmp_path / "calls.txt")}},
        dedupe={"mode": "skip"},
        output={"on_success": "delete", "layout": "{yyyy}/{rel}"},
    )
    daemon.start()
    scan = make_image(tmp_path / "scan.png", width=48)
    shutil.copy(scan, daemon.inbox / "a.png")
    year = f"{datetime.now().astimezone():%Y}"
    first = daemon.wait_json(f"{year}/a.png", daemon.outbox)
    shutil.copy(scan, daemon.inbox / "b.png")
    copy = daemon.wait_json(f"{year}/b.png", daemon.outbox)
    assert copy["status"] == "duplicate" and copy["image_path"] is None
    assert copy["duplicate_of"] == str(daemon.outbox / year / "a.png.json") and first["image_path"] is None
    wait_until(lambda: not (daemon.inbox / ".watcherd" / "processing" / "b.png").exists(), 10, "the copy deleted")
    assert not [p for p in daemon.archive.rglob("*") if p.is_file()] and calls(daemon) == 1


def test_copies_claimed_together_wait_for_the_first(daemon_factory, tmp_path: Path) -> None:
    """Two copies claimed in the same moment: one is OCR'd, the other waits and is its duplicate."""
    daemon = counting(daemon_factory, tmp_path, delay_s=1.0).start()
    scan = make_image(tmp_path / "scan.png", width=41)
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("x.png", "y.png"):
        shutil.copy(scan, staging / name)
    for name in ("x.png", "y.png"):
        (staging / name).rename(daemon.inbox / name)
    docs = {name: daemon.wait_json(name) for name in ("x.png", "y.png")}
    assert sorted(d["status"] for d in docs.values()) == ["duplicate", "ok"]
    ok = next(name for name, d in docs.items() if d["status"] == "ok")
    dup = next(d for d in docs.values() if d["status"] == "duplicate")
    assert dup["duplicate_of"] == str(daemon.outbox / f"{ok}.json")
    assert calls(daemon) == 1


def test_sigterm_returns_files_hashed_ahead_to_the_inbox(daemon_factory, tmp_path: Path) -> None:
    """Files claimed and hashed while the child works go back to the inbox at a stop, like any
    claimed file that did not reach a child."""
    daemon = counting(daemon_factory, tmp_path, delay_s=2.0).start()
    staging = tmp_path / "staging"
    for i in range(4):
        make_image(staging / f"f{i}.png", width=50 + i)
    for i in range(4):
        (staging / f"f{i}.png").rename(daemon.inbox / f"f{i}.png")
    wait_until(lambda: calls(daemon) == 1, 30, "the first OCR")
    processing = daemon.inbox / ".watcherd" / "processing"
    wait_until(lambda: len(list(processing.glob("*.png"))) == 4, 10, "the others claimed and hashed ahead")
    assert daemon.stop() == 0
    assert not list(processing.glob("*.png"))
    results = {p.name for p in daemon.outbox.glob("*.json")}
    back = {p.name for p in daemon.inbox.glob("*.png")}
    assert (
        len(results) == 1
        and len(back) == 3
        and {r[: -len(".json")] for r in results} | back == {f"f{i}.png" for i in range(4)}
    )


def test_kill_9_during_the_first_ocr_claims_no_duplicate(daemon_factory, tmp_path: Path) -> None:
    daemon = counting(daemon_factory, tmp_path, delay_s=3600).start()
    scan = make_image(tmp_path / "scan.png", width=42)
    shutil.copy(scan, daemon.inbox / "a.png")
    wait_until(lambda: calls(daemon) == 1, 30, "the first OCR to start")
    child = daemon.child_pid()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: gone_or_zombie(child), 10, "the child to die with the daemon")

    daemon.configure(
        ocr={"engine": "tests.engines:Counting", "options": {"calls_file": str(tmp_path / "calls.txt")}},
        dedupe={"mode": "skip"},
    )
    daemon.start()
    doc = daemon.wait_json("a.png")
    assert doc["status"] == "ok", doc  # never finished before: OCR'd, not a duplicate of nothing
    assert calls(daemon) == 2
    shutil.copy(scan, daemon.inbox / "b.png")
    assert daemon.wait_json("b.png")["duplicate_of"] == str(daemon.outbox / "a.png.json")
    assert calls(daemon) == 2


def test_the_index_survives_a_restart_and_old_entries_are_pruned(daemon_factory, tmp_path: Path) -> None:
    daemon = counting(daemon_factory, tmp_path).start()
    scan = make_image(tmp_path / "scan.png", width=43)
    shutil.copy(scan, daemon.inbox / "a.png")
    assert daemon.wait_json("a.png")["status"] == "ok"
    assert daemon.stop() == 0

    # Entries written through the module's own API, as if finished 91 and 89 days ago.
    old, recent = make_image(tmp_path / "old.png", width=44), make_image(tmp_path / "recent.png", width=45)
    index = dedupe.Index(index_of(daemon))
    index.open()
    for path, days in ((old, 91), (recent, 89)):
        finished = (datetime.now().astimezone() - timedelta(days=days)).isoformat()
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        index.add(dedupe.Entry(sha, f"/earlier/{path.name}.json", path.name, finished))
    index.close()

    daemon.start()
    wait_until(lambda: "Pruned 1 entry older than 90 days" in daemon.log(), 10, "the prune at start")
    shutil.copy(scan, daemon.inbox / "again.png")
    assert daemon.wait_json("again.png")["duplicate_of"] == str(daemon.outbox / "a.png.json")  # survived
    shutil.copy(recent, daemon.inbox / "recent.png")
    assert daemon.wait_json("recent.png")["duplicate_of"] == "/earlier/recent.png.json"
    shutil.copy(old, daemon.inbox / "old.png")
    assert daemon.wait_json("old.png")["status"] == "ok"  # its entry was older than keep_days
    assert calls(daemon) == 2
    assert daemon.stop() == 0

    # A tiny keep_days: everything finished before this start is forgotten.
    finished = datetime.fromisoformat(json.loads((daemon.outbox / "old.png.json").read_text())["finished_at"])
    daemon.configure(
        ocr={"engine": "tests.engines:Counting", "options": {"calls_file": str(tmp_path / "calls.txt")}},
        dedupe={"mode": "skip", "keep_days": 0.00002},  # 1.7 s
    )
    wait_until(lambda: datetime.now().astimezone() - finished > timedelta(seconds=2), 5, "entries to age")
    daemon.start()
    wait_until(lambda: "Pruned 3 entries" in daemon.log(), 10, "the prune at start")
    shutil.copy(old, daemon.inbox / "old-again.png")
    assert daemon.wait_json("old-again.png")["status"] == "ok"
    assert calls(daemon) == 3


@pytest.mark.parametrize("planted", ["garbage", "other schema", "symlink"])
def test_a_bad_index_is_set_aside_and_never_makes_a_duplicate(daemon_factory, tmp_path: Path, planted: str) -> None:
    daemon = counting(daemon_factory, tmp_path)
    path = index_of(daemon)
    path.parent.mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if planted == "garbage":
        path.write_bytes(b"\x00not a database" * 100)
    elif planted == "other schema":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE seen (sha256 TEXT, json_path TEXT)")
        conn.commit()
        conn.close()
    else:
        path.symlink_to(victim)
    daemon.start()
    assert "is not one watcherd can use" in daemon.log() and "set aside" in daemon.log()
    assert len(list(path.parent.glob(f"{path.name}.bad-*"))) == 1
    assert victim.read_text() == "precious"
    scan = make_image(tmp_path / "scan.png", width=46)
    shutil.copy(scan, daemon.inbox / "a.png")
    assert daemon.wait_json("a.png")["status"] == "ok"  # OCR'd: nothing in a bad index counts
    shutil.copy(scan, daemon.inbox / "b.png")
    assert daemon.wait_json("b.png")["status"] == "duplicate"  # the fresh index works
    assert calls(daemon) == 1 and daemon.alive()


def test_dedupe_off_ocrs_every_copy_and_keeps_no_index(daemon_factory, tmp_path: Path) -> None:
    daemon = counting(daemon_factory, tmp_path, mode=False).start()  # YAML's bare `off`
    scan = make_image(tmp_path / "scan.png", width=47)
    shutil.copy(scan, daemon.inbox / "a.png")
    daemon.wait_json("a.png")
    shutil.copy(scan, daemon.inbox / "b.png")
    assert daemon.wait_json("b.png")["status"] == "ok"
    assert calls(daemon) == 2 and not index_of(daemon).exists()
    assert "duplicate" not in json.loads(daemon.status_path.read_text())["summary"]


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("dedupe: on", "dedupe.mode", "must be one of off | skip, got 'on'"),
        ("dedupe: always", "dedupe.mode", "must be one of off | skip"),
        ("dedupe: {mode: skip, keep_days: 0}", "dedupe.keep_days", "must be greater than 0"),
        ("dedupe: {mode: skip, keep_days: .nan}", "dedupe.keep_days", "must be a finite number"),
        ("dedupe: {mode: skip, days: 3}", "dedupe.days", "unknown key"),
        ("dedupe: 3", "dedupe", "expected a mapping"),
    ],
)
def test_bad_dedupe_settings_exit_78(tmp_path: Path, extra: str, key: str, words: str) -> None:
    assert_config_error(tmp_path, PATHS + extra, key, words)


@pytest.mark.parametrize(
    ("raw", "mode", "keep_days"),
    [("skip", "skip", 90.0), (False, "off", 90.0), ({"mode": "skip", "keep_days": 7}, "skip", 7.0), (None, "off", 90)],
)
def test_dedupe_shorthand(raw: object, mode: str, keep_days: float) -> None:
    s = config_file.from_dict({} if raw is None else {"dedupe": raw})
    assert (s.dedupe.mode, s.dedupe.keep_days) == (mode, keep_days)


def test_the_index_api(tmp_path: Path) -> None:
    index = dedupe.Index(tmp_path / "i.sqlite")
    index.open()
    now = datetime.now().astimezone()
    index.add(dedupe.Entry("a" * 64, "/out/a.json", "a.png", now.isoformat()))
    index.add(dedupe.Entry("a" * 64, "/out/later.json", "later.png", now.isoformat()))  # the first one stays
    index.add(dedupe.Entry("b" * 64, "/out/b.json", "b.png", (now - timedelta(days=10)).isoformat()))
    assert index.lookup("a" * 64, keep_days=1) == dedupe.Entry("a" * 64, "/out/a.json", "a.png", now.isoformat())
    assert index.lookup("b" * 64, keep_days=1) is None  # too old to count, even before a prune
    assert index.lookup("b" * 64, keep_days=11) is not None
    assert index.prune(keep_days=1) == 1 and index.lookup("b" * 64, keep_days=11) is None
    index.close()
