"""Which files go to which free slot next.

A long file part-way through gets its next turn once another file went; otherwise files already
claimed (retries, recovered claims, deferred files whose time has come) go before a newly claimed
ready file (the backlog keeps these orders). Files that need no OCR (a
precheck's error, a duplicate) are never handed over: `dispatch` returns their outcomes for the
caller to settle, so that publishing stays in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from watcherd.core import logs
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import Settings
from watcherd.daemon.arrivals import Arrivals
from watcherd.outputs import documents
from watcherd.work.backlog import Backlog
from watcherd.work.dedupe import Dedupe
from watcherd.work.slot import Slot
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")


class Dispatcher:
    def __init__(
        self, settings: Settings, *, backlog: Backlog, spool: Spool, arrivals: Arrivals, dedupe: Dedupe | None
    ):
        self.settings = settings
        self.backlog = backlog
        self.spool = spool
        self.arrivals = arrivals
        self.dedupe = dedupe

    def dispatch(self, slots: Sequence[Slot]) -> list[Outcome]:
        """Fill every slot that is ready (or hungry) from the backlog; the outcomes of the files
        finished on the way, without OCR, in the order they were met."""
        early: list[Outcome] = []
        if self.dedupe is not None:
            self.backlog.add_claimed(self.dedupe.released())
        for slot in slots:
            while slot.ready or slot.hungry:
                jobs = self._next_jobs(slot.room, alone=slot.ready, early=early)
                if not jobs:
                    break
                for job in jobs:
                    logs.event(
                        "claimed", f"{job.rel}: OCR started (child {slot.pid})", source=job.rel, child_pid=slot.pid
                    )
                    job.render = self.spool.render_targets(job)
                if not slot.assign(*jobs):
                    for job in reversed(jobs):
                        self.backlog.put_back(job)
        if self.dedupe is not None:
            self._hash_ahead()
        if self.backlog.empty:
            for slot in slots:
                slot.drained()
        return early

    def _hash_ahead(self) -> None:
        """dedupe: claim and hash a few ready files while the children work, so none waits for a hash."""
        assert self.dedupe is not None
        while self.dedupe.room():
            job = self.arrivals.claim_next()
            if job is None:
                return
            st = self.spool.lstat(job)
            if st is None or not self.dedupe.prefetch(job, st):
                self.backlog.add_claimed([job])  # precheck or the child judges it

    def _next_jobs(self, wanted: int, *, alone: bool, early: list[Outcome]) -> list[Job]:
        """The files for a slot: one, or for an engine that reads pages in batches as many as
        hold `wanted` pages (a one-page scan counts one, a long file part-way through a turn), so
        that a GPU is fed pages of several files at once. A file to be read alone goes alone, to
        an idle slot (`alone`). Files that need no OCR go to `early`, with their outcome."""
        jobs: list[Job] = []
        pages = 0
        while pages < wanted:
            job = self._next_job()
            if job is None:
                break
            if job.solo and (jobs or not alone):
                self.backlog.put_back(job)
                break
            st = self.spool.lstat(job)
            if st is None:
                log.warning("%s vanished from the work area before OCR", job.rel)
                continue
            outcome = documents.precheck(job, st, self.settings)
            if outcome is None and self.dedupe is not None:
                verdict = self.dedupe.screen(job, st)
                if verdict == "held":  # being hashed, or the same bytes are in a child: back via released()
                    continue
                if verdict == "later":  # enough files are being hashed already
                    self.backlog.put_back(job)
                    break
                if isinstance(verdict, Outcome):
                    outcome = verdict  # a duplicate: published at once, without OCR
            if outcome is not None:
                early.append(outcome)
                continue
            jobs.append(job)
            if job.solo:
                break
            pages += self.settings.ocr.turn_pages if job.next_page else 1
        return jobs

    def _next_job(self) -> Job | None:
        job = self.backlog.next_turn() or self.backlog.next_claimed() or self.arrivals.claim_next()
        if job is not None:
            if job.next_page == 0:
                self.backlog.another_went()
            return job
        return self.backlog.next_turn(anyway=True)
