"""The records every stage shares: a claimed file (`Job`) and what became of it (`Outcome`)."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload


@dataclass
class Job:
    """A claimed file. `rel` is its path below the inbox with '/' separators."""

    rel: str
    path: Path
    received_at: str
    attempts: int = 0
    deferred_since: float | None = None  # monotonic time of the first deferral for GPU memory
    deferrals: int = 0
    signature: Signature | None = None  # (type, size, mtime) when claimed
    rereads: int = 0  # times it changed under us after the claim and was OCR'd again
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of what was claimed
    opened: tuple[int, int] | None = None  # (st_dev, st_ino) of what the child read
    json_path: str | None = None  # where `finish` published its result or error JSON
    render: dict[str, Any] = field(default_factory=dict)  # the child's request to write PDF/hOCR/ALTO
    solo: bool = False  # a batch it was in timed out or crashed: OCR it alone, a page at a time
    # A long file is read in turns of ocr.turn_pages pages, other files going in between:
    next_page: int = 0  # 0-based: where its next turn starts
    pages_done: list[dict[str, Any]] = field(default_factory=list)  # read in earlier turns
    turn_sha256: str | None = None  # the bytes those turns read
    elapsed: float = 0.0  # seconds spent in earlier turns

    def start_over(self) -> None:
        """Forget the pages read so far (the file changed, or what was read was not it)."""
        self.next_page, self.pages_done, self.turn_sha256, self.elapsed = 0, [], None, 0.0


# What says a file is still the one seen: its type, size and mtime (what a writer changes).
Signature = tuple[int, int, int]


@overload
def signature(st: os.stat_result) -> Signature: ...
@overload
def signature(st: None) -> None: ...
def signature(st: os.stat_result | None) -> Signature | None:
    return None if st is None else (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)


def signature_of(path: Path) -> Signature | None:
    """`signature` of what is at `path` now (lstat: a symlink is never followed), None if nothing."""
    try:
        return signature(os.lstat(path))
    except OSError:
        return None


def inbox_id(inbox: Path) -> str:
    """A stable name for an inbox in the state folder (several daemons may share that folder)."""
    return hashlib.sha256(os.fsencode(os.path.realpath(inbox))).hexdigest()[:16]


@dataclass
class Outcome:
    """What became of one job: ok with pages, an error code, or `retry` after a child death."""

    job: Job
    ok: bool
    code: str | None = None
    detail: str | None = None
    sha256: str | None = None
    pages: list[dict[str, Any]] = field(default_factory=list)
    processing_time: float = 0.0
    gpu_info_before: dict[str, Any] = field(default_factory=lambda: {"available": False})
    gpu_info_after: dict[str, Any] = field(default_factory=lambda: {"available": False})
    engine: str | None = None
    model: str | None = None
    retry: bool = False  # the child died on it: run it again (once)
    deferred: bool = False  # too little GPU memory: keep it queued and try again later
    duplicate_of: str | None = None  # dedupe: the JSON of the first result with these bytes (no OCR ran)
    partial: bool = False  # a turn of a long file went well: its next turn waits behind other files
    rendered: tuple[str, ...] = ()  # PDF/hOCR/ALTO the child wrote to their scratch files
    render_errors: dict[str, str] = field(default_factory=dict)  # and those it could not write, why
    defer_reason: str = "vram"  # or "engine_unavailable": the engine's server is down or busy


class InputError(Exception):
    """The file itself is the problem; `code` is one of the design §5 error codes."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail
