"""Intake: notice candidate files (events, polling, scans) and hand them to the service.

Where files come from:
- filesystem events (watchdog's inotify observer) when the inbox is on a local filesystem;
- our `Poller` on network and FUSE filesystems, where inotify sees nothing written by other hosts
  (`watch.mode: auto` decides per filesystem, see `mounts.choose_watch_mode`; a network mount
  *below* a local inbox is polled while the rest gets events);
- a scan of the whole tree at startup (files dropped while we were down) and every
  `rescan_interval_s`, the safety net for everything below.
Callbacks (watchdog's thread, the poller's thread) only put paths on a queue and wake the main
loop; the service's single loop does everything else (a slow handler must never stall delivery).

Going blind is the failure this module exists to prevent, so each way inotify can fail is handled:
- no inotify instance or no watch for the inbox (`max_user_instances` / `max_user_watches`:
  EMFILE / ENOSPC): poll instead, with one warning;
- watches for only part of the tree (watchdog swallows ENOSPC below the top folder): found by
  counting watches in /proc/self/fdinfo against folders at start; poll instead, one warning;
- the kernel's event queue overflowed (events lost): watchdog 7 logs it; a logging filter turns
  that into a rescan of the inbox, with one warning. (watchdog 6 drops the overflow silently:
  there only the periodic rescan finds what was lost.) Overflows that keep coming (watchdog
  re-adds a watch per folder after each, which on a big tree overflows the queue again): poll;
- watchdog cannot walk the tree (RecursionError: Python 3.11's os.walk recurses per level, and a
  share user can make a tree 1,100 levels deep), at start or later, when one of its threads dies
  of it: poll instead, one warning; the loop checks watchdog's threads every tick.

No folder shape may stall the main loop (systemd's watchdog would kill the daemon) or crash it
(design §9): walks are iterative, scans and the stability tracker work in slices of
TICK_BUDGET_S per tick, the poller works on its own thread at a bounded duty cycle, nothing
descends more than MAX_DEPTH folders, and no symlink is ever followed below the inbox.

When a candidate is ready to be claimed is `readiness.py`'s business; the poller is
`poller.py`. What follows a claim (a writer on another host still at it) is the service's: it
compares signatures before claiming and OCRs a file again if it changed after the claim.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from watcherd.core.settings import WatchSettings
from watcherd.intake import mounts
from watcherd.intake.filter import MAX_DEPTH, Complaints, PathFilter
from watcherd.intake.poller import Poller, claimable
from watcherd.intake.readiness import TICK_BUDGET_S
from watcherd.intake.scan import MAX_CANDIDATES_PER_TICK, Scan

# watchdog holds an unmatched IN_MOVED_FROM for 0.5 s, hoping for its IN_MOVED_TO, and every later
# event waits behind it. Each archived original leaves the watched tree that way (processing →
# archive), so back-to-back scans waited 0.5 s extra each. The two halves of a move inside the
# tree come in the same read from the kernel, so 50 ms still pairs them.
InotifyMoveEventGrouper.delay = 0.05

log = logging.getLogger("watcherd")


# -- events ----------------------------------------------------------------------------------


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: only enqueue, then wake the main loop."""

    def __init__(self, events: queue.SimpleQueue[Path], wake: Callable[[], None]):
        self.events = events
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        if event.is_directory and event.event_type not in ("created", "moved"):
            # A folder's "modified" event comes with every file created in it; passing it on would
            # rescan the whole folder (and everything below) per file dropped.
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        self.events.put(Path(os.fsdecode(path)))
        self.wake()


class _OverflowFilter(logging.Filter):
    """watchdog 7 reports a kernel queue overflow only as a log warning (and rebuilds its watches);
    turn that record into a rescan request, and drop it: Intake logs its own single warning."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__()
        self.on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in str(record.msg).lower():
            self.on_overflow()
            return False
        return True


WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
INOTIFY_LIMIT_ERRORS = (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM)


class Intake:
    """Candidate paths from events, polling and scans; the service asks `drain()` for them.

    `mode` is "events" or "polling" (what the inbox itself gets) and `reason` says why, in words
    an operator can act on; both may change in `start()` if inotify fails, and later if
    watchdog's threads die (`drain` checks them every tick).

    Scans (the startup scan, the periodic rescan, a folder that appeared) are `scan.Scan`'s:
    resumable, a slice per tick. Events are served before scan work, so a scan dropped into the
    inbox is tracked at once even while a big scan is in progress.
    """

    def __init__(
        self,
        inbox: Path,
        watch: WatchSettings,
        *,
        wake: Callable[[], None] = lambda: None,
        mountinfo: str = "/proc/self/mountinfo",
    ):
        self.inbox = inbox
        self.watch = watch
        self.filter = PathFilter(watch)
        self.plan = mounts.choose_watch_mode(inbox, watch.mode, recursive=watch.recursive, mountinfo=mountinfo)
        self.mode = self.plan.mode
        self.reason = self.plan.reason
        self._events: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._observer: BaseObserver | None = None
        self._poller: Poller | None = None
        self._overflow = _OverflowFilter(self._on_overflow)
        self._rescan_requested = threading.Event()
        self._overflows = 0
        self._overflow_times: list[float] = []
        self._wake = wake
        self.complaints = Complaints()
        self._scan = Scan(inbox, self.filter, self.complaints)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching. Call from the main thread (it makes SIGIO harmless, see `open_for_writing`)."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGIO) == signal.SIG_DFL:
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        if self.mode == "events":
            self._start_events()
        if self.mode == "polling":
            self._start_poller([self.inbox])
        elif self.plan.poll_also:
            self._start_poller(list(self.plan.poll_also))
        log.info("Watch mode: %s (%s)", self.mode, self.reason)

    def stop(self) -> None:
        """Stop the watchers (observer, poller); scan work in progress is kept."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
            self._remove_overflow_filter()
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _start_events(self) -> None:
        watches = mounts.inotify_limits()["max_user_watches"]
        if self.watch.recursive and watches is not None:
            # More folders than watches: watchdog would spend its start adding watches one by one
            # (300,000 folders: 40 s before the loop ran) and still leave part of the tree blind.
            folders = 1 + mounts.count_folders(self.inbox, limit=watches)
            if folders > watches:
                self._fall_back(self._limit_reason(OSError(errno.ENOSPC, "too many folders"), (watches, folders)))
                return
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).addFilter(self._overflow)
        observer: BaseObserver | None = None
        try:
            observer = Observer()  # watchdog 7 creates its inotify instance here (EMFILE)
            observer.schedule(_Handler(self._events, self._wake), str(self.inbox), recursive=self.watch.recursive)
            observer.daemon = True
            observer.start()
        except (OSError, RecursionError) as exc:
            if isinstance(exc, OSError) and exc.errno not in INOTIFY_LIMIT_ERRORS:
                raise
            if observer is not None:
                observer.stop()  # closes its inotify instance; never started, so nothing to join
            self._remove_overflow_filter()
            if isinstance(exc, RecursionError):
                # Python 3.11's os.walk recurses once per folder level; watchdog walks the tree
                # with it to add watches, so a tree ~1,000 levels deep made every start exit 1.
                self._fall_back(TOO_DEEP)
            else:
                self._fall_back(self._limit_reason(exc))
            return
        self._observer = observer
        if self.watch.recursive:
            missing = self._unwatched_folders()
            if missing:
                self._fall_back(self._limit_reason(OSError(errno.ENOSPC, "inotify watch limit reached"), missing))

    def _remove_overflow_filter(self) -> None:
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).removeFilter(self._overflow)

    def _start_poller(self, roots: list[Path]) -> None:
        self._poller = Poller(
            self.inbox,
            roots,
            self.filter,
            interval_s=self.watch.poll_interval_s,
            emit=self._emit,
            complaints=self.complaints,
        )
        self._poller.start()

    def _emit(self, path: Path) -> None:
        self._events.put(path)
        self._wake()

    def _fall_back(self, why: str, *, from_loop: bool = False) -> None:
        """inotify failed: poll the whole inbox instead, and say so once.

        `from_loop`: called by the main loop while running. Stopping watchdog's observer joins
        its threads, which may be busy re-adding a watch per folder of a huge tree (seconds), so
        a helper thread does that; the loop goes on at once."""
        if from_loop and self._observer is not None:
            observer, self._observer = self._observer, None
            # The overflow filter stays until the observer is gone: watchdog's own overflow
            # warnings, which we fold into ours, keep coming while it winds down.
            threading.Thread(
                target=_stop_observer,
                args=(observer, self._remove_overflow_filter),
                name="watcherd-observer-stop",
                daemon=True,
            ).start()
        self.stop()
        self.mode = "polling"
        self.reason = f"{why}; polling instead (was: {self.reason})"
        log.warning("inotify failed: %s", self.reason)

    def _observer_died(self) -> bool:
        """True if one of watchdog's threads is dead: its observer (dispatch), an emitter, or the
        thread reading the inotify descriptor. Any of them dying leaves the daemon blind without
        a word (a tree too deep for the recursive os.walk it runs when a folder appears did it)."""
        observer = self._observer
        if observer is None:
            return False
        threads: list[threading.Thread] = [observer, *observer.emitters]
        reader = getattr(observer, "_inotify_fd", None)  # watchdog 7's InotifyObserver
        if isinstance(reader, threading.Thread):
            threads.append(reader)
        return any(not t.is_alive() for t in threads)

    def _check_observer(self) -> None:
        if self._observer is None:
            return
        if len(self._overflow_times) >= OVERFLOW_STORM:
            # watchdog answers an overflow by removing and re-adding one watch per folder; past
            # max_queued_events folders (20,000 folders moved in at once) that overflows the queue
            # again, for ever: two threads spinning and a full rescan every second.
            limit = mounts.inotify_limits()["max_queued_events"]
            self._overflow_times = []
            self._fall_back(
                from_loop=True,
                why=f"the inotify event queue overflowed {OVERFLOW_STORM} times within {OVERFLOW_STORM_S:g} s "
                f"(fs.inotify.max_queued_events = {limit}; watchdog re-adds a watch per folder after each "
                "overflow, which on a big tree overflows it again)",
            )
        elif self._observer_died():
            self._fall_back(
                "a watchdog thread died (its error is logged above; a folder tree too deep for its recursive "
                "walk does this)",
                from_loop=True,
            )
        else:
            return
        self._start_poller([self.inbox])
        self.request_scan()  # whatever arrived since the thread died

    @staticmethod
    def _limit_reason(exc: OSError, missing: tuple[int, int] | None = None) -> str:
        limits = mounts.inotify_limits()
        if exc.errno == errno.EMFILE:
            what = f"no inotify instance left (fs.inotify.max_user_instances = {limits['max_user_instances']})"
        elif exc.errno == errno.ENOSPC:
            what = f"inotify watch limit reached (fs.inotify.max_user_watches = {limits['max_user_watches']})"
        else:
            what = f"inotify could not start ({exc.strerror or exc})"
        if missing:
            what += f": at most {missing[0]} of at least {missing[1]} folders can be watched"
        return what + "; raise the limit with sysctl to get events back"

    def _unwatched_folders(self) -> tuple[int, int] | None:
        """(watched, folders) if watchdog silently left folders unwatched, else None."""
        shortfall = None
        for _ in range(2):  # a folder created or removed meanwhile must not look like a shortfall
            watched = mounts.inotify_watch_count()
            if watched is None:
                return None
            # Counting past `watched` tells nothing more; on a huge tree it would only cost time.
            folders = 1 + mounts.count_folders(self.inbox, limit=watched)
            if folders <= watched:
                return None
            shortfall = (watched, folders)
        return shortfall

    def _on_overflow(self) -> None:
        """Called on watchdog's thread: request a rescan and wake the loop; one warning."""
        self._overflows += 1
        now = time.monotonic()
        self._overflow_times = [t for t in self._overflow_times if now - t < OVERFLOW_STORM_S] + [now]
        if self._overflows == 1:
            limit = mounts.inotify_limits()["max_queued_events"]
            log.warning(
                "inotify event queue overflowed (fs.inotify.max_queued_events = %s): events were lost; "
                "rescanning %s (later overflows are logged at info level)",
                limit,
                self.inbox,
            )
        else:
            log.info("inotify event queue overflowed again (%d times); rescanning", self._overflows)
        self._rescan_requested.set()
        self._wake()

    # -- candidates ------------------------------------------------------------------------

    def request_scan(self, top: Path | None = None) -> None:
        """Queue a scan of `top` (default: the whole inbox); `drain` does it, a slice per tick."""
        self._scan.request(str(top or self.inbox))

    def drain(self, budget_s: float = TICK_BUDGET_S) -> list[Path]:
        """Candidate files from events, polling and scans since the last call, for about
        `budget_s` of work: events first, then scan work. What is left waits for the next call,
        and the loop is woken at once so that the next call comes without delay."""
        deadline = time.perf_counter() + budget_s
        self._check_observer()
        if self._rescan_requested.is_set():
            self._rescan_requested.clear()
            self.request_scan()
        self._drain_events(deadline - (budget_s / 2 if self._scan.busy else 0.0))
        self._scan.work(deadline)
        out = self._scan.take(MAX_CANDIDATES_PER_TICK)
        if self._scan.busy or not self._events.empty():
            self._wake()
        return out

    def _drain_events(self, deadline: float) -> None:
        for n in itertools.count():
            if n % 64 == 63 and time.perf_counter() > deadline:
                return
            try:
                path = self._events.get_nowait()
            except queue.Empty:
                return
            rel = self._rel_parts(path)
            if rel is None:
                continue
            if self.filter.wanted(rel):
                if claimable(os.path.dirname(path), self.complaints):
                    self._scan.found.append(path)
            elif (
                self.watch.recursive
                and len(rel) <= MAX_DEPTH
                and not any(self.filter.ignored_component(p) for p in rel)
                and _is_real_folder(path)
                and not self._scan.covered(str(path))
            ):
                self.request_scan(path)

    def _rel_parts(self, path: Path) -> tuple[str, ...] | None:
        try:
            return path.relative_to(self.inbox).parts
        except ValueError:
            return None


OVERFLOW_STORM, OVERFLOW_STORM_S = 3, 60.0  # this many queue overflows within this long: poll instead
TOO_DEEP = (
    "the inbox holds a folder tree too deep for watchdog's inotify backend (it walks folders "
    "recursively and hit Python's recursion limit)"
)


def _stop_observer(observer: BaseObserver, then: Callable[[], None]) -> None:
    observer.stop()
    observer.join(timeout=60)
    then()


def _is_real_folder(path: Path) -> bool:
    """A folder, not a symlink to one (lstat: the last component is never followed)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
