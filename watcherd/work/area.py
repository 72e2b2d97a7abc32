"""The work area: the daemon's own folders beside the inbox, held open by descriptor.

Layout (`paths.work`, default `<inbox>/.watcherd/`, on the inbox's filesystem, owner-only 0700,
ignored by the watcher):
  processing/<rel>        claimed originals; the path itself records where the file came from
  pending/<hash>.json     a finished file's publication record: the whole result or error
                          document and the final name of every output, written before any of them
  quarantine/             anything found in pending/ that is not a record we wrote (set aside,
                          never executed)
  rejected/<rel>          a folder or special file named like a scan that failed/ (on another
                          filesystem) cannot take with one rename

Threat model (design §9): the default work area sits inside a folder that share users can write.
They cannot enter it (0700), but they can rename it away or plant things in its place while the
daemon is down. So every path in it is resolved below a descriptor without following links
(`safefs`); anything in the work area's place that is not our own folder is set aside; and a
work area moved away while we run is moved back. What is claimed into it is `claim`'s, what is
published from it `publication`'s, and `spool` tells a file's whole way through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from watcherd.core import naming, safefs
from watcherd.core.settings import ConfigError

log = logging.getLogger("watcherd")


class WorkArea:
    """The work area's folders, held open by descriptor; `check()` notices it being moved."""

    SUBDIRS = ("processing", "pending", "quarantine", "rejected")

    def __init__(self, path: Path, *, configured: bool, source: str | None):
        self.path = path
        self.configured = configured
        self.source = source
        self.fds: dict[str, int] = {}
        self.identity: tuple[int, int] | None = None
        self._moved_reported = False

    def open(self) -> None:
        """Open (or create) the work area, owner-only. Whatever sits in its place and is not our
        own folder (a file, a link, a FIFO, someone else's folder) is set aside, not used. The
        folders held so far stay in use until the new ones are all open."""
        fds: dict[str, int] = {}
        try:
            with safefs.folder(self.path.parent, []) as parent:
                st = safefs.lstat_at(parent, self.path.name)
                if st is not None and not _ours(st):
                    if self.configured:
                        raise ConfigError(
                            f"{self.path} is {_describe(st)}, not a folder of uid {os.geteuid()}: refusing to use it",
                            key="paths.work",
                            source=self.source,
                        )
                    self._set_aside(parent, self.path.name, st)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path.name, 0o700, dir_fd=parent)
                fds["root"] = root = safefs.open_dir(parent, [self.path.name])
            st = os.fstat(root)
            if not _ours(st):  # replaced between the check and the open
                raise OSError(f"{self.path} changed while it was being opened")
            _owner_only(root, self.path)
            for name in self.SUBDIRS:
                sub = safefs.lstat_at(root, name)
                if sub is not None and not _ours(sub):
                    self._set_aside(root, name, sub)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=root)
                fds[name] = safefs.open_dir(root, [name])
                _owner_only(fds[name], self.path / name)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        self.close()
        self.fds = fds
        self.identity = (st.st_dev, st.st_ino)
        self._moved_reported = False

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def fd(self, name: str) -> int:
        return self.fds[name]

    def check(self) -> None:
        """Called from the main loop (one lstat): is the work area still where it belongs?

        Deleted (the inbox was removed and recreated): start a fresh one. Moved away or replaced
        by someone who can write the inbox: we keep working in our own folder through its
        descriptors; it is moved back and whatever took its place is set aside.
        """
        try:
            st = os.stat(self.path, follow_symlinks=False)
            here = (st.st_dev, st.st_ino)
        except OSError:
            st, here = None, None
        if here == self.identity:
            return
        if os.fstat(self.fds["root"]).st_nlink == 0:
            try:
                self.open()
            except OSError as exc:  # the inbox itself is not back yet: next time round
                if not self._moved_reported:
                    self._moved_reported = True
                    log.warning("The work area %s was deleted (with the inbox?) and cannot be made: %s", self.path, exc)
                return
            log.warning("The work area %s was deleted (with the inbox?); started a new one", self.path)
            return
        try:
            where = os.readlink(f"/proc/self/fd/{self.fds['root']}")
            with safefs.folder(self.path.parent, []) as parent:
                if st is not None:
                    self._set_aside(parent, self.path.name, st)
                actual_parent = os.open("..", safefs.DIR_FLAGS, dir_fd=self.fds["root"])
                try:
                    safefs.rename_noreplace(actual_parent, os.path.basename(where), parent, self.path.name)
                finally:
                    os.close(actual_parent)
            log.error("The work area had been moved to %s by someone; moved it back to %s", where, self.path)
            self._moved_reported = False
        except OSError as exc:
            if not self._moved_reported:
                self._moved_reported = True
                log.error(
                    "The work area %s was moved or replaced by someone, and cannot be moved back (%s); "
                    "working on in it through its open descriptor. Set paths.work to a folder share users "
                    "cannot reach",
                    self.path,
                    exc,
                )

    def lstat(self, rel: str) -> os.stat_result | None:
        """The lstat of the claimed file `rel`, through processing/'s descriptor (never a path)."""
        *folders, name = safefs.parts(rel)
        try:
            with safefs.folder(self.fd("processing"), folders) as fd:
                return safefs.lstat_at(fd, name)
        except OSError:
            return None

    def quarantine(self, name: str, why: str, *, quietly: bool = False) -> None:
        """Move `name`, found in pending/ and not a record this daemon wrote, to quarantine/ (or
        remove it where that fails): it is never executed, and the file it names is OCR'd again."""
        pending = self.fd("pending")
        try:
            safefs.set_aside(pending, name, label="", into=self.fd("quarantine"), shown=naming.fit_name(name, extra=24))
        except OSError as exc:
            log.error("Cannot quarantine %s: %s; removing it", name, exc)
            safefs.remove(pending, name)
            return
        if not quietly:
            log.error(
                "Quarantined %s from the work area (%s): not a record this daemon wrote; never executed. "
                "The file it names, if any, is OCR'd again",
                name,
                why,
            )

    @staticmethod
    def _set_aside(parent: int, name: str, st: os.stat_result) -> None:
        aside = safefs.set_aside(parent, name, label="untrusted")
        log.error(
            "Found %s at %s, where the work area belongs: set aside as %s, not used",
            _describe(st),
            name,
            aside,
        )


def _ours(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _owner_only(fd: int, path: Path) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        os.fchmod(fd, 0o700)
        log.warning("%s was open to others (mode %04o); made it owner-only (0700)", path, mode)


def _describe(st: os.stat_result) -> str:
    kinds = {
        stat.S_IFDIR: "a folder",
        stat.S_IFLNK: "a symbolic link",
        stat.S_IFREG: "a file",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
    }
    kind = kinds.get(stat.S_IFMT(st.st_mode), "a device")
    return f"{kind} owned by uid {st.st_uid}"
