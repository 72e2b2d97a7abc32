"""What happens to each `Outcome` a slot (or the dispatcher) hands back.

A retry goes back to the front of the queue, a long file's finished turn to the back of the
turns, a file deferred for GPU memory or an unavailable engine waits with backoff; the rest are
finished: checked (was the file read the one claimed? did it change while it was read?), then
published, and once published counted and said.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from watcherd.core import logs, naming
from watcherd.core.backoff import backoff_s
from watcherd.core.records import Job, Outcome, signature
from watcherd.core.settings import Settings
from watcherd.daemon.tally import Tally
from watcherd.outputs import documents
from watcherd.outputs.publisher import Publisher
from watcherd.work.backlog import Backlog
from watcherd.work.dedupe import Dedupe
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")

MAX_DEFER_BACKOFF_S = 30.0
MAX_REREADS = 3  # how often a file is read again: it changed while read, or the read was not of it


class Settler:
    def __init__(
        self,
        settings: Settings,
        *,
        backlog: Backlog,
        spool: Spool,
        publisher: Publisher,
        dedupe: Dedupe | None,
        tally: Tally,
        clock: Callable[[], float],
    ):
        self.settings = settings
        self.backlog = backlog
        self.spool = spool
        self.publisher = publisher
        self.dedupe = dedupe
        self.tally = tally
        self.clock = clock
        self.gpu_by_device: dict[str, dict[str, Any]] = {}  # the last GPU figures each child reported
        self.last_gpu: dict[str, Any] = {"available": False}
        self.engine_unavailable: dict[str, str] | None = None  # since, detail: its server is down or busy

    def settle(self, outcomes: list[Outcome], device: int | str | None = None) -> list[Outcome]:
        """Requeue retries and deferrals at once; return the outcomes to `finish`."""
        finished, retries = [], []
        for outcome in outcomes:
            if outcome.gpu_info_after.get("available"):
                self.last_gpu = outcome.gpu_info_after
                self.gpu_by_device["default" if device is None else str(device)] = outcome.gpu_info_after
            if outcome.retry:
                retries.append(outcome.job)
            elif outcome.partial:
                self.backlog.take_turn(outcome.job)
            elif outcome.deferred:
                self._defer(outcome)
            else:
                finished.append(outcome)
        for job in reversed(retries):  # first, in the order they were in the child
            self.backlog.put_back(job)
        return finished

    def _defer(self, outcome: Outcome) -> None:
        """Too little GPU memory (or the engine unavailable: `_wait_for_engine`): the file stays
        claimed and queued; others may go first."""
        job, now = outcome.job, self.clock()
        if outcome.defer_reason == "engine_unavailable":
            self._wait_for_engine(outcome, now)
            return
        free = outcome.gpu_info_after.get("free_mb")
        gpu = self.settings.gpu
        if job.deferred_since is None:
            job.deferred_since = now
            logs.event(
                "deferred",
                f"{job.rel}: waiting for GPU memory ({free} MB free, "
                f"{outcome.gpu_info_after.get('usage_percent')}% used; need {gpu.min_free_mb} MB "
                f"and at most {gpu.max_usage_percent:g}%)",
                level=logging.WARNING,
                source=job.rel,
                gpu_free_mb=free,
            )
        if now - job.deferred_since >= gpu.wait_for_memory_s:
            waited = now - job.deferred_since
            detail = f"{free} MB free after waiting {waited:.0f} s"
            self.finish(dataclasses.replace(outcome, deferred=False, code="vram_insufficient", detail=detail))
            return
        self._back_off(job)

    def _wait_for_engine(self, outcome: Outcome, now: float) -> None:
        """The engine's server is down or busy: the file waits, however long that takes (nothing
        is wrong with the file); logged once per file, retried with backoff."""
        job = outcome.job
        detail = (outcome.detail or "unavailable")[:500]
        if self.engine_unavailable is None:
            self.engine_unavailable = {"since": naming.now_iso(), "detail": detail}
        if job.deferred_since is None:
            job.deferred_since = now
            logs.event(
                "deferred",
                f"{job.rel}: waiting for the OCR engine, retried with backoff ({detail})",
                level=logging.WARNING,
                source=job.rel,
            )
        self._back_off(job)

    def _back_off(self, job: Job) -> None:
        job.deferrals += 1
        self.backlog.defer(job, backoff_s(job.deferrals, first_s=0.5, most_s=MAX_DEFER_BACKOFF_S))

    def finish(self, outcome: Outcome) -> None:
        """Publish it, unless the bytes read were not the claimed file's final ones (read again)."""
        job = outcome.job
        if self.engine_unavailable is not None and (outcome.ok or outcome.code == "engine_error"):
            log.info("The OCR engine answers again (unavailable since %s)", self.engine_unavailable["since"])
            self.engine_unavailable = None
        if self._read_something_else(outcome):
            return
        if outcome.ok and self._changed_since_claim(job):
            return
        document, text = documents.document_for(outcome, settings=self.settings, received_at=job.received_at)
        self.publisher.publish(outcome, document, text)

    def published(self, outcome: Outcome, document: dict[str, Any]) -> None:
        """Count it, say it (journald fields), and let a file waiting for its name go."""
        job = outcome.job
        self.tally.add(outcome, document)
        if self.dedupe is not None:
            self.dedupe.finished(outcome, document)
        if document["status"] == "duplicate":
            logs.event(
                "duplicate",
                f"{job.rel}: the same bytes as {document['duplicate_of']}; not OCR'd again → "
                f"{document.get('image_path') or 'deleted'}",
                source=job.rel,
            )
        elif outcome.ok:
            for fmt, why in outcome.render_errors.items():
                log.error("%s: its %s could not be written: %s", job.rel, fmt, why)
            logs.event(
                "done",
                f"{job.rel}: {len(outcome.pages)} page(s) in {outcome.processing_time:.2f} s → "
                f"{document.get('image_path') or 'deleted'}",
                source=job.rel,
                processing_time=outcome.processing_time,
                pages=len(outcome.pages),
            )
        else:
            logs.event(
                "failed",
                f"{job.rel}: {outcome.code}: {outcome.detail}",
                level=logging.ERROR,
                source=job.rel,
                error_code=outcome.code,
                processing_time=outcome.processing_time,
                gpu_free_mb=outcome.gpu_info_after.get("free_mb"),
            )
        self.backlog.unblock()  # a file waiting for this name may go now

    def _read_something_else(self, outcome: Outcome) -> bool:
        """The child opens the claimed file by path; if the work area was swapped between the claim
        and that open (someone who can write the inbox, design §9), it read another file. Its inode
        tells: that outcome is never published for the claimed file, which is read again."""
        job = outcome.job
        opened, job.opened = job.opened, None
        if opened is None or job.identity is None or opened == job.identity:
            return False
        log.error(
            "%s: the child read inode %s, not the file claimed (inode %s): the work area was tampered "
            "with; reading the claimed file again",
            job.rel,
            opened[1],
            job.identity[1],
        )
        job.attempts -= 1  # not the file's fault
        job.start_over()
        if job.rereads >= MAX_REREADS:
            detail = "the file read was never the one claimed: the work area keeps being tampered with"
            self.finish(dataclasses.replace(outcome, ok=False, code="unreadable", detail=detail, pages=[]))
            return True
        job.rereads += 1
        self.backlog.put_back(job)
        return True

    def _changed_since_claim(self, job: Job) -> bool:
        """A writer on another host (SMB/NFS) may still hold the file and write on after the claim:
        the bytes OCR'd were not the final ones. OCR it again, up to MAX_REREADS times."""
        now = signature(self.spool.lstat(job))
        if job.signature is None or now is None or now == job.signature or job.rereads >= MAX_REREADS:
            return False
        job.rereads += 1
        job.signature = now
        job.attempts -= 1  # not the child's fault
        job.start_over()
        log.warning("%s changed while it was being OCR'd; reading it again", job.rel)
        self.backlog.put_back(job)
        return True
