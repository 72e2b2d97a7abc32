"""Fuzzing the work-area recovery (`Spool.recover`, design §9): whatever lies in `pending/` —
random names, bytes, JSON, envelopes, records signed with the real key but with hostile fields,
folders, FIFOs, links — recovery never raises, never hangs, and never touches a path outside
the inbox and the configured folders. Signed records stand for the worst case (a key that leaked):
their paths must still be refused.

Bounded in CI by WATCHERD_FUZZ_SECONDS, like tests/test_fuzz.py; `make fuzz` runs it longer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcherd.core import config_file
from watcherd.work.spool import Spool

pytestmark = pytest.mark.fuzz

FUZZ_SECONDS = float(os.environ.get("WATCHERD_FUZZ_SECONDS", "24"))
CALL_LIMIT_S = 2.0

segment = st.sampled_from(["a", "b.png", "..", ".", "", "x.jpg", "長", "\udce9", "/", "~", ".watcherd"])
rel_path = st.lists(segment, min_size=0, max_size=4).map("/".join) | st.text(max_size=30)
roots = st.sampled_from(["outbox", "failed", "archive", "rejected", "inbox", "/etc", "", "work"])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def record(draw: st.DrawFn) -> dict[str, Any]:
    """A record close to ours, with any field possibly hostile."""
    rel = draw(rel_path)
    names = draw(
        st.dictionaries(
            st.sampled_from(["json", "text", "original", "other"]),
            st.tuples(roots, rel_path).map(list) | json_value,
            max_size=3,
        )
    )
    body: dict[str, Any] = {
        "v": draw(st.sampled_from([1, 1, 1, 2, "1", None])),
        "rel": rel,
        "names": names,
        "document": draw(st.dictionaries(st.text(max_size=8), json_value, max_size=3) | json_value),
        "text": draw(st.none() | st.text(max_size=20) | json_value),
    }
    for key in draw(st.lists(st.sampled_from(list(body)), max_size=2)):
        body.pop(key, None)
    return body


@st.composite
def entry(draw: st.DrawFn) -> tuple[str, str, Any]:
    """(name, kind, content) of one thing planted in pending/."""
    kind = draw(st.sampled_from(["signed", "signed", "envelope", "json", "bytes", "folder", "fifo", "link", "temp"]))
    body = draw(record())
    rel = body.get("rel") if isinstance(body.get("rel"), str) else "x"
    sha = hashlib.sha1(os.fsencode(rel)).hexdigest() + ".json"
    name = draw(st.sampled_from([sha, sha, "junk.json", ".x.0123abcd.tmp", "a" * 40 + ".json", "長.json"]))
    if kind == "bytes":
        return name, kind, draw(st.binary(max_size=200))
    if kind == "json":
        return name, kind, json.dumps(draw(json_value))
    return name, kind, body


def plant(pending: Path, key: bytes, outside: Path, name: str, kind: str, content: Any) -> None:
    path = pending / name
    if os.path.lexists(path):
        return
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        path.symlink_to(outside / "victim")
    elif kind == "bytes":
        path.write_bytes(content)
    elif kind == "json":
        path.write_text(content)
    else:
        body = json.dumps(content)
        mac = hmac.new(key, b"watcherd-record-v1\0" + body.encode("utf-8", "surrogatepass"), hashlib.sha256)
        digest = mac.hexdigest() if kind == "signed" else "0" * 64
        path.write_bytes(json.dumps({"body": body, "mac": digest}).encode("utf-8", "surrogatepass"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(entries=st.lists(entry(), min_size=1, max_size=6))
def run_once(entries: list[tuple[str, str, Any]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="watcherd-fuzz-"))
    try:
        folders = {k: base / k for k in ("inbox", "outbox", "failed", "archive", "state", "outside")}
        for folder in folders.values():
            folder.mkdir()
        (folders["outside"] / "victim").write_bytes(b"keep")
        for root in ("outbox", "archive", "failed"):  # links planted in output folders: never followed
            (folders[root] / "a").symlink_to(folders["outside"])
        config = {k: str(v) for k, v in folders.items() if k != "outside"}
        spool = Spool(config_file.from_dict({"paths": config}, env={}))
        spool.prepare()
        key = (folders["state"] / "record.key").read_bytes()
        pending = folders["inbox"] / ".watcherd" / "pending"
        for name, kind, content in entries:
            plant(pending, key, folders["outside"], name, kind, content)
        before = snapshot(folders["outside"])
        started = time.monotonic()
        spool.recover()  # must not raise
        assert time.monotonic() - started < CALL_LIMIT_S
        assert snapshot(folders["outside"]) == before
        assert not any(p.name == "victim" for p in folders["outbox"].rglob("*"))
        for stray in base.iterdir():
            assert stray.name in folders, f"something was written beside the configured folders: {stray}"
        spool.area.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_recovery_never_raises_never_escapes_its_folders() -> None:
    deadline = time.monotonic() + FUZZ_SECONDS / 3
    runs = 0
    while runs == 0 or time.monotonic() < deadline:
        run_once()
        runs += 1
