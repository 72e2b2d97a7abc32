"""The daemon's main loop: intake → claim → slot → publish, in one thread.

Callbacks (watchdog, signals) only enqueue and wake the loop through a pipe; the loop sleeps in
one `wait()` on that pipe and every child's protocol pipe until a message, an event, or the next
deadline (a settle period ending, a page timeout, a deferred file's retry, a rescan, the systemd
watchdog) is due. Nothing in the loop waits on OCR, so the watchdog ping is never late because a
model is slow: a missed ping means the daemon itself is stuck.

The loop's parts, each in its own module: `Arrivals` (inbox to work area), `Dispatcher` (which
files go to which free slot), the `Pool` of slots (`watcherd.work.slot.Slot`), `Settler` (what
happens to each outcome), `Reloader` (SIGHUP) and `Status` (systemd, the status file, metrics).
Every deadline is on one clock, injectable (`clock=`), so the stop grace and the queue's timing
can be tested without waiting them out.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait
from typing import Any

from watcherd.core import logs
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import Settings
from watcherd.daemon.arrivals import Arrivals
from watcherd.daemon.dispatch import Dispatcher
from watcherd.daemon.pool import Pool, busy
from watcherd.daemon.reload import Reloader
from watcherd.daemon.sdnotify import Notifier
from watcherd.daemon.settle import Settler
from watcherd.daemon.status import Status
from watcherd.daemon.tally import Tally
from watcherd.handoff.relay import Handoff
from watcherd.ocr.supervisor import EngineLoadError, State
from watcherd.ops.metrics import Metrics
from watcherd.ops.retention import Retention
from watcherd.outputs.publisher import Publisher
from watcherd.work.backlog import Backlog
from watcherd.work.dedupe import Dedupe
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")

STOP_GRACE_S = 30.0  # SIGTERM: how long the page in progress may take to finish
EXIT_WAIT_S = 5.0  # at exit: how long each slot may take to be gone before what is left is killed
IDLE_WAIT_S = 5.0  # the longest the loop sleeps with nothing due
BUSY_WAIT_S = 1.0  # ... and while a file is in a child: the status line's elapsed seconds stay current


class Service:
    def __init__(
        self, settings: Settings, *, notifier: Notifier | None = None, clock: Callable[[], float] = time.monotonic
    ):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier(unset_environment=True)  # children must not inherit it
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.handoff = Handoff(settings, wake=self._wake, clock=clock)  # hooks and webhook
        self.spool = Spool(settings, on_published=self.handoff.published)
        self.metrics = Metrics(settings.metrics, source=settings.source)
        self.retention = Retention(settings)
        self.backlog = Backlog(clock=clock)
        self.publisher = Publisher(self.spool, wake=self._wake, clock=clock)
        self.dedupe = Dedupe(settings, self.spool, wake=self._wake) if settings.dedupe.mode == "skip" else None
        self.arrivals = Arrivals(
            settings.paths.inbox, settings.watch, backlog=self.backlog, spool=self.spool, wake=self._wake, clock=clock
        )
        self.pool = Pool(settings, wake=self._wake, on_event=self.metrics.counting(logs.event), clock=clock)
        self.dispatcher = Dispatcher(
            settings, backlog=self.backlog, spool=self.spool, arrivals=self.arrivals, dedupe=self.dedupe
        )
        self.tally = Tally(self.metrics)
        self.settler = Settler(
            settings,
            backlog=self.backlog,
            spool=self.spool,
            publisher=self.publisher,
            dedupe=self.dedupe,
            tally=self.tally,
            clock=clock,
        )
        self.status = Status(
            settings,
            notifier=self.notifier,
            pool=self.pool,
            arrivals=self.arrivals,
            backlog=self.backlog,
            publisher=self.publisher,
            handoff=self.handoff,
            metrics=self.metrics,
            settler=self.settler,
            clock=clock,
        )
        self.reloader = Reloader(
            settings,
            readers=[self, self.spool, self.dispatcher, self.settler, self.status],
            notifier=self.notifier,
            pool=self.pool,
            arrivals=self.arrivals,
            retention=self.retention,
            status=self.status,
            wake=self._wake,
        )
        self.signals: collections.deque[int] = collections.deque()
        self.stopping_since: float | None = None

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
        if recovered:
            log.info("Recovered %d file(s) claimed before a crash", len(recovered))
        self.arrivals.start()
        self.retention.start()
        log.info(
            "Watching %s (%s); results to %s",
            self.settings.paths.inbox,
            self.arrivals.intake.mode,
            self.settings.paths.outbox,
        )
        try:
            self.pool.spawn()
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
            self.arrivals.stop()
            self.retention.stop()
            self.reloader.cancel()
            self.pool.stop(wait_s=EXIT_WAIT_S)
            self.status.write(stopping=self.stopping_since is not None, state="stopped")
            self.metrics.stop()
        log.info("Stopped: %d ok, %d failed", self.tally.counts["ok"], self.tally.counts["failed"])
        return 0

    def _loop(self) -> None:
        while not self._may_stop():
            self._handle_signals()
            if self.stopping_since is None:
                self.arrivals.tick()
            self._dispatch()
            self._wait()
            finished: list[Outcome] = []
            for slot in self.pool.all():
                finished += self.settler.settle(slot.pump() + slot.tick(), device=slot.device)
            # Hand out the next files before publishing these: the children OCR while the
            # parent fsyncs, instead of waiting for it.
            self._dispatch()
            self._finish(finished)
            for outcome, document in self.publisher.results():
                self.settler.published(outcome, document)
            self.handoff.tick()
            self.pool.reap_retired()
            if not self.publisher.copying:  # the publisher thread uses the work area's descriptors
                self.spool.area.check()
            self.status.tick(stopping=self.stopping_since is not None)
        self._shut_down()

    def _dispatch(self) -> None:
        """Publications held (the outbox full) that are due again first; then, unless stopping or
        holding, files for the free slots."""
        self._finish(self.publisher.due())
        if self.stopping_since is not None or self.publisher.holding:
            return
        self._finish(self.dispatcher.dispatch(self.pool.active))

    def _finish(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.settler.finish(outcome)

    def _may_stop(self) -> bool:
        """After SIGTERM: once no copy is under way (it must end whole) and no child is busy, or
        the page in progress has had its grace."""
        if self.stopping_since is None or self.publisher.copying:
            return False
        return not busy(self.pool.all()) or self.clock() - self.stopping_since >= STOP_GRACE_S

    def _shut_down(self) -> None:
        """Files go back to the inbox, never to failed: a page cut short by the grace too."""
        for slot in self.pool.all():
            jobs = [f.job for f in slot.flights]
            if slot.state == State.BUSY:
                slot.kill(f"stopping after the {STOP_GRACE_S:g} s grace")
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
        if self.stopping_since is None:
            self.reloader.probed()
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT) and self.stopping_since is None:
                self.notifier.stopping()
                logs.event(
                    "stopping",
                    f"{signal.Signals(signum).name}: finishing the page in progress "
                    f"(at most {STOP_GRACE_S:g} s), then stopping",
                )
                self.stopping_since = self.clock()
                self.arrivals.stop()
            elif signum == signal.SIGHUP and self.stopping_since is None:
                self.reloader.reload()

    def _wait(self) -> None:
        now = self.clock()
        slots = self.pool.all()
        times = [
            self.arrivals.next_wakeup(),
            *(s.next_wakeup() for s in slots),
            self.backlog.next_retry_at(),
            self.publisher.next_retry_at(),
            self.handoff.next_wakeup(),
            self.status.next_wakeup(),
        ]
        if self.stopping_since is not None:
            times.append(self.stopping_since + STOP_GRACE_S)
        due = min(t for t in times if t is not None)
        longest = BUSY_WAIT_S if busy(self.pool.active) else IDLE_WAIT_S
        timeout = 0.0 if self.signals else max(0.0, min(due - now, longest))
        sources: list[Any] = [self._wake_r, *(s.conn_in for s in slots if s.conn_in is not None)]
        if self._wake_r in wait(sources, timeout):
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
