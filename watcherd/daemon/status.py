"""What the daemon says about itself: READY=1 and the watchdog ping to systemd, the one-line
`systemctl status` summary, the status file `watcherd status` reads, and the metrics' snapshot.

All of it is read on the loop thread, from the parts as they are; nothing here changes them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from watcherd import __version__
from watcherd.core import logs, naming
from watcherd.core.settings import Settings
from watcherd.daemon.arrivals import Arrivals
from watcherd.daemon.pool import Pool, busy
from watcherd.daemon.sdnotify import Notifier
from watcherd.daemon.settle import Settler
from watcherd.handoff.relay import Handoff
from watcherd.ocr.supervisor import State
from watcherd.ops import report
from watcherd.ops.metrics import Metrics, Snapshot
from watcherd.outputs.publisher import Publisher
from watcherd.work.backlog import Backlog

SUMMARY_FILES = 4  # files in flight named on the systemctl status line
STATUS_EVERY_S = 1.0  # the status file and the metrics' snapshot


class Status:
    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier,
        pool: Pool,
        arrivals: Arrivals,
        backlog: Backlog,
        publisher: Publisher,
        handoff: Handoff,
        metrics: Metrics,
        settler: Settler,
        clock: Callable[[], float],
    ):
        self.settings = settings
        self.notifier = notifier
        self.pool = pool
        self.arrivals = arrivals
        self.backlog = backlog
        self.publisher = publisher
        self.handoff = handoff
        self.metrics = metrics
        self.settler = settler
        self.tally = settler.tally
        self.clock = clock
        self.ready = False  # READY=1 sent for the slots there are now (a reload of the engine clears it)
        self.started = report.proc_start_time(os.getpid())
        self.started_at = naming.now_iso()
        self.next_watchdog = 0.0
        self._line = ""
        self._written = 0.0

    def tick(self, *, stopping: bool) -> None:
        """READY=1 once every slot has loaded, the watchdog ping when due, STATUS= when it
        changed, and about once a second the metrics' snapshot and the status file."""
        now = self.clock()
        slots = self.pool.active
        if not self.ready and not stopping and all(s.state in (State.IDLE, State.BUSY) for s in slots):
            self.ready = True
            self.notifier.ready(self.summary(stopping=stopping))
            engines = ", ".join(sorted({s.engine_name or "?" for s in slots}))
            logs.event(
                "ready",
                f"watcherd ready: {len(slots)} OCR child(ren) with {engines}; watching {self.settings.paths.inbox}",
            )
        if self.notifier.watchdog_interval_s and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval_s
        line = self.summary(stopping=stopping)
        if line != self._line:
            self._line = line
            self.notifier.status(line)
        if now - self._written >= STATUS_EVERY_S:
            self.metrics.update(self.snapshot())
            self.write(stopping=stopping)
            self._written = now

    def next_wakeup(self) -> float | None:
        return self.next_watchdog if self.notifier.watchdog_interval_s else None

    def summary(self, *, stopping: bool) -> str:
        """One line for `systemctl status`: what it is doing, counts, queue, engine."""
        flights = [f for s in self.pool.active for f in s.flights]
        if stopping:
            state = "stopping"
        elif flights:
            now = self.clock()
            shown = SUMMARY_FILES  # a batch engine's child holds dozens: `watcherd status` lists them all
            state = "; ".join(
                f"working on {naming.display_name(f.job.rel)['source']} "
                f"(page {f.current_page or 1}/{f.page_count or '?'}, {now - f.started_at:.0f} s)"
                for f in flights[:shown]
            ) + (f"; and {len(flights) - shown} more files" if len(flights) > shown else "")
        elif not self.ready:
            state = "loading model"
        else:
            state = "idle"
        counts = self.backlog.counts()
        queue = sum(counts.values())
        ocr, done = self.settings.ocr, self.tally.counts
        where = "cpu" if ocr.devices is None else "gpu " + ",".join(map(str, ocr.devices))
        parts = [
            state,
            f"{done['ok']:,} ok",
            f"{done['failed']:,} failed",
            *([f"{done['duplicate']:,} duplicate"] if self.settings.dedupe.mode == "skip" else []),
            f"queue {queue}",
            f"{ocr.engine} on {where}",
        ]
        unavailable = self.settler.engine_unavailable
        if unavailable is not None:
            parts.insert(-1, f"OCR engine unavailable since {unavailable['since'][11:19]}, files wait")
        elif counts["waiting_for_memory"]:
            parts.insert(-1, f"{counts['waiting_for_memory']} waiting for GPU memory")
        return " · ".join(parts)

    def snapshot(self) -> Snapshot:
        """The state the metrics show, taken on the loop thread (about once a second): queue sizes
        and when the oldest file not yet finished arrived (epoch seconds). O(files waiting)."""
        now, mono = time.time(), self.clock()
        counts = self.backlog.counts()
        tracker = self.arrivals.tracker
        flights = [f for s in self.pool.all() for f in s.flights]
        seen = (tracker.oldest_since(), self.backlog.oldest_ready_since())  # the clock's time
        arrivals = [now - (mono - t) for t in seen if t is not None]
        for job in [*self.backlog.claimed_jobs(), *(f.job for f in flights), *(o.job for o in self.publisher.held)]:
            try:
                arrivals.append(datetime.fromisoformat(job.received_at).timestamp())
            except ValueError:
                continue
        return Snapshot(
            up=True,
            ready=self.ready,
            queue={**counts, "settling": len(tracker), "in_flight": len(flights)},
            oldest_since=min(arrivals, default=None),
            gpu=dict(self.settler.gpu_by_device),
            **handoff_figures(self.handoff),
            workers=self.pool.remote_workers(),
            refused_messages=self.pool.refused_messages(),
        )

    def write(self, *, stopping: bool, state: str | None = None) -> None:
        """The file `watcherd status` reads; replaced atomically, not fsync'ed (it is not data)."""
        now = self.clock()
        slots = self.pool.active
        intake = self.arrivals.intake
        status = {
            "pid": os.getpid(),
            "pid_started": self.started,  # with pid: tells a stale file from a reused pid
            "state": state
            or ("stopping" if stopping else "working" if busy(slots) else "idle" if self.ready else "starting"),
            "summary": self.summary(stopping=stopping),
            "started_at": self.started_at,
            "updated_at": naming.now_iso(),
            "inbox": str(self.settings.paths.inbox),
            "watch_mode": intake.mode,
            "watch_reason": intake.reason,
            "engine": self.settings.ocr.engine,
            "counts": self.tally.counts,
            "pages": self.tally.pages,
            "queue": {**self.backlog.counts(), "settling": len(self.arrivals.tracker)},
            "in_flight": [
                {
                    "source": naming.display_name(f.job.rel)["source"],
                    "child_pid": s.pid,
                    "page": f.current_page,
                    "pages": f.page_count,
                    "elapsed_s": round(now - f.started_at, 1),
                }
                for s in self.pool.all()
                for f in s.flights
            ],
            "children": [
                {"pid": s.pid, "device": s.device, "state": s.state, "files_done": s.files_done} for s in slots
            ],
            "last_error": self.tally.last_error,
            "metrics": {
                "oldest_unfinished_age_s": round(self.metrics.snapshot.oldest_age_s(), 1),
                "pages": self.metrics.pages_total,
                "last_success_at": self.metrics.last_success_at,
            },
            "handoff": self.handoff.status(),  # hook and webhook backlog and outcomes
            "engine_unavailable": self.settler.engine_unavailable,
            "gpu": self.settler.last_gpu,
            **self.pool.cluster_status(),
            "version": __version__,
        }
        report.write_status(self.settings, status)


def handoff_figures(handoff: Handoff) -> dict[str, Any]:
    """Hook runs and webhook deliveries for the metrics: outcomes since start, and backlog."""
    outcomes: dict[str, dict[str, int]] = {}
    backlog: dict[str, int] = {}
    if handoff.hooks is not None:
        outcomes["hook"] = dict(handoff.hooks.counts)
        backlog["hook"] = handoff.hooks.backlog()
    if handoff.webhook is not None:
        outcomes["webhook"] = dict(handoff.webhook.counts)
        backlog["webhook"] = handoff.webhook.backlog()
    return {"handoffs": outcomes, "handoff_backlog": backlog}
