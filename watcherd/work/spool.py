"""The work area's whole story: claiming files, and finishing them so that a crash at any instant
loses nothing and duplicates nothing, and nobody but the daemon can steer what it does there.

The folders are `area.WorkArea` (layout and threat model there); claiming is `claim.Claims`,
publishing `publication.Publication`; `Spool` holds the three for the daemon. And in the state
folder (`paths.state`, default systemd's StateDirectory=, never in the inbox):
  record.key              the HMAC key that authenticates publication records
  <inbox id>.lock         one daemon per inbox (flock)
  <inbox id>.render/      the child's PDF/hOCR/ALTO, until they are published

A file's life, and what a restart after kill -9 finds at each step:
  1. claim: rename(inbox/<rel> → processing/<rel>)      → in inbox or in processing, never both
  2. OCR in the child                                    → in processing: OCR it again
  3. choose names, write the pending record (atomic)     → no record: OCR again; record: go to 4
  4. publish: JSON, text file, then move or delete the original, each step idempotent
  5. remove the record                                   → a record with nothing left to do is removed
So a result is published exactly once, and an original is deleted only after its JSON is durable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from watcherd.core.records import Job
from watcherd.core.settings import Settings
from watcherd.work.area import WorkArea
from watcherd.work.claim import Claims, LockHeld
from watcherd.work.publication import NameTaken, OnPublished, Publication

__all__ = ["LockHeld", "NameTaken", "OnPublished", "Spool"]  # what the daemon imports from here


class Spool:
    """The work area (`area`), what is claimed into it (`claims`) and published from it
    (`publication`), behind the calls the daemon makes."""

    def __init__(self, settings: Settings, *, on_published: OnPublished | None = None):
        assert settings.paths.inbox is not None
        self.inbox = settings.paths.inbox
        self.area = WorkArea(settings.work_dir, configured=settings.paths.work is not None, source=settings.source)
        self.processing = self.area.path / "processing"
        self.claims = Claims(settings, self.area)
        self.publication = Publication(settings, self.area, on_published=on_published)

    @property
    def settings(self) -> Settings:
        return self.claims.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:  # a reload (SIGHUP): both parts see the new settings
        self.claims.settings = self.publication.settings = settings

    def prepare(self) -> None:
        """Open the state folder (record key) and the work area; ConfigError if impossible."""
        self.publication.open_state()
        self.claims.open_area()

    def lock(self) -> None:
        self.claims.lock()

    def claim(self, inbox_path: Path) -> Job | None:
        return self.claims.claim(inbox_path)

    def lstat(self, job: Job) -> os.stat_result | None:
        return self.area.lstat(job.rel)

    def unclaim(self, job: Job) -> str:
        return self.claims.unclaim(job)

    def recover(self) -> list[Job]:
        """After a crash: finish every recorded publication, then return what must be OCR'd again
        (everything still claimed)."""
        self.publication.finish_interrupted()
        return self.claims.in_flight()

    def render_targets(self, job: Job) -> dict[str, Any]:
        return self.publication.render_targets(job)

    def crosses_filesystems(self, job: Job, *, ok: bool, rendered: tuple[str, ...] = ()) -> bool:
        return self.publication.crosses_filesystems(job, ok=ok, rendered=rendered)

    def finish(
        self, job: Job, document: dict[str, Any], text: str | None, rendered: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        return self.publication.finish(job, document, text, rendered)
