"""Publication of finished files, and what happens when it cannot be done now.

`publish()` runs `Spool.finish` in the loop, or on a thread of its own when the original is to be
copied to another filesystem (that takes as long as the file is big, and a too_large file can be
any size: the loop must not wait). `results()` hands back what was published.

Output errors that go away by themselves (space freed, remounted read-write, permissions fixed)
hold the outcome: `holding` tells the loop to claim nothing new, `due()` hands held outcomes back
every OUTPUT_RETRY_S to be finished again, and the hold and its end are logged once, not per
retry. Anything else (a name the share refuses) is logged and the file left in the work area for
the next start, without stopping the others.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from watcherd.core import naming
from watcherd.core.records import Outcome
from watcherd.work.spool import Spool

log = logging.getLogger("watcherd")

OUTPUT_RETRY_S = 5.0
# ENOENT is not among them: a folder that vanished does not come back by waiting (the work area
# is held by descriptor and output roots are recreated, so it means a file of ours is gone).
TRANSIENT_OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class Publisher:
    def __init__(self, spool: Spool, *, wake: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.spool = spool
        self.wake = wake
        self.clock = clock
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="watcherd-publish")
        self._copies: dict[concurrent.futures.Future[dict[str, Any]], Outcome] = {}
        self._done: list[tuple[Outcome, dict[str, Any]]] = []
        self.held: list[Outcome] = []  # finished, but the outputs could not be written yet
        self._held_since: float | None = None
        self._next_retry = 0.0

    @property
    def copying(self) -> bool:
        """A copy across filesystems is under way (it uses the work area's descriptors)."""
        return bool(self._copies)

    @property
    def holding(self) -> bool:
        return bool(self.held)

    def next_retry_at(self) -> float | None:
        return self._next_retry if self.held else None

    def publish(self, outcome: Outcome, document: dict[str, Any], text: str | None) -> None:
        job = outcome.job
        if self.spool.crosses_filesystems(job, ok=outcome.ok, rendered=outcome.rendered):
            future = self._thread.submit(self.spool.finish, job, document, text, outcome.rendered)
            future.add_done_callback(lambda _: self.wake())
            self._copies[future] = outcome
            return
        try:
            self._done.append((outcome, self.spool.finish(job, document, text, outcome.rendered)))
        except OSError as exc:
            self._failed(outcome, exc)

    def results(self) -> list[tuple[Outcome, dict[str, Any]]]:
        """(outcome, published document) for every publication finished since the last call."""
        for future in [f for f in self._copies if f.done()]:
            outcome = self._copies.pop(future)
            try:
                self._done.append((outcome, future.result()))
            except OSError as exc:
                self._failed(outcome, exc)
        done, self._done = self._done, []
        if done and self._held_since is not None and not self.held:
            log.warning("Results can be written again; resuming")
            self._held_since = None
        return done

    def due(self) -> list[Outcome]:
        """Held outcomes to be finished again now (every OUTPUT_RETRY_S)."""
        if not self.held or self.clock() < self._next_retry:
            return []
        due, self.held = self.held, []
        return due

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)

    def _failed(self, outcome: Outcome, exc: OSError) -> None:
        if exc.errno not in TRANSIENT_OUTPUT_ERRORS:
            log.error(
                "Cannot publish the result of %s (%s); it stays in %s and is tried again at the next start",
                naming.display_name(outcome.job.rel)["source"],
                exc,
                outcome.job.path,
            )
            return
        now = self.clock()
        if self._held_since is None:
            self._held_since = now
            log.error(
                "Cannot write results (%s: %s); %s stays in the work area, no new files are taken "
                "until this is fixed; retrying every %g s",
                exc.strerror or exc,
                exc.filename or "",
                outcome.job.rel,
                OUTPUT_RETRY_S,
            )
        self.held.append(outcome)
        self._next_retry = now + OUTPUT_RETRY_S
