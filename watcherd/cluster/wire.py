"""The messages between the dispatcher and its workers, and their one codec each.

A task goes to the broker's task queue as Celery kwargs (`Task.encode`, read by the worker with
`Task.decode`); a worker's replies come back on the dispatcher's reply queue (`encode_reply`, read
with `decode_reply`), and a task that died on every worker comes back dead-lettered
(`decode_dead`). The broker is trusted no more than a share: anything that can reach the reply
queue can put a message there, so every field is checked here, once, and a message this code
cannot read is dropped with a log line — it never reaches the loop as an exception. Only a holder
of a task's attempt id (128 random bits, sent only in the task) can make a reply count at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeGuard

from watcherd.core.records import Outcome
from watcherd.ocr.protocol import ERROR_CODES

REPLY_KINDS = ("started", "progress", "outcome")
MAX_FIELD_CHARS = 4096  # a job's path: far below this; a flood is not
MAX_NAME_CHARS = 255  # a host, engine or device name


class WireError(ValueError):
    """A message that is not one this codec writes."""


@dataclass(frozen=True)
class Task:
    """One attempt at one file, dispatcher → worker."""

    job: str
    attempt: str
    path: str  # as the worker sees it (cluster.path_map applied)
    signature: list[int] | None  # [size, mtime_ns, inode] when claimed
    received_at: str
    reply_to: str
    heartbeat_s: float
    ocr: dict[str, Any]

    def encode(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def decode(cls, kwargs: Any) -> Task:
        if not isinstance(kwargs, dict):
            raise WireError(f"a task is a mapping, not {type(kwargs).__name__}")
        for key in ("job", "attempt", "path", "reply_to"):
            if not _short_str(kwargs.get(key)):
                raise WireError(f"task field {key!r} missing or not a string")
        signature = kwargs.get("signature")
        if signature is not None and not (
            isinstance(signature, list) and len(signature) == 3 and all(_int(v) for v in signature)
        ):
            raise WireError("task field 'signature' is not [size, mtime_ns, inode]")
        heartbeat = kwargs.get("heartbeat_s")
        ocr = kwargs.get("ocr")
        return cls(
            job=kwargs["job"],
            attempt=kwargs["attempt"],
            path=kwargs["path"],
            signature=signature,
            received_at=str(kwargs.get("received_at")),
            reply_to=kwargs["reply_to"],
            heartbeat_s=float(heartbeat) if _number(heartbeat) and heartbeat > 0 else 10.0,
            ocr=ocr if isinstance(ocr, dict) else {},
        )


@dataclass(frozen=True)
class Reply:
    """A worker's word on an attempt: it started (on which host and device), a page began, or the outcome."""

    kind: str
    attempt: str
    job: str | None
    host: str
    device: Any = None
    engine: str | None = None
    page: int = 0
    pages: int = 0
    outcome: dict[str, Any] | None = None  # read with `decode_outcome`


@dataclass(frozen=True)
class Dead:
    """A task dead-lettered by the broker after cluster.max_deliveries deliveries."""

    attempt: str | None
    job: str | None


def encode_reply(task: Task, host: str, kind: str, **fields: Any) -> dict[str, Any]:
    assert kind in REPLY_KINDS
    return {"attempt": task.attempt, "job": task.job, "host": host, "kind": kind, **fields}


def decode_reply(body: Any) -> Reply:
    if not isinstance(body, dict):
        raise WireError(f"a reply is a mapping, not {type(body).__name__}")
    kind, attempt = body.get("kind"), body.get("attempt")
    if kind not in REPLY_KINDS:
        raise WireError(f"unknown reply kind {kind!r}")
    if not _short_str(attempt):
        raise WireError("reply without an attempt id")
    job, host, engine = body.get("job"), body.get("host"), body.get("engine")
    page, pages, outcome = body.get("page", 0), body.get("pages", 0), body.get("outcome")
    if not (_int(page) and _int(pages)):
        raise WireError("reply page numbers are not integers")
    if kind == "outcome" and not isinstance(outcome, dict):
        raise WireError("outcome reply without an outcome")
    return Reply(
        kind=kind,
        attempt=attempt,
        job=job if _short_str(job) else None,
        host=host if _name(host) else "?",
        device=body.get("device") if _device(body.get("device")) else None,
        engine=engine if _name(engine) else None,
        page=page,
        pages=pages,
        outcome=outcome if isinstance(outcome, dict) else None,
    )


def decode_dead(kwargs: Any) -> Dead:
    """The task's own kwargs, as the broker dead-lettered them (any shape: it names its attempt or not)."""
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    attempt, job = kwargs.get("attempt"), kwargs.get("job")
    return Dead(attempt=attempt if _short_str(attempt) else None, job=job if _short_str(job) else None)


def encode_outcome(outcome: Outcome) -> dict[str, Any]:
    return {
        "ok": outcome.ok,
        "code": outcome.code,
        "detail": outcome.detail,
        "sha256": outcome.sha256,
        "pages": outcome.pages,
        "processing_time": outcome.processing_time,
        "gpu_info_before": outcome.gpu_info_before,
        "gpu_info_after": outcome.gpu_info_after,
        "engine": outcome.engine,
        "model": outcome.model,
        "deferred": outcome.deferred,
        "opened_ino": outcome.job.opened[1] if outcome.job.opened else None,
    }


@dataclass(frozen=True)
class OutcomeFields:
    """An outcome reply's fields, each of the type the dispatcher's `Outcome` needs."""

    ok: bool
    code: str | None
    detail: str | None
    sha256: str | None
    pages: list[dict[str, Any]]
    processing_time: float
    gpu_info_before: dict[str, Any]
    gpu_info_after: dict[str, Any]
    engine: str | None
    model: str | None
    deferred: bool
    opened_ino: int | None


def decode_outcome(raw: dict[str, Any]) -> OutcomeFields:
    """Raises WireError when the outcome cannot be published: pages that are not text, a failure
    without one of watcherd's error codes (that costs the file, not the loop)."""
    pages = raw.get("pages") or []
    if not (isinstance(pages, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in pages)):
        raise WireError("the outcome's pages are not pages of text")
    ok, deferred = bool(raw.get("ok")), bool(raw.get("deferred"))
    code, detail = _text(raw.get("code")), _text(raw.get("detail"))
    if not ok and not deferred:
        # The error document names the code and explains it: a code it cannot explain is not ours.
        if code not in ERROR_CODES:
            raise WireError(f"the outcome's error code {code!r} is not one of watcherd's")
        detail = detail or "the worker gave no detail"
    ino = raw.get("opened_ino")
    return OutcomeFields(
        ok=ok,
        code=None if ok else code,
        detail=detail,
        sha256=_text(raw.get("sha256")),
        pages=pages,
        processing_time=float(raw["processing_time"]) if _number(raw.get("processing_time")) else 0.0,
        gpu_info_before=_mapping(raw.get("gpu_info_before")),
        gpu_info_after=_mapping(raw.get("gpu_info_after")),
        engine=_text(raw.get("engine")),
        model=_text(raw.get("model")),
        deferred=deferred,
        opened_ino=ino if _int(ino) else None,
    )


def _short_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_FIELD_CHARS


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _device(value: Any) -> bool:
    return value is None or _int(value) or _name(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"available": False}
