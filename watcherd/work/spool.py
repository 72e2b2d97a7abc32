"""The work area: claiming files, and finishing them so that a crash at any instant loses nothing
and duplicates nothing, and nobody but the daemon can steer what it does there.

Layout of the work area (`paths.work`, default `<inbox>/.watcherd/`, on the inbox's filesystem,
owner-only 0700, ignored by the watcher):
  processing/<rel>        claimed originals; the path itself records where the file came from
  pending/<hash>.json     a finished file's publication record: the whole result or error
                          document and the final name of every output, written before any of them
  quarantine/             anything found in pending/ that is not a record we wrote (set aside,
                          never executed)
  rejected/<rel>          a folder or special file named like a scan that failed/ (on another
                          filesystem) cannot take with one rename
And in the state folder (`paths.state`, default systemd's StateDirectory=, never in the inbox):
  record.key              the HMAC key that authenticates records
  <inbox id>.lock         one daemon per inbox (flock)

A file's life, and what a restart after kill -9 finds at each step:
  1. claim: rename(inbox/<rel> → processing/<rel>)      → in inbox or in processing, never both
  2. OCR in the child                                    → in processing: OCR it again
  3. choose names, write the pending record (atomic)     → no record: OCR again; record: go to 4
  4. publish: JSON, text file, then move or delete the original, each step idempotent
  5. remove the record                                   → a record with nothing left to do is removed
So a result is published exactly once, and an original is deleted only after its JSON is durable.

Threat model (design §9): the default work area sits inside a folder that share users can write.
They cannot enter it (0700), but they can rename it away or plant things in its place while the
daemon is down. So: every path is resolved below a descriptor without following links
(`safefs`); a record names its outputs only as (root, relative path) pairs checked against the
configured roots, and carries an HMAC made with a key kept in the state folder, so a planted or
altered record is quarantined and logged, never executed; anything in the work area's place that
is not our own folder is set aside; and a work area moved away while we run is moved back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watcherd.core import naming, safefs, sealed
from watcherd.core.moves import move
from watcherd.core.naming import dumps, now_iso, public_path
from watcherd.core.records import Job, inbox_id, signature
from watcherd.core.settings import RENDERED, ConfigError, Settings
from watcherd.intake.filter import appledouble_companion, matches_include

log = logging.getLogger("watcherd")

RECORD_VERSION = 1
RECORD_PURPOSE = "watcherd-record-v1"  # the MAC's domain: a record is no other sealed file
RECORD_MAX_BYTES = 256 << 20  # 500 pages of dense text fit many times over
RECORD_NAME = re.compile(r"[0-9a-f]{40}\.json")
OUR_TEMP = re.compile(r"\..*\.[0-9a-f]{8}\.tmp")  # safefs' temp names: a record being written at a kill
QUARANTINE_LOG_LINES = 20  # per start; the rest are counted in one line
# Which folder each output may go to; anything else in a record is refused.
ROLE_ROOTS: dict[str, tuple[str, ...]] = {
    "json": ("outbox", "failed"),
    "text": ("outbox",),  # md or txt, in records written before output.formats
    **{fmt: ("outbox",) for fmt in ("md", "txt", *RENDERED)},
    "original": ("archive", "failed", "rejected"),
}


class NameTaken(Exception):
    """A different file already sits at the name chosen for a result JSON; nothing was published."""


class LockHeld(Exception):
    """Another process holds this inbox's lock."""


class BadRecord(ValueError):
    """A pending entry that is not a record this daemon wrote."""


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


# Told of every publication, with the record's name, the document and the JSON's final path,
# after every output is durable and before the record goes: what it needs must be durable when it
# returns (a crash then re-runs the publication, so it must be idempotent). May run on the
# publisher's thread.
OnPublished = Callable[[str, dict[str, Any], Path], None]


class Spool:
    def __init__(self, settings: Settings, *, on_published: OnPublished | None = None):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.on_published = on_published
        self.inbox = settings.paths.inbox
        self.area = WorkArea(settings.work_dir, configured=settings.paths.work is not None, source=settings.source)
        self.processing = self.area.path / "processing"
        self._key: bytes | None = None
        self._lock_fd: int | None = None
        self._render_fd: int | None = None  # <state>/<inbox id>.render: the child's PDF/hOCR/ALTO

    # -- start-up ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Open the state folder (record key) and the work area; ConfigError if impossible."""
        state = self.settings.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            with safefs.folder(state, []) as fd:
                self._key = safefs.key_file(fd, "record.key")
                render = f"{inbox_id(self.inbox)}.render"
                with contextlib.suppress(FileExistsError):
                    os.mkdir(render, 0o700, dir_fd=fd)
                self._render_fd = os.open(
                    render, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
        except OSError as exc:
            raise ConfigError(
                f"cannot use the state folder {state}: {exc.strerror or exc}",
                key="paths.state",
                source=self.settings.source,
            ) from None
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

    # -- claiming ----------------------------------------------------------------------------

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

    def lstat(self, job: Job) -> os.stat_result | None:
        """The claimed file's lstat, through the work area's descriptor (never a path)."""
        *folders, name = safefs.parts(job.rel)
        try:
            with safefs.folder(self.area.fd("processing"), folders) as fd:
                return safefs.lstat_at(fd, name)
        except OSError:
            return None

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

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """After a crash: finish every recorded publication, then return what must be OCR'd again.

        Nothing found here is trusted: entries that are not records we wrote (wrong name or type,
        bad JSON, bad or missing MAC, paths outside our roots) are quarantined with one log line.
        """
        pending = self.area.fd("pending")
        quarantined = 0
        with os.scandir(pending) as it:
            entries = sorted(e.name for e in it)
        for name in entries:
            try:
                st = os.stat(name, dir_fd=pending, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and OUR_TEMP.fullmatch(name):
                os.unlink(name, dir_fd=pending)  # a record being written when we died
                continue
            try:
                record = self._read_record(name, st)
            except BadRecord as exc:
                quarantined += 1
                self._quarantine(name, str(exc), quietly=quarantined > QUARANTINE_LOG_LINES)
                continue
            log.info("Finishing %s, interrupted while publishing its result", record["rel"])
            try:
                self._publish(record, name)
            except (OSError, NameTaken) as exc:  # the file stays claimed; it is tried again when it comes up
                log.error("Cannot finish publishing %s yet: %s", record["rel"], exc)
        if quarantined > QUARANTINE_LOG_LINES:
            log.error("%d entries of %s quarantined in all", quarantined, self.area.path / "pending")
        return self._claimed()

    def _claimed(self) -> list[Job]:
        """Every claimed entry in processing/, found by `safefs.walk`; a link found there is a
        claim itself and fails as not_regular_file."""
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

    def _quarantine(self, name: str, why: str, *, quietly: bool = False) -> None:
        pending = self.area.fd("pending")
        try:
            safefs.set_aside(
                pending, name, label="", into=self.area.fd("quarantine"), shown=naming.fit_name(name, extra=24)
            )
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

    def _read_record(self, name: str, st: os.stat_result) -> dict[str, Any]:
        if not RECORD_NAME.fullmatch(name):
            raise BadRecord("unexpected name")
        assert self._key is not None, "prepare() first"
        try:
            record = sealed.unseal(
                self.area.fd("pending"), name, st, key=self._key, purpose=RECORD_PURPOSE, limit=RECORD_MAX_BYTES
            )
        except sealed.NotOurs as exc:
            raise BadRecord(str(exc)) from None
        _validate(record, name)
        roots = self._roots()
        if any(root not in roots for root, _ in record["names"].values()):
            raise BadRecord("names an output folder that is not configured")
        return record

    # -- publication -------------------------------------------------------------------------

    def _roots(self) -> dict[str, Path | int]:
        p = self.settings.paths
        roots: dict[str, Path | int] = {"rejected": self.area.fd("rejected")}
        for key in ("outbox", "failed", "archive"):
            if getattr(p, key) is not None:
                roots[key] = getattr(p, key)
        return roots

    def render_targets(self, job: Job) -> dict[str, Any]:
        """What the child is to write besides the text: the PDF/hOCR/ALTO, each to a scratch file
        in the state folder named after the job, published from there by `finish`."""
        assert self._render_fd is not None, "prepare() first"
        folder = self.settings.state_dir / f"{inbox_id(self.inbox)}.render"
        formats = {fmt: str(folder / _scratch(job.rel, fmt)) for fmt in self.settings.output.rendered}
        return {"formats": formats, "pdfa": self.settings.output.pdfa} if formats else {}

    def finish(
        self, job: Job, document: dict[str, Any], text: str | None, rendered: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Publish a result (status ok) or error document for `job`, with the text and the
        rendered outputs the child wrote; returns the document with final paths."""
        record_name = f"{hashlib.sha1(os.fsencode(job.rel)).hexdigest()}.json"
        st = safefs.lstat_at(self.area.fd("pending"), record_name)
        if st is not None:
            # An earlier attempt for this very file was interrupted (outbox full, read-only):
            # publish exactly what was decided then, so no output is written twice.
            try:
                record = self._read_record(record_name, st)
            except BadRecord as exc:
                self._quarantine(record_name, str(exc))
            else:
                try:
                    self._publish(record, record_name)
                    root, rel = record["names"]["json"]
                    job.json_path = public_path(self._root_path(root) / rel)
                    return record["document"]  # type: ignore[no-any-return]
                except NameTaken:
                    os.unlink(record_name, dir_fd=self.area.fd("pending"))  # nothing of ours is out: choose again
        out = self.settings.output
        paths = self.settings.paths
        ok = document["status"] in ("ok", "duplicate")  # a duplicate goes where a result goes, without text
        targets: dict[str, tuple[str, str]] = {}
        if ok:
            targets["json"] = ("outbox", ".json")
            for fmt in out.written:
                if (fmt in ("md", "txt") and text is not None) or fmt in rendered:
                    targets[fmt] = ("outbox", ".alto.xml" if fmt == "alto" else f".{fmt}")
            if out.on_success == "archive":
                targets["original"] = ("archive", "")
        else:
            targets["json"] = ("failed", ".json")
            targets["original"] = ("failed", "")
            if self._must_stay_on_this_filesystem(job, paths.failed):
                targets["original"] = ("rejected", "")
        names = naming.choose_names(
            job.rel,
            targets={r: (self._root_path(k), e) for r, (k, e) in targets.items()},
            layout=out.layout,
            finished_at=document["finished_at"],
        )
        rel_names = {role: [targets[role][0], self._relative(targets[role][0], path)] for role, path in names.items()}
        document["image_path"] = public_path(names.get("original"))
        if "md" in names or "txt" in names:
            document["text_path"] = public_path(names.get("md") or names["txt"])
        if "md" in names and "txt" in names:
            document["txt_path"] = public_path(names["txt"])
        for fmt in RENDERED:
            if fmt in names:
                document[f"{fmt}_path"] = public_path(names[fmt])
        record = {"v": RECORD_VERSION, "rel": job.rel, "names": rel_names, "document": document, "text": text}
        # ensure_ascii keeps surrogate-escaped (non-UTF-8) names exact across the round trip.
        body = json.dumps(record, ensure_ascii=True)
        assert self._key is not None, "prepare() first"
        envelope = sealed.seal(body, key=self._key, purpose=RECORD_PURPOSE)
        safefs.write_private(self.area.fd("pending"), record_name, envelope, durable=True)
        try:
            self._publish(record, record_name)
        except NameTaken:
            # Another writer took the name between our choice and the publish (or two held
            # results chose the same one while the outbox was full): choose again.
            os.unlink(record_name, dir_fd=self.area.fd("pending"))
            return self.finish(job, document, text, rendered)
        job.json_path = public_path(names["json"])
        return document

    def _root_path(self, key: str) -> Path:
        return self.area.path / "rejected" if key == "rejected" else getattr(self.settings.paths, key)  # type: ignore[no-any-return]

    def _relative(self, key: str, path: Path) -> str:
        return path.relative_to(self._root_path(key)).as_posix()

    def crosses_filesystems(self, job: Job, *, ok: bool, rendered: tuple[str, ...] = ()) -> bool:
        """Will publishing `job` copy its original, or its PDF from the state folder, to another
        filesystem (which takes as long as the file is big)? Only regular files are ever copied;
        see `_must_stay_on_this_filesystem`."""
        if ok and rendered and self._render_fd is not None and self.settings.paths.outbox is not None:
            try:
                if os.fstat(self._render_fd).st_dev != os.stat(self.settings.paths.outbox).st_dev:
                    return True
            except OSError:
                pass
        if ok and self.settings.output.on_success != "archive":
            return False
        root = self.settings.paths.archive if ok else self.settings.paths.failed
        st = self.lstat(job)
        if root is None or st is None or not stat.S_ISREG(st.st_mode):
            return False
        try:
            return os.stat(root).st_dev != st.st_dev
        except OSError:
            return False

    def _must_stay_on_this_filesystem(self, job: Job, failed: Path | None) -> bool:
        """A folder, link or FIFO named like a scan is moved to failed/ as it is, with one rename;
        when failed/ is on another filesystem it is kept in the work area's rejected/ instead of
        being copied (a folder tree can be arbitrarily deep and large)."""
        st = self.lstat(job)
        if st is None or stat.S_ISREG(st.st_mode) or failed is None:
            return False
        try:
            return os.stat(failed).st_dev != st.st_dev
        except OSError:
            return False

    def _publish(self, record: dict[str, Any], record_name: str) -> None:
        roots = self._roots()
        names = {role: (roots[root], safefs.parts(rel)) for role, (root, rel) in record["names"].items()}
        mode, dir_mode = self.settings.output.file_mode, self.settings.output.dir_mode
        *claimed_folders, claimed_name = safefs.parts(record["rel"])
        text = (record["text"] or "").encode("utf-8", "replace")
        for role, data in (("json", dumps(record["document"])), ("text", text), ("md", text), ("txt", text)):
            if role not in names:
                continue
            root, (*folders, name) = names[role]
            with safefs.folder(root, folders, create=True, mode=dir_mode) as fd:
                try:
                    safefs.write_new(fd, name, data, mode=mode)
                except FileExistsError:
                    if role == "json":
                        raise NameTaken(name) from None
                    raise
        assert self._render_fd is not None
        for fmt in RENDERED:
            scratch = _scratch(record["rel"], fmt)
            if fmt not in names:
                with contextlib.suppress(FileNotFoundError):  # not published (an error, or the format was turned off)
                    os.unlink(scratch, dir_fd=self._render_fd)
                continue
            root, (*folders, name) = names[fmt]
            with safefs.folder(root, folders, create=True, mode=dir_mode) as dst:
                try:
                    move(self._render_fd, scratch, dst, name)
                    _set_mode(dst, name, mode)
                except FileNotFoundError:
                    log.warning("%s: its %s was lost before publication (state folder cleared?)", record["rel"], fmt)
        with safefs.folder(self.area.fd("processing"), claimed_folders) as src:
            if "original" in names:
                root, (*folders, name) = names["original"]
                with safefs.folder(root, folders, create=True, mode=dir_mode) as dst:
                    try:
                        move(src, claimed_name, dst, name)
                    except FileNotFoundError:  # neither here nor there: waiting cannot bring it back
                        log.warning("%s vanished from the work area; its JSON is published", record["rel"])
            else:
                safefs.remove(src, claimed_name)  # on_success: delete, and the JSON is durable by now
                os.fsync(src)
        self._remove_companion(record["rel"])
        if self.on_published is not None:  # hooks and webhook (watcherd/handoff/)
            json_root, json_rel = record["names"]["json"]
            self.on_published(record_name, record["document"], self._root_path(json_root) / json_rel)
        os.unlink(record_name, dir_fd=self.area.fd("pending"))
        safefs.prune(self.area.fd("processing"), claimed_folders)

    def _remove_companion(self, rel: str) -> None:
        """A Mac's AppleDouble companion (`._name`) goes with its file instead of lingering
        forever; only a regular file, in the very folder the scan came from (no link followed)."""
        *folders, name = safefs.parts(rel)
        companion = appledouble_companion(Path(name)).name
        try:
            with safefs.folder(self.inbox, folders) as fd:
                st = safefs.lstat_at(fd, companion)
                if st is not None and stat.S_ISREG(st.st_mode):
                    os.unlink(companion, dir_fd=fd)
        except OSError:
            pass  # no such companion possible (`._` + a 254-byte name is too long), gone, or a link on the way


def _cannot_list(path: tuple[str, ...], exc: OSError) -> None:
    log.error("Cannot list %s: %s", "/".join(path), exc)


def _scratch(rel: str, fmt: str) -> str:
    return f"{hashlib.sha1(os.fsencode(rel)).hexdigest()}.{fmt}"


def _set_mode(dir_fd: int, name: str, mode: int) -> None:
    """The exact output.file_mode on a file moved into place (the child creates its scratch
    files owner-only); never through a link."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _validate(record: Any, name: str) -> None:
    """A record must have exactly our shape, name only paths below our roots, and be filed under
    the name its own `rel` hashes to."""
    if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
        raise BadRecord("not a version-1 record")
    rel, names, document, text = record.get("rel"), record.get("names"), record.get("document"), record.get("text")
    if not isinstance(rel, str) or not isinstance(names, dict) or not isinstance(document, dict):
        raise BadRecord("missing or mistyped fields")
    if text is not None and not isinstance(text, str):
        raise BadRecord("text is not a string")
    try:
        safefs.parts(rel)
        for role, target in names.items():
            if role not in ROLE_ROOTS or not isinstance(target, list) or len(target) != 2:
                raise BadRecord(f"unexpected output {role!r}")
            root, path = target
            if root not in ROLE_ROOTS[role] or not isinstance(path, str):
                raise BadRecord(f"{role} may not go to {root!r}")
            safefs.parts(path)
    except safefs.Refused as exc:
        raise BadRecord(f"a path that is not plain and relative ({exc.filename!r})") from None
    if "json" not in names:
        raise BadRecord("no result document")
    if f"{hashlib.sha1(os.fsencode(rel)).hexdigest()}.json" != name:
        raise BadRecord("filed under another file's name")
