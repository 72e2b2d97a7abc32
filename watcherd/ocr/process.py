"""An OCR child as a process: started, written to, asked for its stacks, killed, reaped, and how it ended.

A child that is let go (asked to exit, or killed) goes to a `Reaper`, which polls it from the
main loop's ticks and never waits for it: a child stuck in uninterruptible sleep never stalls the
loop and its watchdog ping. Only `Reaper.wait_gone`, at exit, waits a bounded time.

On SIGUSR1 the child's faulthandler writes every thread's Python stack to a pipe of its own, even
from inside native code: on a page timeout the parent reads it before the SIGKILL, so that the
operator learns where the model hung. SIGKILL goes to the child's whole process group — the one
signal native code cannot ignore, and the one that reaches what the child started.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from watcherd.core.settings import GpuSettings, OcrSettings
from watcherd.ocr import launch, protocol
from watcherd.ocr.framing import Reader
from watcherd.ocr.launch import EngineLoadError

log = logging.getLogger("watcherd")

STACK_BYTES = 256 * 1024  # what we read of a child's stacks
EXIT_GRACE_S = 5.0  # a child asked to exit: then SIGKILL
POLL_DYING_S = 0.05  # how often a child on its way out is polled
UNKILLABLE_S = 10.0  # SIGKILLed this long ago and still there: D state (hung NFS/GPU); say so once


class Exit(enum.StrEnum):
    """How a child ended. The value is the `reason` label of `watcherd_child_exits_total`, but for
    SIGNALLED, whose label is the signal's name in lower case (sigsegv; sigkill, which the
    kernel's OOM killer sends too)."""

    TIMEOUT = "timeout"  # killed by watcherd: a page ran over ocr.timeout_s (detail: the file)
    RECYCLED = "recycled"  # ended by watcherd after ocr.recycle_after_files
    STOPPED = "stopped"  # ended by watcherd, which is stopping or retiring it (detail: that, in words)
    LOAD_FAILED = "load_failed"  # killed by watcherd: its engine did not load
    KILLED = "killed"  # killed by watcherd for another reason (detail: which, in words)
    SIGNALLED = "signal"  # killed by a signal it did not get from watcherd (detail: the signal's name)
    EXITED = "exit"  # exited by itself (detail: its exit status; "" when unknown)


@dataclass(frozen=True)
class ExitReason:
    """Why a child is gone: `str()` is the sentence for the log ("killed by SIGSEGV", "killed by
    watcherd (page timeout on a.pdf)"), `label` the metric's."""

    kind: Exit
    detail: str = ""

    @classmethod
    def of_status(cls, returncode: int | None) -> ExitReason:
        """A child that ended by itself (or by a signal not ours), from its exit status."""
        if returncode is None:
            return cls(Exit.EXITED)
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return cls(Exit.SIGNALLED, name)
        return cls(Exit.EXITED, str(returncode))

    @property
    def label(self) -> str:
        if self.kind == Exit.SIGNALLED:
            return self.detail.lower() if self.detail.isalnum() else "signal"
        return self.kind.value

    def __str__(self) -> str:
        match self.kind:
            case Exit.EXITED:
                return f"exited with status {self.detail}" if self.detail else "unknown exit status"
            case Exit.SIGNALLED:
                hint = " (perhaps out of memory?)" if self.detail == signal.SIGKILL.name else ""
                return f"killed by {self.detail}{hint}"
            case Exit.TIMEOUT:
                why = f"page timeout on {self.detail}"
            case Exit.RECYCLED:
                why = "recycling"
            case Exit.LOAD_FAILED:
                why = "engine load failed"
            case _:  # STOPPED, KILLED: the words they were given
                why = self.detail
        return f"killed by watcherd ({why})"


def describe_exit(returncode: int | None) -> str:
    """Exit status in words, the way an operator wants to read it."""
    return str(ExitReason.of_status(returncode))


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+) in (?P<func>.*)$')


def summarise_stack(text: str, frames: int = 4) -> str | None:
    """The top frames of the thread that was running the engine, from faulthandler's dump
    ("ocr (tests/engines.py:71) ← _call (watcherd/ocr/child/main.py:477)"); None without any."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if "most recent call first" in b]
    if not blocks:
        return None
    chosen = next((b for b in blocks if " in _call" in b), blocks[0])
    shown = []
    root = launch.PACKAGE_ROOT
    for line in chosen.splitlines():
        match = _FRAME.match(line)
        if match:
            path = match["file"]
            short = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
            shown.append(f"{match['func']} ({short}:{match['line']})")
        if len(shown) == frames:
            break
    return " ← ".join(shown) or None


class Child:
    """A started OCR child: its process, the pipe it writes messages to (`reader`, None once hung
    up), the one requests go to, and the one its faulthandler writes its stacks to."""

    def __init__(self, proc: subprocess.Popen[bytes], reader: Reader, writer: Connection, stacks: int):
        self.proc = proc
        self.reader: Reader | None = reader  # child → parent (non-blocking, framed)
        self._writer: Connection | None = writer  # parent → child
        self._stacks: int | None = stacks

    @classmethod
    def start(cls, ocr: OcrSettings, gpu: GpuSettings, *, device: int | None, threads: int | None) -> Child:
        """A fresh interpreter running the child; EngineLoadError (config_error) if it cannot start."""
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        stacks_r, stacks_w = os.pipe()
        os.set_blocking(stacks_r, False)
        spec = launch.child_spec(ocr, gpu, device=device, threads=threads, stack_fd=stacks_w)
        argv = launch.command(ocr, launch.CHILD_BOOTSTRAP, str(child_r), str(child_w), spec)
        try:
            proc = launch.start(
                argv,
                pass_fds=(child_r, child_w, stacks_w),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # models print; keep the protocol pipe clean
                env=launch.environment(device=device, threads=threads),
            )
        except OSError as exc:  # ocr.python missing or not executable: retrying cannot fix it
            for fd in (parent_r, parent_w, stacks_r):
                os.close(fd)
            raise EngineLoadError(
                f"ocr.python: cannot start {argv[0]}: {exc.strerror or exc}", config_error=True
            ) from None
        finally:
            for fd in (child_r, child_w, stacks_w):
                os.close(fd)
        return cls(proc, Reader(parent_r), Connection(parent_w, readable=False), stacks_r)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, request: protocol.Request) -> None:
        """Write a request; OSError if the child is gone (its pipe is closed)."""
        if self._writer is None:
            raise OSError("the pipe to the child is closed")
        self._writer.send_bytes(protocol.encode(request))

    def hang_up(self) -> None:
        """Stop reading the child (its pipe closed, or it broke the protocol)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def close(self) -> None:
        """Close every pipe to and from the child."""
        self.hang_up()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._stacks is not None:
            os.close(self._stacks)
            self._stacks = None

    def ask_for_stacks(self) -> bool:
        """SIGUSR1: the child's faulthandler writes its stacks. False if it is gone already."""
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        return True

    def read_stacks(self) -> str:
        """What the child's faulthandler wrote, up to STACK_BYTES, without waiting for more."""
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


@dataclass
class _Dying:
    """A child on its way out."""

    proc: subprocess.Popen[bytes]
    reason: ExitReason | None  # why we ended it; None: it died by itself (its exit status says how)
    kill_at: float  # SIGKILL its process group at this time if it has not exited
    killed_at: float | None = None
    said_unkillable: bool = False


class Reaper:
    """The children let go and not yet reaped: each is polled, SIGKILLed once overdue, and its
    end reported as a `child_exited` event (the sentence, and `exit_reason`: the metric's label)."""

    def __init__(self, on_event: Callable[..., None], clock: Callable[[], float]):
        self.on_event = on_event
        self.clock = clock
        self.dying: list[_Dying] = []

    def take(self, child: Child, reason: ExitReason | None, *, ask_exit: bool) -> None:
        """Let go of `child`: ask it to exit (SIGKILL after EXIT_GRACE_S) or kill its group now,
        and close its pipes."""
        now = self.clock()
        if ask_exit:
            try:
                child.send(protocol.ExitRequest())
            except OSError:
                ask_exit = False
        child.close()
        self.dying.append(_Dying(child.proc, reason, kill_at=now + EXIT_GRACE_S if ask_exit else now))
        self.reap(now)

    def reap(self, now: float) -> None:
        """Poll the children on their way out; SIGKILL the overdue; report the reaped."""
        for dying in list(self.dying):
            proc = dying.proc
            if dying.killed_at is None and now >= dying.kill_at and proc.poll() is None:
                launch.killpg(proc.pid)
                dying.killed_at = now
            returncode = proc.poll()
            if returncode is None:
                if dying.killed_at is not None and now - dying.killed_at > UNKILLABLE_S and not dying.said_unkillable:
                    dying.said_unkillable = True  # D state (hung NFS/GPU): note it, keep polling
                    log.error("OCR child %s did not die %g s after SIGKILL", proc.pid, UNKILLABLE_S)
                continue
            self.dying.remove(dying)
            launch.killpg(proc.pid)  # grandchildren the child left behind
            reason = dying.reason or ExitReason.of_status(returncode)
            self.on_event(
                "child_exited",
                f"OCR child {proc.pid} {reason}",
                child_pid=proc.pid,
                exit_reason=reason.label,
                level=logging.INFO,
            )

    def wait_gone(self, wait_s: float) -> None:
        """At exit only: wait up to `wait_s` for the dying children, then kill and reap them."""
        deadline = time.monotonic() + wait_s
        for dying in self.dying:
            try:
                dying.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for dying in self.dying:
            dying.kill_at = 0.0
        self.reap(self.clock())
        for dying in list(self.dying):
            try:
                dying.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                log.error("OCR child %s did not die after SIGKILL", dying.proc.pid)
                self.dying.remove(dying)
        self.reap(self.clock())

    def next_wakeup(self, now: float) -> float | None:
        """When to poll again: soon, or once a second when all that is left will not die."""
        if not self.dying:
            return None
        return now + (1.0 if all(d.said_unkillable for d in self.dying) else POLL_DYING_S)
