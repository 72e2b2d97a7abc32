"""The daemon's main loop: intake → claim → worker → publish, in one thread.

Callbacks (watchdog, signals) only enqueue and wake the loop through a pipe; the loop sleeps in
one `wait()` on that pipe and every child's protocol pipe until a message, an event, or the next
deadline (a settle period ending, a page timeout, a deferred file's retry, a rescan, the systemd
watchdog) is due. Nothing in the loop waits on OCR, so the watchdog ping is never late because a
model is slow: a missed ping means the daemon itself is stuck.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import os
import signal
import stat
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from . import __version__, intake, logs, outputs
from . import settings as settings_mod
from .intake import Intake, StabilityTracker
from .sdnotify import Notifier
from .settings import ConfigError, Settings
from .spool import Job, Spool
from .supervisor import EngineLoadError, Outcome, Worker, probe_engine

log = logging.getLogger("watcherd")

STOP_GRACE_S = 30.0  # SIGTERM: how long the page in progress may take to finish
MAX_DEFER_BACKOFF_S = 30.0
OUTPUT_RETRY_S = 5.0
# Output errors that go away by themselves (space freed, remounted read-write, permissions fixed):
# hold the result and stop claiming until then. Anything else is logged and the file left claimed.
TRANSIENT_OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT}
MAX_REREADS = 3  # how often results that could not be written are tried again


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
        code,
        settings.output.locale,
        detail=outcome.detail or "",
        timeout=settings.ocr.timeout_s,
        free_mb=outcome.gpu_info_after.get("free_mb", "?"),
        min_free_mb=settings.gpu.min_free_mb,
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
        kind = (
            "symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "folder"
            if stat.S_ISDIR(st.st_mode)
            else ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device")
        )
        return Outcome(job=job, ok=False, code="not_regular_file", detail=f"{kind}, not followed")
    limit = settings.ocr.max_file_mb * 1024 * 1024
    if st.st_size > limit:
        detail = f"{st.st_size / 1024 / 1024:.1f} MB, more than ocr.max_file_mb ({settings.ocr.max_file_mb:g})"
        return Outcome(job=job, ok=False, code="too_large", detail=detail)
    return None


def status_path(settings: Settings) -> Path:
    """Where the daemon keeps its status file: its work area, one per inbox (the lock makes sure)."""
    return settings.processing_dir / "status.json"


class Service:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.notifier = notifier or Notifier(unset_environment=True)  # children must not inherit it
        self.spool = Spool(settings)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.intake = Intake(settings.paths.inbox, settings.watch, wake=self._wake)
        self.tracker = StabilityTracker(settings.watch.settle_s)
        self.workers = self._make_workers(settings)
        self.retiring: list[Worker] = []  # busy workers to replace once their file is done (reload)
        self.ready: collections.deque[tuple[Path, tuple[int, int, int]]] = collections.deque()
        self.queued: set[Path] = set()  # paths in `ready`, so repeated events never queue twice
        self.jobs: collections.deque[Job] = collections.deque()  # claimed, waiting for a worker
        self.deferred: list[tuple[float, Job]] = []  # (retry at, job): waiting for GPU memory
        self.blocked: list[tuple[Path, tuple[int, int, int]]] = []  # same name still in progress
        self.signals: collections.deque[int] = collections.deque()
        self.counts = {"ok": 0, "failed": 0}
        self.last_error: dict[str, Any] | None = None
        self.last_gpu: dict[str, Any] = {"available": False}
        self.unpublished: list[Outcome] = []  # finished, but the outputs could not be written yet
        self.unpublished_since: float | None = None
        self.next_output_retry = 0.0
        self.stopping_since: float | None = None
        self.is_ready = False
        self.started_at = outputs.now_iso()
        self.next_rescan = 0.0
        self.next_watchdog = 0.0
        self._status_line = ""
        self._status_written = 0.0

    @staticmethod
    def _make_workers(settings: Settings) -> list[Worker]:
        devices = settings.ocr.devices or (None,)
        return [Worker(ocr=settings.ocr, gpu=settings.gpu, device=d, on_event=logs.event) for d in devices]

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
        self.spool.lock()
        self.spool.prepare()
        self.jobs.extend(self.spool.recover())
        if self.jobs:
            log.info("Recovered %d file(s) claimed before a crash", len(self.jobs))
        self.intake.start()
        log.info(
            "Watching %s (%s); results to %s", self.settings.paths.inbox, self.intake.mode, self.settings.paths.outbox
        )
        try:
            for worker in self.workers:
                worker.spawn()
            self._loop()
        except EngineLoadError:
            # No engine: put back what was claimed but not started, so files wait in the inbox.
            for job in [*self.jobs, *(job for _, job in self.deferred)]:
                self.spool.unclaim(job)
            raise
        finally:
            self.intake.stop()
            for worker in self.workers + self.retiring:
                worker.stop()
            self._write_status(state="stopped")
        log.info("Stopped: %d ok, %d failed", self.counts["ok"], self.counts["failed"])
        return 0

    def _loop(self) -> None:
        while not self._finished():
            self._handle_signals()
            self._intake()
            self._dispatch()
            self._wait()
            finished: list[Outcome] = []
            for worker in self.workers + self.retiring:
                finished += self._settle(worker.pump() + worker.tick())
            # Hand out the next files before publishing these: the children OCR while the
            # parent fsyncs, instead of waiting for it.
            self._dispatch()
            for outcome in finished:
                self._finish(outcome)
            self._replace_retired()
            self._systemd()

    def _finished(self) -> bool:
        if self.stopping_since is None:
            return False
        busy = [w for w in self.workers + self.retiring if w.state == "busy"]
        if busy and time.monotonic() - self.stopping_since < STOP_GRACE_S:
            return False
        for worker in busy:  # grace is over: the page goes back to the inbox, never to failed
            job = worker.job
            worker.kill(f"stopping after the {STOP_GRACE_S:g} s grace")
            if job is not None:
                self.jobs.appendleft(job)
        for job in [*self.jobs, *(job for _, job in self.deferred)]:
            back = self.spool.unclaim(job)
            log.info("Returned %s to the inbox as %s", job.rel, back.name)
        return True

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT) and self.stopping_since is None:
                self.notifier.stopping()
                logs.event(
                    "stopping",
                    f"{signal.Signals(signum).name}: finishing the page in progress "
                    f"(at most {STOP_GRACE_S:g} s), then stopping",
                )
                self.stopping_since = time.monotonic()
                self.intake.stop()
            elif signum == signal.SIGHUP and self.stopping_since is None:
                self._reload()

    def _intake(self) -> None:
        if self.stopping_since is not None:
            return
        now = time.monotonic()
        if now >= self.next_rescan:
            self.intake.request_scan()  # done by drain(), a time slice per tick
            self.next_rescan = now + self.settings.watch.rescan_interval_s
        # Each step is bounded per tick (intake.TICK_BUDGET_S), so no pile of folders or files
        # can hold the loop past the systemd watchdog; the rest waits for the next tick.
        for path in self.intake.drain():
            if path not in self.queued:
                self.tracker.track(path)
        for path, signature in self.tracker.ready(budget_s=intake.TICK_BUDGET_S):
            self.ready.append((path, signature))
            self.queued.add(path)

    def _dispatch(self) -> None:
        self._retry_outputs()
        if self.stopping_since is not None or self.unpublished:
            return
        for worker in self.workers:
            while worker.ready:
                job = self._next_job()
                if job is None:
                    break
                try:
                    early = precheck(job, self.settings)
                except FileNotFoundError:
                    log.warning("%s vanished from the work area before OCR", job.rel)
                    continue
                if early is not None:
                    self._finish(early)
                    continue
                logs.event(
                    "claimed", f"{job.rel}: OCR started (child {worker.pid})", source=job.rel, child_pid=worker.pid
                )
                if not worker.assign(job):
                    self.jobs.appendleft(job)
        if not self.jobs and not self.ready:
            for worker in self.workers:
                worker.drained()

    def _next_job(self) -> Job | None:
        if self.jobs:
            return self.jobs.popleft()
        now = time.monotonic()
        for i, (retry_at, waiting) in enumerate(self.deferred):
            if retry_at <= now:
                del self.deferred[i]
                return waiting
        while self.ready:
            path, signature = self.ready.popleft()
            self.queued.discard(path)
            if intake.signature_of(path) != signature:
                self.tracker.track(path)  # changed (or vanished) since it was judged ready
                continue
            try:
                job = self.spool.claim(path)
            except OSError as exc:  # e.g. a sticky-bit inbox and another user's file: EPERM
                self.intake.complaints.problem(
                    "claiming", str(path.parent), f"Cannot claim {path}: {exc.strerror or exc}; left in the inbox"
                )
                continue
            if job is None:
                if os.path.lexists(path):
                    self.blocked.append((path, signature))
                continue
            return job
        return None

    def _wait(self) -> None:
        now = time.monotonic()
        times = [
            self.next_rescan,
            *(w.next_wakeup() for w in self.workers + self.retiring),
            self.tracker.next_due(),
            min((t for t, _ in self.deferred), default=None),
            self.next_output_retry if self.unpublished else None,
        ]
        if self.stopping_since is not None:
            times.append(self.stopping_since + STOP_GRACE_S)
        if self.notifier.watchdog_interval_s:
            times.append(self.next_watchdog)
        due = min(t for t in times if t is not None)
        busy = any(w.state == "busy" for w in self.workers)
        timeout = max(0.0, min(due - now, 1.0 if busy else 5.0))  # busy: keep STATUS elapsed current
        if self.signals:
            timeout = 0.0
        sources: list[Any] = [self._wake_r] + [w for w in self.workers + self.retiring if w.conn_in is not None]
        readable = wait(sources, timeout)
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # -- outcomes ----------------------------------------------------------------------------

    def _settle(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Requeue retries and deferrals at once; return the outcomes that need publishing."""
        finished = []
        for outcome in outcomes:
            if outcome.gpu_info_after.get("available"):
                self.last_gpu = outcome.gpu_info_after
            if outcome.retry:
                self.jobs.appendleft(outcome.job)
            elif outcome.deferred:
                self._defer(outcome)
            else:
                finished.append(outcome)
        return finished

    def _defer(self, outcome: Outcome) -> None:
        """Too little GPU memory: the file stays claimed and queued; others may go first."""
        job, now = outcome.job, time.monotonic()
        free = outcome.gpu_info_after.get("free_mb")
        if job.deferred_since is None:
            job.deferred_since = now
            logs.event(
                "deferred",
                f"{job.rel}: waiting for GPU memory ({free} MB free, "
                f"{outcome.gpu_info_after.get('usage_percent')}% used; need {self.settings.gpu.min_free_mb} MB "
                f"and at most {self.settings.gpu.max_usage_percent:g}%)",
                level=logging.WARNING,
                source=job.rel,
                gpu_free_mb=free,
            )
        if now - job.deferred_since >= self.settings.gpu.wait_for_memory_s:
            waited = now - job.deferred_since
            self._finish(
                dataclasses.replace(
                    outcome,
                    deferred=False,
                    code="vram_insufficient",
                    detail=f"{free} MB free after waiting {waited:.0f} s",
                )
            )
            return
        backoff = min(MAX_DEFER_BACKOFF_S, 2.0**job.deferrals * 0.5)
        job.deferrals += 1
        self.deferred.append((now + backoff, job))

    def _finish(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.ok and self._changed_since_claim(job):
            return
        document, text = document_for(outcome, settings=self.settings, received_at=job.received_at)
        try:
            document = self.spool.finish(job, document, text)
        except OSError as exc:
            if exc.errno in TRANSIENT_OUTPUT_ERRORS:
                self._output_failed(outcome, exc)
            else:  # e.g. a name the outbox's filesystem refuses (EINVAL on CIFS): holding cannot help
                log.error(
                    "Cannot publish the result of %s (%s); it stays in %s and is tried again at the next start",
                    outputs.display_name(job.rel)["source"],
                    exc,
                    job.path,
                )
            return
        if self.unpublished_since is not None and not self.unpublished:
            log.warning("Results can be written again; resuming")
            self.unpublished_since = None
        if outcome.ok:
            self.counts["ok"] += 1
            logs.event(
                "done",
                f"{job.rel}: {len(outcome.pages)} page(s) in {outcome.processing_time:.2f} s → "
                f"{document.get('image_path') or 'deleted'}",
                source=job.rel,
                processing_time=outcome.processing_time,
                pages=len(outcome.pages),
            )
        else:
            self.counts["failed"] += 1
            self.last_error = {
                "source": document["source"],
                "error_code": outcome.code,
                "detail": outcome.detail,
                "at": document["finished_at"],
            }
            logs.event(
                "failed",
                f"{job.rel}: {outcome.code}: {outcome.detail}",
                level=logging.ERROR,
                source=job.rel,
                error_code=outcome.code,
                processing_time=outcome.processing_time,
                gpu_free_mb=outcome.gpu_info_after.get("free_mb"),
            )
        if self.blocked:  # a file waiting for this name may go now
            self.ready.extendleft(reversed(self.blocked))
            self.queued.update(p for p, _ in self.blocked)
            self.blocked.clear()

    def _changed_since_claim(self, job: Job) -> bool:
        """A writer on another host (SMB/NFS) may still hold the file and write on after the claim:
        the bytes OCR'd were not the final ones. OCR it again, up to MAX_REREADS times."""
        now = intake.signature_of(job.path)
        if job.signature is None or now is None or now == job.signature or job.rereads >= MAX_REREADS:
            return False
        job.rereads += 1
        job.signature = now
        job.attempts -= 1  # not the child's fault
        log.warning("%s changed while it was being OCR'd; reading it again", job.rel)
        self.jobs.appendleft(job)
        return True

    def _output_failed(self, outcome: Outcome, exc: OSError) -> None:
        """The outbox/failed/archive cannot be written (disk full, read-only, permissions).

        The file stays claimed with its outcome kept; claiming stops until writing works again,
        so nothing new is taken on while results cannot be delivered. Said once, not per retry.
        """
        now = time.monotonic()
        if self.unpublished_since is None:
            self.unpublished_since = now
            log.error(
                "Cannot write results (%s: %s); %s stays in the work area, no new files are taken "
                "until this is fixed; retrying every %g s",
                exc.strerror or exc,
                exc.filename or "",
                outcome.job.rel,
                OUTPUT_RETRY_S,
            )
        self.unpublished.append(outcome)
        self.next_output_retry = now + OUTPUT_RETRY_S

    def _retry_outputs(self) -> None:
        if not self.unpublished or time.monotonic() < self.next_output_retry:
            return
        waiting, self.unpublished = self.unpublished, []
        for outcome in waiting:
            self._finish(outcome)

    # -- configuration reload (SIGHUP) -------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the config file; restart children only if engine or GPU settings changed.

        A bad new config is logged and the running one kept: a typo must not stop a service.
        """
        self.notifier.reloading()
        old = self.settings
        try:
            new = settings_mod.load(old.source)
            new.require_paths()
        except ConfigError as exc:
            log.error("Reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready()
            return
        if (new.ocr.engine, new.ocr.python) != (old.ocr.engine, old.ocr.python):
            problem = probe_engine(new.ocr)
            if problem is not None:
                log.error("Reload failed, keeping the running configuration: %s", problem)
                self.notifier.ready()
                return
        if new.paths != old.paths:
            log.warning("paths.* changed: that takes a restart; keeping the current folders until then")
            new = dataclasses.replace(new, paths=old.paths)
        self.settings = new
        self.spool.settings = new
        logging.getLogger("watcherd").setLevel(new.logging.level.upper())
        if new.watch != old.watch:
            # Files still settling are found again at once by the rescan below and judged by the
            # new rules; files already ready or claimed stay queued.
            self.tracker = StabilityTracker(new.watch.settle_s)
            self.intake.stop()
            self.intake = Intake(new.paths.inbox, new.watch, wake=self._wake)  # type: ignore[arg-type]
            self.intake.start()
            self.next_rescan = 0.0  # pick up what the old patterns left out
        if new.ocr != old.ocr or new.gpu != old.gpu:
            log.info("Engine settings changed: replacing the OCR child(ren)")
            for worker in self.workers:
                if worker.state == "busy":
                    self.retiring.append(worker)  # finishes its file first
                else:
                    worker.stop()
            self.workers = self._make_workers(new)
            for worker in self.workers:
                worker.spawn()
            self.is_ready = False  # READY=1 again once the new children have loaded
        else:
            self.notifier.ready()
        log.info("Configuration reloaded from %s", new.source)

    def _replace_retired(self) -> None:
        for worker in list(self.retiring):
            if worker.state != "busy":
                worker.stop()
                self.retiring.remove(worker)

    # -- systemd and the status file -------------------------------------------------------

    def _systemd(self) -> None:
        now = time.monotonic()
        if not self.is_ready and self.stopping_since is None and all(w.state in ("idle", "busy") for w in self.workers):
            self.is_ready = True
            self.notifier.ready(self._summary())
            engines = ", ".join(sorted({w.engine_name or "?" for w in self.workers}))
            logs.event(
                "ready",
                f"watcherd ready: {len(self.workers)} OCR child(ren) with {engines}; "
                f"watching {self.settings.paths.inbox}",
            )
        if self.notifier.watchdog_interval_s and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval_s
        line = self._summary()
        if line != self._status_line:
            self._status_line = line
            self.notifier.status(line)
        if now - self._status_written >= 1.0:
            self._write_status()
            self._status_written = now

    def _summary(self) -> str:
        """One line for `systemctl status`: what it is doing, counts, queue, engine."""
        busy = [w for w in self.workers if w.state == "busy" and w.job is not None]
        if self.stopping_since is not None:
            state = "stopping"
        elif busy:
            now = time.monotonic()
            state = "; ".join(
                f"working on {outputs.display_name(w.job.rel)['source']} "  # type: ignore[union-attr]
                f"(page {w.current_page or 1}/{w.page_count or '?'}, {now - w.started_at:.0f} s)"
                for w in busy
            )
        elif not self.is_ready:
            state = "loading model"
        else:
            state = "idle"
        queue = len(self.ready) + len(self.jobs) + len(self.deferred)
        engine = self.settings.ocr.engine
        where = "cpu" if self.settings.ocr.devices is None else "gpu " + ",".join(map(str, self.settings.ocr.devices))
        parts = [
            state,
            f"{self.counts['ok']:,} ok",
            f"{self.counts['failed']:,} failed",
            f"queue {queue}",
            f"{engine} on {where}",
        ]
        if self.deferred:
            parts.insert(4, f"{len(self.deferred)} waiting for GPU memory")
        return " · ".join(parts)

    def _write_status(self, state: str | None = None) -> None:
        """The file `watcherd status` reads; replaced atomically, not fsync'ed (it is not data)."""
        now = time.monotonic()
        status = {
            "pid": os.getpid(),
            "state": state
            or (
                "stopping"
                if self.stopping_since is not None
                else "working"
                if any(w.state == "busy" for w in self.workers)
                else "idle"
                if self.is_ready
                else "starting"
            ),
            "summary": self._summary(),
            "started_at": self.started_at,
            "updated_at": outputs.now_iso(),
            "inbox": str(self.settings.paths.inbox),
            "watch_mode": self.intake.mode,
            "watch_reason": self.intake.reason,
            "engine": self.settings.ocr.engine,
            "counts": self.counts,
            "queue": {
                "ready": len(self.ready),
                "claimed": len(self.jobs),
                "waiting_for_memory": len(self.deferred),
                "settling": len(self.tracker),
            },
            "in_flight": [
                {
                    "source": outputs.display_name(w.job.rel)["source"],
                    "child_pid": w.pid,
                    "page": w.current_page,
                    "pages": w.page_count,
                    "elapsed_s": round(now - w.started_at, 1),
                }
                for w in self.workers + self.retiring
                if w.state == "busy" and w.job is not None
            ],
            "children": [
                {"pid": w.pid, "device": w.device, "state": w.state, "files_done": w.files_done} for w in self.workers
            ],
            "last_error": self.last_error,
            "gpu": self.last_gpu,
            "version": __version__,
        }
        path = status_path(self.settings)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(status, ensure_ascii=False, indent=2))
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:  # the status must never take the daemon down
            log.debug("Cannot write %s: %s", path, exc)
