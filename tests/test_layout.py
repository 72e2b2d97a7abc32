"""`output.layout`: where outputs go below outbox, failed and archive (mirror, or a dated
template). Real daemons; `watcherd retry` finds failed originals in dated folders."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_image, run_watcherd, wait_until
from watcherd.core import config_file, naming


def dated(document: dict) -> str:
    """The yyyy/mm/dd folder of a document's finish date (local time, as in its JSON)."""
    return datetime.fromisoformat(document["finished_at"]).strftime("%Y/%m/%d")


def wait_anywhere(daemon: Daemon, root: Path, name: str) -> tuple[Path, dict]:
    """Wait for `<name>.json` in any folder below `root`; (its path, its document)."""
    path = wait_until(lambda: next(iter(root.rglob(f"{name}.json")), None), 30, f"{name}.json below {root}")
    document = json.loads(path.read_bytes())
    claimed = daemon.inbox / ".watcherd" / "processing" / document["source"]
    wait_until(lambda: not os.path.lexists(claimed), 10, f"{name} to leave the work area")
    return path, document


def test_a_template_puts_every_output_in_date_folders(daemon_factory) -> None:
    daemon = daemon_factory(output={"layout": "{yyyy}/{mm}/{dd}/{rel}"}).start()
    make_image(daemon.inbox / "sub" / "a.png")
    (daemon.inbox / "sub" / "bad.png").write_text("not a png")
    ok_json, ok = wait_anywhere(daemon, daemon.outbox, "a.png")
    bad_json, bad = wait_anywhere(daemon, daemon.failed, "bad.png")
    day = dated(ok)
    assert ok_json == daemon.outbox / day / "sub" / "a.png.json"
    assert ok["source"] == "sub/a.png"  # the inbox path, whatever the layout
    assert ok["image_path"] == str(daemon.archive / day / "sub" / "a.png")
    assert ok["text_path"] == str(daemon.outbox / day / "sub" / "a.png.md")
    wait_until((daemon.archive / day / "sub" / "a.png").exists, 10, "the original archived")
    assert (daemon.outbox / day / "sub" / "a.png.md").exists()
    assert bad_json == daemon.failed / dated(bad) / "sub" / "bad.png.json"
    assert bad["image_path"] == str(daemon.failed / dated(bad) / "sub" / "bad.png")
    assert (daemon.failed / dated(bad) / "sub" / "bad.png").read_text() == "not a png"
    assert not (daemon.outbox / "sub").exists() and not (daemon.archive / "sub").exists()

    # The same name again: one suffix for the JSON, the text and the archived original.
    make_image(daemon.inbox / "sub" / "a.png", width=30)
    again = daemon.wait_json(f"{day}/sub/a_1.png", daemon.outbox)
    assert again["image_path"] == str(daemon.archive / day / "sub" / "a_1.png")
    assert again["text_path"] == str(daemon.outbox / day / "sub" / "a_1.png.md")
    wait_until((daemon.archive / day / "sub" / "a_1.png").exists, 10, "the second original archived")


def test_name_only_layouts_share_one_suffix_across_folders(daemon_factory) -> None:
    """`{name}` drops the inbox folders: x.png from two folders clash, and get _1 everywhere."""
    daemon = daemon_factory(output={"layout": "scans-{yyyy}-{mm}/{name}"}).start()
    make_image(daemon.inbox / "left" / "x.png", width=20)
    first = daemon.wait_json(f"scans-{datetime.now():%Y-%m}/x.png", daemon.outbox)
    make_image(daemon.inbox / "right" / "x.png", width=21)
    folder = f"scans-{datetime.fromisoformat(first['finished_at']):%Y-%m}"
    second = daemon.wait_json(f"{folder}/x_1.png", daemon.outbox)
    assert (first["source"], second["source"]) == ("left/x.png", "right/x.png")
    assert first["text"] == "echo 20x48" and second["text"] == "echo 21x48"
    assert second["image_path"] == str(daemon.archive / folder / "x_1.png")
    assert second["text_path"] == str(daemon.outbox / folder / "x_1.png.md")


def test_retry_finds_failed_originals_in_dated_folders(daemon_factory) -> None:
    daemon = daemon_factory(output={"layout": "{yyyy}/{mm}/{dd}/{rel}"}).start()
    (daemon.inbox / "scanner1").mkdir()
    (daemon.inbox / "scanner1" / "bad.png").write_text("not a png")
    (daemon.inbox / "top.png").write_text("nor this")
    wait_until(lambda: len(daemon.results(daemon.failed)) == 2, 30, "two error JSON")
    for name in ("bad.png", "top.png"):
        wait_anywhere(daemon, daemon.failed, name)
    assert daemon.stop() == 0
    result = run_watcherd("retry", "--config", str(daemon.config_path))
    assert result.returncode == 0 and "2 file(s) back in the inbox" in result.stdout, result.stdout + result.stderr
    assert (daemon.inbox / "scanner1" / "bad.png").read_text() == "not a png"  # its original path, no date
    assert (daemon.inbox / "top.png").read_text() == "nor this"
    assert not [p for p in daemon.failed.rglob("*.png") if ".retried" not in p.parts]
    assert len(list((daemon.failed / ".retried").rglob("bad.png.*.json"))) == 1


def test_retry_by_source_pattern_and_after_a_clash(daemon_factory) -> None:
    """A failed original stored as bad_1.png (a clash) goes back as bad.png; GLOB matches either path."""
    daemon = daemon_factory().start()
    (daemon.inbox / "bad.png").write_text("one")
    daemon.wait_json("bad.png", daemon.failed)
    (daemon.inbox / "bad.png").write_text("two")
    daemon.wait_json("bad_1.png", daemon.failed)
    assert daemon.stop() == 0
    result = run_watcherd("retry", "--config", str(daemon.config_path), "bad_1.png")
    assert result.returncode == 0 and "1 file(s) back in the inbox" in result.stdout, result.stdout
    assert (daemon.inbox / "bad.png").read_text() == "two"
    assert (daemon.failed / "bad.png").read_text() == "one"


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ("{yyyy}/{mm}", "last component must contain {rel} or {name}"),
        ("{yyyy}/{month}/{rel}", "unknown placeholder {month}"),
        ("/srv/{rel}", "not an absolute path"),
        ("{yyyy}/../{rel}", "'..'"),
        ("{yyyy}//{rel}", "empty"),
        ("{yyyy:>4}/{rel}", "no format spec"),
        ("{rel", "not a template"),
        (".hidden/{rel}", "hidden"),
    ],
)
def test_bad_layouts_exit_78_naming_the_key(tmp_path: Path, layout: str, words: str) -> None:
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "watcherd.yaml"
    config.write_text(
        f"paths: {{inbox: {tmp_path}/inbox, outbox: {tmp_path}/outbox, failed: {tmp_path}/failed, "
        f"archive: {tmp_path}/archive}}\noutput: {{layout: '{layout}'}}\n"
    )
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{config}: output.layout:" in message and words in message, message


def test_place_is_a_pure_function() -> None:
    when = datetime(2026, 3, 7, 23, 59)
    assert naming.place("a/b.jpg", "mirror", when) == "a/b.jpg"
    assert naming.place("a/b.jpg", "{yyyy}/{mm}/{dd}/{rel}", when) == "2026/03/07/a/b.jpg"
    assert naming.place("a/b.jpg", "{yyyy}{mm}{dd}-{name}", when) == "20260307-b.jpg"
    assert naming.place("b.jpg", "in/{rel}", when) == "in/b.jpg"
    assert config_file.from_dict({"output": {"layout": "{yyyy}/{rel}"}}).output.layout == "{yyyy}/{rel}"
    assert config_file.from_dict({}).output.layout == "mirror"
