"""`watcherd worker`: a Celery worker per GPU whose task drives watcherd's supervised child.

The pool is prefork with one process, and that process owns one `supervisor.Worker` for its whole
life: the model loads once and stays loaded across tasks, and the VRAM guard, cache clearing,
per-page SIGKILL and the one crash retry work exactly as on one host, because they are the same
code. Why prefork and not `solo`: the main process keeps the broker connection and its heartbeats
while a file runs for minutes (a solo worker stops heartbeating inside a long task, the broker
drops it and redelivers a file that is still being read), and when the pool process dies (the OOM
killer, or a model taking it down) `task_reject_on_worker_lost` requeues its message; the OCR
child dies with it (PR_SET_PDEATHSIG) and the main process starts a new pool process.

The task never raises for a file's sake: every outcome (ok, error, timeout, deferred for GPU
memory) goes back to the dispatcher's reply queue, and only then is the message acknowledged.
While a file runs the task sends progress: a reply when a page starts and a heartbeat every
`heartbeat_s` (a quarter of the dispatcher's `cluster.progress_grace_s`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcherd.cluster import app as app_mod
from watcherd.cluster import wire
from watcherd.core import logs
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import Settings, redact_url
from watcherd.ocr.supervisor import EngineLoadError, Worker

if TYPE_CHECKING:
    from celery import Celery, Task

log = logging.getLogger("watcherd")

PUBLISH_RETRY = {"max_retries": None, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}


class _Process:
    """What a pool process keeps between tasks (set in the main process before the pool forks)."""

    settings: Settings | None = None
    name: str = ""
    supervised: Worker | None = None
    exit_code: Any = None  # a multiprocessing.Value shared with the main process: why the worker stops


def _give_up(exc: EngineLoadError) -> None:
    """The engine cannot load in this pool process: stop the whole worker (warm shutdown) with an
    exit code systemd understands: 78 for a configuration error (no restart loop), else 1."""
    log.critical("Cannot load the OCR engine on %s, stopping this worker: %s", _Process.name, exc)
    if _Process.exit_code is not None:
        _Process.exit_code.value = 78 if exc.config_error else 1
    os.kill(os.getppid(), signal.SIGTERM)


def _supervised() -> Worker:
    if _Process.supervised is None:
        settings = _Process.settings
        assert settings is not None
        device = settings.ocr.devices[0] if settings.ocr.devices else None
        _Process.supervised = Worker(ocr=settings.ocr, gpu=settings.gpu, device=device, on_event=logs.event)
        _Process.supervised.spawn()
    return _Process.supervised


class Replies:
    """Messages to the dispatcher's reply queue for one attempt."""

    def __init__(self, app: Celery, task: wire.Task):
        self.app = app
        self.task = task

    def send(self, kind: str, *, must: bool = False, **fields: Any) -> None:
        body = wire.encode_reply(self.task, _Process.name, kind, **fields)
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(
                    body,
                    exchange="",
                    routing_key=self.task.reply_to,
                    serializer="json",
                    delivery_mode=2,
                    retry=True,
                    retry_policy=PUBLISH_RETRY if must else {"max_retries": 1},
                )
        except Exception as exc:  # progress is best effort; an outcome is retried until it goes (above)
            if must:
                raise
            log.warning("Cannot send %s for %s to the dispatcher: %s", kind, logs.escape(self.task.job), exc)


def _signature_problem(path: str, signature: list[int] | None) -> str | None:
    """The file as the dispatcher claimed it, or why not (wrong path_map, a stale NFS view)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path} on worker {_Process.name}: {exc.strerror or exc}"
    if isinstance(signature, list) and len(signature) == 3:
        size, mtime_ns, ino = signature
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (size, mtime_ns, ino):
            return (
                f"{path} on worker {_Process.name} is not the file claimed (size, mtime, inode "
                f"{st.st_size}, {st.st_mtime_ns}, {st.st_ino} instead of {size}, {mtime_ns}, {ino}); "
                "check cluster.path_map"
            )
    return None


def run_task(task: Task, **kwargs: Any) -> None:
    """One file: check it is the file claimed, OCR it with the supervised child, reply."""
    wanted = wire.Task.decode(kwargs)  # WireError: not a task the dispatcher writes; Celery records the failure
    replies = Replies(task.app, wanted)
    settings = _Process.settings
    assert settings is not None
    log.info("%s: attempt %s started on %s", logs.escape(wanted.job), logs.escape(wanted.attempt), _Process.name)
    replies.send(
        "started",
        pid=os.getpid(),
        device=settings.ocr.devices[0] if settings.ocr.devices else None,
        engine=settings.ocr.engine,
        redelivered=bool((task.request.delivery_info or {}).get("redelivered")),
    )
    if wanted.ocr.get("engine") not in (None, settings.ocr.engine):
        log.warning(
            "The dispatcher asks for engine %s; this worker runs %s (its own ocr.* settings decide)",
            logs.escape(str(wanted.ocr.get("engine"))),
            settings.ocr.engine,
        )
    problem = _signature_problem(wanted.path, wanted.signature)
    if problem is not None:
        replies.send("outcome", must=True, outcome={"ok": False, "code": "unreadable", "detail": problem})
        return
    job = Job(rel=wanted.job, path=Path(wanted.path), received_at=wanted.received_at)
    outcome = _ocr(job, replies, heartbeat_s=wanted.heartbeat_s)
    replies.send("outcome", must=True, outcome=wire.encode_outcome(outcome))


def _ocr(job: Job, replies: Replies, *, heartbeat_s: float) -> Outcome:
    """Drive the supervised child the way the service's loop does, for one file."""
    try:
        worker = _supervised()
        assigned = False
        last_beat = time.monotonic()
        page = -1
        while True:
            if not assigned and worker.ready:
                assigned = worker.assign(job)
            for outcome in worker.pump() + worker.tick():
                if outcome.job is not job:
                    continue
                if outcome.retry:  # the child died on it: once more with a new child, as on one host
                    assigned = False
                    continue
                if outcome.partial:  # a turn of a long file (ocr.turn_pages): the next one, here
                    assigned = False
                    continue
                return outcome
            now = time.monotonic()
            flight = worker.flight
            if flight is not None and flight.current_page != page or now - last_beat >= heartbeat_s:
                page = flight.current_page if flight is not None else page
                replies.send("progress", page=page, pages=flight.page_count if flight else 0)
                last_beat = now
            wakeups = [t for t in (worker.next_wakeup(), last_beat + heartbeat_s) if t is not None]
            timeout = max(0.0, min(wakeups) - time.monotonic())
            wait([worker.fileno()] if worker.conn_in is not None else [], min(timeout, 1.0))
    except EngineLoadError as exc:
        # Not the file's fault: put it back for another worker, and stop this one.
        from celery.exceptions import Reject

        _give_up(exc)
        raise Reject(str(exc), requeue=True) from None


def _loaded(worker: Worker) -> None:
    """Drive the child until its model is loaded (or EngineLoadError: retries as on one host)."""
    while not worker.ready:
        worker.pump()
        worker.tick()
        due = worker.next_wakeup()
        timeout = 1.0 if due is None else max(0.0, min(1.0, due - time.monotonic()))
        wait([worker.fileno()] if worker.conn_in is not None else [], timeout)


def run(settings: Settings, *, name: str | None = None) -> int:
    import multiprocessing

    from celery import signals

    _Process.settings = settings
    _Process.exit_code = multiprocessing.Value("i", 0)
    device = settings.ocr.devices[0] if settings.ocr.devices else None
    _Process.name = name or (socket.gethostname() + ("" if device is None else f"/gpu{device}"))
    app = app_mod.make_app(settings.cluster)
    app.conf.worker_proc_alive_timeout = settings.ocr.load_timeout_s * 2  # the pool process loads the model
    app.task(name=app_mod.TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)(run_task)

    @signals.worker_process_init.connect(weak=False)
    def _load_model(**_: Any) -> None:  # the model loads before the pool process takes a file
        try:
            _loaded(_supervised())
        except EngineLoadError as exc:
            _give_up(exc)

    @signals.worker_process_shutdown.connect(weak=False)
    def _unload(**_: Any) -> None:
        if _Process.supervised is not None:
            _Process.supervised.stop(wait_s=5.0)

    logs.event(
        "ready",
        f"watcherd worker {_Process.name}: {settings.ocr.engine} on "
        f"{'cpu' if device is None else f'GPU {device}'}; queue {settings.cluster.queue} at "
        f"{redact_url(settings.cluster.broker_url or '')}",
    )
    worker = app.Worker(
        hostname=f"watcherd@{_Process.name}",
        concurrency=1,
        pool="prefork",
        queues=[settings.cluster.queue],
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel=settings.logging.level.upper(),
        quiet=True,
    )
    worker.start()
    return int(_Process.exit_code.value or worker.exitcode or 0)
