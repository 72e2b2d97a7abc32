"""A consumer's mailbox in the state folder: one sealed entry per published document."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from watcherd.core import safefs, sealed

log = logging.getLogger("watcherd")

ENTRY_VERSION = 1


ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.json")


ENTRY_MAX_BYTES = 256 << 20  # a webhook entry carries the whole document (like a publication record)


ASIDE_LOG_LINES = 20  # per folder and start; the rest are counted in one line


class BadEntry(ValueError):
    """A queue entry this daemon did not write (or that was altered)."""


def entry_key(record_name: str, document: dict[str, Any]) -> str:
    """Stable per file and outcome: a re-run of the same publication gives the same key (and the
    webhook's Idempotency-Key), a later file of the same name another one."""
    status, finished = str(document.get("status")), str(document.get("finished_at"))
    return hashlib.sha256(f"{record_name}\0{status}\0{finished}".encode()).hexdigest()[:40]


class Mailbox:
    """One durable queue folder: entries are signed JSON files, written whole (temp, fsync,
    rename) and read within a size bound; anything else found there is set aside."""

    def __init__(self, folder: Path, kind: str, key: bytes):
        self.folder = folder
        self.kind = kind
        self._key = key
        self._fd: int | None = None

    def open(self) -> None:
        with safefs.folder(self.folder.parent, []) as parent:
            self._fd = safefs.open_dir(parent, [self.folder.name], create=True, mode=0o700)
        if stat.S_IMODE(os.fstat(self._fd).st_mode) & 0o077:
            os.fchmod(self._fd, 0o700)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def fd(self) -> int:
        assert self._fd is not None, "open() first"
        return self._fd

    def put(self, name: str, payload: dict[str, Any]) -> bool:
        """Write the entry unless it is there already (a re-run publication); True if written."""
        if safefs.lstat_at(self.fd, name) is not None:
            return False
        body = json.dumps({"v": ENTRY_VERSION, "kind": self.kind, **payload}, ensure_ascii=True)
        envelope = sealed.seal(body, key=self._key, purpose=self._purpose)
        safefs.write_private(self.fd, name, envelope, durable=True)
        return True

    def get(self, name: str) -> dict[str, Any]:
        """The entry's payload; BadEntry if it is not one we wrote."""
        if not ENTRY_NAME.fullmatch(name):
            raise BadEntry("unexpected name")
        st = safefs.lstat_at(self.fd, name)
        if st is None:
            raise FileNotFoundError(name)
        try:
            payload = sealed.unseal(self.fd, name, st, key=self._key, purpose=self._purpose, limit=ENTRY_MAX_BYTES)
        except sealed.NotOurs as exc:
            raise BadEntry(str(exc)) from None
        if not isinstance(payload, dict) or payload.get("v") != ENTRY_VERSION or payload.get("kind") != self.kind:
            raise BadEntry(f"not a version-{ENTRY_VERSION} {self.kind} entry")
        return payload  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        """Every entry name, oldest first (by mtime); our own temp files from a kill are removed,
        anything else that is not an entry name is set aside."""
        found = []
        aside = 0
        with os.scandir(self.fd) as it:
            entries = list(it)
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and stat.S_ISREG(st.st_mode):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self.fd)  # an entry being written when we died
            elif ENTRY_NAME.fullmatch(entry.name) and stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime_ns, entry.name))
            else:
                aside += 1
                self.set_aside(entry.name, "not an entry this daemon wrote", quietly=aside > ASIDE_LOG_LINES)
        if aside > ASIDE_LOG_LINES:
            log.error("%d entries of %s set aside in all", aside, self.folder)
        return [name for _, name in sorted(found)]

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def set_aside(self, name: str, why: str, *, quietly: bool = False) -> None:
        aside_dir = self.folder.parent / "aside"
        try:
            aside_dir.mkdir(mode=0o700, exist_ok=True)
            with safefs.folder(aside_dir, []) as dst:
                new = safefs.set_aside(self.fd, name, label=self.kind, into=dst, shown=name[:64])
        except OSError as exc:
            log.error("Cannot set aside %s in %s (%s); removing it", name, self.folder, exc)
            safefs.remove(self.fd, name)
            return
        if not quietly:
            log.error(
                "Set aside %s from %s (%s): never run or posted; it is in %s", name, self.folder, why, aside_dir / new
            )

    @property
    def _purpose(self) -> str:  # the MAC's domain: a hook entry is no webhook entry, nor a record
        return f"watcherd-{self.kind}-v{ENTRY_VERSION}"
