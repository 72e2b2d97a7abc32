"""Intake: notice candidate files (events, polling, scans) and decide when each is ready.

Where files come from:
- filesystem events (watchdog's inotify observer) in `watch.mode: events`;
- watchdog's polling observer in `polling` (inotify sees nothing written by other NFS/SMB hosts);
- a scan of the whole tree at startup (files dropped while we were down) and every
  `rescan_interval_s` (events can be lost: queue overflow, a folder created and filled before its
  watch was added).
Watchdog callbacks run on the observer's thread and only put paths on a queue; the service's
single loop does everything else (a slow handler must never stall event delivery).

When a file is ready (`StabilityTracker`): its size and mtime have not changed for `settle_s`, and
its own structure says it is complete (`formats.looks_complete`). A file still incomplete after
`INCOMPLETE_GRACE` quiet periods is handed over anyway, so a truncated scan ends as an
`unreadable` error JSON rather than waiting forever. Symlinks, FIFOs and folders named like images
are never opened; they are ready once quiet, and the service fails them as `not_regular_file`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from . import formats
from .settings import BUILTIN_IGNORE, WatchSettings

log = logging.getLogger("watcherd")

INCOMPLETE_GRACE = 5  # quiet periods (x settle_s) an incomplete-looking file may wait


def matches_include(name: str, include: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, pattern.lower()) for pattern in include)


class PathFilter:
    """Which paths below the inbox are scans: include patterns on the name (case-insensitive),
    ignore patterns (built-in + configured) on every component of the relative path."""

    def __init__(self, watch: WatchSettings):
        self.include = watch.include
        self.ignore = tuple(p.lower() for p in BUILTIN_IGNORE + watch.ignore)
        self.recursive = watch.recursive

    def ignored_component(self, name: str) -> bool:
        lower = name.lower()
        return any(fnmatch.fnmatchcase(lower, pattern) for pattern in self.ignore)

    def wanted(self, rel_parts: tuple[str, ...]) -> bool:
        if not rel_parts or (not self.recursive and len(rel_parts) > 1):
            return False
        if any(self.ignored_component(part) for part in rel_parts):
            return False
        return matches_include(rel_parts[-1], self.include)


@dataclass
class _Tracked:
    signature: tuple[int, int, int]  # (mode, size, mtime_ns)
    quiet_since: float
    due: float


class StabilityTracker:
    """Remembers candidate files until they are ready; verbs: `track`, `ready`, `forget`.

    `clock` and `lstat` are injectable so tests can drive time instead of sleeping.
    """

    def __init__(
        self,
        settle_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        lstat: Callable[[Path], os.stat_result] = os.lstat,
        complete: Callable[[Path], bool] = formats.looks_complete,
    ):
        self.settle_s = settle_s
        self.clock = clock
        self.lstat = lstat
        self.complete = complete
        self._files: dict[Path, _Tracked] = {}

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
        self._files[path] = _Tracked(_signature(st), now, now + self.settle_s)

    def forget(self, path: Path) -> None:
        self._files.pop(path, None)

    def next_due(self) -> float | None:
        return min((t.due for t in self._files.values()), default=None)

    def ready(self) -> list[tuple[Path, tuple[int, int, int]]]:
        """Stat the files whose quiet period may be over; return those that are ready, with the
        signature they were judged on (the claim re-checks it: a change since means not ready)."""
        now = self.clock()
        out = []
        for path, tracked in list(self._files.items()):
            if tracked.due > now:
                continue
            try:
                st = self.lstat(path)
            except OSError:
                del self._files[path]  # claimed, moved away or deleted
                continue
            signature = _signature(st)
            if signature != tracked.signature:
                tracked.signature, tracked.quiet_since, tracked.due = signature, now, now + self.settle_s
                continue
            quiet = now - tracked.quiet_since
            if quiet < self.settle_s:
                tracked.due = tracked.quiet_since + self.settle_s
                continue
            if stat.S_ISREG(st.st_mode) and quiet < INCOMPLETE_GRACE * self.settle_s:
                try:
                    complete = self.complete(path)
                except OSError:
                    complete = True  # unreadable: let the child report why
                if not complete:
                    tracked.due = now + max(self.settle_s, 0.1)
                    continue
            del self._files[path]
            out.append((path, signature))
        return out


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)


def signature_of(path: Path) -> tuple[int, int, int] | None:
    try:
        return _signature(os.lstat(path))
    except OSError:
        return None


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: only enqueue, then wake the main loop."""

    def __init__(self, events: queue.SimpleQueue[Path], wake: Callable[[], None]):
        self.events = events
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        self.events.put(Path(os.fsdecode(path)))
        self.wake()


class Intake:
    """Candidate paths from events and scans; the service asks `drain()` for them."""

    def __init__(self, inbox: Path, watch: WatchSettings, *, wake: Callable[[], None] = lambda: None):
        self.inbox = inbox
        self.watch = watch
        self.filter = PathFilter(watch)
        self.mode = "polling" if watch.mode == "polling" else "events"
        self._events: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._observer: BaseObserver | None = None
        self._wake = wake

    def start(self) -> None:
        if self.mode == "polling":
            observer: BaseObserver = PollingObserver(timeout=self.watch.poll_interval_s)
        else:
            observer = Observer()
        observer.schedule(_Handler(self._events, self._wake), str(self.inbox), recursive=self.watch.recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def drain(self) -> Iterator[Path]:
        """Candidate files from events since the last call. A new folder is scanned whole: files
        moved in with their folder arrive as one event for the folder."""
        while True:
            try:
                path = self._events.get_nowait()
            except queue.Empty:
                return
            rel = self._rel_parts(path)
            if rel is None:
                continue
            if self.filter.wanted(rel):
                yield path
            elif os.path.isdir(path) and not os.path.islink(path) and not any(
                self.filter.ignored_component(p) for p in rel
            ):
                yield from self.scan(path)

    def scan(self, top: Path | None = None) -> Iterator[Path]:
        """Every candidate below `top` (default: the inbox); never follows symlinked folders."""
        top = top or self.inbox
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("Cannot list %s: %s", folder, exc.strerror)
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                rel = self._rel_parts(path)
                if rel is None:
                    continue
                if self.filter.wanted(rel):
                    yield path
                elif (
                    self.watch.recursive
                    and entry.is_dir(follow_symlinks=False)
                    and not self.filter.ignored_component(entry.name)
                ):
                    stack.append(path)

    def _rel_parts(self, path: Path) -> tuple[str, ...] | None:
        try:
            return path.relative_to(self.inbox).parts
        except ValueError:
            return None
