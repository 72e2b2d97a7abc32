"""Intake: notice candidate files (events, polling, scans) and decide when each is ready.

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
  there only the periodic rescan finds what was lost.)

When a file is ready (`StabilityTracker`): its size and mtime have not changed for `settle_s`, no
local process has it open for writing (a lease probe: smbd keeps a slow upload open, so a file
Samba created at 0 bytes waits however long the client takes), and its own structure says it is
complete (`formats.looks_complete`). A file still incomplete after `INCOMPLETE_GRACE` quiet periods
is handed over anyway, so a truncated scan ends as an `unreadable` error JSON rather than waiting
forever. Symlinks, FIFOs and folders named like images are never opened; they are ready once
quiet, and the service fails them as `not_regular_file`.

A file that changes after it was judged ready: before the claim, the service compares signatures
and starts the quiet period again. After the claim (rename into the processing area) a writer
that still holds the file open writes into the claimed inode; the child reads the file once and
the JSON's sha256 is of exactly the bytes OCR'd. The lease probe rules this out for local writers
(smbd on this host, cp, a scanner daemon); for a writer on another NFS/SMB client only the quiet
period protects, which is why `settle_s` should exceed the longest pause of the slowest scanner.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import logging
import os
import queue
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from . import formats, mounts
from .settings import BUILTIN_IGNORE, WatchSettings

# watchdog holds an unmatched IN_MOVED_FROM for 0.5 s, hoping for its IN_MOVED_TO, and every later
# event waits behind it. Each archived original leaves the watched tree that way (processing →
# archive), so back-to-back scans waited 0.5 s extra each. The two halves of a move inside the
# tree come in the same read from the kernel, so 50 ms still pairs them.
InotifyMoveEventGrouper.delay = 0.05

log = logging.getLogger("watcherd")

INCOMPLETE_GRACE = 5  # quiet periods (x settle_s) an incomplete-looking file may wait
# A directory's mtime is trusted to reveal every later change only once this long has passed since
# we first saw its value: a file created in the same timestamp tick as our listing leaves the mtime
# unchanged (2 s is FAT's granularity, the coarsest a NAS may report; ext4/NFS/SMB are finer).
MTIME_GRANULARITY_S = 2.0


def matches_include(name: str, include: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, pattern.lower()) for pattern in include)


def appledouble_companion(path: Path) -> Path:
    """`dir/._name`, where macOS clients over SMB/AFP keep `dir/name`'s resource fork and Finder
    info. Ignored by the built-in '.*' pattern; whoever archives `name` should remove it too."""
    return path.with_name(f"._{path.name}")


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


# -- readiness -------------------------------------------------------------------------------


def open_for_writing(path: Path) -> bool | None:
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
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        try:  # O_NOATIME needs ownership; try without
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
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


@dataclass
class _Tracked:
    signature: tuple[int, int, int]  # (mode, size, mtime_ns)
    quiet_since: float
    due: float


class StabilityTracker:
    """Remembers candidate files until they are ready; verbs: `track`, `ready`, `forget`.

    `clock`, `lstat`, `complete` and `busy` are injectable so tests can drive time instead of
    sleeping. `busy(path)` says whether a local writer still has the file open (None: unknown).
    """

    def __init__(
        self,
        settle_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        lstat: Callable[[Path], os.stat_result] = os.lstat,
        complete: Callable[[Path], bool] = formats.looks_complete,
        busy: Callable[[Path], bool | None] = open_for_writing,
    ):
        self.settle_s = settle_s
        self.clock = clock
        self.lstat = lstat
        self.complete = complete
        self.busy = busy
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
            if stat.S_ISREG(st.st_mode) and self.busy(path):
                # Still open for writing (smbd holding a slow upload, a scanner between pages):
                # no grace applies, the writer decides when it is done.
                tracked.due = now + max(self.settle_s, 0.1)
                continue
            if stat.S_ISREG(st.st_mode) and quiet < INCOMPLETE_GRACE * self.settle_s:
                try:
                    complete = self.complete(path)
                except OSError:
                    complete = True  # unreadable: let the child report why, once
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


# -- complaints: each problem with a folder is logged once, until it goes away ------------------


class _Complaints:
    """Log a problem about a folder once, and once more when it is fixed, not every scan.

    Keys are (what, folder): a folder can be listable and still not claimable.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def problem(self, what: str, folder: str, message: str) -> None:
        with self._lock:
            if self._open.get((what, folder)) == message:
                return
            self._open[(what, folder)] = message
        log.warning("%s", message)

    def fine(self, what: str, folder: str) -> None:
        if (what, folder) not in self._open:
            return
        with self._lock:
            if self._open.pop((what, folder), None) is None:
                return
        log.info("%s: %s works again", folder, what)


def _claimable(folder: str, complaints: _Complaints) -> bool:
    """Files can be claimed only from folders we may write to (rename removes a name there)."""
    if os.access(folder, os.W_OK | os.X_OK):
        complaints.fine("claiming", folder)
        return True
    complaints.problem(
        "claiming",
        folder,
        f"Cannot claim files in {folder}: missing write permission on the folder "
        f"(needed to move files out); its files are left alone until this is fixed",
    )
    return False


# -- the poller ------------------------------------------------------------------------------


@dataclass
class _Dir:
    rel: tuple[str, ...]  # below the inbox
    key: tuple[int, int, int, int] | None = None  # (mtime_ns, ctime_ns, ino, dev) at the last listing
    first_seen: float = 0.0  # when `key` was first seen (monotonic)
    settled: bool = False  # the listing is known to reflect `key`
    subdirs: set[str] = field(default_factory=set)


class Poller:
    """Finds new files on filesystems without usable events, at a cost that does not grow with
    the number of files.

    watchdog's PollingObserver stats every file of the tree every interval (100,000 files: 100,000
    stat calls every 2 s, each a round trip on NFS). This poller stats each *folder* once per
    interval and lists a folder only when its mtime/ctime changed (creating, deleting or renaming
    an entry changes the folder's mtime on every filesystem we support, including NFS, SMB and
    FUSE). A listing uses the d_type from readdir, so no per-file stat either. Growth of a file
    already found is the StabilityTracker's business, not the poller's.

    Every listing reports all wanted names in the folder (not only new ones): a file claimed and
    replaced by another of the same name within one interval is still seen, and the service
    ignores names it already tracks or queued. `stat` and `scandir` are injectable.
    """

    def __init__(
        self,
        inbox: Path,
        roots: Iterable[Path],
        path_filter: PathFilter,
        *,
        interval_s: float,
        emit: Callable[[Path], None],
        complaints: _Complaints | None = None,
        clock: Callable[[], float] = time.monotonic,
        stat_fn: Callable[[str], os.stat_result] = os.stat,
        scandir: Callable[[str], Iterator[os.DirEntry[str]]] = os.scandir,
    ):
        self.inbox = inbox
        self.filter = path_filter
        self.interval_s = interval_s
        self.emit = emit
        self.complaints = complaints or _Complaints()
        self.clock = clock
        self.stat = stat_fn
        self.scandir = scandir
        self.roots = [str(r) for r in roots]
        self._dirs: dict[str, _Dir] = {}
        for root in self.roots:
            rel = Path(root).relative_to(inbox).parts if root != str(inbox) else ()
            self._dirs[root] = _Dir(rel)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.listings = 0  # folders listed so far (for tests and the benchmark)

    def __len__(self) -> int:
        return len(self._dirs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watcherd-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.poll()
            except Exception:  # never let the poller die silently: the daemon would go blind
                log.exception("Polling %s failed; trying again in %g s", self.inbox, self.interval_s)
            self._stop.wait(max(0.0, self.interval_s - (self.clock() - started)))

    def poll(self) -> int:
        """One pass: stat every known folder, list the changed ones; returns how many were listed."""
        listed = 0
        pending = list(self._dirs)
        while pending:
            path = pending.pop()
            folder = self._dirs.get(path)
            if folder is None:
                continue  # dropped with a removed parent during this pass
            new = self._check(path, folder)
            if new is None:
                continue
            listed += 1
            pending.extend(new)
        self.polls += 1
        self.listings += listed
        return listed

    def _check(self, path: str, folder: _Dir) -> list[str] | None:
        """Stat `path`; list it if changed. Returns new subfolders to visit, or None if not listed."""
        try:
            st = self.stat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and path not in self.roots:
                self._drop(path)
            else:
                self.complaints.problem("polling", path, f"Cannot poll {path}: {exc.strerror}")
            return None
        if not stat.S_ISDIR(st.st_mode):
            if path not in self.roots:
                self._drop(path)
            return None
        key = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        now = self.clock()
        if key == folder.key and folder.settled:
            return None
        if key != folder.key:
            folder.key, folder.first_seen = key, now
        try:
            with self.scandir(path) as entries:  # type: ignore[attr-defined]
                found = list(entries)
        except OSError as exc:
            # Keep the key: the folder is listed again only when it changes (chmod changes ctime).
            folder.settled = True
            self.complaints.problem(
                "listing", path, f"Cannot list {path}: {exc.strerror}; files in it are not seen until this is fixed"
            )
            return None
        self.complaints.fine("polling", path)
        self.complaints.fine("listing", path)
        # The listing reflects `key` for sure only once the timestamp tick has passed (see above).
        folder.settled = now - folder.first_seen >= MTIME_GRANULARITY_S
        subdirs = set()
        files = []
        for entry in found:
            rel = (*folder.rel, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if self.filter.wanted(rel):
                files.append(entry.path)
            elif is_dir and self.filter.recursive and not self.filter.ignored_component(entry.name):
                subdirs.add(entry.name)
        if files and _claimable(path, self.complaints):
            for file in files:
                self.emit(Path(file))
        for gone in folder.subdirs - subdirs:
            self._drop(os.path.join(path, gone))
        new = []
        for name in sorted(subdirs - folder.subdirs):
            child = os.path.join(path, name)
            if child not in self._dirs:
                self._dirs[child] = _Dir((*folder.rel, name))
                new.append(child)
        folder.subdirs = subdirs
        return new

    def _drop(self, path: str) -> None:
        prefix = path + os.sep
        for known in [p for p in self._dirs if p == path or p.startswith(prefix)]:
            if known not in self.roots:
                del self._dirs[known]


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
    an operator can act on; both may change in `start()` if inotify fails.
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
        self._wake = wake
        self.complaints = _Complaints()

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
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).removeFilter(self._overflow)
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _start_events(self) -> None:
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).addFilter(self._overflow)
        observer: BaseObserver | None = None
        try:
            observer = Observer()  # watchdog 7 creates its inotify instance here (EMFILE)
            observer.schedule(_Handler(self._events, self._wake), str(self.inbox), recursive=self.watch.recursive)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            if exc.errno not in INOTIFY_LIMIT_ERRORS:
                raise
            if observer is not None:
                observer.stop()  # closes its inotify instance; never started, so nothing to join
            self._fall_back(self._limit_reason(exc))
            return
        self._observer = observer
        if self.watch.recursive:
            missing = self._unwatched_folders()
            if missing:
                self._fall_back(self._limit_reason(OSError(errno.ENOSPC, "inotify watch limit reached"), missing))

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

    def _fall_back(self, why: str) -> None:
        """inotify failed: poll the whole inbox instead, and say so once."""
        self.stop()
        self.mode = "polling"
        self.reason = f"{why}; polling instead (was: {self.reason})"
        log.warning("inotify failed: %s", self.reason)

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
            what += f": only {missing[0]} of {missing[1]} folders are watched"
        return what + "; raise the limit with sysctl to get events back"

    def _unwatched_folders(self) -> tuple[int, int] | None:
        """(watched, folders) if watchdog silently left folders unwatched, else None."""
        for _ in range(2):  # a folder created or removed meanwhile must not look like a shortfall
            folders = 1 + sum(
                1 for top, dirs, _ in os.walk(self.inbox) for d in dirs if not os.path.islink(os.path.join(top, d))
            )
            watched = mounts.inotify_watch_count()
            if watched is None or watched >= folders:
                return None
        return (watched, folders)  # type: ignore[return-value]  # not None: the loop returned otherwise

    def _on_overflow(self) -> None:
        """Called on watchdog's thread: request a rescan and wake the loop; one warning."""
        self._overflows += 1
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

    @property
    def polled_folders(self) -> int:
        return len(self._poller) if self._poller is not None else 0

    # -- candidates ------------------------------------------------------------------------

    def drain(self) -> Iterator[Path]:
        """Candidate files from events and polling since the last call. A new folder is scanned
        whole (files moved in with their folder arrive as one event for the folder), and so is the
        inbox after events were lost."""
        if self._rescan_requested.is_set():
            self._rescan_requested.clear()
            yield from self.scan()
        while True:
            try:
                path = self._events.get_nowait()
            except queue.Empty:
                return
            rel = self._rel_parts(path)
            if rel is None:
                continue
            if self.filter.wanted(rel):
                if _claimable(os.path.dirname(path), self.complaints):
                    yield path
            elif (
                os.path.isdir(path)
                and not os.path.islink(path)
                and not any(self.filter.ignored_component(p) for p in rel)
            ):
                yield from self.scan(path)

    def scan(self, top: Path | None = None) -> Iterator[Path]:
        """Every candidate below `top` (default: the inbox); never follows symlinked folders.
        A folder that cannot be listed, or whose files cannot be claimed, is reported once."""
        top = top or self.inbox
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                self.complaints.problem(
                    "listing",
                    str(folder),
                    f"Cannot list {folder}: {exc.strerror}; files in it are not seen until this is fixed",
                )
                continue
            self.complaints.fine("listing", str(folder))
            files = []
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                rel = self._rel_parts(path)
                if rel is None:
                    continue
                if self.filter.wanted(rel):
                    files.append(path)
                elif (
                    self.watch.recursive
                    and entry.is_dir(follow_symlinks=False)
                    and not self.filter.ignored_component(entry.name)
                ):
                    stack.append(path)
            if files and _claimable(str(folder), self.complaints):
                yield from files

    def _rel_parts(self, path: Path) -> tuple[str, ...] | None:
        try:
            return path.relative_to(self.inbox).parts
        except ValueError:
            return None
