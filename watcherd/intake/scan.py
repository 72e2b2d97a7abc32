"""Scans of the inbox tree: resumable, a slice of listing per tick, never following a symlink.

A scan (the startup scan, the periodic rescan, a folder that appeared) lists folders by
descriptor for at most the time it is given and carries on at the next call, so no folder shape
(300,000 folders moved in at once, a folder of 200,000 junk files) holds the main loop. A folder
is opened with O_NOFOLLOW; a folder named by an event is opened one component at a time from the
inbox (openat, O_NOFOLLOW each); a subfolder is listed only if it is still the folder its
parent's listing showed (same device and inode, from an lstat relative to the parent's
descriptor) (design §9).
"""

from __future__ import annotations

import collections
import errno
import os
import time
from pathlib import Path

from watcherd.core import safefs
from watcherd.intake.filter import Complaints, PathFilter
from watcherd.intake.poller import claimable

MAX_CANDIDATES_PER_TICK = 2000  # the service lstats each one it is handed: bound that too


class _Listing:
    """A folder a scan is listing: open, and resumable from one tick to the next."""

    __slots__ = ("path", "depth", "fd", "entries", "claimable", "files")

    def __init__(self, path: str, depth: int, fd: int, claimable: bool):
        self.path = path
        self.depth = depth
        self.fd = fd
        self.entries = os.scandir(fd)
        self.claimable = claimable
        self.files: list[str] = []  # wanted names found so far, handed on sorted when it is done

    def close(self) -> None:
        self.entries.close()
        os.close(self.fd)


class Scan:
    """The scan work of one inbox: folders still to list, the listing in progress, files found."""

    def __init__(self, inbox: Path, filter: PathFilter, complaints: Complaints):
        self._inbox_path = inbox
        self._top = str(inbox)
        self.filter = filter
        self.complaints = complaints
        # Folders still to list (path, depth, (st_dev, st_ino) or None for a scan's top), the same
        # paths as a set (an event for a folder already queued adds nothing: one `mv` of 300,000
        # folders brings 300,000 folder events from watchdog), the listing in progress, and files
        # found but not yet handed out.
        self._to_list: list[tuple[str, int, tuple[int, int] | None]] = []
        self._queued: set[str] = set()
        self._listing: _Listing | None = None
        self.found: collections.deque[Path] = collections.deque()

    def request(self, path: str) -> None:
        """Queue `path` (a folder at or below the inbox) to be listed."""
        if path not in self._queued:
            self._queued.add(path)
            self._to_list.append((path, self._depth(path), None))

    @property
    def busy(self) -> bool:
        """Folders still to list, a listing in progress, or files found and not yet taken."""
        return bool(self._to_list or self._listing is not None or self.found)

    def take(self, most: int) -> list[Path]:
        """Up to `most` of the files found, in the order found."""
        out: list[Path] = []
        while self.found and len(out) < most:
            out.append(self.found.popleft())
        return out

    def covered(self, path: str) -> bool:
        """Whether `path` or a folder above it waits to be listed (so `path` will be too)."""
        while len(path) > len(self._top):
            if path in self._queued:
                return True
            path = os.path.dirname(path)
        return path in self._queued

    def work(self, deadline: float) -> None:
        """List folders until `deadline`; found files go to `found`, subfolders to the folders to list."""
        n = 0
        while True:
            listing = self._listing
            if listing is None:
                if not self._to_list:
                    return
                listing = self._listing = self._open_next()
                if listing is None:
                    continue
            try:
                for entry in listing.entries:
                    n += 1
                    self._take(listing, entry)
                    if n % 64 == 0 and time.perf_counter() > deadline:
                        return
            except OSError as exc:  # readdir failed midway (EIO on a share): hand on what was seen
                self.complaints.problem("listing", listing.path, f"Cannot list {listing.path}: {exc.strerror}")
            else:
                self.complaints.fine("listing", listing.path)
            self._listing = None
            listing.close()
            self.found.extend(Path(os.path.join(listing.path, name)) for name in sorted(listing.files))
            if time.perf_counter() > deadline:
                return

    def _take(self, listing: _Listing, entry: os.DirEntry[str]) -> None:
        name = entry.name
        if self.filter.wanted_name(name, listing.depth):
            if listing.claimable:
                listing.files.append(name)
            return
        try:
            if not entry.is_dir(follow_symlinks=False):
                return
            if not self.filter.descend(name, listing.depth, self.complaints, self._inbox_path):
                return
            st = entry.stat(follow_symlinks=False)  # fstatat on the parent's descriptor
        except OSError:
            return
        child = os.path.join(listing.path, name)
        if child not in self._queued:
            self._queued.add(child)
            self._to_list.append((child, listing.depth + 1, (st.st_dev, st.st_ino)))

    def _open_next(self) -> _Listing | None:
        path, depth, identity = self._to_list.pop()
        self._queued.discard(path)
        try:
            if path == self._top:
                fd = safefs.open_root(path)  # the configured inbox itself may be a symlink
            elif identity is None:
                fd = self._open_beneath(path)
            else:
                fd = os.open(path, safefs.DIR_FLAGS)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != identity:
                    # Not the folder its parent's listing showed: moved, or a folder above it was
                    # swapped for a symlink. Whatever is there now brings its own event or rescan.
                    os.close(fd)
                    return None
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # gone or not a folder now
                self.complaints.problem(
                    "listing", path, f"Cannot list {path}: {exc.strerror}; files in it are not seen until this is fixed"
                )
            return None
        try:
            return _Listing(path, depth, fd, claimable(path, self.complaints))
        except OSError:
            os.close(fd)
            return None

    def _open_beneath(self, path: str) -> int:
        """Open a folder below the inbox one component at a time, refusing symlinks on the way."""
        top = safefs.open_root(self._top)
        try:
            return safefs.open_dir(top, path[len(self._top) + 1 :].split(os.sep))
        finally:
            os.close(top)

    def _depth(self, path: str) -> int:
        return 0 if path == self._top else path[len(self._top) + 1 :].count(os.sep) + 1
