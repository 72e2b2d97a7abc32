"""Files on their way in: intake events and rescans → the stability tracker → ready in the
backlog → claimed into the work area, one file at a time as a slot needs it.

Every step is bounded per call (TICK_BUDGET_S, MAX_CLAIM_TRIES), so no pile of folders or files
can hold the loop past the systemd watchdog; the rest waits for the next tick.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watcherd.core.records import Job, signature_of
from watcherd.core.settings import WatchSettings
from watcherd.intake.readiness import TICK_BUDGET_S, StabilityTracker
from watcherd.intake.watch import Intake
from watcherd.work.backlog import Backlog
from watcherd.work.spool import Spool

MAX_CLAIM_TRIES = 1000  # ready files looked at per claim: a pile that vanished costs a tick each


class Arrivals:
    def __init__(
        self,
        inbox: Path,
        watch: WatchSettings,
        *,
        backlog: Backlog,
        spool: Spool,
        wake: Callable[[], None],
        clock: Callable[[], float],
    ):
        self.inbox = inbox
        self.watch = watch
        self.backlog = backlog
        self.spool = spool
        self.wake = wake
        self.clock = clock
        self.intake = Intake(inbox, watch, wake=wake)
        self.tracker = StabilityTracker(watch.settle_s, root=inbox, clock=clock)
        self.next_rescan = 0.0

    def start(self) -> None:
        self.intake.start()

    def stop(self) -> None:
        self.intake.stop()

    def rewatch(self, watch: WatchSettings) -> None:
        """New watch.* settings (reload). Files still settling are found again at once by the
        rescan and judged by the new rules; files already ready or claimed stay queued."""
        self.watch = watch
        self.tracker = StabilityTracker(watch.settle_s, root=self.inbox, clock=self.clock)
        self.intake.stop()
        self.intake = Intake(self.inbox, watch, wake=self.wake)
        self.intake.start()
        self.next_rescan = 0.0  # pick up what the old patterns left out

    def tick(self) -> None:
        """Rescan when due; track what intake found; queue what has settled as ready."""
        now = self.clock()
        if now >= self.next_rescan:
            self.intake.request_scan()  # done by drain(), a time slice per tick
            self.next_rescan = now + self.watch.rescan_interval_s
        for path in self.intake.drain():
            if path not in self.backlog:
                self.tracker.track(path)
        for path, signature in self.tracker.ready(budget_s=TICK_BUDGET_S):
            self.backlog.add_ready(path, signature)

    def next_wakeup(self) -> float:
        due = self.tracker.next_due()
        return self.next_rescan if due is None else min(due, self.next_rescan)

    def claim_next(self) -> Job | None:
        """Claim the next ready file that is still as it was judged ready; None: none left this tick."""
        for _ in range(MAX_CLAIM_TRIES):  # the rest next time round: vanished files cost a stat each
            ready = self.backlog.next_ready()
            if ready is None:
                return None
            path, signature = ready
            if signature_of(path) != signature:
                self.tracker.track(path)  # changed (or vanished) since it was judged ready
                continue
            try:
                job = self.spool.claim(path)
            except OSError as exc:  # e.g. a sticky-bit inbox and another user's file: EPERM
                self.intake.complaints.problem(
                    "claiming", str(path.parent), f"Cannot claim {path}: {exc.strerror or exc}; left in the inbox"
                )
                continue
            if job is None:
                if os.path.lexists(path):
                    self.backlog.block(path, signature)
                continue
            return job
        return None
