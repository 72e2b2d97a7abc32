"""The files the daemon knows of between "ready" (written, quiet, complete) and "in a child".

Four kinds of waiting, each with its own order, kept in one place so their invariants hold:
  ready     in the inbox, judged ready; each path at most once, first come first served
  claimed   in the work area, waiting for a child; they go before anything ready (a retry after
            a child death, a file recovered after a crash, one put back at a reload)
  deferred  claimed, waiting for GPU memory until their retry time; others may pass them
  blocked   ready, but a file of the same name is still in progress: back to the front of
            `ready` when any file finishes
  turns     claimed, part-way through (a long file is read ocr.turn_pages pages at a time): they
            take every other turn with the files behind them, so a one-page scan dropped during
            a 300-page PDF waits for one turn, not for the whole PDF
The clock is injectable, so ordering and deferral are tested without sleeping.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watcherd.core.records import Job, Signature


class Backlog:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._ready: collections.deque[tuple[Path, Signature]] = collections.deque()
        self._queued: set[Path] = set()  # paths in `_ready`, so repeated events never queue twice
        self._claimed: collections.deque[Job] = collections.deque()
        self._deferred: list[tuple[float, Job]] = []  # (retry at, job)
        self._blocked: list[tuple[Path, Signature]] = []
        self._turns: collections.deque[Job] = collections.deque()
        self._turn_owed = False  # another file went since the last turn: a part-way file goes next
        self._since: dict[Path, float] = {}  # ready or blocked path → when it was first queued (clock)

    # -- in ----------------------------------------------------------------------------------

    def __contains__(self, path: Path) -> bool:
        return path in self._queued

    def add_ready(self, path: Path, signature: Signature) -> None:
        if path not in self._queued:
            self._ready.append((path, signature))
            self._queued.add(path)
            self._since.setdefault(path, self.clock())

    def add_claimed(self, jobs: Iterable[Job]) -> None:
        """Claimed files in their own order (recovery after a crash)."""
        self._claimed.extend(jobs)

    def put_back(self, job: Job) -> None:
        """A claimed file goes first: a retry, a re-read, a file a child could not take."""
        self._claimed.appendleft(job)

    def take_turn(self, job: Job) -> None:
        """A file part-way through waits for its next turn behind the others."""
        self._turns.append(job)

    def defer(self, job: Job, delay_s: float) -> None:
        self._deferred.append((self.clock() + delay_s, job))

    def block(self, path: Path, signature: Signature) -> None:
        self._blocked.append((path, signature))
        self._since.setdefault(path, self.clock())

    def unblock(self) -> None:
        """A file finished: those waiting for a name to be free may try again, first."""
        for path, signature in reversed(self._blocked):
            if path not in self._queued:
                self._ready.appendleft((path, signature))
                self._queued.add(path)
        self._blocked.clear()

    # -- out ---------------------------------------------------------------------------------

    def next_claimed(self) -> Job | None:
        """The next claimed file whose turn it is: put-back and recovered ones, then the first
        deferred one whose retry time has come."""
        if self._claimed:
            return self._claimed.popleft()
        now = self.clock()
        for i, (retry_at, job) in enumerate(self._deferred):
            if retry_at <= now:
                del self._deferred[i]
                return job
        return None

    def next_turn(self, *, anyway: bool = False) -> Job | None:
        """A part-way file, if it is owed a turn (another file went since its last), or `anyway`
        (nothing else waits)."""
        if not self._turns or not (anyway or self._turn_owed):
            return None
        self._turn_owed = False
        return self._turns.popleft()

    def another_went(self) -> None:
        """A file other than a part-way one was handed out."""
        self._turn_owed = bool(self._turns)

    def next_ready(self) -> tuple[Path, Signature] | None:
        if not self._ready:
            return None
        path, signature = self._ready.popleft()
        self._queued.discard(path)
        self._since.pop(path, None)  # claimed now (the job's received_at takes over), or queued anew
        return path, signature

    def waiting_jobs(self) -> list[Job]:
        """Every claimed file not in a child (to put back into the inbox at a stop), emptied."""
        jobs = [*self._claimed, *(job for _, job in self._deferred), *self._turns]
        self._claimed.clear()
        self._deferred.clear()
        self._turns.clear()
        return jobs

    # -- looking -----------------------------------------------------------------------------

    def oldest_ready_since(self) -> float | None:
        """When (clock) the longest-waiting ready or blocked file was queued; O(n), for metrics."""
        return min(self._since.values(), default=None)

    def claimed_jobs(self) -> list[Job]:
        """The claimed files waiting for a child (deferred ones too), for a look; nothing moves."""
        return [*self._claimed, *(job for _, job in self._deferred), *self._turns]

    def next_retry_at(self) -> float | None:
        return min((t for t, _ in self._deferred), default=None)

    @property
    def empty(self) -> bool:
        """Nothing ready or claimed (deferred files wait for their time: not work for now)."""
        return not self._claimed and not self._ready and not self._turns

    def counts(self) -> dict[str, int]:
        return {
            "ready": len(self._ready),
            "claimed": len(self._claimed) + len(self._turns),
            "waiting_for_memory": len(self._deferred),
        }
