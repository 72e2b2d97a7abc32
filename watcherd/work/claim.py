"""Claiming: taking a ready file from the inbox into the work area with one rename(2), giving it
back on a graceful stop, and finding after a kill -9 what was claimed and not yet finished.

A claimed file is either in the inbox or in processing/, never both and never neither: the claim
is one rename between folders opened without following links (design §1, §9). One daemon per
inbox (`lock`), or two would each take the other's claimed files for ones left by a crash.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from watcherd.core import naming, safefs
from watcherd.core.naming import now_iso
from watcherd.core.records import Job, inbox_id, signature
from watcherd.core.settings import ConfigError, Settings
from watcherd.intake.filter import matches_include
from watcherd.work.area import WorkArea

log = logging.getLogger("watcherd")


class LockHeld(Exception):
    """Another process holds this inbox's lock."""


class Claims:
    """What moves between the inbox and processing/ (`area`), and the lock that makes this daemon
    the only one doing it."""

    def __init__(self, settings: Settings, area: WorkArea):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.inbox = settings.paths.inbox
        self.area = area
        self.processing = area.path / "processing"
        self._lock_fd: int | None = None

    def open_area(self) -> None:
        """Open the work area (`WorkArea.open`), which must be on the inbox's filesystem: claiming
        is one rename. ConfigError if it cannot be used."""
        try:
            self.area.open()
            if os.fstat(self.area.fd("root")).st_dev != os.stat(self.inbox).st_dev:
                raise ConfigError(
                    f"{self.area.path} is not on the inbox's filesystem: claiming must be one rename",
                    key="paths.work",
                    source=self.settings.source,
                )
        except OSError as exc:
            raise ConfigError(
                f"cannot use the work area {self.area.path}: {exc.strerror or exc}",
                key="paths.work" if self.settings.paths.work else "paths.inbox",
                source=self.settings.source,
            ) from None

    def lock(self) -> None:
        """Make this daemon the only one using the inbox, for as long as the process lives.

        Two daemons on one work area would each "recover" the other's files in flight and publish
        them twice. The lock lives in the state folder, out of reach of the inbox's writers (a
        share user holding a lock in the inbox could keep the daemon from starting); flock is
        released by the kernel when the process dies, even by kill -9.
        """
        state = self.settings.state_dir
        name = f"{inbox_id(self.inbox)}.lock"
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            with safefs.folder(state, []) as dir_fd:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:  # a link planted at the lock's name is refused, never written through
            raise ConfigError(
                f"cannot open the lock {state / name}: {exc.strerror or exc}",
                key="paths.state",
                source=self.settings.source,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LockHeld(
                f"another watcherd (pid {other}) already serves {self.inbox} (lock {state / name}); give each "
                "daemon its own inbox, or serve several GPUs from one daemon with ocr.devices"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def rel(self, inbox_path: Path) -> str:
        return inbox_path.relative_to(self.inbox).as_posix()

    def claim(self, inbox_path: Path) -> Job | None:
        """Move a ready file into the processing area with one rename(2), through folders opened
        without following links: a subfolder swapped for a link is refused (`safefs.Refused`).

        Returns None if the file vanished, or if a file of the same name is still in progress
        (the caller keeps it queued and tries again later).
        """
        rel = self.rel(inbox_path)
        *folders, name = safefs.parts(rel)
        with safefs.folder(self.inbox, folders) as src:
            if safefs.lstat_at(src, name) is None:
                return None
            with safefs.folder(self.area.fd("processing"), folders, create=True, mode=0o700) as dst:
                try:
                    safefs.rename_noreplace(src, name, dst, name)
                except (FileNotFoundError, FileExistsError):
                    return None
                st = safefs.lstat_at(dst, name)
        return Job(
            rel=rel,
            path=self.processing / rel,
            received_at=now_iso(),
            signature=signature(st),
            identity=None if st is None else (st.st_dev, st.st_ino),
        )

    def unclaim(self, job: Job) -> str:
        """Put a claimed file back into the inbox (graceful stop), under a new name if taken."""
        *folders, name = safefs.parts(job.rel)
        with safefs.folder(self.area.fd("processing"), folders) as src:
            with safefs.folder(self.inbox, folders, create=True, mode=0o777) as dst:
                back, n = name, 0
                while True:
                    try:
                        safefs.rename_noreplace(src, name, dst, back)
                        break
                    except FileExistsError:  # a new file of the same name arrived meanwhile
                        n += 1
                        back = naming.with_suffix_number(naming.fit_name(name, extra=8), n)
        safefs.prune(self.area.fd("processing"), folders)
        return back

    def in_flight(self) -> list[Job]:
        """Every claimed entry in processing/ (all of them were in flight at a kill -9: OCR'd
        again), found by `safefs.walk`; a link found there is a claim itself and fails as
        not_regular_file."""
        jobs = []
        include = self.settings.watch.include
        for folder in safefs.walk(self.area.fd("processing"), on_error=_cannot_list):
            folder.descend, here = [], folder.path
            for name, is_folder in folder.entries.items():
                if is_folder and not matches_include(name, include):
                    folder.descend.append(name)
                    continue
                rel = "/".join((*here, name))
                try:
                    st = safefs.lstat_at(folder.fd, name)
                except OSError:
                    st = None
                identity = None if st is None else (st.st_dev, st.st_ino)
                jobs.append(Job(rel=rel, path=self.processing / rel, received_at=now_iso(), identity=identity))
        return jobs


def _cannot_list(path: tuple[str, ...], exc: OSError) -> None:
    log.error("Cannot list %s: %s", "/".join(path), exc)
