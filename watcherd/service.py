"""The daemon's main loop: intake → claim → worker → publish, in one thread.

Callbacks (watchdog, signals) only enqueue and wake the loop through a pipe; the loop sleeps in
one `wait()` on that pipe and every child's protocol pipe until a message, an event, or the next
deadline (a settle period ending, a page timeout, a rescan) is due.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import stat
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from . import __version__, intake, logs, outputs
from .intake import Intake, StabilityTracker
from .settings import Settings
from .spool import Job, Spool
from .supervisor import Outcome, Worker

log = logging.getLogger("watcherd")

STOP_GRACE_S = 30.0  # SIGTERM: how long the page in progress may take to finish


def document_for(outcome: Outcome, *, settings: Settings, received_at: str) -> tuple[dict[str, Any], str | None]:
    """The result or error JSON for an outcome (DESIGN §5), and the text for the .md/.txt file."""
    common = {
        **outputs.display_name(outcome.job.rel),
        "image_path": None,  # set to the original's final place when it is published
        "sha256": outcome.sha256,
    }
    if outcome.ok:
        text = "\n\n".join(page["text"] for page in outcome.pages)
        document = {
            "status": "ok",
            **common,
            "text": text,
            "pages": outcome.pages,
            "processing_time": outcome.processing_time,
            "engine": outcome.engine,
            "model": outcome.model,
            "gpu_info_before": outcome.gpu_info_before,
            "gpu_info_after": outcome.gpu_info_after,
            "attempts": outcome.job.attempts,
            "received_at": received_at,
            "finished_at": outputs.now_iso(),
            "watcherd_version": __version__,
        }
        return document, text
    code = outcome.code or "engine_error"
    message = outputs.error_message(
        code, settings.output.locale, detail=outcome.detail or "", timeout=settings.ocr.timeout_s,
        free_mb=outcome.gpu_info_after.get("free_mb", "?"), min_free_mb=settings.gpu.min_free_mb,
    )
    document = {
        "status": "failed",
        "error_code": code,
        "error": message,
        **common,
        "processing_time": outcome.processing_time,
        "gpu_info": outcome.gpu_info_after,
        "attempts": outcome.job.attempts,
        "detail": outcome.detail,
        "engine": outcome.engine,
        "model": outcome.model,
        "received_at": received_at,
        "finished_at": outputs.now_iso(),
        "watcherd_version": __version__,
    }
    return document, None


def precheck(job: Job, settings: Settings) -> Outcome | None:
    """Failures the parent can see from lstat alone, without giving the file to the child."""
    st = os.lstat(job.path)
    if not stat.S_ISREG(st.st_mode):
        kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "folder" if stat.S_ISDIR(st.st_mode) else (
            "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device")
        return Outcome(job=job, ok=False, code="not_regular_file", detail=f"{kind}, not followed")
    limit = settings.ocr.max_file_mb * 1024 * 1024
    if st.st_size > limit:
        return Outcome(job=job, ok=False, code="too_large",
                       detail=f"{st.st_size / 1024 / 1024:.1f} MB, more than ocr.max_file_mb ({settings.ocr.max_file_mb:g})")
    return None


class Service:
    def __init__(self, settings: Settings):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.spool = Spool(settings)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.intake = Intake(settings.paths.inbox, settings.watch, wake=self._wake)
        self.tracker = StabilityTracker(settings.watch.settle_s)
        devices = settings.ocr.devices or (None,)
        self.workers = [Worker(ocr=settings.ocr, gpu=settings.gpu, device=d, on_event=logs.event) for d in devices]
        self.ready: collections.deque[tuple[Path, tuple[int, int, int]]] = collections.deque()
        self.queued: set[Path] = set()  # paths in `ready`, so repeated events never queue twice
        self.jobs: collections.deque[Job] = collections.deque()  # claimed, waiting for a worker
        self.blocked: list[tuple[Path, tuple[int, int, int]]] = []  # same name still in progress
        self.signals: collections.deque[int] = collections.deque()
        self.counts = {"ok": 0, "failed": 0}
        self.stopping_since: float | None = None
        self.next_rescan = 0.0

    # -- callbacks: enqueue and wake, nothing else ----------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake anyway

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        self._wake()

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.spool.prepare()
        self.jobs.extend(self.spool.recover())
        if self.jobs:
            log.info("Recovered %d file(s) claimed before a crash", len(self.jobs))
        self.intake.start()
        log.info("Watching %s (%s); results to %s", self.settings.paths.inbox, self.intake.mode,
                 self.settings.paths.outbox)
        for worker in self.workers:
            worker.spawn()
        try:
            while not self._finished():
                self._handle_signals()
                self._intake()
                self._dispatch()
                self._wait()
                for worker in self.workers:
                    self._settle(worker.pump())
                    self._settle(worker.tick())
        finally:
            self.intake.stop()
            for worker in self.workers:
                worker.stop()
        log.info("Stopped: %d ok, %d failed", self.counts["ok"], self.counts["failed"])
        return 0

    def _finished(self) -> bool:
        if self.stopping_since is None:
            return False
        busy = [w for w in self.workers if w.state == "busy"]
        if busy and time.monotonic() - self.stopping_since < STOP_GRACE_S:
            return False
        for worker in busy:  # grace is over: the page goes back to the inbox, never to failed
            job = worker.job
            worker.kill()
            if job is not None:
                self.jobs.appendleft(job)
        for job in self.jobs:
            back = self.spool.unclaim(job)
            log.info("Returned %s to the inbox as %s", job.rel, back.name)
        return True

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT) and self.stopping_since is None:
                logs.event("stopping", f"{signal.Signals(signum).name}: finishing the page in progress "
                           f"(at most {STOP_GRACE_S:g} s), then stopping")
                self.stopping_since = time.monotonic()
                self.intake.stop()
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: configuration reload is not supported yet; restart the service")

    def _intake(self) -> None:
        if self.stopping_since is not None:
            return
        now = time.monotonic()
        candidates = list(self.intake.drain())
        if now >= self.next_rescan:
            candidates.extend(self.intake.scan())
            self.next_rescan = now + self.settings.watch.rescan_interval_s
        for path in candidates:
            if path not in self.queued:
                self.tracker.track(path)
        for path, signature in self.tracker.ready():
            self.ready.append((path, signature))
            self.queued.add(path)

    def _dispatch(self) -> None:
        if self.stopping_since is not None:
            return
        for worker in self.workers:
            while worker.ready:
                job = self._next_job()
                if job is None:
                    break
                early = precheck(job, self.settings)
                if early is not None:
                    self._finish(early)
                    continue
                logs.event("claimed", f"{job.rel}: OCR started (child {worker.pid})", source=job.rel,
                           child_pid=worker.pid)
                worker.assign(job)
        if not self.jobs and not self.ready:
            for worker in self.workers:
                if worker.ready and worker.files_done:
                    worker.drained()

    def _next_job(self) -> Job | None:
        if self.jobs:
            return self.jobs.popleft()
        while self.ready:
            path, signature = self.ready.popleft()
            self.queued.discard(path)
            if intake.signature_of(path) != signature:
                self.tracker.track(path)  # changed (or vanished) since it was judged ready
                continue
            job = self.spool.claim(path)
            if job is None:
                if os.path.lexists(path):
                    self.blocked.append((path, signature))
                continue
            return job
        return None

    def _wait(self) -> None:
        now = time.monotonic()
        times = [self.next_rescan, *(w.next_wakeup() for w in self.workers), self.tracker.next_due()]
        if self.stopping_since is not None:
            times.append(self.stopping_since + STOP_GRACE_S)
        due = min(t for t in times if t is not None)
        timeout = max(0.0, min(due - now, 5.0))
        if self.signals:
            timeout = 0.0
        sources: list[Any] = [self._wake_r] + [w for w in self.workers if w.conn_in is not None]
        readable = wait(sources, timeout)
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # -- outcomes ----------------------------------------------------------------------------

    def _settle(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.retry:
                self.jobs.appendleft(outcome.job)
            else:
                self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        job = outcome.job
        document, text = document_for(outcome, settings=self.settings, received_at=job.received_at)
        document = self.spool.finish(job, document, text)
        if outcome.ok:
            self.counts["ok"] += 1
            logs.event("done", f"{job.rel}: {len(outcome.pages)} page(s) in {outcome.processing_time:.2f} s → "
                       f"{document.get('image_path') or 'deleted'}", source=job.rel,
                       processing_time=outcome.processing_time, pages=len(outcome.pages))
        else:
            self.counts["failed"] += 1
            logs.event("failed", f"{job.rel}: {outcome.code}: {outcome.detail}", level=logging.ERROR,
                       source=job.rel, error_code=outcome.code, processing_time=outcome.processing_time)
        if self.blocked:  # a file waiting for this name may go now
            self.ready.extendleft(reversed(self.blocked))
            self.queued.update(p for p, _ in self.blocked)
            self.blocked.clear()
