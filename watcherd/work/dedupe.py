"""Duplicates (`dedupe: skip`): a file whose bytes were already OCR'd successfully is not OCR'd
again. It gets a result JSON with `status: "duplicate"` naming the first result (`duplicate_of`),
and its original goes where `output.on_success` says.

The index is a small SQLite database, sha256 → the first result's JSON path, source and finish
time, in the STATE folder (`<state>/<inbox id>.dedupe.sqlite`), never in the work area: the
default work area sits inside the inbox, and whoever can write the inbox can rename it away and
plant things in its place while the daemon is down (design §9). A planted index there could make
the daemon call any new scan a duplicate and swallow it. The state folder is the daemon's own
(systemd's StateDirectory=, 0700), like the record key and the lock.

What may go wrong, and what it costs:
- An entry is added only after the first result is published (status ok), so a kill -9 while a
  file is in OCR or being published can never leave an entry for a file that has no result: no
  false duplicate. A kill -9 between the publication and the insert costs a missed duplicate (the
  next copy is OCR'd again), nothing else.
- An index that is not ours (garbage, another schema, a link, a folder) is set aside as
  `<name>.bad-<time>` with one error and a fresh, empty one is started: the worst outcome is that
  copies of files finished before are OCR'd again, never that a new scan is taken for a copy.
- Entries older than `dedupe.keep_days` are never used, and are deleted at start and then hourly
  (on the dedupe thread, off the main loop).

The main loop never reads a file: a claimed file is opened on the loop (by descriptor below the
work area's held folder, O_NOFOLLOW|O_NONBLOCK, so a link or FIFO is never followed or waited on)
and hashed on a thread, which wakes the loop when done. Lookups and inserts are primary-key
operations on the loop thread; the insert's fsync (synchronous=FULL) sits beside the
publication's own fsyncs. Two copies claimed together: the second waits until the first is
finished, then is a duplicate of it (or OCR'd, if the first failed).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from watcherd.core import safefs
from watcherd.core.records import Job, Outcome, Signature, inbox_id, signature
from watcherd.core.settings import ConfigError, Settings
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")

SCHEMA_VERSION = 1
COLUMNS = ("sha256", "json_path", "source", "finished_at", "finished_epoch")
HASH_CHUNK = 1 << 20
PRUNE_EVERY_S = 3600.0
HASH_AHEAD = 8  # claimed files hashed (or hashed and queued) ahead of the children; each holds an fd

DAY_S = 86400.0

Verdict = Outcome | Literal["ocr", "held", "later"]


def index_path(settings: Settings) -> Path:
    """The index of an inbox: in the state folder, beside its lock and status file."""
    assert settings.paths.inbox is not None
    return settings.state_dir / f"{inbox_id(settings.paths.inbox)}.dedupe.sqlite"


class BadIndex(Exception):
    """The file at the index's path is not a watcherd duplicate index."""


@dataclass(frozen=True)
class Entry:
    """The first successful result for some bytes."""

    sha256: str
    json_path: str
    source: str
    finished_at: str  # ISO-8601, as in that result's JSON


@dataclass(frozen=True)
class Hashed:
    """A claimed file's sha256 (None: it could not be read) and the (type, size, mtime) and
    (dev, inode) it had when read, so a file changed since is hashed again."""

    sha256: str | None
    signature: Signature
    identity: tuple[int, int]


class Index:
    """The SQLite index at `path`. `open()` gives the calling thread its connection; `prune()`
    opens its own, for the dedupe thread."""

    def __init__(self, path: Path, *, source: str | None = None):
        self.path = path
        self.source = source
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open or create the index. One that is not ours is set aside and a fresh one started
        (logged); a state folder where it cannot be made at all is a ConfigError (paths.state)."""
        try:
            try:
                self._conn = self._connect()
            except BadIndex as exc:
                self._set_aside(str(exc))
                self._conn = self._connect()
        except (OSError, sqlite3.Error, BadIndex) as exc:
            raise ConfigError(
                f"cannot use the duplicate index {self.path}: {exc}", key="paths.state", source=self.source
            ) from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def lookup(self, sha256: str, *, keep_days: float, now: float | None = None) -> Entry | None:
        assert self._conn is not None, "open() first"
        cutoff = (time.time() if now is None else now) - keep_days * DAY_S
        row = self._conn.execute(
            "SELECT sha256, json_path, source, finished_at FROM seen WHERE sha256 = ? AND finished_epoch >= ?",
            (sha256, cutoff),
        ).fetchone()
        return None if row is None else Entry(*row)

    def add(self, entry: Entry) -> None:
        """Remember the first result for these bytes (a later one for the same bytes is ignored)."""
        assert self._conn is not None, "open() first"
        epoch = datetime.fromisoformat(entry.finished_at).timestamp()
        with self._conn:
            self._conn.execute(
                "INSERT OR IGNORE INTO seen (sha256, json_path, source, finished_at, finished_epoch) "
                "VALUES (?, ?, ?, ?, ?)",
                (entry.sha256, entry.json_path, entry.source, entry.finished_at, epoch),
            )

    def prune(self, *, keep_days: float, now: float | None = None) -> int:
        """Delete entries finished more than `keep_days` ago; returns how many (own connection)."""
        conn = self._connect()
        try:
            cutoff = (time.time() if now is None else now) - keep_days * DAY_S
            with conn:
                return conn.execute("DELETE FROM seen WHERE finished_epoch < ?", (cutoff,)).rowcount
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        self._check_kind()
        conn = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                with conn:
                    conn.execute(
                        "CREATE TABLE seen (sha256 TEXT PRIMARY KEY, json_path TEXT NOT NULL, source TEXT NOT NULL, "
                        "finished_at TEXT NOT NULL, finished_epoch REAL NOT NULL)"
                    )
                    conn.execute("CREATE INDEX seen_by_age ON seen (finished_epoch)")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise BadIndex(f"schema version {version}, not {SCHEMA_VERSION}")
            else:
                columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(seen)"))
                if columns != COLUMNS:
                    raise BadIndex(f"unexpected table layout {columns}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise BadIndex(str(exc)) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_kind(self) -> None:
        """SQLite opens by path, following links: refuse anything but our own regular file."""
        with safefs.folder(self.path.parent, []) as fd:
            st = safefs.lstat_at(fd, self.path.name)
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file of ours"
            raise BadIndex(f"{kind} (uid {st.st_uid})")

    def _set_aside(self, why: str) -> None:
        stamp = safefs.aside_stamp()  # one for the database and its journals: they stay together
        with safefs.folder(self.path.parent, []) as fd:
            for suffix in ("", "-wal", "-shm", "-journal"):
                name = self.path.name + suffix
                if safefs.lstat_at(fd, name) is not None:
                    safefs.set_aside(fd, name, label="bad", stamp=stamp)
        log.error(
            "The duplicate index %s is not one watcherd can use (%s): set aside as %s.bad-%s; starting an "
            "empty one (copies of files finished before are OCR'd again, never taken for duplicates wrongly)",
            self.path,
            why,
            self.path.name,
            stamp,
        )


def _hash(fd: int, limit: int) -> Hashed:
    """Runs on the dedupe thread: sha256 of an open file (hashlib releases the GIL), then closes it."""
    try:
        st = os.fstat(fd)
        digest: str | None = None
        if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
            h = hashlib.sha256()
            try:
                os.set_blocking(fd, True)
                while chunk := os.read(fd, HASH_CHUNK):
                    h.update(chunk)
                digest = h.hexdigest()
            except OSError as exc:  # EIO on a failing disk: the child will say what is wrong
                log.warning("Cannot read a claimed file to hash it (%s); it is OCR'd", exc)
        sig = signature(st)
        assert sig is not None
        return Hashed(digest, sig, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)


class Dedupe:
    """The loop's side: `screen()` each claimed file before it goes to a child, `released()` for
    files held meanwhile, `finished()` after each publication."""

    def __init__(self, settings: Settings, spool: Spool, *, wake: Callable[[], None]):
        self.keep_days = settings.dedupe.keep_days
        self.max_bytes = settings.ocr.max_file_bytes
        self.spool = spool
        self.wake = wake
        self.index = Index(index_path(settings), source=settings.source)
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="watcherd-dedupe")
        self._hashing: dict[str, tuple[Job, int, concurrent.futures.Future[Hashed]]] = {}  # rel → job, fd, hash
        self._hashes: dict[str, Hashed] = {}  # rel → its bytes' hash
        self._running: dict[str, str] = {}  # sha256 → rel of the file in a child with those bytes
        self._twins: list[tuple[str, Job]] = []  # (sha256, job): wait for that file in a child
        self._back: list[Job] = []  # hashed or released: back to the backlog
        self._queued: set[str] = set()  # rels hashed ahead and back in the backlog, not yet screened
        self._next_prune = 0.0

    @property
    def path(self) -> Path:
        return self.index.path

    def open(self) -> None:
        """At start (ConfigError if the state folder cannot hold the index); prunes on the thread."""
        self.index.open()
        self._maybe_prune()

    def room(self) -> bool:
        """May another file be hashed ahead of the children (`prefetch`)?"""
        return len(self._hashing) + len(self._queued) < HASH_AHEAD

    def prefetch(self, job: Job, st: os.stat_result) -> bool:
        """Start hashing a file just claimed while the children are busy, so that none waits for a
        hash; it comes back through `released()`. False if it cannot be (not a regular file)."""
        return stat.S_ISREG(st.st_mode) and self._submit(job)

    def screen(self, job: Job, st: os.stat_result) -> Verdict:
        """A claimed regular file about to go to a child: "held" (being hashed, or the same bytes
        are in a child now; it comes back through `released()`), "later" (too many files are
        being hashed: put it back and try again next time round), a duplicate Outcome to publish
        at once, or "ocr"."""
        self._queued.discard(job.rel)
        hashed = self._hashes.get(job.rel)
        if hashed is None or hashed.signature != signature(st) or hashed.identity != (st.st_dev, st.st_ino):
            self._release(job.rel)  # bytes that changed are not the twin's any more
            if job.rel not in self._hashing and len(self._hashing) >= HASH_AHEAD:
                return "later"
            return "held" if self._submit(job) else "ocr"
        if hashed.sha256 is None:
            return "ocr"  # the child judges what could not be read here
        try:
            entry = self.index.lookup(hashed.sha256, keep_days=self.keep_days)
        except sqlite3.Error as exc:
            log.error("Cannot look %s up in the duplicate index %s: %s; OCR'ing it", job.rel, self.path, exc)
            entry = None
        if entry is not None:
            return Outcome(job=job, ok=True, sha256=hashed.sha256, duplicate_of=entry.json_path)
        twin = self._running.get(hashed.sha256)
        if twin is not None and twin != job.rel:
            log.info("%s has the same bytes as %s, in OCR now: waiting for its result", job.rel, twin)
            self._twins.append((hashed.sha256, job))
            return "held"
        self._running[hashed.sha256] = job.rel
        return "ocr"

    def released(self) -> list[Job]:
        """Files held by `screen()` that may be looked at again now. Called every loop turn (at
        least every few seconds), so it also starts the hourly prune."""
        self._maybe_prune()
        for rel, (job, _, future) in list(self._hashing.items()):
            if not future.done():
                continue
            del self._hashing[rel]
            self._hashes[rel] = future.result()
            self._back.append(job)
            self._queued.add(rel)
        back, self._back = self._back, []
        return back

    def finished(self, outcome: Outcome, document: dict[str, Any]) -> None:
        """After a publication: index a successful result (the child's sha256, of the bytes it
        OCR'd), then let copies waiting for it go."""
        job = outcome.job
        hashed = self._hashes.pop(job.rel, None)
        if document.get("status") == "ok" and outcome.sha256 and job.json_path:
            if hashed is not None and hashed.sha256 not in (None, outcome.sha256):
                log.warning("%s changed between its hashing and its OCR; indexing the bytes OCR'd", job.rel)
            entry = Entry(outcome.sha256, job.json_path, str(document["source"]), str(document["finished_at"]))
            try:
                self.index.add(entry)
            except sqlite3.Error as exc:  # costs a missed duplicate, never a wrong one
                log.error("Cannot add %s to the duplicate index %s: %s", job.rel, self.path, exc)
        self._release(job.rel)

    def waiting_jobs(self) -> list[Job]:
        """Every claimed file held here (to go back into the inbox at a stop), emptied."""
        jobs = [job for _, job in self._twins] + self._back
        for job, fd, future in self._hashing.values():
            if future.cancel():
                os.close(fd)
            jobs.append(job)
        self._hashing.clear()
        self._queued.clear()
        self._twins.clear()
        self._back = []
        return jobs

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self.index.close()

    def _submit(self, job: Job) -> bool:
        """Open the claimed file on the loop (by descriptor, no link followed, never blocking on a
        FIFO) and hash it on the thread. False if it cannot be opened: the child will judge it."""
        if job.rel in self._hashing:
            return True
        *folders, name = safefs.parts(job.rel)
        try:
            with safefs.folder(self.spool.area.fd("processing"), folders) as dir_fd:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            log.debug("Cannot open %s to hash it: %s", job.rel, exc)
            return False
        future = self._thread.submit(_hash, fd, self.max_bytes)
        future.add_done_callback(lambda _: self.wake())
        self._hashing[job.rel] = (job, fd, future)
        return True

    def _release(self, rel: str) -> None:
        """`rel` left the child (finished, or its bytes changed): copies waiting for it may go."""
        for sha, running in list(self._running.items()):
            if running != rel:
                continue
            del self._running[sha]
            self._back += [job for twin_sha, job in self._twins if twin_sha == sha]
            self._twins = [(s, j) for s, j in self._twins if s != sha]

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        self._thread.submit(self._prune)

    def _prune(self) -> None:
        try:
            removed = self.index.prune(keep_days=self.keep_days)
        except (OSError, sqlite3.Error, BadIndex) as exc:
            log.error("Cannot prune the duplicate index %s: %s", self.path, exc)
            return
        if removed:
            log.info(
                "Pruned %d entr%s older than %g days from the duplicate index",
                removed,
                "y" if removed == 1 else "ies",
                self.keep_days,
            )
