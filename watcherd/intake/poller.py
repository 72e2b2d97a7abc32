"""Our poller, for filesystems without usable events (NFS, SMB, FUSE), and the once-per-folder
complaints it shares with the rest of intake. See `Poller` for why it is not watchdog's.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from watcherd.intake.filter import Complaints

log = logging.getLogger("watcherd")

if TYPE_CHECKING:
    from watcherd.intake.filter import PathFilter

# A directory's mtime is trusted to reveal every later change only once this long has passed since
# we first saw its value: a file created in the same timestamp tick as our listing leaves the mtime
# unchanged (2 s is FAT's granularity, the coarsest a NAS may report; ext4/NFS/SMB are finer).
MTIME_GRANULARITY_S = 2.0


# -- complaints: each problem with a folder is logged once, until it goes away ------------------


def claimable(folder: str, complaints: Complaints) -> bool:
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

# Most of one core the poller may use: a pass over a huge tree (300,000 folders: about a second
# of stat calls) is followed by a pause this long relative to it, however short poll_interval_s.
POLL_DUTY = 0.1
MAX_POLL_PAUSE_S = 30.0  # ... but a new file is never left unseen for longer than this plus a pass


class _Dir:
    """What the poller remembers of one folder. Small on purpose (one per folder, and a share may
    hold 300,000): no set of child names, which the pass order makes unnecessary (see `poll`)."""

    __slots__ = ("parent", "key", "first_seen", "settled", "verified")

    def __init__(self, parent: _Dir | None) -> None:
        self.parent = parent  # None for a root
        self.key: int | None = None  # hash of (mtime_ns, ctime_ns, ino, dev) at the last listing
        self.first_seen = 0.0  # when `key` was first seen (monotonic)
        self.settled = False  # the listing is known to reflect `key`
        self.verified = -1  # the pass in which lstat last showed a real folder here


class Poller:
    """Finds new files on filesystems without usable events, at a cost that does not grow with
    the number of files.

    watchdog's PollingObserver stats every file of the tree every interval (100,000 files: 100,000
    stat calls every 2 s, each a round trip on NFS). This poller stats each *folder* once per
    interval and lists a folder only when its mtime/ctime changed (creating, deleting or renaming
    an entry changes the folder's mtime on every filesystem we support, including NFS, SMB and
    FUSE). A listing uses the d_type from readdir, so no per-file stat either. Growth of a file
    already found is the StabilityTracker's business, not the poller's. A steady pass that takes
    long (a huge tree) is followed by a pause nine times as long (at most MAX_POLL_PAUSE_S), with
    one warning: at rest the poller uses about POLL_DUTY of a core at most.

    Symlinks are never followed (design §9): folders below the roots are checked with lstat, and a
    folder is looked at only after its parent was seen as a real folder in the same pass, so a
    subfolder swapped for a symlink to elsewhere is dropped with everything below it, never listed.

    Every listing reports all wanted names in the folder (not only new ones): a file claimed and
    replaced by another of the same name within one interval is still seen, and the service
    ignores names it already tracks or queued. `stat` (an lstat) and `scandir` are injectable.
    """

    def __init__(
        self,
        inbox: Path,
        roots: Iterable[Path],
        path_filter: PathFilter,
        *,
        interval_s: float,
        emit: Callable[[Path], None],
        complaints: Complaints | None = None,
        clock: Callable[[], float] = time.monotonic,
        stat_fn: Callable[[str], os.stat_result] = os.lstat,
        scandir: Callable[[str], Iterator[os.DirEntry[str]]] = os.scandir,
    ):
        self.inbox = inbox
        self.filter = path_filter
        self.interval_s = interval_s
        self.emit = emit
        self.complaints = complaints or Complaints()
        self.clock = clock
        self.stat = stat_fn
        self.scandir = scandir
        self.roots = [str(r) for r in roots]
        self._roots = set(self.roots)
        self._inbox = str(inbox)
        self._dirs: dict[str, _Dir] = {root: _Dir(None) for root in self.roots}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slow_warned = False
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
            listed = 0
            try:
                listed = self.poll()
            except Exception:  # never let the poller die silently: the daemon would go blind
                log.exception("Polling %s failed; trying again in %g s", self.inbox, self.interval_s)
            self._stop.wait(self._pause(self.clock() - started, listed))

    def _pause(self, elapsed: float, listed: int) -> float:
        if listed * 10 > len(self._dirs):
            # Mostly listings (the first pass, a pile of new folders settling): real work that
            # ends by itself, and not what a steady pass costs; pacing on it once meant 208 s.
            return max(0.0, self.interval_s - elapsed)
        pause = max(self.interval_s - elapsed, min(elapsed * (1 - POLL_DUTY) / POLL_DUTY, MAX_POLL_PAUSE_S))
        if pause > self.interval_s - elapsed and not self._slow_warned:
            self._slow_warned = True
            log.warning(
                "Polling %d folders below %s takes %.1f s a pass: polling every %.1f s instead of every "
                "%g s, to keep the poller under %d%% of a core (fewer folders, or events, would be faster)",
                len(self._dirs),
                self.inbox,
                elapsed,
                elapsed + pause,
                self.interval_s,
                round(POLL_DUTY * 100),
            )
        return pause

    def poll(self) -> int:
        """One pass: stat every known folder, list the changed ones; returns how many were listed.

        Folders are visited in the order they were found, so a parent always comes before its
        children: a folder whose parent is gone or is no longer a real folder (replaced by a
        symlink) is dropped without being looked at, and so, in turn, is everything below it.
        """
        self.polls += 1
        listed = 0
        now = self.clock()
        order = list(self._dirs.items())
        i = 0
        while i < len(order):
            path, folder = order[i]
            i += 1
            if self._dirs.get(path) is not folder:
                continue  # dropped earlier in this pass
            parent = folder.parent
            if parent is not None and parent.verified != self.polls:
                self._dirs.pop(path, None)  # its parent is gone, or no longer a real folder
                continue
            new = self._check(path, folder, now)
            if new is None:
                continue
            listed += 1
            order.extend(new)
        self.listings += listed
        return listed

    def _check(self, path: str, folder: _Dir, now: float) -> list[tuple[str, _Dir]] | None:
        """lstat `path`; list it if changed. Returns new subfolders to visit, or None if not listed.
        This runs for every folder in every pass: keep it lean."""
        root = folder.parent is None
        try:
            st = self.stat(path)
            if root and stat.S_ISLNK(st.st_mode):
                st = os.stat(path)  # the configured inbox (or a mount point) may be a symlink
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not root:
                self._dirs.pop(path, None)
            else:
                self.complaints.problem("polling", path, f"Cannot poll {path}: {exc.strerror}")
            return None
        if not stat.S_ISDIR(st.st_mode):
            if not root:
                self._dirs.pop(path, None)  # a file or a symlink now: never followed
            return None
        folder.verified = self.polls
        key = hash((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
        if key == folder.key and folder.settled:
            return None
        if key != folder.key:
            folder.key, folder.first_seen = key, now
        depth = 0 if path == self._inbox else path[len(self._inbox) + 1 :].count(os.sep) + 1
        files: list[str] = []
        new: list[tuple[str, _Dir]] = []
        try:
            with self.scandir(path) as entries:  # type: ignore[attr-defined]
                for entry in entries:  # streamed: a folder of 300,000 entries is never held whole
                    if self.filter.wanted_name(entry.name, depth):
                        files.append(entry.path)
                        continue
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir and self.filter.descend(entry.name, depth, self.complaints, self.inbox):
                        if entry.path not in self._dirs:
                            child = self._dirs[entry.path] = _Dir(folder)
                            new.append((entry.path, child))
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
        if files and claimable(path, self.complaints):
            for file in files:
                self.emit(Path(file))
        return new
