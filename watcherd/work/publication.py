"""Publication: a finished file's outputs and its original go to their folders exactly once,
all or nothing, whatever instant a kill -9 comes (design §1).

The order (steps 3 to 5 of a file's life, `spool`):
  3. choose the final names (clash suffixes, `output.layout`) and write the publication record
     (`pending/<hash>.json`: the whole document, the text, every output's name), atomically
  4. publish: the JSON, the text files, the rendered PDF/hOCR/ALTO, then move or delete the
     original, each step idempotent (a repeat finds it done, or the same bytes in place)
  5. remove the record
A restart finds either no record (the file is still claimed: OCR'd again) or a record, and
finishes exactly what it says; so an original is deleted only after its JSON is durable.

Threat model (design §9): pending/ is in the work area, which share users may have replaced
while the daemon was down. A record names its outputs only as (root, relative path) pairs,
checked against the configured roots (`ROLE_ROOTS`), and carries an HMAC made with a key kept
in the state folder (`record.key`), so a planted or altered record is quarantined and logged,
never executed.
"""

from __future__ import annotations

import contextlib
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
from watcherd.core.naming import dumps, public_path
from watcherd.core.records import Job, inbox_id
from watcherd.core.settings import RENDERED, ConfigError, Settings
from watcherd.intake.filter import appledouble_companion
from watcherd.work.area import WorkArea

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


class BadRecord(ValueError):
    """A pending entry that is not a record this daemon wrote."""


# Told of every publication, with the record's name, the document and the JSON's final path,
# after every output is durable and before the record goes: what it needs must be durable when it
# returns (a crash then re-runs the publication, so it must be idempotent). May run on the
# publisher's thread.
OnPublished = Callable[[str, dict[str, Any], Path], None]


class Publication:
    """Publishes finished files from the work area (`area`): `finish` one, `finish_interrupted`
    what a kill left half done. `on_published` is told of each (the hand-off to hooks and webhook)."""

    def __init__(self, settings: Settings, area: WorkArea, *, on_published: OnPublished | None = None):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.on_published = on_published
        self.inbox = settings.paths.inbox
        self.area = area
        self._key: bytes | None = None
        self._render_fd: int | None = None  # <state>/<inbox id>.render: the child's PDF/hOCR/ALTO

    def open_state(self) -> None:
        """Open the state folder: the record key, and the folder the child renders into."""
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

    def finish_interrupted(self) -> None:
        """After a crash: finish every recorded publication.

        Nothing found in pending/ is trusted: entries that are not records we wrote (wrong name or
        type, bad JSON, bad or missing MAC, paths outside our roots) are quarantined with one log
        line (the first `QUARANTINE_LOG_LINES`, then a count); a file one names stays claimed.
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
                self.area.quarantine(name, str(exc), quietly=quarantined > QUARANTINE_LOG_LINES)
                continue
            log.info("Finishing %s, interrupted while publishing its result", record["rel"])
            try:
                self._publish(record, name)
            except (OSError, NameTaken) as exc:  # the file stays claimed; it is tried again when it comes up
                log.error("Cannot finish publishing %s yet: %s", record["rel"], exc)
        if quarantined > QUARANTINE_LOG_LINES:
            log.error("%d entries of %s quarantined in all", quarantined, self.area.path / "pending")

    def _read_record(self, name: str, st: os.stat_result) -> dict[str, Any]:
        if not RECORD_NAME.fullmatch(name):
            raise BadRecord("unexpected name")
        assert self._key is not None, "open_state() first"
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
        assert self._render_fd is not None, "open_state() first"
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
                self.area.quarantine(record_name, str(exc))
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
        assert self._key is not None, "open_state() first"
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
        st = self.area.lstat(job.rel)
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
        st = self.area.lstat(job.rel)
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
