"""The parent's side of the OCR child: spawn, feed, time, kill, respawn.

The parent owns the clock. The per-page deadline restarts whenever the child reports a new page;
past it the child's whole process group gets SIGKILL — the one signal native code cannot ignore,
which is why the SIGALRM timeout of the service watcherd replaces never fired inside
`model.infer()`. A killed child is never reused: a late reply can therefore never be taken for the
next file's answer, and replies are matched by request id as well.

A `Worker` is driven from one loop: `fileno()` for waiting, `pump()` when readable, `tick()` for
deadlines and respawns. Both return finished `Outcome`s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .settings import GpuSettings, OcrSettings
from .spool import Job

log = logging.getLogger("watcherd")

# The child runs `watcherd.child` from this very installation. Under `ocr.python` (another venv,
# pinned for a model) our folder is appended, not prepended, so that venv's own packages win.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_PATH_SETUP = "import sys; sys.path.append(sys.argv.pop(1))"  # argv[1] is PACKAGE_ROOT
CHILD_BOOTSTRAP = f"{CHILD_PATH_SETUP}; import runpy; runpy.run_module('watcherd.child', run_name='__main__')"

LOAD_RETRIES = 5  # consecutive load failures before the daemon gives up (after backoffs of 1, 2, 4, 8 s)
MAX_BACKOFF_S = 30.0


def probe_engine(ocr: OcrSettings) -> str | None:
    """Can the child's interpreter import `ocr.engine`? None if so, else what went wrong.

    Runs in a throw-away process (the parent never imports an engine, or torch).
    """
    python = ocr.python or sys.executable
    probe = f"{CHILD_PATH_SETUP}; from watcherd.engines import resolve; resolve(sys.argv[1])"
    try:
        result = subprocess.run(
            [python, "-c", probe, PACKAGE_ROOT, ocr.engine],
            capture_output=True,
            text=True,
            timeout=ocr.load_timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ocr.python: cannot run {python}: {exc}"
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


class EngineLoadError(Exception):
    """The engine cannot be loaded: `config_error` when retrying cannot help (bad ocr.engine)."""

    def __init__(self, detail: str, *, config_error: bool):
        super().__init__(detail)
        self.config_error = config_error


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


class Worker:
    """One supervised child on one device (None: the default device)."""

    def __init__(
        self,
        *,
        ocr: OcrSettings,
        gpu: GpuSettings,
        device: int | None = None,
        on_event: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ocr = ocr
        self.gpu = gpu
        self.device = device
        self.on_event = on_event or (lambda *a, **k: None)
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn_in: Connection | None = None  # child → parent
        self.conn_out: Connection | None = None  # parent → child
        self.state = "stopped"  # stopped | loading | idle | busy
        self.deadline: float | None = None
        self.next_spawn_at: float = 0.0
        self.load_failures = 0
        self.crashes_in_a_row = 0
        self.files_done = 0
        self.dirty = False  # files done since the cache was last cleared for an empty queue
        self.engine_name: str | None = None
        self.model: str | None = None
        self.job: Job | None = None
        self._request_id = 0
        self._pages: list[dict[str, Any]] = []
        self._sha256: str | None = None
        self.started_at = 0.0  # when the current file was handed over
        self._gpu_before: dict[str, Any] = {"available": False}
        self.current_page = 0
        self.page_count = 0

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def ready(self) -> bool:
        return self.state == "idle"

    def spawn(self) -> None:
        """Start a fresh interpreter for the child; it reports `ready` once its model is loaded."""
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        spec = {
            "engine": self.ocr.engine,
            "model": self.ocr.model,
            "prompt": self.ocr.prompt,
            "options": self.ocr.options,
            "device": None if self.device is None else "cuda",
            "max_side_px": self.ocr.max_side_px,
            "max_pages": self.ocr.max_pages,
            "max_file_mb": self.ocr.max_file_mb,
            "max_file_bytes": int(self.ocr.max_file_mb * 1024 * 1024),
            "clear_cache_every": self.gpu.clear_cache_every,
            "min_free_mb": self.gpu.min_free_mb,
            "max_usage_percent": self.gpu.max_usage_percent,
        }
        env = dict(os.environ)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        python = self.ocr.python or sys.executable
        try:
            self.proc = subprocess.Popen(
                [python, "-c", CHILD_BOOTSTRAP, PACKAGE_ROOT, str(child_r), str(child_w), json.dumps(spec)],
                pass_fds=(child_r, child_w),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # models print; keep the protocol pipe clean
                start_new_session=True,  # own process group: killpg reaches grandchildren
                env=env,
            )
        except OSError as exc:  # ocr.python missing or not executable: retrying cannot fix it
            os.close(parent_r)
            os.close(parent_w)
            raise EngineLoadError(
                f"ocr.python: cannot start {python}: {exc.strerror or exc}", config_error=True
            ) from None
        finally:
            os.close(child_r)
            os.close(child_w)
        self.conn_in = Connection(parent_r, writable=False)
        self.conn_out = Connection(parent_w, readable=False)
        self.state = "loading"
        self.deadline = self.clock() + self.ocr.load_timeout_s
        self.on_event(
            "child_started",
            f"OCR child started (pid {self.proc.pid}, engine {self.ocr.engine})",
            child_pid=self.proc.pid,
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask the child to exit; kill its process group if it has not within `grace_s`."""
        if self.proc is None:
            return
        try:
            if self.state == "idle" and self.conn_out is not None:
                self.conn_out.send_bytes(b'{"op": "exit"}')
            self.proc.wait(timeout=grace_s if self.state == "idle" else 0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._reap(kill=True, reason="stopping" if self.proc.poll() is None else None)

    def kill(self, reason: str = "stopping") -> None:
        self._reap(kill=True, reason=reason)

    def _reap(self, *, kill: bool, reason: str | None = None) -> int | None:
        """Make sure the child and its process group are gone; return its exit status.

        `reason` says why we killed it, so the log does not blame the child for our SIGKILL.
        """
        proc = self.proc
        if proc is None:
            return None
        if kill:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state on a hung NFS/GPU): note and move on
            log.error("OCR child %s did not die after SIGKILL", proc.pid)
            returncode = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # grandchildren the child left behind
        except (ProcessLookupError, PermissionError):
            pass
        for conn in (self.conn_in, self.conn_out):
            if conn is not None:
                conn.close()
        self.proc = self.conn_in = self.conn_out = None
        self.state = "stopped"
        self.deadline = None
        how = f"killed by watcherd ({reason})" if reason else describe_exit(returncode)
        self.on_event("child_exited", f"OCR child {proc.pid} {how}", child_pid=proc.pid, level=logging.INFO)
        return returncode

    def fileno(self) -> int:
        assert self.conn_in is not None
        return self.conn_in.fileno()

    # -- work ------------------------------------------------------------------------------

    def assign(self, job: Job) -> bool:
        """Hand `job` to the idle child. False if the child turned out to be dead (killed while
        idle, e.g. by the OOM killer): the job was not started and goes back to the queue."""
        assert self.state == "idle" and self.conn_out is not None
        self._request_id += 1
        self.job = job
        job.attempts += 1
        self._pages = []
        self._sha256 = None
        self.current_page = 0
        self.page_count = 0
        self._gpu_before = {"available": False}
        self.started_at = self.clock()
        self.deadline = self.started_at + self.ocr.timeout_s  # opening the file counts too
        self.state = "busy"
        try:
            self.conn_out.send_bytes(
                json.dumps({"op": "ocr", "id": self._request_id, "path": str(job.path)}, ensure_ascii=True).encode()
            )
        except OSError:
            job.attempts -= 1
            self.job = None
            self.state = "idle"
            self._died()  # reaps it, logs how it died, schedules a new child
            return False
        return True

    def drained(self) -> None:
        """The queue is empty: let the child clear the GPU cache while nothing waits."""
        if self.dirty and self.state == "idle" and self.conn_out is not None:
            self.dirty = False
            try:
                self.conn_out.send_bytes(b'{"op": "idle"}')
            except OSError:
                self._died()

    def pump(self) -> list[Outcome]:
        """Read every message the child has sent; handle its death."""
        outcomes: list[Outcome] = []
        while self.conn_in is not None:
            try:
                if not self.conn_in.poll():
                    break
                message = json.loads(self.conn_in.recv_bytes())
            except (EOFError, OSError):
                outcomes.extend(self._died())
                break
            outcome = self._handle(message)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _handle(self, message: dict[str, Any]) -> Outcome | None:
        op = message["op"]
        if op == "ready":
            self.state = "idle"
            self.deadline = None
            self.load_failures = 0
            self.engine_name = message.get("engine")
            self.model = message.get("model")
            log.info("OCR child %s ready: %s loaded in %.1f s", message["pid"], self.engine_name, message["load_time"])
            return None
        if op == "load_failed":
            self._load_failed(message["detail"], config_error=message.get("config_error", False))
            return None
        if op == "cleared":
            before, after = message["before"], message["after"]
            if after.get("available"):
                freed = before.get("torch_reserved_mb", 0) - after.get("torch_reserved_mb", 0)
                log.info(
                    "GPU cache cleared after %d file(s): %s MB reserved memory freed, %s MB free",
                    message["files_done"],
                    freed,
                    after.get("free_mb"),
                )
            else:
                log.debug("Engine cache cleared after %d file(s)", message["files_done"])
            return None
        if self.job is None or message.get("id") != self._request_id:
            return None  # a reply to a request we gave up on: never read it as the next answer
        now = self.clock()
        if op == "pages":
            self._sha256 = message["sha256"]
            self.page_count = message["count"]
        elif op == "page_start":
            self.current_page = message["page"]
            self.deadline = now + self.ocr.timeout_s
        elif op == "page":
            self._pages.append({k: message[k] for k in ("page", "text", "processing_time", "size", "resized_from")})
        elif op == "deferred":
            job, self.job = self.job, None
            job.attempts -= 1  # waiting for memory is not an attempt
            self.state = "idle"
            self.deadline = None
            self.dirty = True
            return Outcome(
                job=job,
                ok=False,
                deferred=True,
                sha256=message.get("sha256"),
                gpu_info_after=message["gpu_info"],
                engine=self.engine_name,
                model=self.model,
            )
        elif op in ("done", "failed"):
            self.dirty = True
            self.crashes_in_a_row = 0
            job, self.job = self.job, None
            self.state = "idle"
            self.deadline = None
            outcome = Outcome(
                job=job,
                ok=op == "done",
                code=message.get("code"),
                detail=message.get("detail"),
                sha256=message.get("sha256", self._sha256) or self._sha256,
                pages=self._pages,
                processing_time=round(now - self.started_at, 3),
                gpu_info_before=message.get("gpu_info_before", {"available": False}),
                gpu_info_after=message.get("gpu_info_after", {"available": False}),
                engine=self.engine_name,
                model=self.model,
            )
            self.files_done += 1
            if self.ocr.recycle_after_files and self.files_done >= self.ocr.recycle_after_files:
                log.info("Recycling the OCR child after %d files (ocr.recycle_after_files)", self.files_done)
                self.stop()
                self.files_done = 0
            return outcome
        return None

    def _load_failed(self, detail: str, *, config_error: bool) -> None:
        self._reap(kill=True, reason="engine load failed")
        self.load_failures += 1
        if config_error or self.load_failures >= LOAD_RETRIES:
            raise EngineLoadError(detail, config_error=config_error)
        backoff = min(MAX_BACKOFF_S, 2.0 ** (self.load_failures - 1))
        log.error("OCR engine failed to load (%s); retrying in %.0f s", detail, backoff)
        self.next_spawn_at = self.clock() + backoff

    def _died(self) -> list[Outcome]:
        was = self.state
        job = self.job
        returncode = self._reap(kill=True)
        why = describe_exit(returncode)
        if was == "loading":
            self._load_failed(f"the child {why} while loading the engine", config_error=False)
            return []
        self.crashes_in_a_row += 1
        self.next_spawn_at = self.clock() + min(MAX_BACKOFF_S, 0.5 * (2 ** (self.crashes_in_a_row - 1)) - 0.5)
        if job is None:
            log.warning("OCR child %s while idle; starting a new one", why)
            return []
        self.job = None
        if job.attempts < 2:
            log.warning("OCR child %s on %s; retrying the file once with a new child", why, job.rel)
            return [Outcome(job=job, ok=False, retry=True, detail=why)]
        return [
            Outcome(
                job=job,
                ok=False,
                code="child_crashed",
                detail=why,
                sha256=self._sha256,
                processing_time=round(self.clock() - self.started_at, 3),
                engine=self.engine_name,
                model=self.model,
            )
        ]

    def tick(self) -> list[Outcome]:
        """Enforce deadlines and respawn a stopped child when its backoff has passed."""
        now = self.clock()
        if self.state == "stopped":
            if now >= self.next_spawn_at:
                self.spawn()
            return []
        if self.deadline is None or now < self.deadline:
            return []
        if self.state == "loading":
            self._load_failed(
                f"model did not load within ocr.load_timeout_s ({self.ocr.load_timeout_s:g} s)", config_error=False
            )
            return []
        job = self.job
        assert job is not None
        self.job = None
        elapsed = round(now - self.started_at, 3)
        pid = self.pid
        self.on_event(
            "timeout",
            f"{job.rel}: page {self.current_page or 1} exceeded ocr.timeout_s "
            f"({self.ocr.timeout_s:g} s); killing OCR child {pid}",
            source=job.rel,
            child_pid=pid,
            level=logging.WARNING,
        )
        self._reap(kill=True, reason=f"page timeout on {job.rel}")
        self.next_spawn_at = now  # respawn at once; the load is not charged to the next file
        return [
            Outcome(
                job=job,
                ok=False,
                code="timeout",
                detail=f"page {self.current_page or 1}, {elapsed:g} s",
                sha256=self._sha256,
                processing_time=elapsed,
                engine=self.engine_name,
                model=self.model,
            )
        ]

    def next_wakeup(self) -> float | None:
        if self.state == "stopped":
            return self.next_spawn_at
        return self.deadline
