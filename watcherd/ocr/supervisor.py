"""The parent's side of the OCR child: feed it, time it, turn its messages into outcomes, respawn it.

The parent owns the clock. The per-page deadline restarts whenever the child reports a new page;
past it the parent first asks the child for its Python stacks (`process.Child.ask_for_stacks`)
so that the operator learns where the model hung, then the child's whole process group gets
SIGKILL — the one signal native code cannot ignore, which is why the SIGALRM timeout of the
service watcherd replaces never fired inside `model.infer()`. A child that blocks signals gives
no stack and dies on time all the same. A killed child is never reused: a late reply can
therefore never be taken for the next file's answer, and replies are matched by request id as well.

A `Worker` is driven from one loop: `fileno()` for waiting, `pump()` when readable, `tick()` for
deadlines, reaping and respawns. Both return finished `Outcome`s. Nothing here waits on a child:
a child asked to exit, or killed, goes to the `process.Reaper`, which reaps it from `tick()`.
Only `stop(wait_s=...)`, at exit, waits a bounded time.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from watcherd.core.backoff import backoff_s
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import GpuSettings, OcrSettings
from watcherd.ocr import protocol
from watcherd.ocr.flight import Engine, InFlight, Lost, Request, TimedOut
from watcherd.ocr.framing import Reader
from watcherd.ocr.launch import CHILD_PATH_SETUP, PACKAGE_ROOT, EngineLoadError, EngineProbe, killpg, probe_engine
from watcherd.ocr.process import POLL_DYING_S, Child, Exit, ExitReason, Reaper, describe_exit, summarise_stack

__all__ = [  # what other modules import from here
    "CHILD_PATH_SETUP",
    "PACKAGE_ROOT",
    "EngineLoadError",
    "EngineProbe",
    "InFlight",
    "State",
    "Worker",
    "describe_exit",
    "probe_engine",
    "summarise_stack",
]

log = logging.getLogger("watcherd")

LOAD_RETRIES = 5  # consecutive load failures before the daemon gives up (after backoffs of 1, 2, 4, 8 s)
MAX_BACKOFF_S = 30.0
MAX_UNAVAILABLE_PAUSE_S = 30.0  # the engine's server is down: the longest pause before the next try


class State(enum.StrEnum):
    """A worker's child: none (STOPPED), loading its engine, IDLE, BUSY with a file, or EXITING
    (its pipe closed: waiting for its exit status)."""

    STOPPED = "stopped"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    EXITING = "exiting"


@dataclass
class _Backoff:
    """Failures in a row, and how long each makes the next try wait."""

    load_failures: int = 0  # of the engine to load: LOAD_RETRIES of them and the daemon gives up
    crashes: int = 0  # of the child: the first respawn is at once, the next after 0.5, 1.5, 3.5 s, ...
    unavailable: int = 0  # of the engine's server: no file is handed over for a while

    def load_failed(self) -> float:
        self.load_failures += 1
        return backoff_s(self.load_failures, first_s=1.0, most_s=MAX_BACKOFF_S)

    def crashed(self) -> float:
        self.crashes += 1
        return backoff_s(self.crashes, first_s=0.5, most_s=MAX_BACKOFF_S + 0.5) - 0.5  # the first at once

    def server_unavailable(self) -> float:
        self.unavailable += 1
        return backoff_s(self.unavailable, first_s=0.5, most_s=MAX_UNAVAILABLE_PAUSE_S)


class Worker:
    """One supervised child on one device (None: the default device)."""

    def __init__(
        self,
        *,
        ocr: OcrSettings,
        gpu: GpuSettings,
        device: int | None = None,
        threads: int | None = None,
        on_event: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ocr = ocr
        self.gpu = gpu
        self.device = device
        self.threads = threads  # intra-op threads for the child (ocr.workers); None: the libraries' default
        self.on_event = on_event or (lambda *a, **k: None)
        self.clock = clock
        self.child: Child | None = None
        self.reaper = Reaper(self.on_event, clock)
        self.state = State.STOPPED
        self.retired = False  # stop() was called: never respawn
        self.deadline: float | None = None
        self.next_spawn_at: float = 0.0
        self.backoff = _Backoff()
        # The engine said its server is unavailable: no file is handed over before this time, so a
        # down server costs one request per pause, not one per queued file.
        self.paused_until = 0.0
        self.files_done = 0
        self.dirty = False  # files done since the cache was last cleared for an empty queue
        self.engine = Engine()  # what the child loaded
        self.request = Request()  # the files the child is working on
        self._timed_out: TimedOut | None = None  # a page is over time: the child's stacks are awaited
        self._lost: Lost | None = None  # its pipe closed: its exit status is awaited

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def engine_name(self) -> str | None:
        return self.engine.name

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def conn_in(self) -> Reader | None:
        """What to wait on for the child's messages; None when there is nothing to read."""
        return self.child.reader if self.child else None

    @property
    def flights(self) -> list[InFlight]:
        return self.request.flights

    @property
    def flight(self) -> InFlight | None:
        """The first file in the child (the only one, unless pages are read in batches)."""
        return self.flights[0] if self.flights else None

    @property
    def ready(self) -> bool:
        return self.state == State.IDLE and self.clock() >= self.paused_until

    @property
    def hungry(self) -> bool:
        """A busy child of a batch engine with room for another batch's worth of files takes them
        now: they join the request in progress, and arrive before the child picks the batch it
        decodes ahead, so the engine never waits between requests. Not while a file is read
        alone, a timeout is being handled, or a recycle is due."""
        if self.state != State.BUSY or self._timed_out is not None or not self.request.joinable:
            return False
        recycle = self.ocr.recycle_after_files
        return not (recycle and self.files_done + len(self.flights) >= recycle)

    @property
    def room(self) -> int:
        return self.request.room

    @property
    def gone(self) -> bool:
        """No child of ours is left, not even one on its way out."""
        return self.child is None and not self.reaper.dying

    def spawn(self) -> None:
        """Start a fresh interpreter for the child; it reports `ready` once its model is loaded."""
        self.child = Child.start(self.ocr, self.gpu, device=self.device, threads=self.threads)
        self.state = State.LOADING
        self.deadline = self.clock() + self.ocr.load_timeout_s
        pid = self.child.pid
        self.on_event("child_started", f"OCR child started (pid {pid}, engine {self.ocr.engine})", child_pid=pid)

    def stop(self, wait_s: float | None = None) -> None:
        """Retire this worker: an idle child is asked to exit (SIGKILL after EXIT_GRACE_S), any
        other is killed. Returns at once and the child is reaped from `tick()`; with `wait_s`
        (at exit) it waits up to that long, then kills whatever is left and reaps it."""
        self.retired = True
        if self.state == State.EXITING and wait_s is None:
            return  # its death is still to be judged (its file retried): tick() finishes it
        if self.child is not None:
            self._release(ExitReason(Exit.STOPPED, "stopping"), ask_exit=self.state == State.IDLE)
        if wait_s is not None:
            self.reaper.wait_gone(wait_s)

    def kill(self, reason: str = "stopping") -> None:
        """SIGKILL the child's process group now (`reason`: the stop, in words); it is reaped from `tick()`."""
        if self.child is not None:
            self._release(ExitReason(Exit.STOPPED, reason), ask_exit=False)

    def _release(self, reason: ExitReason | None, *, ask_exit: bool) -> None:
        """Let go of the current child (to the reaper). The worker is `stopped` at once (a new child may start)."""
        assert self.child is not None
        self.reaper.take(self.child, reason, ask_exit=ask_exit)
        self.child = None
        self.request.drop()
        self.state = State.STOPPED
        self.deadline = None
        self._timed_out = None
        self._lost = None

    def fileno(self) -> int:
        assert self.conn_in is not None
        return self.conn_in.fileno()

    # -- work ------------------------------------------------------------------------------

    def assign(self, *jobs: Job) -> bool:
        """Hand `jobs` to the idle child (or a `hungry` one: they join the files it is reading,
        and its deadline stands): one file, or for an engine that reads pages in batches as many
        as `room` says. False if the child turned out to be dead (killed while idle, e.g. by the
        OOM killer): these jobs were not started and go back to the queue."""
        idle = self.state == State.IDLE
        assert (idle or self.hungry) and self.child is not None and jobs
        now = self.clock()
        request = self.request.add(jobs, now, self.ocr.turn_pages)
        if idle:
            self.deadline = now + self.ocr.timeout_s  # opening the file counts too
            self.state = State.BUSY
        try:
            self.child.send(request)
        except OSError:
            self.request.take_back(len(jobs))
            if idle:
                self.state = State.IDLE
            self._died()  # reaped later; logs how it died, schedules a new child (and retries its files)
            return False
        return True

    def drained(self) -> None:
        """The queue is empty: let the child clear the GPU cache while nothing waits."""
        if self.dirty and self.state == State.IDLE and self.child is not None:
            self.dirty = False
            try:
                self.child.send(protocol.IdleRequest())
            except OSError:
                self._died()

    def pump(self) -> list[Outcome]:
        """Read every complete message the child has sent, without waiting for a partial one;
        note its death. A message that breaks the protocol counts as the child crashing."""
        outcomes: list[Outcome] = []
        reader = self.conn_in
        if reader is None:
            return outcomes
        try:
            frames, eof = reader.read()
            for raw in frames:
                outcome = self._handle(protocol.decode(raw))
                if outcome is not None:
                    outcomes.append(outcome)
                if self.conn_in is not reader:  # the child was let go while handling (recycled)
                    return outcomes
        except protocol.ProtocolError as exc:
            self._died(f"broke the protocol: {exc}")
            return outcomes
        if eof:
            self._died()
        return outcomes

    def _handle(self, message: protocol.Message) -> Outcome | None:
        """A message about the child itself, or about one of its files."""
        match message:
            case protocol.Ready():
                self._ready(message)
            case protocol.LoadFailed():
                self._load_failed(message.detail, config_error=message.config_error)
            case protocol.Cleared():
                _log_cleared(message)
            case _:
                flight = self.request.find(message.id)
                if flight is None or self._timed_out is not None:
                    return None  # a reply to a request we gave up on: never read it as the next answer
                return self._progress(flight, message, self.clock())
        return None

    def _ready(self, message: protocol.Ready) -> None:
        self.state = State.IDLE
        self.deadline = None
        self.backoff.load_failures = 0
        self.engine = Engine(message.engine, message.model)
        self.request.batch_pages = message.batch_pages
        log.info("OCR child %s ready: %s loaded in %.1f s", message.pid, message.engine, message.load_time)

    def _progress(self, flight: InFlight, message: protocol.FileMessage, now: float) -> Outcome | None:
        """A file's news: the end of it is an outcome; each step before restarts the clock."""
        match message:
            case protocol.Deferred():
                return self._deferred(flight, message, now)
            case protocol.Finished():
                return self._finished(flight, message, now)
        if flight.note(message):
            self.deadline = now + self.ocr.timeout_s
        return None

    def _deferred(self, flight: InFlight, message: protocol.Deferred, now: float) -> Outcome:
        """Too little GPU memory, or the engine's server is down: the file waits in the queue."""
        self._landed(flight, now)
        self.dirty = True
        if message.reason == "engine_unavailable" and not self.flights:  # one pause per request
            self.paused_until = now + self.backoff.server_unavailable()
        return flight.deferred(message, self.engine)

    def _finished(self, flight: InFlight, message: protocol.Finished, now: float) -> Outcome:
        """`done` or `failed`: the file's outcome, or a turn of a long file over; a recycle if due."""
        self.dirty = True
        self.backoff.crashes = self.backoff.unavailable = 0
        self._landed(flight, now)
        if message.ok and (message.next_page or flight.job.turn_sha256 not in (None, flight.sha256)):
            return flight.turn_over(message.next_page, now, self.engine)
        outcome = flight.finished(message, now, self.engine)
        self.files_done += 1
        recycle = self.ocr.recycle_after_files
        if recycle and self.files_done >= recycle and not self.flights:
            log.info("Recycling the OCR child after %d files (ocr.recycle_after_files)", self.files_done)
            self._release(ExitReason(Exit.RECYCLED), ask_exit=True)
            self.files_done = 0
        return outcome

    def _landed(self, flight: InFlight, now: float) -> None:
        """A file of the request is over; the child is idle once all are."""
        if self.request.land(flight):
            self.deadline = now + self.ocr.timeout_s  # the child goes on with the others
        else:
            self.state = State.IDLE
            self.deadline = None

    def _load_failed(self, detail: str, *, config_error: bool) -> None:
        if self.child is not None:
            self._release(ExitReason(Exit.LOAD_FAILED), ask_exit=False)
        backoff = self.backoff.load_failed()
        if config_error or self.backoff.load_failures >= LOAD_RETRIES:
            raise EngineLoadError(detail, config_error=config_error)
        log.error("OCR engine failed to load (%s); retrying in %.0f s", detail, backoff)
        self.next_spawn_at = self.clock() + backoff

    # -- deaths and timeouts ----------------------------------------------------------------

    def _died(self, why: str | None = None) -> None:
        """The child is lost: its pipe closed (`why` None: its exit status will say how) or it
        broke the protocol (`why` says how; it is killed now). The outcome comes from `tick()`
        once its exit status is known, so that "killed by SIGSEGV" is reported, not a guess."""
        if self.child is None or self.state == State.EXITING:
            return
        self._lost = Lost.of(self.request, why, self.clock(), loading=self.state == State.LOADING)
        self.state = State.EXITING
        self.deadline = None
        self._timed_out = None
        self.child.hang_up()
        if why:
            killpg(self.child.pid)

    def _finish_death(self, now: float) -> list[Outcome]:
        """`exiting`: once the exit status is known (or the grace is over), decide what the
        death costs: a load failure, nothing (it was idle), a retry, or `child_crashed`."""
        assert self.child is not None and self._lost is not None
        lost = self._lost
        settled = lost.settle(self.child, now, self.ocr.memory_max_mb)
        if settled is None:
            return []
        why, reason = settled
        self._release(reason, ask_exit=False)
        if lost.loading:
            self._load_failed(f"the child {why} while loading the engine", config_error=False)
            return []
        self.next_spawn_at = now + self.backoff.crashed()
        return lost.outcomes(why, now, self.engine)

    def tick(self) -> list[Outcome]:
        """Enforce deadlines, reap children on their way out, respawn when the backoff has passed."""
        now = self.clock()
        if self.reaper.dying:
            self.reaper.reap(now)
        if self.state == State.EXITING:
            return self._finish_death(now)
        if self.state == State.STOPPED:
            if not self.retired and now >= self.next_spawn_at:
                self.spawn()
            return []
        if self._timed_out is None and self.deadline is not None and now >= self.deadline:
            if self.state == State.LOADING:
                self._load_failed(
                    f"model did not load within ocr.load_timeout_s ({self.ocr.load_timeout_s:g} s)", config_error=False
                )
                return []
            assert self.child is not None and self.flights  # the page is over time
            self._timed_out = TimedOut.begin(self.child, self.flights[0], now)
        if self._timed_out is not None and now >= self._timed_out.stacks_until:
            return self._kill_timed_out(now)
        return []

    def _kill_timed_out(self, now: float) -> list[Outcome]:
        """Say where the child hung, kill it, and fail the file (or read a batch's files again alone)."""
        assert self.flights and self.child is not None and self._timed_out is not None
        timed_out, grouped = self._timed_out, self.request.grouped
        flights = self.request.drop()
        where = timed_out.report(flights[0], self.child, self.ocr.timeout_s, self.on_event)
        self._release(ExitReason(Exit.TIMEOUT, flights[0].job.rel), ask_exit=False)
        self.next_spawn_at = now  # respawn at once; the load is not charged to the next file
        return timed_out.outcomes(flights, grouped, where, self.engine)

    def next_wakeup(self) -> float | None:
        now = self.clock()
        times = [t for t in (self.reaper.next_wakeup(now),) if t is not None]
        if self.state == State.EXITING:
            times.append(now + POLL_DYING_S)
        elif self.state == State.STOPPED:
            if not self.retired:
                times.append(self.next_spawn_at)
        elif self._timed_out is not None:
            times.append(self._timed_out.stacks_until)
        elif self.deadline is not None:
            times.append(self.deadline)
        elif self.state == State.IDLE and self.paused_until > now:
            times.append(self.paused_until)
        return min(times, default=None)


def _log_cleared(message: protocol.Cleared) -> None:
    before, after = message.before, message.after
    if after.get("available"):
        freed = before.get("torch_reserved_mb", 0) - after.get("torch_reserved_mb", 0)
        log.info(
            "GPU cache cleared after %d file(s): %s MB reserved memory freed, %s MB free",
            message.files_done,
            freed,
            after.get("free_mb"),
        )
    else:
        log.debug("Engine cache cleared after %d file(s)", message.files_done)
