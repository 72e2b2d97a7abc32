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
import logging
import os
import signal
import time
from datetime import datetime
from multiprocessing.connection import wait
from typing import Any

from watcherd import __version__
from watcherd.core import config_file, logs, naming
from watcherd.core.records import Job, Outcome, signature_of
from watcherd.core.settings import ConfigError, Settings
from watcherd.daemon.sdnotify import Notifier
from watcherd.handoff.relay import Handoff
from watcherd.intake.readiness import TICK_BUDGET_S, StabilityTracker
from watcherd.intake.watch import Intake
from watcherd.ocr import workers as workers_mod
from watcherd.ocr.supervisor import EngineLoadError, EngineProbe, State, Worker
from watcherd.ops import report
from watcherd.ops.metrics import Metrics, Snapshot
from watcherd.ops.retention import Retention
from watcherd.outputs import documents
from watcherd.outputs.publisher import Publisher
from watcherd.work import spool as spool_mod
from watcherd.work.backlog import Backlog
from watcherd.work.dedupe import Dedupe
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")

STOP_GRACE_S = 30.0  # SIGTERM: how long the page in progress may take to finish
SUMMARY_FILES = 4  # files in flight named on the systemctl status line
MAX_DEFER_BACKOFF_S = 30.0
MAX_CLAIM_TRIES = 1000  # ready files looked at per claim: a pile that vanished costs a tick each
MAX_REREADS = 3  # how often results that could not be written are tried again


class Service:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.notifier = notifier or Notifier(unset_environment=True)  # children must not inherit it
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.handoff = Handoff(settings, wake=self._wake)  # hooks and webhook
        self.spool = Spool(settings, on_published=self.handoff.published)
        self.intake = Intake(settings.paths.inbox, settings.watch, wake=self._wake)
        self.tracker = StabilityTracker(settings.watch.settle_s, root=settings.paths.inbox)
        self.metrics = Metrics(settings.metrics, source=settings.source)
        self.retention = Retention(settings)
        self.gpu_by_device: dict[str, dict[str, Any]] = {}  # the last GPU figures each child reported
        self.workers = self._make_workers(settings)
        self.retiring: list[Worker] = []  # replaced workers (reload): busy ones finish their file, all are reaped
        self.probe: tuple[EngineProbe, Settings] | None = None  # a reload waiting for its new engine to import
        self.backlog = Backlog()
        self.signals: collections.deque[int] = collections.deque()
        self.counts = {"ok": 0, "failed": 0, "duplicate": 0}
        self.pages = {"ocr": 0, "pdf_text": 0}  # pages OCR'd, and those whose own text layer was taken
        self.last_error: dict[str, Any] | None = None
        self.last_gpu: dict[str, Any] = {"available": False}
        self.engine_unavailable: dict[str, str] | None = None  # since, detail: its server is down or busy
        self.publisher = Publisher(self.spool, wake=self._wake)
        self.dedupe = Dedupe(settings, self.spool, wake=self._wake) if settings.dedupe.mode == "skip" else None
        self.stopping_since: float | None = None
        self.is_ready = False
        self.started_at = naming.now_iso()
        self.next_rescan = 0.0
        self.next_watchdog = 0.0
        self._status_line = ""
        self.started: int | None = None
        self._status_written = 0.0

    def _make_workers(self, settings: Settings) -> list[Worker]:
        if settings.cluster.role == "dispatcher":  # remote slots with Worker's interface (docs/cluster.md)
            from watcherd.cluster.dispatcher import make_slots

            return make_slots(settings, wake=self._wake)  # type: ignore[return-value]
        on_event = self.metrics.counting(logs.event)
        if settings.ocr.devices:
            return [
                Worker(ocr=settings.ocr, gpu=settings.gpu, device=d, on_event=on_event) for d in settings.ocr.devices
            ]
        count, threads = workers_mod.plan(settings.ocr.workers)  # CPU: ocr.workers children
        return [Worker(ocr=settings.ocr, gpu=settings.gpu, threads=threads, on_event=on_event) for _ in range(count)]

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
        self.metrics.start()  # a listener that cannot bind stops us here, before anything is claimed
        self.spool.prepare()
        if self.dedupe is not None:
            self.dedupe.open()
        self.handoff.open()  # before recover(): finishing a publication enqueues its hook and delivery
        recovered = self.spool.recover()
        self.backlog.add_claimed(recovered)
        self.started = report.proc_start_time(os.getpid())
        if recovered:
            log.info("Recovered %d file(s) claimed before a crash", len(recovered))
        self.intake.start()
        self.retention.start()
        log.info(
            "Watching %s (%s); results to %s", self.settings.paths.inbox, self.intake.mode, self.settings.paths.outbox
        )
        try:
            for worker in self.workers:
                worker.spawn()
            self._loop()
        except EngineLoadError:
            # No engine: put back what was claimed but not started, so files wait in the inbox.
            for job in self._waiting_jobs():
                self._unclaim(job)
            raise
        finally:
            self.publisher.shutdown()
            if self.dedupe is not None:
                self.dedupe.shutdown()
            self.handoff.stop()
            self.intake.stop()
            self.retention.stop()
            if self.probe is not None:
                self.probe[0].cancel()
            for worker in self.workers + self.retiring:
                worker.stop(wait_s=5.0)
            self._write_status(state="stopped")
            self.metrics.stop()
        log.info("Stopped: %d ok, %d failed", self.counts["ok"], self.counts["failed"])
        return 0

    def _loop(self) -> None:
        while not self._may_stop():
            self._handle_signals()
            self._intake()
            self._dispatch()
            self._wait()
            finished: list[Outcome] = []
            for worker in self.workers + self.retiring:
                finished += self._settle(worker.pump() + worker.tick(), device=worker.device)
            # Hand out the next files before publishing these: the children OCR while the
            # parent fsyncs, instead of waiting for it.
            self._dispatch()
            for outcome in finished:
                self._finish(outcome)
            for outcome, document in self.publisher.results():
                self._published(outcome, document)
            self.handoff.tick()
            self._replace_retired()
            if not self.publisher.copying:  # the publisher thread uses the work area's descriptors
                self.spool.area.check()
            self._systemd()
        self._shut_down()

    def _may_stop(self) -> bool:
        """After SIGTERM: once no copy is under way (it must end whole) and no child is busy, or
        the page in progress has had its grace."""
        if self.stopping_since is None or self.publisher.copying:
            return False
        busy = any(w.state == State.BUSY for w in self.workers + self.retiring)
        return not busy or time.monotonic() - self.stopping_since >= STOP_GRACE_S

    def _shut_down(self) -> None:
        """Files go back to the inbox, never to failed: a page cut short by the grace too."""
        for worker in self.workers + self.retiring:
            jobs = [f.job for f in worker.flights]
            if worker.state == State.BUSY:
                worker.kill(f"stopping after the {STOP_GRACE_S:g} s grace")
                for job in reversed(jobs):
                    self.backlog.put_back(job)
        for job in self._waiting_jobs():
            self._unclaim(job)

    def _waiting_jobs(self) -> list[Job]:
        held = self.dedupe.waiting_jobs() if self.dedupe is not None else []
        return self.backlog.waiting_jobs() + held

    def _unclaim(self, job: Job) -> None:
        try:
            back = self.spool.unclaim(job)
        except OSError as exc:  # e.g. its inbox folder swapped for a link: it stays claimed for the next start
            log.error("Cannot return %s to the inbox (%s); it stays in the work area", job.rel, exc)
            return
        log.info("Returned %s to the inbox as %s", job.rel, back)

    def _handle_signals(self) -> None:
        self._probed()
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
        # Each step is bounded per tick (TICK_BUDGET_S), so no pile of folders or files
        # can hold the loop past the systemd watchdog; the rest waits for the next tick.
        for path in self.intake.drain():
            if path not in self.backlog:
                self.tracker.track(path)
        for path, signature in self.tracker.ready(budget_s=TICK_BUDGET_S):
            self.backlog.add_ready(path, signature)

    def _dispatch(self) -> None:
        for held in self.publisher.due():
            self._finish(held)
        if self.stopping_since is not None or self.publisher.holding:
            return
        if self.dedupe is not None:
            self.backlog.add_claimed(self.dedupe.released())
        for worker in self.workers:
            while worker.ready or worker.hungry:
                jobs = self._next_jobs(worker.room, alone=worker.ready)
                if not jobs:
                    break
                for job in jobs:
                    logs.event(
                        "claimed", f"{job.rel}: OCR started (child {worker.pid})", source=job.rel, child_pid=worker.pid
                    )
                    job.render = self.spool.render_targets(job)
                if not worker.assign(*jobs):
                    for job in reversed(jobs):
                        self.backlog.put_back(job)
        if self.dedupe is not None:
            self._hash_ahead()
        if self.backlog.empty:
            for worker in self.workers:
                worker.drained()

    def _hash_ahead(self) -> None:
        """dedupe: claim and hash a few ready files while the children work, so none waits for a hash."""
        assert self.dedupe is not None
        while self.dedupe.room():
            job = self._claim_next()
            if job is None:
                return
            st = self.spool.lstat(job)
            if st is None or not self.dedupe.prefetch(job, st):
                self.backlog.add_claimed([job])  # precheck or the child judges it

    def _next_jobs(self, wanted: int, *, alone: bool) -> list[Job]:
        """The files for a child: one, or for an engine that reads pages in batches as many as
        hold `wanted` pages (a one-page scan counts one, a long file part-way through a turn), so
        that a GPU is fed pages of several files at once. A file to be read alone goes alone, to
        an idle child (`alone`). Files that need no OCR (a precheck's error, a duplicate) are
        finished on the way."""
        jobs: list[Job] = []
        pages = 0
        while pages < wanted:
            job = self._next_job()
            if job is None:
                break
            if job.solo and (jobs or not alone):
                self.backlog.put_back(job)
                break
            st = self.spool.lstat(job)
            if st is None:
                log.warning("%s vanished from the work area before OCR", job.rel)
                continue
            early = documents.precheck(job, st, self.settings)
            if early is None and self.dedupe is not None:
                verdict = self.dedupe.screen(job, st)
                if verdict == "held":  # being hashed, or the same bytes are in a child: back via released()
                    continue
                if verdict == "later":  # enough files are being hashed already
                    self.backlog.put_back(job)
                    break
                if isinstance(verdict, Outcome):
                    early = verdict  # a duplicate: published at once, without OCR
            if early is not None:
                self._finish(early)
                continue
            jobs.append(job)
            if job.solo:
                break
            pages += self.settings.ocr.turn_pages if job.next_page else 1
        return jobs

    def _next_job(self) -> Job | None:
        job = self.backlog.next_turn() or self.backlog.next_claimed() or self._claim_next()
        if job is not None:
            if job.next_page == 0:
                self.backlog.another_went()
            return job
        return self.backlog.next_turn(anyway=True)

    def _claim_next(self) -> Job | None:
        for _ in range(MAX_CLAIM_TRIES):  # the rest next time round: vanished files cost a stat each
            ready = self.backlog.next_ready()
            if ready is None:
                return None
            path, signature = ready
            if signature_of(path) != signature:
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
                    self.backlog.block(path, signature)
                continue
            return job
        return None

    def _wait(self) -> None:
        now = time.monotonic()
        times = [
            self.next_rescan,
            *(w.next_wakeup() for w in self.workers + self.retiring),
            self.tracker.next_due(),
            self.backlog.next_retry_at(),
            self.publisher.next_retry_at(),
            self.handoff.next_wakeup(),
        ]
        if self.stopping_since is not None:
            times.append(self.stopping_since + STOP_GRACE_S)
        if self.notifier.watchdog_interval_s:
            times.append(self.next_watchdog)
        due = min(t for t in times if t is not None)
        busy = any(w.state == State.BUSY for w in self.workers)
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

    def _settle(self, outcomes: list[Outcome], device: int | None = None) -> list[Outcome]:
        """Requeue retries and deferrals at once; return the outcomes that need publishing."""
        finished, retries = [], []
        for outcome in outcomes:
            if outcome.gpu_info_after.get("available"):
                self.last_gpu = outcome.gpu_info_after
                self.gpu_by_device["default" if device is None else str(device)] = outcome.gpu_info_after
            if outcome.retry:
                retries.append(outcome.job)
            elif outcome.partial:
                self.backlog.take_turn(outcome.job)
            elif outcome.deferred:
                self._defer(outcome)
            else:
                finished.append(outcome)
        for job in reversed(retries):  # first, in the order they were in the child
            self.backlog.put_back(job)
        return finished

    def _defer(self, outcome: Outcome) -> None:
        """Too little GPU memory (or the engine unavailable: `_wait_for_engine`): the file stays
        claimed and queued; others may go first."""
        job, now = outcome.job, time.monotonic()
        if outcome.defer_reason == "engine_unavailable":
            self._wait_for_engine(outcome, now)
            return
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
        self.backlog.defer(job, backoff)

    def _wait_for_engine(self, outcome: Outcome, now: float) -> None:
        """The engine's server is down or busy: the file waits, however long that takes (nothing
        is wrong with the file); logged once per file, retried with backoff."""
        job = outcome.job
        detail = (outcome.detail or "unavailable")[:500]
        if self.engine_unavailable is None:
            self.engine_unavailable = {"since": naming.now_iso(), "detail": detail}
        if job.deferred_since is None:
            job.deferred_since = now
            logs.event(
                "deferred",
                f"{job.rel}: waiting for the OCR engine, retried with backoff ({detail})",
                level=logging.WARNING,
                source=job.rel,
            )
        backoff = min(MAX_DEFER_BACKOFF_S, 2.0**job.deferrals * 0.5)
        job.deferrals += 1
        self.backlog.defer(job, backoff)

    def _finish(self, outcome: Outcome) -> None:
        job = outcome.job
        if self.engine_unavailable is not None and (outcome.ok or outcome.code == "engine_error"):
            log.info("The OCR engine answers again (unavailable since %s)", self.engine_unavailable["since"])
            self.engine_unavailable = None
        if self._read_something_else(outcome):
            return
        if outcome.ok and self._changed_since_claim(job):
            return
        document, text = documents.document_for(outcome, settings=self.settings, received_at=job.received_at)
        self.publisher.publish(outcome, document, text)

    def _published(self, outcome: Outcome, document: dict[str, Any]) -> None:
        """Count it, say it (journald fields), and let a file waiting for its name go."""
        job = outcome.job
        self.metrics.finished(document)
        if self.dedupe is not None:
            self.dedupe.finished(outcome, document)
        if document["status"] == "duplicate":
            self.counts["duplicate"] += 1
            logs.event(
                "duplicate",
                f"{job.rel}: the same bytes as {document['duplicate_of']}; not OCR'd again → "
                f"{document.get('image_path') or 'deleted'}",
                source=job.rel,
            )
        elif outcome.ok:
            self.counts["ok"] += 1
            for page in outcome.pages:  # pages whose own text layer saved an OCR (ocr.pdf_text: use)
                self.pages["pdf_text" if page.get("source") == "pdf_text" else "ocr"] += 1
            for fmt, why in outcome.render_errors.items():
                log.error("%s: its %s could not be written: %s", job.rel, fmt, why)
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
        self.backlog.unblock()  # a file waiting for this name may go now

    def _read_something_else(self, outcome: Outcome) -> bool:
        """The child opens the claimed file by path; if the work area was swapped between the claim
        and that open (someone who can write the inbox, design §9), it read another file. Its inode
        tells: that outcome is never published for the claimed file, which is read again."""
        job = outcome.job
        opened, job.opened = job.opened, None
        if opened is None or job.identity is None or opened == job.identity:
            return False
        log.error(
            "%s: the child read inode %s, not the file claimed (inode %s): the work area was tampered "
            "with; reading the claimed file again",
            job.rel,
            opened[1],
            job.identity[1],
        )
        job.attempts -= 1  # not the file's fault
        job.start_over()
        if job.rereads >= MAX_REREADS:
            self._finish_tampered(outcome)
            return True
        job.rereads += 1
        self.backlog.put_back(job)
        return True

    def _finish_tampered(self, outcome: Outcome) -> None:
        detail = "the file read was never the one claimed: the work area keeps being tampered with"
        self._finish(dataclasses.replace(outcome, ok=False, code="unreadable", detail=detail, pages=[]))

    def _changed_since_claim(self, job: Job) -> bool:
        """A writer on another host (SMB/NFS) may still hold the file and write on after the claim:
        the bytes OCR'd were not the final ones. OCR it again, up to MAX_REREADS times."""
        now = spool_mod.signature(self.spool.lstat(job))
        if job.signature is None or now is None or now == job.signature or job.rereads >= MAX_REREADS:
            return False
        job.rereads += 1
        job.signature = now
        job.attempts -= 1  # not the child's fault
        job.start_over()
        log.warning("%s changed while it was being OCR'd; reading it again", job.rel)
        self.backlog.put_back(job)
        return True

    # -- configuration reload (SIGHUP) -------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the config file; restart children only if engine or GPU settings changed.

        A bad new config is logged and the running one kept: a typo must not stop a service.
        """
        self.notifier.reloading()
        old = self.settings
        try:
            new = config_file.load(old.source)
            new.require_paths()
        except ConfigError as exc:
            log.error("Reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready()
            return
        if self.probe is not None:  # this reload supersedes one still probing its engine
            self.probe[0].cancel()
            self.probe = None
        if (new.ocr.engine, new.ocr.python) != (old.ocr.engine, old.ocr.python):
            # Importing a model's package can take minutes, longer than the watchdog allows the
            # loop to stand still: probe it beside the loop and switch when it answers (_probed).
            self.probe = (EngineProbe(new.ocr, on_done=self._wake), new)
            return
        self._switch(old, new)

    def _probed(self) -> None:
        """A reload's engine probe has answered: switch to the new configuration, or keep ours."""
        if self.probe is None or not self.probe[0].done or self.stopping_since is not None:
            return
        probe, new = self.probe
        self.probe = None
        if probe.problem is not None:
            log.error("Reload failed, keeping the running configuration: %s", probe.problem)
            self.notifier.ready()
            return
        self._switch(self.settings, new)

    def _switch(self, old: Settings, new: Settings) -> None:
        if new.paths != old.paths:
            log.warning("paths.* changed: that takes a restart; keeping the current folders until then")
            new = dataclasses.replace(new, paths=old.paths)
        if new.dedupe != old.dedupe:
            log.warning("dedupe.* changed: that takes a restart; keeping the current setting until then")
            new = dataclasses.replace(new, dedupe=old.dedupe)
        if (new.hooks, new.webhook) != (old.hooks, old.webhook):
            log.warning("hooks.* or webhook.* changed: that takes a restart; keeping the current ones until then")
            new = dataclasses.replace(new, hooks=old.hooks, webhook=old.webhook)
        self.settings = new
        self.spool.settings = new
        self.retention.update(new)
        if new.metrics != old.metrics:
            log.warning("metrics.* changed: that takes a restart; keeping the current metrics outputs until then")
        logging.getLogger("watcherd").setLevel(new.logging.level.upper())
        if new.watch != old.watch:
            # Files still settling are found again at once by the rescan below and judged by the
            # new rules; files already ready or claimed stay queued.
            self.tracker = StabilityTracker(new.watch.settle_s, root=new.paths.inbox)
            self.intake.stop()
            self.intake = Intake(new.paths.inbox, new.watch, wake=self._wake)  # type: ignore[arg-type]
            self.intake.start()
            self.next_rescan = 0.0  # pick up what the old patterns left out
        if new.ocr != old.ocr or new.gpu != old.gpu:
            log.info("Engine settings changed: replacing the OCR child(ren)")
            self.retiring.extend(self.workers)  # busy ones finish their file first (_replace_retired)
            self.workers = self._make_workers(new)
            for worker in self.workers:
                worker.spawn()
            self.is_ready = False  # READY=1 again once the new children have loaded
        else:
            self.notifier.ready()
        log.info("Configuration reloaded from %s", new.source)

    def _replace_retired(self) -> None:
        for worker in list(self.retiring):
            if worker.state != State.BUSY:
                worker.stop()  # returns at once; the child is reaped by its tick()
            if worker.gone:
                self.retiring.remove(worker)

    # -- systemd and the status file -------------------------------------------------------

    def _systemd(self) -> None:
        now = time.monotonic()
        if (
            not self.is_ready
            and self.stopping_since is None
            and all(w.state in (State.IDLE, State.BUSY) for w in self.workers)
        ):
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
            self.metrics.update(self._snapshot())
            self._write_status()
            self._status_written = now

    def _summary(self) -> str:
        """One line for `systemctl status`: what it is doing, counts, queue, engine."""
        busy = [f for w in self.workers for f in w.flights]
        if self.stopping_since is not None:
            state = "stopping"
        elif busy:
            now = time.monotonic()
            shown = SUMMARY_FILES  # a batch engine's child holds dozens: `watcherd status` lists them all
            state = "; ".join(
                f"working on {naming.display_name(f.job.rel)['source']} "
                f"(page {f.current_page or 1}/{f.page_count or '?'}, {now - f.started_at:.0f} s)"
                for f in busy[:shown]
            ) + (f"; and {len(busy) - shown} more files" if len(busy) > shown else "")
        elif not self.is_ready:
            state = "loading model"
        else:
            state = "idle"
        counts = self.backlog.counts()
        queue = sum(counts.values())
        engine = self.settings.ocr.engine
        where = "cpu" if self.settings.ocr.devices is None else "gpu " + ",".join(map(str, self.settings.ocr.devices))
        parts = [
            state,
            f"{self.counts['ok']:,} ok",
            f"{self.counts['failed']:,} failed",
            *([f"{self.counts['duplicate']:,} duplicate"] if self.dedupe is not None else []),
            f"queue {queue}",
            f"{engine} on {where}",
        ]
        if self.engine_unavailable is not None:
            parts.insert(-1, f"OCR engine unavailable since {self.engine_unavailable['since'][11:19]}, files wait")
        elif counts["waiting_for_memory"]:
            parts.insert(-1, f"{counts['waiting_for_memory']} waiting for GPU memory")
        return " · ".join(parts)

    def _snapshot(self) -> Snapshot:
        """The state the metrics show, taken on the loop thread (about once a second): queue sizes
        and when the oldest file not yet finished arrived (epoch seconds). O(files waiting)."""
        now, mono = time.time(), time.monotonic()
        counts = self.backlog.counts()
        flights = [f for w in self.workers + self.retiring for f in w.flights]
        seen = (self.tracker.oldest_since(), self.backlog.oldest_ready_since())  # monotonic
        arrivals = [now - (mono - t) for t in seen if t is not None]
        for job in [*self.backlog.claimed_jobs(), *(f.job for f in flights), *(o.job for o in self.publisher.held)]:
            try:
                arrivals.append(datetime.fromisoformat(job.received_at).timestamp())
            except ValueError:
                continue
        return Snapshot(
            up=True,
            ready=self.is_ready,
            queue={**counts, "settling": len(self.tracker), "in_flight": len(flights)},
            oldest_since=min(arrivals, default=None),
            gpu=dict(self.gpu_by_device),
            **self._handoff_figures(),
            workers=self._remote_workers(),
        )

    def _remote_workers(self) -> dict[str, dict[str, float]]:
        """A dispatcher's worker hosts, as its replies described them (empty on one host)."""
        hub = getattr(self.workers[0], "hub", None) if self.workers else None
        if hub is None:
            return {}
        return {
            h.host: {"files_done": h.files_done, "busy": 1.0 if h.busy_with else 0.0, "last_heard": h.last_heard}
            for h in hub.hosts.values()
        }

    def _handoff_figures(self) -> dict[str, Any]:
        """Hook runs and webhook deliveries for the metrics: outcomes since start, and backlog."""
        outcomes: dict[str, dict[str, int]] = {}
        backlog: dict[str, int] = {}
        if self.handoff.hooks is not None:
            outcomes["hook"] = dict(self.handoff.hooks.counts)
            backlog["hook"] = self.handoff.hooks.backlog()
        if self.handoff.webhook is not None:
            outcomes["webhook"] = dict(self.handoff.webhook.counts)
            backlog["webhook"] = self.handoff.webhook.backlog()
        return {"handoffs": outcomes, "handoff_backlog": backlog}

    def _write_status(self, state: str | None = None) -> None:
        """The file `watcherd status` reads; replaced atomically, not fsync'ed (it is not data)."""
        now = time.monotonic()
        status = {
            "pid": os.getpid(),
            "pid_started": self.started,  # with pid: tells a stale file from a reused pid
            "state": state
            or (
                "stopping"
                if self.stopping_since is not None
                else "working"
                if any(w.state == State.BUSY for w in self.workers)
                else "idle"
                if self.is_ready
                else "starting"
            ),
            "summary": self._summary(),
            "started_at": self.started_at,
            "updated_at": naming.now_iso(),
            "inbox": str(self.settings.paths.inbox),
            "watch_mode": self.intake.mode,
            "watch_reason": self.intake.reason,
            "engine": self.settings.ocr.engine,
            "counts": self.counts,
            "pages": self.pages,
            "queue": {
                **self.backlog.counts(),
                "settling": len(self.tracker),
            },
            "in_flight": [
                {
                    "source": naming.display_name(f.job.rel)["source"],
                    "child_pid": w.pid,
                    "page": f.current_page,
                    "pages": f.page_count,
                    "elapsed_s": round(now - f.started_at, 1),
                }
                for w in self.workers + self.retiring
                for f in w.flights
            ],
            "children": [
                {"pid": w.pid, "device": w.device, "state": w.state, "files_done": w.files_done} for w in self.workers
            ],
            "last_error": self.last_error,
            "metrics": {
                "oldest_unfinished_age_s": round(self.metrics.snapshot.oldest_age_s(), 1),
                "pages": self.metrics.pages_total,
                "last_success_at": self.metrics.last_success_at,
            },
            "handoff": self.handoff.status(),  # hook and webhook backlog and outcomes
            "engine_unavailable": self.engine_unavailable,
            "gpu": self.last_gpu,
            **({"cluster": self.workers[0].hub.status()} if hasattr(self.workers[0], "hub") else {}),
            "version": __version__,
        }
        report.write_status(self.settings, status)
