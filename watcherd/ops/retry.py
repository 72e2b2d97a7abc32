"""`watcherd retry`: failed originals back into the inbox."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import stat
from datetime import datetime
from pathlib import Path

from watcherd.core import naming, safefs
from watcherd.core.moves import move
from watcherd.core.settings import Settings
from watcherd.ops.report import STATUS_MAX_BYTES


def retry(settings: Settings, pattern: str = "*") -> list[tuple[str, str]]:
    """Move failed originals matching `pattern` (relative to the failed folder) back into the inbox.

    Only pairs that watcherd made count: a regular file `x` beside `x.json`, where `x.json` is an
    error document whose `image_path` is exactly that file. Each goes back under its original
    path below the inbox (the error JSON's `source`), wherever `output.layout` put it (a dated
    folder, a suffix after a name clash). Folders that are failed originals
    themselves (a folder named `x.jpg`) are not searched, links are never followed, and the move
    into the inbox goes through folders opened without following links. Their error JSON is moved
    aside to `<failed>/.retried/`, so the record of the failure stays and the next result or
    error JSON for the file does not get a suffix because of it.
    """
    failed, inbox = settings.paths.failed, settings.paths.inbox
    assert failed is not None and inbox is not None
    moved = []
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    for rel, source in _failed_originals(failed):
        if not fnmatch.fnmatch(rel, pattern) and not fnmatch.fnmatch(source, pattern):
            continue
        *folders, name = safefs.parts(rel)
        *inbox_folders, inbox_name = safefs.parts(source)
        with safefs.folder(failed, folders) as src:
            with safefs.folder(inbox, inbox_folders, create=True, mode=0o777) as dst:
                back, n = inbox_name, 0
                while safefs.exists_at(dst, back):
                    n += 1
                    back = naming.with_suffix_number(naming.fit_name(inbox_name, extra=8), n)
                # The original first: a crash here leaves a duplicate record, never a lost file.
                move(src, name, dst, back)
            with safefs.folder(failed, [".retried", *folders], create=True, mode=0o750) as aside:
                move(src, f"{name}.json", aside, f"{naming.fit_name(name, extra=22)}.{stamp}.json")
        moved.append((rel, "/".join((*inbox_folders, back))))
    return moved


def _failed_originals(failed: Path) -> list[tuple[str, str]]:
    """(path below `failed`, path below the inbox it came from) of the failed originals watcherd
    itself put in `failed`, walked by descriptor (`safefs.walk`)."""
    found = []
    for folder in safefs.walk(failed, on_error=lambda path, exc: None):
        entries = folder.entries
        try:
            for name, is_folder in entries.items():
                if name.startswith(".") or not name.endswith(".json") or is_folder:
                    continue
                original = name[: -len(".json")]
                if original not in entries or entries[original]:
                    continue
                st = safefs.lstat_at(folder.fd, original)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue
                rel = "/".join([*folder.path, original])
                source = _error_source(folder.fd, name, failed / rel, fallback=rel)
                if source is not None:
                    found.append((rel, source))
        except OSError:
            folder.skip()
            continue
        claimed_folders = {n[: -len(".json")] for n in entries if n.endswith(".json")}
        folder.descend = [n for n in folder.descend if not n.startswith(".") and n not in claimed_folders]
    return found


def _error_source(fd: int, name: str, original: Path, *, fallback: str) -> str | None:
    """If `name` is an error JSON watcherd wrote for `original`: the path below the inbox the file
    came from (its `source`, exact bytes from `source_b64`); a `source` that is not a plain
    relative path falls back to where the original lies below failed/."""
    data = safefs.read_regular(fd, name, STATUS_MAX_BYTES)
    try:
        document = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if not (
        isinstance(document, dict)
        and document.get("status") == "failed"
        and document.get("image_path") == naming.public_path(original)
    ):
        return None
    source = document.get("source")
    try:
        if isinstance(document.get("source_b64"), str):
            source = os.fsdecode(base64.b64decode(document["source_b64"], validate=True))
        if not isinstance(source, str):
            return fallback
        safefs.parts(source)
    except (ValueError, safefs.Refused):
        return fallback
    return source
