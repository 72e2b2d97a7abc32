"""The parent's side of the OCR child: spawn, feed, time, kill, respawn.

The parent owns the clock. The per-page deadline restarts whenever the child reports a new page;
past it the parent first asks the child for its Python stacks (SIGUSR1, which the child's
faulthandler answers on a pipe of its own, even from inside native code) so that the operator
learns where the model hung, then the child's whole process group gets SIGKILL — the one signal
native code cannot ignore, which is why the SIGALRM timeout of the service watcherd replaces
never fired inside `model.infer()`. A child that blocks signals gives no stack and dies on time all
the same. A killed child is never reused: a late reply can therefore never be taken for the next
file's answer, and replies are matched by request id as well.

A `Worker` is driven from one loop: `fileno()` for waiting, `pump()` when readable, `tick()` for
deadlines, reaping and respawns. Both return finished `Outcome`s. Nothing here waits on a child:
a child asked to exit, or killed, is reaped later from `tick()` (`proc.poll()`), so a child stuck
in uninterruptible sleep never stalls the main loop and its watchdog ping. Only `stop(wait_s=...)`,
at exit, waits a bounded time.

The child starts with "/" as its working directory and without the current directory on its
import path: `python -c` would otherwise put the daemon's working directory first on sys.path,
and a `runpy.py` or `json.py` planted there would run inside the child.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from watcherd.core.records import Job, Outcome
from watcherd.core.settings import GpuSettings, OcrSettings
from watcherd.ocr import protocol
from watcherd.ocr.framing import Reader

log = logging.getLogger("watcherd")

# The child runs `watcherd.ocr.child.main` from this very installation. Under `ocr.python` (another venv,
# pinned for a model) our folder is appended, not prepended, so that venv's own packages win.
# `python -c` puts "" (the working directory) first on sys.path: dropped before anything is
# imported (`-P` would do it too, but not on the older interpreters `ocr.python` may name).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_PATH_SETUP = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "sys.path.append(sys.argv.pop(1))"  # argv[1] is PACKAGE_ROOT
)
CHILD_BOOTSTRAP = f"{CHILD_PATH_SETUP}; import runpy; runpy.run_module('watcherd.ocr.child.main', run_name='__main__')"
CHILD_CWD = "/"

LOAD_RETRIES = 5  # consecutive load failures before the daemon gives up (after backoffs of 1, 2, 4, 8 s)
MAX_BACKOFF_S = 30.0
STACK_GRACE_S = 0.5  # after SIGUSR1 on a timeout: how long the child's stacks may take to arrive
STACK_BYTES = 256 * 1024  # what we read of them
STACK_LINES = 300  # and log
EXIT_GRACE_S = 5.0  # an idle child asked to exit: then SIGKILL
DEATH_GRACE_S = 1.0  # a child whose pipe closed: time to finish dying before SIGKILL
POLL_DYING_S = 0.05  # how often a child on its way out is polled
UNKILLABLE_S = 10.0  # SIGKILLed this long ago and still there: D state (hung NFS/GPU); say so once
MAX_UNAVAILABLE_PAUSE_S = 30.0  # the engine's server is down: the longest pause before the next try


def _probe_command(ocr: OcrSettings) -> list[str]:
    python = _absolute_program(ocr.python) if ocr.python else sys.executable
    probe = f"{CHILD_PATH_SETUP}; from watcherd.ocr.engines import resolve; resolve(sys.argv[1])"
    return [python, "-c", probe, PACKAGE_ROOT, ocr.engine]


def _probe_problem(returncode: int, stderr: str) -> str | None:
    if returncode != 0:
        return (stderr.strip().splitlines() or ["?"])[-1]
    return None


def probe_engine(ocr: OcrSettings) -> str | None:
    """Can the child's interpreter import `ocr.engine`? None if so, else what went wrong.

    Runs in a throw-away process (the parent never imports an engine, or torch) and waits for it:
    for `watcherd check`. The daemon's reload uses `EngineProbe`, which does not wait.
    """
    command = _probe_command(ocr)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=ocr.load_timeout_s, check=False, cwd=CHILD_CWD
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ocr.python: cannot run {command[0]}: {exc}"
    return _probe_problem(result.returncode, result.stderr)


class EngineProbe:
    """`probe_engine` without waiting: the probe process runs while the main loop goes on.

    A thread waits for the process (up to `ocr.load_timeout_s`, then kills it) and calls
    `on_done` — the loop's wake-up — when the answer is there; `done` and `problem` hold it.
    Importing a model's package can take minutes, far longer than the systemd watchdog allows
    the loop to stand still.
    """

    def __init__(self, ocr: OcrSettings, *, on_done: Callable[[], None] = lambda: None):
        self.ocr = ocr
        self.done = False
        self.problem: str | None = None
        self._on_done = on_done
        command = _probe_command(ocr)
        try:
            self._proc: subprocess.Popen[str] | None = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                cwd=CHILD_CWD,
                start_new_session=True,
            )
        except OSError as exc:
            self._proc = None
            self._finish(f"ocr.python: cannot run {command[0]}: {exc.strerror or exc}")
            return
        threading.Thread(target=self._wait, name="engine-probe", daemon=True).start()

    def _wait(self) -> None:
        assert self._proc is not None
        try:
            _, stderr = self._proc.communicate(timeout=self.ocr.load_timeout_s)
        except subprocess.TimeoutExpired:
            self.cancel()
            self._proc.communicate()
            self._finish(
                f"importing {self.ocr.engine} took longer than ocr.load_timeout_s ({self.ocr.load_timeout_s:g} s)"
            )
            return
        self._finish(_probe_problem(self._proc.returncode, stderr or ""))

    def _finish(self, problem: str | None) -> None:
        self.problem = problem
        self.done = True
        self._on_done()

    def cancel(self) -> None:
        """Kill the probe (a newer reload, or the daemon stopping)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class EngineLoadError(Exception):
    """The engine cannot be loaded: `config_error` when retrying cannot help (bad ocr.engine)."""

    def __init__(self, detail: str, *, config_error: bool):
        super().__init__(detail)
        self.config_error = config_error


def describe_exit(returncode: int | None) -> str:
    """Exit status in words, the way an operator wants to read it."""
    if returncode is None:
        return "unknown exit status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (perhaps out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


def _absolute_program(program: str) -> str:
    """`ocr.python` as given, made absolute when relative: the child starts in "/"."""
    return os.path.abspath(program) if os.sep in program and not os.path.isabs(program) else program


def _absolute_model(model: str | None) -> str | None:
    """A relative model folder that exists here, made absolute (the child starts in "/"); a hub
    id such as "deepseek-ai/DeepSeek-OCR" is left as it is."""
    if model and not os.path.isabs(model) and os.path.exists(model):
        return os.path.abspath(model)
    return model


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+) in (?P<func>.*)$')


def summarise_stack(text: str, frames: int = 4) -> str | None:
    """The top frames of the thread that was running the engine, from faulthandler's dump
    ("ocr (tests/engines.py:71) ← _call (watcherd/ocr/child/main.py:477)"); None without any."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if "most recent call first" in b]
    if not blocks:
        return None
    chosen = next((b for b in blocks if " in _call" in b), blocks[0])
    shown = []
    for line in chosen.splitlines():
        match = _FRAME.match(line)
        if match:
            path = match["file"]
            short = os.path.relpath(path, PACKAGE_ROOT) if path.startswith(PACKAGE_ROOT + os.sep) else path
            shown.append(f"{match['func']} ({short}:{match['line']})")
        if len(shown) == frames:
            break
    return " ← ".join(shown) or None


class State(enum.StrEnum):
    """A worker's child: none (STOPPED), loading its engine, IDLE, BUSY with a file, or EXITING
    (its pipe closed: waiting for its exit status)."""

    STOPPED = "stopped"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    EXITING = "exiting"


@dataclass
class InFlight:
    """A file a child is working on: everything about it lives and dies together."""

    job: Job
    request_id: int
    started_at: float  # when it was handed over
    pages: list[dict[str, Any]] = field(default_factory=list)  # `protocol.Page.record`s
    sha256: str | None = None
    current_page: int = 0
    page_count: int = 0
    batch: int = 1  # pages in the engine call under way (ocr_batch)


@dataclass
class _Dying:
    """A child on its way out, reaped from `tick()` (never waited for in the loop)."""

    proc: subprocess.Popen[bytes]
    reason: str | None  # why we ended it; None: it died by itself (its exit status says how)
    kill_at: float  # SIGKILL its process group at this time if it has not exited
    killed_at: float | None = None
    said_unkillable: bool = False


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
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn_in: Reader | None = None  # child → parent (non-blocking, framed)
        self.conn_out: Connection | None = None  # parent → child
        self._stacks: int | None = None  # read end of the pipe the child's faulthandler writes to
        self.state = State.STOPPED
        self.retired = False  # stop() was called: never respawn
        self.dying: list[_Dying] = []
        self.deadline: float | None = None
        self.next_spawn_at: float = 0.0
        self.load_failures = 0
        self.crashes_in_a_row = 0
        self.files_done = 0
        self.dirty = False  # files done since the cache was last cleared for an empty queue
        self.engine_name: str | None = None
        self.model: str | None = None
        # The files the child is working on: one, or with an engine that reads pages in batches
        # (ocr_batch) up to `batch_pages` files whose pages share engine calls.
        self.flights: list[InFlight] = []
        self.batch_pages = 1  # pages per engine call, as the child said when ready
        self._request_id = 0
        self._stack_until: float | None = None  # timed out: the child's stacks are awaited until then
        self._timed_out_after = 0.0
        # state, files, grouped (several files or pages in one call), why, SIGKILL at
        self._lost: tuple[State, list[InFlight], bool, str | None, float] | None = None
        # The engine said its server is unavailable: no file is handed over before this time, so a
        # down server costs one request per pause, not one per queued file.
        self.paused_until = 0.0
        self.unavailable_in_a_row = 0

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def flight(self) -> InFlight | None:
        """The first file in the child (the only one, unless pages are read in batches)."""
        return self.flights[0] if self.flights else None

    @property
    def grouped(self) -> bool:
        """Is the child reading pages of several files, or several pages, in one engine call?
        Then a timeout or a death cannot say which page was at fault."""
        return len(self.flights) > 1 or any(f.batch > 1 for f in self.flights)

    @property
    def ready(self) -> bool:
        return self.state == State.IDLE and self.clock() >= self.paused_until

    @property
    def hungry(self) -> bool:
        """A busy child of a batch engine with room for another batch's worth of files takes them
        now: they join the request in progress, and arrive before the child picks the batch it
        decodes ahead, so the engine never waits between requests. Not while a file is read
        alone, a timeout is being handled, or a recycle is due."""
        if self.state != State.BUSY or self.batch_pages < 2 or self._stack_until is not None:
            return False
        if self.room < self.batch_pages or any(f.job.solo for f in self.flights):
            return False
        recycle = self.ocr.recycle_after_files
        return not (recycle and self.files_done + len(self.flights) >= recycle)

    @property
    def room(self) -> int:
        """Pages to hand over now: three batches' worth (the one read, the one decoded ahead, the
        one after it) less the files in the child; one file for an engine without batches."""
        return 3 * self.batch_pages - len(self.flights) if self.batch_pages > 1 else 1

    @property
    def gone(self) -> bool:
        """No child of ours is left, not even one on its way out."""
        return self.proc is None and not self.dying

    def spawn(self) -> None:
        """Start a fresh interpreter for the child; it reports `ready` once its model is loaded."""
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        stacks_r, stacks_w = os.pipe()
        os.set_blocking(stacks_r, False)
        spec = {
            "engine": self.ocr.engine,
            "model": _absolute_model(self.ocr.model),
            "prompt": self.ocr.prompt,
            "options": self.ocr.options,
            "device": None if self.device is None else "cuda",
            "max_side_px": self.ocr.max_side_px,
            "max_pages": self.ocr.max_pages,
            "max_file_mb": self.ocr.max_file_mb,
            "max_file_bytes": int(self.ocr.max_file_mb * 1024 * 1024),
            "memory_max_mb": self.ocr.memory_max_mb,
            "clear_cache_every": self.gpu.clear_cache_every,
            "min_free_mb": self.gpu.min_free_mb,
            "max_usage_percent": self.gpu.max_usage_percent,
            "pdf_text": self.ocr.pdf_text,
            "auto_rotate": self.ocr.auto_rotate,
            "batch_pages": self.ocr.batch_pages,
            "stack_fd": stacks_w,
            "threads": self.threads,
        }
        env = dict(os.environ)
        if self.threads:  # read as the child's libraries start: OpenMP (torch), our rapidocr engine
            env["OMP_NUM_THREADS"] = env["WATCHERD_OCR_THREADS"] = str(self.threads)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        python = _absolute_program(self.ocr.python) if self.ocr.python else sys.executable
        try:
            self.proc = subprocess.Popen(
                [python, "-c", CHILD_BOOTSTRAP, PACKAGE_ROOT, str(child_r), str(child_w), json.dumps(spec)],
                pass_fds=(child_r, child_w, stacks_w),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # models print; keep the protocol pipe clean
                start_new_session=True,  # own process group: killpg reaches grandchildren
                cwd=CHILD_CWD,
                env=env,
            )
        except OSError as exc:  # ocr.python missing or not executable: retrying cannot fix it
            for fd in (parent_r, parent_w, stacks_r):
                os.close(fd)
            raise EngineLoadError(
                f"ocr.python: cannot start {python}: {exc.strerror or exc}", config_error=True
            ) from None
        finally:
            for fd in (child_r, child_w, stacks_w):
                os.close(fd)
        self.conn_in = Reader(parent_r)
        self.conn_out = Connection(parent_w, readable=False)
        self._stacks = stacks_r
        self.state = State.LOADING
        self.deadline = self.clock() + self.ocr.load_timeout_s
        self.on_event(
            "child_started",
            f"OCR child started (pid {self.proc.pid}, engine {self.ocr.engine})",
            child_pid=self.proc.pid,
        )

    def stop(self, wait_s: float | None = None) -> None:
        """Retire this worker: an idle child is asked to exit (SIGKILL after EXIT_GRACE_S), any
        other is killed. Returns at once and the child is reaped from `tick()`; with `wait_s`
        (at exit) it waits up to that long, then kills whatever is left and reaps it."""
        self.retired = True
        if self.state == State.EXITING and wait_s is None:
            return  # its death is still to be judged (its file retried): tick() finishes it
        if self.proc is not None:
            self._release("stopping", ask_exit=self.state == State.IDLE)
        if wait_s is not None:
            self._wait_gone(wait_s)

    def kill(self, reason: str = "stopping") -> None:
        """SIGKILL the child's process group now; it is reaped from `tick()`."""
        if self.proc is not None:
            self._release(reason, ask_exit=False)

    def _release(self, reason: str | None, *, ask_exit: bool) -> None:
        """Let go of the current child: close its pipes, ask it to exit or kill its group, and
        hand it to the dying list. The worker is `stopped` at once (a new child may start)."""
        proc = self.proc
        assert proc is not None
        now = self.clock()
        if ask_exit and self.conn_out is not None:
            try:
                self.conn_out.send_bytes(protocol.encode(protocol.ExitRequest()))
            except OSError:
                ask_exit = False
        self._close_pipes()
        dying = _Dying(proc, reason, kill_at=now + EXIT_GRACE_S if ask_exit else now)
        self.dying.append(dying)
        self.proc = None
        self.flights = []
        self.state = State.STOPPED
        self.deadline = None
        self._stack_until = None
        self._lost = None
        self._reap_dying(now)

    def _close_pipes(self) -> None:
        if self.conn_in is not None:
            self.conn_in.close()
        if self.conn_out is not None:
            self.conn_out.close()
        if self._stacks is not None:
            os.close(self._stacks)
        self.conn_in = self.conn_out = None
        self._stacks = None

    def _reap_dying(self, now: float) -> None:
        """Poll the children on their way out; SIGKILL the overdue; log the reaped."""
        for dying in list(self.dying):
            proc = dying.proc
            if dying.killed_at is None and now >= dying.kill_at and proc.poll() is None:
                _killpg(proc.pid)
                dying.killed_at = now
            returncode = proc.poll()
            if returncode is None:
                if dying.killed_at is not None and now - dying.killed_at > UNKILLABLE_S and not dying.said_unkillable:
                    dying.said_unkillable = True  # D state (hung NFS/GPU): note it, keep polling
                    log.error("OCR child %s did not die %g s after SIGKILL", proc.pid, UNKILLABLE_S)
                continue
            self.dying.remove(dying)
            _killpg(proc.pid)  # grandchildren the child left behind
            how = f"killed by watcherd ({dying.reason})" if dying.reason else describe_exit(returncode)
            self.on_event("child_exited", f"OCR child {proc.pid} {how}", child_pid=proc.pid, level=logging.INFO)

    def _wait_gone(self, wait_s: float) -> None:
        """At exit only: wait up to `wait_s` for the dying children, then kill and reap them."""
        deadline = time.monotonic() + wait_s
        for dying in self.dying:
            try:
                dying.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for dying in self.dying:
            dying.kill_at = 0.0
        self._reap_dying(self.clock())
        for dying in list(self.dying):
            try:
                dying.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                log.error("OCR child %s did not die after SIGKILL", dying.proc.pid)
                self.dying.remove(dying)
        self._reap_dying(self.clock())

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
        assert (idle or self.hungry) and self.conn_out is not None and jobs
        now = self.clock()
        files = []
        for job in jobs:
            self._request_id += 1
            self.flights.append(InFlight(job=job, request_id=self._request_id, started_at=now))
            job.attempts += 1
            # What earlier turns read: the PDF/hOCR/ALTO are written at the last turn.
            earlier = job.pages_done if job.render else []
            files.append(protocol.FileRequest(self._request_id, str(job.path), job.render, job.next_page, earlier))
        if idle:
            self.deadline = now + self.ocr.timeout_s  # opening the file counts too
            self.state = State.BUSY
        request = protocol.OcrRequest(tuple(files), any(j.solo for j in jobs), self.ocr.turn_pages)
        try:
            self.conn_out.send_bytes(protocol.encode(request))
        except OSError:
            for job in jobs:
                job.attempts -= 1
            self.flights = self.flights[: len(self.flights) - len(jobs)]
            if idle:
                self.state = State.IDLE
            self._died()  # reaped later; logs how it died, schedules a new child (and retries its files)
            return False
        return True

    def drained(self) -> None:
        """The queue is empty: let the child clear the GPU cache while nothing waits."""
        if self.dirty and self.state == State.IDLE and self.conn_out is not None:
            self.dirty = False
            try:
                self.conn_out.send_bytes(protocol.encode(protocol.IdleRequest()))
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
        except protocol.ProtocolError as exc:
            self._died(f"broke the protocol: {exc}")
            return outcomes
        for raw in frames:
            try:
                outcome = self._handle(protocol.decode(raw))
            except protocol.ProtocolError as exc:
                self._died(f"broke the protocol: {exc}")
                return outcomes
            if outcome is not None:
                outcomes.append(outcome)
            if self.conn_in is not reader:  # the child was let go while handling (recycled)
                return outcomes
        if eof:
            self._died()
        return outcomes

    def _handle(self, message: protocol.Message) -> Outcome | None:
        match message:
            case protocol.Ready():
                self.state = State.IDLE
                self.deadline = None
                self.load_failures = 0
                self.engine_name, self.model = message.engine, message.model
                self.batch_pages = message.batch_pages
                log.info("OCR child %s ready: %s loaded in %.1f s", message.pid, message.engine, message.load_time)
                return None
            case protocol.LoadFailed():
                self._load_failed(message.detail, config_error=message.config_error)
                return None
            case protocol.Cleared(files_done=files, before=before, after=after):
                if after.get("available"):
                    freed = before.get("torch_reserved_mb", 0) - after.get("torch_reserved_mb", 0)
                    log.info(
                        "GPU cache cleared after %d file(s): %s MB reserved memory freed, %s MB free",
                        files,
                        freed,
                        after.get("free_mb"),
                    )
                else:
                    log.debug("Engine cache cleared after %d file(s)", files)
                return None
        flight = next((f for f in self.flights if f.request_id == message.id), None)
        if flight is None or self._stack_until is not None:
            return None  # a reply to a request we gave up on: never read it as the next answer
        now = self.clock()
        match message:
            case protocol.Pages():  # the file is open (in a request of several, the next one is opened next)
                flight.sha256 = message.sha256
                flight.page_count = message.count
                flight.job.opened = message.file
                self.deadline = now + self.ocr.timeout_s
            case protocol.PageStart():
                flight.current_page, flight.batch = message.page, message.pages
                self.deadline = now + self.ocr.timeout_s
            case protocol.Rendering():  # writing the PDF/hOCR/ALTO gets a page's time of its own
                self.deadline = now + self.ocr.timeout_s
            case protocol.Page():
                flight.pages.append(message.record)
            case protocol.Deferred():
                job = flight.job
                self._landed(flight, now)
                job.attempts -= 1  # waiting for memory (or a server) is not an attempt
                self.dirty = True
                if message.reason == "engine_unavailable" and not self.flights:  # one pause per request
                    self.unavailable_in_a_row += 1
                    pause = min(MAX_UNAVAILABLE_PAUSE_S, 0.5 * 2 ** (self.unavailable_in_a_row - 1))
                    self.paused_until = now + pause
                return Outcome(
                    job=job,
                    ok=False,
                    deferred=True,
                    defer_reason=message.reason,
                    detail=message.detail,
                    sha256=message.sha256,
                    gpu_info_after=message.gpu_info,
                    engine=self.engine_name,
                    model=self.model,
                )
            case protocol.Finished():
                self.dirty = True
                self.crashes_in_a_row = 0
                self.unavailable_in_a_row = 0
                job = flight.job
                self._landed(flight, now)
                if message.ok and (message.next_page or job.turn_sha256 not in (None, flight.sha256)):
                    return self._turn_done(job, flight, message.next_page, now)
                outcome = Outcome(
                    job=job,
                    ok=message.ok,
                    code=message.code,
                    detail=message.detail,
                    sha256=message.sha256 or flight.sha256,
                    pages=job.pages_done + flight.pages,
                    processing_time=round(job.elapsed + now - flight.started_at, 3),
                    gpu_info_before=message.gpu_info_before,
                    gpu_info_after=message.gpu_info_after,
                    engine=self.engine_name,
                    model=self.model,
                    rendered=message.rendered,
                    render_errors=message.render_errors,
                )
                self.files_done += 1
                recycle = self.ocr.recycle_after_files
                if recycle and self.files_done >= recycle and not self.flights:
                    log.info("Recycling the OCR child after %d files (ocr.recycle_after_files)", self.files_done)
                    self._release("recycling", ask_exit=True)
                    self.files_done = 0
                return outcome
        return None

    def _landed(self, flight: InFlight, now: float) -> None:
        """A file of the request is over; the child is idle once all are."""
        self.flights.remove(flight)
        if self.flights:
            self.deadline = now + self.ocr.timeout_s  # the child goes on with the others
        else:
            self.state = State.IDLE
            self.deadline = None

    def _turn_done(self, job: Job, flight: InFlight, next_page: int | None, now: float) -> Outcome:
        """A turn of a long file is over (ocr.turn_pages): keep its pages, and queue its next turn.
        If its bytes are not those the earlier turns read, it changed meanwhile: start over."""
        if job.turn_sha256 not in (None, flight.sha256):
            log.warning("%s changed between its turns; reading it again from the first page", job.rel)
            job.start_over()
        else:
            job.pages_done += flight.pages
            job.next_page = next_page or 0
            job.turn_sha256 = flight.sha256
            job.elapsed += now - flight.started_at
        job.attempts -= 1  # the file's attempts count its failures, not its turns
        return Outcome(job=job, ok=False, partial=True, engine=self.engine_name, model=self.model)

    def _load_failed(self, detail: str, *, config_error: bool) -> None:
        if self.proc is not None:
            self._release("engine load failed", ask_exit=False)
        self.load_failures += 1
        if config_error or self.load_failures >= LOAD_RETRIES:
            raise EngineLoadError(detail, config_error=config_error)
        backoff = min(MAX_BACKOFF_S, 2.0 ** (self.load_failures - 1))
        log.error("OCR engine failed to load (%s); retrying in %.0f s", detail, backoff)
        self.next_spawn_at = self.clock() + backoff

    def _died(self, why: str | None = None) -> None:
        """The child is lost: its pipe closed (`why` None: its exit status will say how) or it
        broke the protocol (`why` says how; it is killed now). The outcome comes from `tick()`
        once its exit status is known, so that "killed by SIGSEGV" is reported, not a guess."""
        if self.proc is None or self.state == State.EXITING:
            return
        self._lost = (self.state, self.flights, self.grouped, why, self.clock() + (0.0 if why else DEATH_GRACE_S))
        self.flights = []
        self.state = State.EXITING
        self.deadline = None
        self._stack_until = None
        if self.conn_in is not None:
            self.conn_in.close()
            self.conn_in = None
        if why:
            _killpg(self.proc.pid)

    def _finish_death(self, now: float) -> list[Outcome]:
        """`exiting`: once the exit status is known (or the grace is over), decide what the
        death costs: a load failure, nothing (it was idle), a retry, or `child_crashed`."""
        assert self.proc is not None and self._lost is not None
        was, flights, grouped, why, kill_at = self._lost
        returncode = self.proc.poll()
        if returncode is None and now < kill_at:
            return []
        if why is None:
            why = describe_exit(returncode) if returncode is not None else "closed its pipe without exiting"
        if self.ocr.memory_max_mb and (returncode is None or returncode < 0):
            why += f" (perhaps the memory limit ocr.memory_max_mb = {self.ocr.memory_max_mb:g} MB was exceeded)"
        self._lost = None
        self._release(None if returncode is not None else why, ask_exit=False)
        if was == State.LOADING:
            self._load_failed(f"the child {why} while loading the engine", config_error=False)
            return []
        self.crashes_in_a_row += 1
        self.next_spawn_at = now + min(MAX_BACKOFF_S, 0.5 * (2 ** (self.crashes_in_a_row - 1)) - 0.5)
        if not flights:
            log.warning("OCR child %s while idle; starting a new one", why)
            return []
        return [self._death_outcome(flight, grouped, why, now) for flight in flights]

    def _death_outcome(self, flight: InFlight, grouped: bool, why: str, now: float) -> Outcome:
        """A file the child died on: run again once (a page at a time and alone, when it shared
        engine calls: which page killed it?), or `child_crashed` the second time."""
        job = flight.job
        if grouped and not job.solo:
            job.solo = True
        if job.attempts < 2:
            log.warning("OCR child %s on %s; retrying the file once with a new child", why, job.rel)
            return Outcome(job=job, ok=False, retry=True, detail=why)
        return Outcome(
            job=job,
            ok=False,
            code="child_crashed",
            detail=why,
            sha256=flight.sha256,
            processing_time=round(now - flight.started_at, 3),
            engine=self.engine_name,
            model=self.model,
        )

    def tick(self) -> list[Outcome]:
        """Enforce deadlines, reap children on their way out, respawn when the backoff has passed."""
        now = self.clock()
        if self.dying:
            self._reap_dying(now)
        if self.state == State.EXITING:
            return self._finish_death(now)
        if self.state == State.STOPPED:
            if not self.retired and now >= self.next_spawn_at:
                self.spawn()
            return []
        if self._stack_until is not None:
            return self._timed_out(now) if now >= self._stack_until else []
        if self.deadline is None or now < self.deadline:
            return []
        if self.state == State.LOADING:
            self._load_failed(
                f"model did not load within ocr.load_timeout_s ({self.ocr.load_timeout_s:g} s)", config_error=False
            )
            return []
        # The page is over time. Ask for the child's Python stacks first and kill it STACK_GRACE_S
        # later, without waiting here (a child with signals blocked never answers).
        assert self.proc is not None and self.flights
        self._timed_out_after = round(now - self.flights[0].started_at, 3)
        self._stack_until = now + STACK_GRACE_S
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            self._stack_until = now
        return self._timed_out(now) if now >= self._stack_until else []

    def _read_stacks(self) -> str:
        if self._stacks is None:
            return ""
        chunks = []
        size = 0
        while size < STACK_BYTES:
            try:
                chunk = os.read(self._stacks, STACK_BYTES - size)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def _timed_out(self, now: float) -> list[Outcome]:
        assert self.flights and self.proc is not None
        flights, grouped = self.flights, self.grouped
        flight = flights[0]  # alone, or the first of a batch (which are all read again, below)
        self.flights = []
        job = flight.job
        stacks = self._read_stacks()
        where = summarise_stack(stacks)
        elapsed = self._timed_out_after
        pid = self.pid
        page = flight.current_page or 1
        self.on_event(
            "timeout",
            f"{job.rel}: page {page} exceeded ocr.timeout_s ({self.ocr.timeout_s:g} s); killing OCR child {pid}"
            + (f"; it was in {where}" if where else "; it gave no Python stack (signals blocked, or native code)"),
            source=job.rel,
            child_pid=pid,
            level=logging.WARNING,
        )
        # One log line per stack line: the log formatter escapes line breaks inside a message.
        for line in stacks.rstrip().splitlines()[:STACK_LINES]:
            log.warning("Python stacks of OCR child %s at the timeout: %s", pid, line)
        self._release(f"page timeout on {job.rel}", ask_exit=False)
        self.next_spawn_at = now  # respawn at once; the load is not charged to the next file
        if grouped and not any(f.job.solo for f in flights):
            # Pages in one engine call share one deadline: it may be the batch, not a page, that
            # was too slow. Read each file again alone, a page at a time (not counted as an
            # attempt): only a page over time by itself fails its file.
            names = ", ".join(f.job.rel for f in flights)
            log.warning("%s: a batch of %d pages ran over time; reading it again a page at a time", names, flight.batch)
            for f in flights:
                f.job.solo = True
                f.job.attempts -= 1
            return [Outcome(job=f.job, ok=False, retry=True, detail="batch timeout") for f in flights]
        detail = f"page {page}, {elapsed:g} s; " + (
            f"hung in {where}" if where else "no Python stack (signals blocked, or stuck in native code)"
        )
        return [
            Outcome(
                job=job,
                ok=False,
                code="timeout",
                detail=detail,
                sha256=flight.sha256,
                processing_time=elapsed,
                engine=self.engine_name,
                model=self.model,
            )
        ]

    def next_wakeup(self) -> float | None:
        now = self.clock()
        times = []
        if self.dying:
            unkillable = all(d.said_unkillable for d in self.dying)
            times.append(now + (1.0 if unkillable else POLL_DYING_S))
        if self.state == State.EXITING:
            times.append(now + POLL_DYING_S)
        elif self.state == State.STOPPED:
            if not self.retired:
                times.append(self.next_spawn_at)
        elif self._stack_until is not None:
            times.append(self._stack_until)
        elif self.deadline is not None:
            times.append(self.deadline)
        elif self.state == State.IDLE and self.paused_until > now:
            times.append(self.paused_until)
        return min(times, default=None)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
