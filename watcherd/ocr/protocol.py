"""The messages between the parent and the OCR child, typed, with one decode site each way.

Child → parent messages are decoded by `decode` only; parent → child requests are encoded by
`encode` only (in the parent) and decoded by `decode_request` (in the child).

They travel as frames (`framing`: the parent's non-blocking `Reader`, the size cap).

The child is not trusted either (it runs a model on hostile files, design §9): a frame over
`MAX_MESSAGE_BYTES`, bytes that are not JSON, JSON that is not an object, an unknown `op` or a
field missing or of the wrong type raise `ProtocolError` (`framing`'s), which the supervisor treats like the
child dying (the file retried once, then `child_crashed`), never as an exception in the parent.
Strings that reach the parent are made valid UTF-8: an engine's text with a lone surrogate
("before \\udce9 after") once raised UnicodeEncodeError at publication, and at every restart.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from watcherd.ocr.framing import ProtocolError

# design §5: every error JSON carries one of these; the child may report all but not_regular_file.
ERROR_CODES = (
    "timeout",
    "vram_insufficient",
    "engine_error",
    "child_crashed",
    "unreadable",
    "unsupported_type",
    "too_large",
    "not_regular_file",
)


_SURROGATE = re.compile("[\ud800-\udfff]")
_NUMBER = (int, float)
_OPTIONAL_STR = (str, type(None))

# op → required fields and their types (bool is an int: excluded where it matters, below).
FIELDS: dict[str, dict[str, Any]] = {
    "ready": {"pid": int, "load_time": _NUMBER, "engine": _OPTIONAL_STR},
    "load_failed": {"detail": str},
    "cleared": {"files_done": int, "before": dict, "after": dict},
    "pages": {"id": int, "count": int, "sha256": str, "file": list},
    "page_start": {"id": int, "page": int},
    "rendering": {"id": int},
    "page": {"id": int, "page": int, "text": str, "processing_time": _NUMBER, "size": list},
    "done": {"id": int},
    "failed": {"id": int, "code": str, "detail": str},
    "deferred": {"id": int, "gpu_info": dict},
}


# -- the messages, child → parent: one dataclass each, built only by `decode` ---------------


@dataclass(frozen=True)
class Ready:
    pid: int
    load_time: float
    engine: str | None
    model: str | None
    batch_pages: int = 1  # pages per engine call (ocr_batch): the parent may hand over this many files at once


@dataclass(frozen=True)
class LoadFailed:
    detail: str
    config_error: bool  # retrying cannot help (a bad ocr.engine)


@dataclass(frozen=True)
class Cleared:
    files_done: int
    before: dict[str, Any]
    after: dict[str, Any]


@dataclass(frozen=True)
class Pages:  # the file is open: how many pages, its hash, and the inode read (design §9)
    id: int
    count: int
    sha256: str
    file: tuple[int, int]


@dataclass(frozen=True)
class PageStart:  # the clock restarts: a page, or a batch of `pages` pages from `page` on
    id: int
    page: int
    pages: int = 1


@dataclass(frozen=True)
class Rendering:  # every page is read; the PDF/hOCR/ALTO are being written (the clock restarts)
    id: int


@dataclass(frozen=True)
class Page:
    """A page read. `record` is the page as the result JSON carries it, built once by `decode` and
    handed on as it is (the document's `pages`, and the `earlier` of a long file's later turns):
    page, text, processing_time, size, resized_from, source ("ocr", or "pdf_text": the PDF page's
    own text layer, no OCR), then where they apply rotated (degrees the page was turned upright
    before OCR), batch_pages and batch_time (pages OCR'd in the same engine call and its wall
    time; processing_time is a share), replaced_characters (lone surrogates replaced, here or in
    the child) and lines (checked: {text, score, box, words?}, boxes in the original's pixels)."""

    id: int
    record: dict[str, Any]

    @property
    def page(self) -> int:
        return int(self.record["page"])

    @property
    def text(self) -> str:
        return str(self.record["text"])

    @property
    def replaced_characters(self) -> int:
        return int(self.record.get("replaced_characters", 0))


@dataclass(frozen=True)
class Deferred:  # try the file later: too little GPU memory even after clearing the cache, or
    id: int  # the engine raised EngineUnavailable (its server is down or busy)
    gpu_info: dict[str, Any]
    sha256: str | None
    reason: str = "vram"  # "vram" | "engine_unavailable"
    detail: str | None = None


@dataclass(frozen=True)
class Finished:  # `done` (ok) or `failed` (code, detail)
    id: int
    ok: bool
    code: str | None
    detail: str | None
    sha256: str | None
    gpu_info_before: dict[str, Any]
    gpu_info_after: dict[str, Any]
    rendered: tuple[str, ...] = ()  # formats written to their scratch files (done only)
    render_errors: dict[str, str] = field(default_factory=dict)  # format → why it could not be written
    next_page: int | None = None  # done with a turn of a long file: where the next turn starts (0-based)


FileMessage = Pages | PageStart | Rendering | Page | Deferred | Finished  # about a file of a request (`id`)
Message = Ready | LoadFailed | Cleared | FileMessage

# -- the requests, parent → child: one dataclass each, written only by `encode` ------------------


@dataclass(frozen=True)
class FileRequest:
    """A file of an `ocr` request, read from `first_page` (0-based: a later turn of a long file)."""

    id: int
    path: str
    render: dict[str, Any]  # Job.render: the PDF/hOCR/ALTO to write to scratch files; {}: none
    first_page: int = 0
    earlier: list[dict[str, Any]] = field(default_factory=list)  # pages earlier turns read (`Page.record`s)


@dataclass(frozen=True)
class OcrRequest:
    """Files to read: several only for an engine with ocr_batch (their pages share engine calls);
    another may come while one is read, and joins it."""

    files: tuple[FileRequest, ...]
    solo: bool = False  # a page per engine call
    turn_pages: int = 0  # a longer file is read this many pages at a time; 0: whole


@dataclass(frozen=True)
class IdleRequest:
    """The queue is drained: clear the cache."""


@dataclass(frozen=True)
class ExitRequest:
    """Exit (the parent SIGKILLs a child that does not)."""


Request = OcrRequest | IdleRequest | ExitRequest


def encode(request: Request) -> bytes:
    """A request as one frame's bytes: JSON, ASCII only (a file name's surrogate escapes survive)."""
    message: dict[str, Any]
    if isinstance(request, OcrRequest):
        files = [
            {"id": f.id, "path": f.path, "render": f.render, "first_page": f.first_page, "earlier": f.earlier}
            for f in request.files
        ]
        message = {"op": "ocr", "files": files, "solo": request.solo, "turn_pages": request.turn_pages}
    else:
        message = {"op": "idle" if isinstance(request, IdleRequest) else "exit"}
    return json.dumps(message, ensure_ascii=True).encode()


def decode_request(raw: bytes) -> Request:
    """A request, in the child. The parent is trusted: optional fields default as `encode` would
    write them; an unknown `op` raises ProtocolError, a missing id or path KeyError."""
    message = json.loads(raw)
    op = message.get("op")
    if op == "idle":
        return IdleRequest()
    if op == "exit":
        return ExitRequest()
    if op != "ocr":
        raise ProtocolError(f"unknown request {str(op)[:40]!r}")
    files = tuple(
        FileRequest(f["id"], f["path"], f.get("render") or {}, int(f.get("first_page") or 0), f.get("earlier") or [])
        for f in message["files"]
    )
    return OcrRequest(files, bool(message.get("solo")), int(message.get("turn_pages") or 0))


MAX_LINES = 100_000  # per page; a dense newspaper page has a few hundred
MAX_WORDS = 10_000  # per line
ROTATIONS = (0, 90, 180, 270)


def valid_text(text: str) -> tuple[str, int]:
    """`text` as valid UTF-8 and how many characters were replaced: surrogate pairs are joined,
    lone surrogates become U+FFFD."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        pass
    joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATE.subn("\ufffd", joined)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return valid_text(value)[0]
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {valid_text(str(k))[0]: _clean(v) for k, v in value.items()}
    return value


def decode(raw: bytes) -> Message:
    """One child message, checked and typed; raises ProtocolError."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"not JSON ({type(exc).__name__}: {str(exc)[:80]}; starts {raw[:32]!r})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object but {type(message).__name__}")
    op = message.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise ProtocolError(f"unknown op {str(op)[:40]!r}")
    for name, kind in FIELDS[op].items():
        value = message.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, _NUMBER)):
            raise ProtocolError(f"{op}: field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    if op == "failed" and message["code"] not in ERROR_CODES:
        raise ProtocolError(f"failed: unknown error code {message['code'][:40]!r}")
    if b"\\ud" in raw or b"\\uD" in raw:  # JSON escapes of surrogates: make every string valid
        if op == "page":
            message["text"], replaced = valid_text(message["text"])
            message["replaced_characters"] = replaced + _count(message.get("replaced_characters"))
        try:
            message = _clean(message)
        except RecursionError:
            raise ProtocolError("nested too deeply") from None
    try:
        return _typed(op, message)
    except OverflowError:  # an integer too large for a float (10**400): float() and isfinite() raise
        raise ProtocolError(f"{op}: a number too large for a float") from None


def _typed(op: str, m: dict[str, Any]) -> Message:
    """The dataclass for a checked message; optional fields of the wrong type read as absent."""
    if op == "ready":
        model = m.get("model")
        model = model if isinstance(model, str) else None
        return Ready(m["pid"], float(m["load_time"]), m["engine"], model, max(1, _count(m.get("batch_pages"))))
    if op == "load_failed":
        return LoadFailed(m["detail"], m.get("config_error") is True)
    if op == "cleared":
        return Cleared(m["files_done"], m["before"], m["after"])
    if op == "pages":
        file = m["file"]
        if len(file) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in file):
            raise ProtocolError("pages: field 'file' is not [st_dev, st_ino]")
        return Pages(m["id"], m["count"], m["sha256"], (file[0], file[1]))
    if op == "page_start":
        return PageStart(m["id"], m["page"], max(1, _count(m.get("pages"))))
    if op == "rendering":
        return Rendering(m["id"])
    if op == "page":
        return Page(m["id"], _page_record(m))
    if op == "deferred":
        reason = "engine_unavailable" if m.get("reason") == "engine_unavailable" else "vram"
        return Deferred(m["id"], m["gpu_info"], _str(m.get("sha256")), reason, _str(m.get("detail")))
    return Finished(  # done | failed: FIELDS knows no other op
        m["id"],
        op == "done",
        m.get("code"),
        m.get("detail"),
        _str(m.get("sha256")),
        _dict(m.get("gpu_info_before")),
        _dict(m.get("gpu_info_after")),
        _rendered(m.get("rendered")),
        {k: v for k, v in _dict(m.get("render_errors")).items() if k in ("pdf", "hocr", "alto") and isinstance(v, str)},
        _count(m.get("next_page")) or None,
    )


def _page_record(m: dict[str, Any]) -> dict[str, Any]:
    """A checked `page` message as the page of the result JSON (`Page.record`), its keys in order."""
    rotated = m.get("rotated")
    if rotated is not None and rotated not in ROTATIONS:
        raise ProtocolError(f"page: rotated is {str(rotated)[:20]!r}, not one of {ROTATIONS}")
    processing_time = float(m["processing_time"])
    lines = None if m.get("lines") is None else _lines(m["lines"])
    record: dict[str, Any] = {
        "page": m["page"],
        "text": m["text"],
        "processing_time": processing_time,
        "size": m["size"],
        "resized_from": m.get("resized_from"),
        "source": "pdf_text" if m.get("source") == "pdf_text" else "ocr",
    }
    if rotated is not None:
        record["rotated"] = rotated
    batch_pages = max(1, _count(m.get("batch_pages")))
    if batch_pages > 1:
        record["batch_pages"] = batch_pages
        record["batch_time"] = float(m["batch_time"]) if _finite(m.get("batch_time")) else None
    replaced = _count(m.get("replaced_characters"))
    if replaced:
        record["replaced_characters"] = replaced
    if lines is not None:
        record["lines"] = lines
    return record


def _lines(value: Any) -> list[dict[str, Any]]:
    """A page's lines, each `{text, score, box}` (+ `words`, the same without words), exactly so:
    boxes are four [x, y] pairs of finite numbers, scores a number in [0, 1] or null."""
    if not isinstance(value, list) or len(value) > MAX_LINES:
        raise ProtocolError(f"page: lines is not a list of at most {MAX_LINES:,}")
    lines = []
    for item in value:
        line = _positioned(item)
        words = item.get("words")
        if words is not None:
            if not isinstance(words, list) or len(words) > MAX_WORDS:
                raise ProtocolError(f"page: a line's words are not a list of at most {MAX_WORDS:,}")
            line["words"] = [_positioned(word) for word in words]
        lines.append(line)
    return lines


def _positioned(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise ProtocolError("page: a line or word without text")
    box = item.get("box")
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(p, list) and len(p) == 2 and all(_finite(v) for v in p) for p in box)
    ):
        raise ProtocolError("page: a box is not four [x, y] points")
    score = item.get("score")
    if score is not None and not (_finite(score) and 0 <= score <= 1):
        raise ProtocolError("page: a score is not null or a number in [0, 1]")
    return {"text": item["text"], "score": score, "box": [[float(x), float(y)] for x, y in box]}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rendered(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if v in ("pdf", "hocr", "alto"))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"available": False}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
