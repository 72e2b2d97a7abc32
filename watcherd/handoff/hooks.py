"""Hooks: a program the operator names (`hooks.on_success`, `hooks.on_failure`), run once per
finished file after every output of it is durable.

Contract (docs/handoff.md):
- argv only, never a shell; placeholders `{json}` `{source}` ... filled from the queue entry, the
  same values as WATCHERD_JSON, WATCHERD_SOURCE, ... in the environment. The program always comes
  from the configuration, never from an entry.
- Own process group (`start_new_session`), cwd `/`, stdin /dev/null, the daemon's environment
  (NOTIFY_SOCKET and the watchdog variables are already gone: `Notifier(unset_environment=True)`).
  Past `hooks.timeout_s` the whole group gets SIGKILL; at most `hooks.max_parallel` run at once,
  the rest wait in the durable queue.
- stdout and stderr go to an unlinked temp file in the queue folder (a pipe nobody reads would
  block the hook); the last OUTPUT_TAIL_BYTES are logged, escaped by the log formatter.
- The main loop never waits: `tick()` starts, polls and kills; a small thread per running hook
  waits for it and wakes the loop, so an exit is seen at once.
- An entry is removed when its hook has ended (whatever the exit code: a hook is never run twice
  for one file on a normal run). After kill -9 of the daemon, a hook that had not ended runs once
  more at the next start: at-least-once across crashes.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from watcherd.core import logs
from watcherd.core.settings import HOOK_PLACEHOLDERS, HooksSettings
from watcherd.handoff.mailbox import BadEntry, Mailbox

log = logging.getLogger("watcherd")

OUTPUT_TAIL_BYTES = 4096
STOP_GRACE_S = 5.0
SPAWN_RETRY_S = 5.0  # after fork/exec failed for want of resources (EAGAIN, ENOMEM, EMFILE)
# A program that cannot be started for one of these reasons cannot be by trying again.
CANNOT_START = {
    errno.ENOENT,
    errno.EACCES,
    errno.ENOEXEC,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EPERM,
    errno.ELOOP,
}  # at shutdown, how long running hooks may take before they are killed
# Not passed on to hooks: systemd's, for the daemon alone (a hook sending READY=1 would lie).
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@dataclass
class Running:
    name: str
    source: str
    proc: subprocess.Popen[bytes]
    started: float
    deadline: float
    output: IO[bytes]
    killed: str | None = None  # why, once SIGKILL was sent
    waiter: threading.Thread | None = field(default=None, repr=False)


class HookRunner:
    def __init__(
        self,
        settings: HooksSettings,
        mailbox: Mailbox,
        *,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.mailbox = mailbox
        self.wake = wake
        self.clock = clock
        self.queue: collections.deque[str] = collections.deque()
        self.running: dict[str, Running] = {}
        self.counts = {"done": 0, "failed": 0}  # outcomes since start (for status and metrics)
        self._spawn_retry_at: float | None = None
        self._queued: set[str] = set()  # the queue's names, for add()'s check
        self._stopping = False

    def configured(self, *, ok: bool) -> bool:
        return (self.settings.on_success if ok else self.settings.on_failure) is not None

    def open(self) -> None:
        """Queue what a previous run left: hooks not yet run, or not ended when it died."""
        self.mailbox.open()
        left = self.mailbox.names()
        if left:
            log.info("%d hook(s) left from the previous run are queued (at-least-once across crashes)", len(left))
        for name in left:
            self.add(name)

    def add(self, name: str) -> None:
        if name not in self.running and name not in self._queued:
            self.queue.append(name)
            self._queued.add(name)

    def backlog(self) -> int:
        return len(self.queue)

    def next_wakeup(self) -> float | None:
        deadlines = [r.deadline for r in self.running.values() if r.killed is None]
        if self._spawn_retry_at is not None and self.queue:
            deadlines.append(self._spawn_retry_at)
        return min(deadlines) if deadlines else None

    def tick(self) -> None:
        now = self.clock()
        for run in list(self.running.values()):
            code = run.proc.poll()
            if code is not None:
                self._ended(run, code, now)
            elif run.killed is None and now >= run.deadline:
                self._kill(run, f"ran past hooks.timeout_s ({self.settings.timeout_s:g} s)")
        if self._stopping or (self._spawn_retry_at is not None and now < self._spawn_retry_at):
            return
        self._spawn_retry_at = None
        while self.queue and len(self.running) < self.settings.max_parallel and self._spawn_retry_at is None:
            name = self.queue.popleft()
            self._queued.discard(name)
            self._start(name, now)

    def stop(self) -> None:
        """Give running hooks STOP_GRACE_S, then kill their groups; a killed hook's entry stays,
        so it runs again at the next start. Hooks still queued wait for the next start too."""
        self._stopping = True  # start nothing new
        deadline = self.clock() + STOP_GRACE_S
        while self.running and self.clock() < deadline:
            self.tick()
            time.sleep(0.05)  # shutdown only: the loop has ended
        for run in list(self.running.values()):
            self._kill(run, "still running at shutdown; it runs again at the next start")
            try:
                code = run.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # unkillable (D state): leave it, keep the entry
                continue
            self._ended(run, code, self.clock(), keep_entry=True)
        self.mailbox.close()

    # -- one hook ----------------------------------------------------------------------------

    def _start(self, name: str, now: float) -> None:
        try:
            payload = self.mailbox.get(name)
        except FileNotFoundError:
            return
        except (BadEntry, OSError) as exc:
            self.mailbox.set_aside(name, str(exc))
            return
        values = payload.get("values")
        if not isinstance(values, dict) or set(values) != set(HOOK_PLACEHOLDERS):
            self.mailbox.set_aside(name, "its values are not the placeholders'")
            return
        values = {k: not_an_option(str(v)) for k, v in values.items()}
        ok = values["status"] != "failed"
        template = self.settings.on_success if ok else self.settings.on_failure
        source = values["source"]
        if template is None:
            log.info("%s: no hooks.%s configured any more; its hook is dropped", source, _key(ok))
            self.mailbox.remove(name)
            return
        argv = [arg.format_map(values) for arg in template]
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env.update({f"WATCHERD_{k.upper()}": v for k, v in values.items()})
        output = tempfile.TemporaryFile(dir=self.mailbox.folder, prefix=".out-")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=env,
                start_new_session=True,  # own process group: killpg reaches what it starts
                close_fds=True,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument
            output.close()
            if (
                isinstance(exc, OSError) and exc.errno not in CANNOT_START
            ):  # out of processes, memory or descriptors: later
                log.warning("%s: cannot start its hook now (%s); trying again in %g s", source, exc, SPAWN_RETRY_S)
                self.queue.appendleft(name)
                self._queued.add(name)
                self._spawn_retry_at = now + SPAWN_RETRY_S
                return
            self.counts["failed"] += 1  # missing, not executable, a folder: trying again cannot help
            logs.event(
                "hook_failed",
                f"{source}: hooks.{_key(ok)} cannot start {template[0]}: {getattr(exc, 'strerror', None) or exc}",
                level=logging.ERROR,
                source=source,
            )
            self.mailbox.remove(name)
            return
        run = Running(name, source, proc, now, now + self.settings.timeout_s, output)
        run.waiter = threading.Thread(target=self._wait_for, args=(proc,), name="watcherd-hook", daemon=True)
        run.waiter.start()
        self.running[name] = run

    def _wait_for(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # leaves reaping to poll()
        except ChildProcessError:
            pass
        self.wake()

    def _kill(self, run: Running, why: str) -> None:
        if run.killed is not None:
            return
        run.killed = why
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _ended(self, run: Running, code: int, now: float, *, keep_entry: bool = False) -> None:
        del self.running[run.name]
        if run.killed is not None:  # the rest of its group too (it may have left children)
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output = _tail(run.output)
        duration = now - run.started
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        said = f"; output: {output}" if output else ""
        if code == 0 and run.killed is None:
            self.counts["done"] += 1
            logs.event("hook_done", f"{run.source}: hook ended ({how}, {duration:.2f} s){said}", source=run.source)
        else:
            self.counts["failed"] += 1
            why = f", {run.killed}" if run.killed else ""
            logs.event(
                "hook_failed",
                f"{run.source}: hook failed ({how}{why}, {duration:.2f} s){said}",
                level=logging.ERROR,
                source=run.source,
            )
        if not keep_entry:
            self.mailbox.remove(run.name)


def _key(ok: bool) -> str:
    return "on_success" if ok else "on_failure"


def _tail(output: IO[bytes]) -> str:
    size = 0
    try:
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - OUTPUT_TAIL_BYTES))
        data = output.read(OUTPUT_TAIL_BYTES)
    except OSError:
        data = b""
    finally:
        output.close()
    text = data.decode("utf-8", "replace").strip()
    return ("…" + text if size > OUTPUT_TAIL_BYTES else text) if text else ""


def not_an_option(value: str) -> str:
    """A value as no program can take it for an option: `{source}` is the uploader's path below
    the inbox, and a folder named `--use-compress-program=sh -c '...' #` made `tar` run a shell
    command. A relative path that starts with `-` gets `./` in front (the same file); the other
    placeholders are absolute paths or the daemon's own words and never start with `-`."""
    return f"./{value}" if value.startswith("-") else value
