"""Readiness: when a candidate file is completely written and may be claimed (`StabilityTracker`).

Its size and mtime have not changed for `settle_s`, no local process has it open for writing (a
lease probe: smbd keeps a slow upload open, so a file Samba created at 0 bytes waits however long
the client takes), and its own structure says it is complete (`sniff.looks_complete`, within a
fixed budget). A file still incomplete after `INCOMPLETE_GRACE` quiet periods is handed over
anyway, so a truncated scan ends as an `unreadable` error JSON rather than waiting forever.
Symlinks, FIFOs and folders named like images are never opened; they are ready once quiet. Work
per tick is bounded (`TICK_BUDGET_S`): 200,000 junk files once held the main loop 31 s.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import heapq
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

from watcherd.core import safefs, sniff
from watcherd.core.records import signature

log = logging.getLogger("watcherd")

INCOMPLETE_GRACE = 5  # quiet periods (x settle_s) an incomplete-looking file may wait


def opener_below(root: Path) -> sniff.Opener:
    """`os.open` for paths below `root` that follows no link on the way (safefs): a folder swapped
    for a link between a file's lstat and its open cannot make the parent open (and read, or
    take a lease on) something outside the inbox, a device node say."""

    def open_below(path: str | os.PathLike[str], flags: int) -> int:
        try:
            *folders, name = Path(path).relative_to(root).parts
        except ValueError:
            raise OSError(errno.EXDEV, "not below the inbox", str(path)) from None
        with safefs.folder(root, folders) as fd:
            return os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)

    return open_below


def open_for_writing(path: Path, opener: sniff.Opener = os.open) -> bool | None:
    """True if some process on this host has `path` open for writing; None if we cannot tell.

    Asks the kernel for a read lease, which it refuses (EAGAIN) while any writer has the file
    open. Needs the file's owner or CAP_LEASE (else EACCES: unknown) and a filesystem with leases
    (NFS/SMB/FUSE clients only know about local openers, if anything). Taking a lease makes the
    kernel send SIGIO to us if a writer opens the file in the microseconds we hold it; SIGIO's
    default action kills the process, so the probe runs only once SIGIO is ignored or handled
    (`Intake.start` ignores it).
    """
    if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
        return None
    try:
        fd = opener(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        try:  # O_NOATIME needs ownership; try without
            fd = opener(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        os.close(fd)
        return True if exc.errno == errno.EAGAIN else None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)
    return False


# The main loop's share of one tick for each kind of intake work. systemd kills a daemon whose
# loop misses WatchdogSec; a junk pile (300,000 folders moved in at once) once held the loop for
# 79 s in one listing. Work beyond the slice waits for the next tick, which comes at once.
TICK_BUDGET_S = 0.05


class _Tracked:
    __slots__ = ("signature", "quiet_since", "due")

    def __init__(self, signature: tuple[int, int, int], quiet_since: float, due: float):
        self.signature = signature  # (mode, size, mtime_ns)
        self.quiet_since = quiet_since
        self.due = due


class StabilityTracker:
    """Remembers candidate files until they are ready; verbs: `track`, `ready`, `forget`.

    `clock`, `lstat`, `complete` and `busy` are injectable so tests can drive time instead of
    sleeping. `busy(path)` says whether a local writer still has the file open (None: unknown).

    Files wait in a heap ordered by when they are next due, so a tick looks only at files that
    are due, and `ready()` stops after `budget_s` of real time (200,000 junk files statted in one
    call held the main loop 31 s): the rest stay due and are looked at in the next tick.
    """

    def __init__(
        self,
        settle_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        lstat: Callable[[Path], os.stat_result] = os.lstat,
        complete: Callable[[Path], bool] | None = None,
        busy: Callable[[Path], bool | None] | None = None,
        root: Path | None = None,
    ):
        """`root` (the inbox): files are opened below it without following links on the way."""
        opener = opener_below(root) if root is not None else os.open
        if complete is None:
            complete = functools.partial(sniff.looks_complete, opener=opener)
        if busy is None:
            busy = functools.partial(open_for_writing, opener=opener)
        self.settle_s = settle_s
        self.clock = clock
        self.lstat = lstat
        self.complete = complete
        self.busy = busy
        self._files: dict[Path, _Tracked] = {}
        # (due, seq, path); an entry is stale when the file was forgotten or re-armed since.
        self._heap: list[tuple[float, int, Path]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path: Path) -> bool:
        return path in self._files

    def track(self, path: Path) -> None:
        """Start (or keep) watching `path`; a known file is not reset by repeated events."""
        if path in self._files:
            return
        try:
            st = self.lstat(path)
        except OSError:
            return
        now = self.clock()
        tracked = _Tracked(signature(st), now, now + self.settle_s)
        self._files[path] = tracked
        self._arm(path, tracked)

    def forget(self, path: Path) -> None:
        self._files.pop(path, None)

    def oldest_since(self) -> float | None:
        """When (clock) the longest-tracked file still being written was last seen changing; O(n),
        for metrics (a file that keeps growing is young by this measure: it is still arriving)."""
        return min((t.quiet_since for t in self._files.values()), default=None)

    def _arm(self, path: Path, tracked: _Tracked) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (tracked.due, self._seq, path))

    def _stale(self, entry: tuple[float, int, Path]) -> bool:
        tracked = self._files.get(entry[2])
        return tracked is None or tracked.due != entry[0]

    def next_due(self) -> float | None:
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def ready(self, budget_s: float | None = None) -> list[tuple[Path, tuple[int, int, int]]]:
        """Stat the files whose quiet period may be over; return those that are ready, with the
        signature they were judged on (the claim re-checks it: a change since means not ready).
        With `budget_s`, stop after that much real time; `next_due()` then says more are due."""
        now = self.clock()
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        out = []
        looked = 0
        while self._heap and self._heap[0][0] <= now:
            if deadline is not None and looked and time.perf_counter() > deadline:
                break
            entry = heapq.heappop(self._heap)
            if self._stale(entry):
                continue
            looked += 1
            path = entry[2]
            tracked = self._files[path]
            signature = self._judge(path, tracked, now)
            if signature is not None:
                out.append((path, signature))
            elif path in self._files:
                self._arm(path, tracked)
        return out

    def _judge(self, path: Path, tracked: _Tracked, now: float) -> tuple[int, int, int] | None:
        """The signature if `path` is ready (and forgotten); else None: it left (forgotten too),
        or it waits with its `due` moved on."""
        try:
            st = self.lstat(path)
        except OSError:
            del self._files[path]  # claimed, moved away or deleted
            return None
        seen = signature(st)
        if seen != tracked.signature:
            tracked.signature, tracked.quiet_since, tracked.due = seen, now, now + self.settle_s
            return None
        quiet = now - tracked.quiet_since
        if quiet < self.settle_s:
            tracked.due = tracked.quiet_since + self.settle_s
            return None
        if stat.S_ISREG(st.st_mode) and self.busy(path):
            # Still open for writing (smbd holding a slow upload, a scanner between pages):
            # no grace applies, the writer decides when it is done.
            tracked.due = now + max(self.settle_s, 0.1)
            return None
        if stat.S_ISREG(st.st_mode) and quiet < INCOMPLETE_GRACE * self.settle_s:
            try:
                complete = self.complete(path)
            except OSError:
                complete = True  # unreadable: let the child report why, once
            if not complete:
                tracked.due = now + max(self.settle_s, 0.1)
                return None
        del self._files[path]
        return seen
