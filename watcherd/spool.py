"""The processing area: claiming files, and finishing them so that a crash at any instant loses
nothing and duplicates nothing.

Layout, on the inbox's filesystem (`<inbox>/.watcherd/`, ignored by the watcher):
  processing/<rel>        claimed originals; the path itself records where the file came from
  pending/<hash>.json     a finished file's publication record: the whole result or error
                          document and the final name of every output, written before any of them

A file's life, and what a restart after kill -9 finds at each step:
  1. claim: rename(inbox/<rel> → processing/<rel>)      → in inbox or in processing, never both
  2. OCR in the child                                    → in processing: OCR it again
  3. choose names, write the pending record (atomic)     → no record: OCR again; record: go to 4
  4. publish: JSON, text file, then move or delete the original, each step idempotent
  5. remove the record                                   → a record with nothing left to do is removed
So a result is published exactly once, and an original is deleted only after its JSON is durable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import outputs
from .intake import appledouble_companion, matches_include, signature_of
from .outputs import public_path
from .settings import ConfigError, Settings

log = logging.getLogger("watcherd")


class NameTaken(Exception):
    """A different file already sits at the name chosen for a result JSON; nothing was published."""


@dataclass
class Job:
    """A claimed file. `rel` is its path below the inbox with '/' separators."""

    rel: str
    path: Path
    received_at: str
    attempts: int = 0
    deferred_since: float | None = None  # monotonic time of the first deferral for GPU memory
    deferrals: int = 0
    signature: tuple[int, int, int] | None = None  # (type, size, mtime) when claimed
    rereads: int = 0  # times it changed under us after the claim and was OCR'd again


class Spool:
    def __init__(self, settings: Settings):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.inbox = settings.paths.inbox
        self.root = settings.processing_dir
        self.processing = self.root / "processing"
        self.pending = self.root / "pending"

    def prepare(self) -> None:
        for folder in (self.processing, self.pending):
            folder.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Make this daemon the only one using the inbox, for as long as the process lives.

        Two daemons on one work area would each "recover" the other's files in flight and publish
        them twice. flock is released by the kernel when the process dies, even by kill -9.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"another watcherd (pid {other}) already serves {self.inbox}; give each daemon its own inbox, "
                "or serve several GPUs from one daemon with ocr.devices",
                key="paths.inbox",
                source=self.settings.source,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def rel(self, inbox_path: Path) -> str:
        return inbox_path.relative_to(self.inbox).as_posix()

    def claim(self, inbox_path: Path) -> Job | None:
        """Move a ready file into the processing area with one rename(2).

        Returns None if the file vanished, or if a file of the same name is still in progress
        (the caller keeps it queued and tries again later).
        """
        rel = self.rel(inbox_path)
        target = self.processing / rel
        if os.path.lexists(target):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(inbox_path, target)
        except FileNotFoundError:
            return None
        return Job(rel=rel, path=target, received_at=outputs.now_iso(), signature=signature_of(target))

    def unclaim(self, job: Job) -> Path:
        """Put a claimed file back into the inbox (graceful stop), under a new name if taken."""
        back = self.inbox / job.rel
        if os.path.lexists(back):  # a new file of the same name arrived meanwhile
            back = outputs.choose_names(job.rel, targets={"original": (self.inbox, "")})["original"]
        outputs.move(job.path, back)
        self._prune(job.path.parent, self.processing)
        return back

    def recover(self) -> list[Job]:
        """After a crash: finish every recorded publication, then return what must be OCR'd again."""
        self.prepare()
        for stale in self.pending.glob("*.tmp"):  # a record being written when we died
            stale.unlink()
        for record_path in sorted(self.pending.glob("*.json")):
            try:
                record = json.loads(record_path.read_bytes())
            except ValueError:
                log.error("Unreadable publication record %s set aside; its file will be OCR'd again", record_path)
                os.replace(record_path, record_path.with_suffix(".corrupt"))
                continue
            log.info("Finishing %s, interrupted while publishing its result", record["rel"])
            try:
                self._publish(record, record_path)
            except (OSError, NameTaken) as exc:  # the file stays claimed; it is tried again when it comes up
                log.error("Cannot finish publishing %s yet: %s", record["rel"], exc)
        jobs = []
        for dirpath, dirnames, filenames in os.walk(self.processing):
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if _looks_like_claim(d, self.settings)]:
                path = Path(dirpath) / name
                rel = path.relative_to(self.processing).as_posix()
                jobs.append(Job(rel=rel, path=path, received_at=outputs.now_iso()))
            dirnames[:] = [d for d in dirnames if not _looks_like_claim(d, self.settings)]
        return jobs

    def finish(self, job: Job, document: dict[str, Any], text: str | None) -> dict[str, Any]:
        """Publish a result (status ok) or error document for `job`; returns it with final paths."""
        record_path = self.pending / f"{hashlib.sha1(os.fsencode(job.rel)).hexdigest()}.json"
        if record_path.exists():
            # An earlier attempt for this very file was interrupted (outbox full, read-only):
            # publish exactly what was decided then, so no output is written twice.
            record = json.loads(record_path.read_bytes())
            try:
                self._publish(record, record_path)
                return record["document"]
            except NameTaken:
                record_path.unlink()  # nothing of ours is out under those names: choose again below
        out = self.settings.output
        paths = self.settings.paths
        ok = document["status"] == "ok"
        targets: dict[str, tuple[Path, str]] = {}
        if ok:
            assert paths.outbox is not None
            targets["json"] = (paths.outbox, ".json")
            if out.text_file != "none" and text is not None:
                targets["text"] = (paths.outbox, f".{out.text_file}")
            if out.on_success == "archive":
                assert paths.archive is not None
                targets["original"] = (paths.archive, "")
        else:
            assert paths.failed is not None
            targets["json"] = (paths.failed, ".json")
            targets["original"] = (paths.failed, "")
        names = outputs.choose_names(job.rel, targets=targets)
        document["image_path"] = public_path(names.get("original"))
        if "text" in names:
            document["text_path"] = public_path(names["text"])
        record = {
            "rel": job.rel,
            "claimed": str(job.path),
            "names": {role: str(p) for role, p in names.items()},
            "document": document,
            "text": text,
        }
        self.pending.mkdir(parents=True, exist_ok=True)  # the inbox may have been deleted and recreated
        # ensure_ascii keeps surrogate-escaped (non-UTF-8) names exact across the round trip.
        tmp = record_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(record, ensure_ascii=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, record_path)
        outputs.fsync_dir(self.pending)
        try:
            self._publish(record, record_path)
        except NameTaken:
            # Another writer took the name between our choice and the publish (or two held
            # results chose the same one while the outbox was full): choose again.
            record_path.unlink()
            return self.finish(job, document, text)
        return document

    def _publish(self, record: dict[str, Any], record_path: Path) -> None:
        names = {role: Path(p) for role, p in record["names"].items()}
        claimed = Path(record["claimed"])
        try:
            outputs.write_atomic(names["json"], outputs.dumps(record["document"]))
        except FileExistsError:
            raise NameTaken(str(names["json"])) from None
        if "text" in names:
            outputs.write_atomic(names["text"], (record["text"] or "").encode("utf-8"))
        if "original" in names:
            outputs.move(claimed, names["original"])
        else:
            outputs.remove(claimed)  # on_success: delete, and the JSON is durable by now
        # A Mac's AppleDouble companion (`._name`) goes with its file instead of lingering forever.
        companion = appledouble_companion(self.inbox / record["rel"])
        try:
            if companion.is_file() and not companion.is_symlink():
                companion.unlink()
        except OSError:
            pass  # no such companion possible (`._` + a 254-byte name is too long), or gone already
        record_path.unlink()
        self._prune(claimed.parent, self.processing)

    @staticmethod
    def _prune(folder: Path, stop: Path) -> None:
        """Remove empty folders the processing area grew for nested files."""
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def _looks_like_claim(name: str, settings: Settings) -> bool:
    """A folder in the processing area that was claimed itself (a directory named `x.jpg`)."""
    return matches_include(name, settings.watch.include)
