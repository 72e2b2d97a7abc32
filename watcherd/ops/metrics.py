"""Prometheus metrics: what the daemon has done (counters) and what it is doing (state gauges).

Two ways out, both optional (docs/metrics.md): `metrics.textfile`, a `.prom` file for
node_exporter's textfile collector, rewritten atomically every `metrics.interval_s` by a thread of
its own (a slow or hung filesystem there must not hold the main loop), and `metrics.listen`,
prometheus_client's HTTP server on its own thread. Everything lives in this module's own
`CollectorRegistry`, never the library's global one.

Threads: counters are incremented where events happen, on the loop thread (prometheus_client's
values carry their own locks). The state (queue sizes, the oldest unfinished file, readiness, GPU
memory) is a frozen `Snapshot` the loop hands over about once a second; a scrape or a textfile
write reads whichever snapshot is current, whole. The oldest file's age is computed at scrape
time from the time it arrived, so it keeps growing even if the loop stops handing snapshots
over: a stuck daemon cannot look young.

Extension point for hand-off (hooks, webhooks): put their figures in `Snapshot.handoffs`
(`{"webhook": {"delivered": 3, "failed": 1}}`, cumulative) and `Snapshot.handoff_backlog`
(`{"webhook": 2}`); they come out as `watcherd_handoffs_total{kind,outcome}` and
`watcherd_handoff_backlog{kind}` without touching this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from watcherd.core.settings import ConfigError, MetricsSettings, parse_listen
from watcherd.ocr.protocol import ERROR_CODES  # every error JSON carries one of these

log = logging.getLogger("watcherd")

# Seconds per page: from a fast CPU engine (0.1 s) to a large model on a long page (minutes).
PAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
QUEUE_STATES = ("settling", "ready", "claimed", "waiting_for_memory", "in_flight")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The daemon's state as the loop last saw it; replaced whole, never changed."""

    up: bool = True
    ready: bool = False
    queue: Mapping[str, int] = dataclasses.field(default_factory=dict)
    oldest_since: float | None = None  # epoch seconds: arrival of the oldest file not yet finished
    gpu: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # device → gpu_info
    handoffs: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    handoff_backlog: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # cluster.role: dispatcher: worker host → {"files_done", "busy", "last_heard" (epoch s)}
    workers: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    refused_messages: int = 0  # cluster.role: dispatcher: messages on the reply queue no worker writes

    def oldest_age_s(self, now: float | None = None) -> float:
        if self.oldest_since is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest_since)


class _StateCollector(Collector):
    """The gauges that describe now, read from the current snapshot at collection time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        snap = self.metrics.snapshot
        yield GaugeMetricFamily(
            "watcherd_up", "1 while the daemon runs (0 written at a clean stop)", value=float(snap.up)
        )
        yield GaugeMetricFamily(
            "watcherd_ready", "1 once the OCR children have loaded their model", value=float(snap.ready and snap.up)
        )
        queue = GaugeMetricFamily(
            "watcherd_queue_files",
            "Files not yet finished, by state (settling: still being written)",
            labels=["state"],
        )
        for state in QUEUE_STATES:
            queue.add_metric([state], snap.queue.get(state, 0))
        yield queue
        yield GaugeMetricFamily(
            "watcherd_oldest_unfinished_age_seconds",
            "Age of the oldest file seen but not yet finished (0 when none): is the folder moving?",
            value=snap.oldest_age_s(),
        )
        free = GaugeMetricFamily("watcherd_gpu_free_bytes", "GPU memory free, as last reported", labels=["device"])
        total = GaugeMetricFamily("watcherd_gpu_total_bytes", "GPU memory in all", labels=["device"])
        for device, info in sorted(snap.gpu.items()):
            if info.get("free_mb") is not None:
                free.add_metric([device], float(info["free_mb"]) * 1024 * 1024)
            if info.get("total_mb") is not None:
                total.add_metric([device], float(info["total_mb"]) * 1024 * 1024)
        yield free
        yield total
        handoffs = CounterMetricFamily(
            "watcherd_handoffs", "Hook runs and webhook deliveries by outcome", labels=["kind", "outcome"]
        )
        for kind, outcomes in sorted(snap.handoffs.items()):
            for outcome, count in sorted(outcomes.items()):
                handoffs.add_metric([kind, outcome], count)
        yield handoffs
        backlog = GaugeMetricFamily("watcherd_handoff_backlog", "Hand-offs waiting to be done", labels=["kind"])
        for kind, count in sorted(snap.handoff_backlog.items()):
            backlog.add_metric([kind], count)
        yield backlog
        yield from self._workers(snap)

    @staticmethod
    def _workers(snap: Snapshot) -> Iterable[Any]:
        """A dispatcher's per-worker series (docs/cluster.md): files each finished, whether it is
        busy, and when it was last heard from (an alert on time() minus that finds a silent host)."""
        done = CounterMetricFamily(
            "watcherd_cluster_worker_files", "Files a worker host finished (from its replies)", labels=["worker"]
        )
        busy = GaugeMetricFamily("watcherd_cluster_worker_busy", "1 while a worker host has a file", labels=["worker"])
        heard = GaugeMetricFamily(
            "watcherd_cluster_worker_last_heard_timestamp_seconds",
            "When the dispatcher last heard from a worker host (epoch seconds)",
            labels=["worker"],
        )
        refused = CounterMetricFamily(
            "watcherd_cluster_refused_messages",
            "Messages on the reply queue that were not a worker's reply (not JSON, not well-formed), refused",
        )
        refused.add_metric([], snap.refused_messages)
        yield refused
        for host, info in sorted(snap.workers.items()):
            done.add_metric([host], info["files_done"])
            busy.add_metric([host], info["busy"])
            heard.add_metric([host], info["last_heard"])
        yield done
        yield busy
        yield heard


class Metrics:
    """The daemon's metrics. Always kept (the status file shows the key figures); exported only
    when `metrics.textfile` or `metrics.listen` is set."""

    def __init__(self, settings: MetricsSettings, *, source: str | None = None):
        self.settings = settings
        self.source = source
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.files = Counter(
            "watcherd_files", "Files finished, by status and error_code", ["status", "error_code"], registry=r
        )
        self.pages = Counter("watcherd_pages", "Pages read in files finished ok", registry=r)
        self.page_seconds = Histogram(
            "watcherd_page_seconds", "Time per page (processing_time)", buckets=PAGE_BUCKETS, registry=r
        )
        self.child_starts = Counter("watcherd_child_starts", "OCR children started", registry=r)
        self.child_exits = Counter("watcherd_child_exits", "OCR children gone, by reason", ["reason"], registry=r)
        self.last_success = Gauge(
            "watcherd_last_success_timestamp_seconds", "When the last file finished ok (0: none yet)", registry=r
        )
        self.started = Gauge("watcherd_start_time_seconds", "When the daemon started", registry=r)
        self.started.set(time.time())
        self.files.labels("ok", "")  # present at 0 from the start, so rate() and ratios work at once
        for code in ERROR_CODES:
            self.files.labels("failed", code)
        self.snapshot = Snapshot(up=True)
        self.registry.register(_StateCollector(self))
        self.pages_total = 0  # plain figures for the status file
        self.last_success_at: str | None = None
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._write_failing = False

    # -- events (loop thread) ------------------------------------------------------------------

    def finished(self, document: Mapping[str, Any], *, finished_epoch: float | None = None) -> None:
        """A result or error JSON was published."""
        status = str(document.get("status") or "unknown")
        self.files.labels(status, str(document.get("error_code") or "")).inc()
        if status == "ok":
            pages = [p for p in document.get("pages") or [] if isinstance(p, dict)]
            self.pages.inc(len(pages))
            self.pages_total += len(pages)
            for page in pages:
                seconds = page.get("processing_time")
                if isinstance(seconds, (int, float)):
                    self.page_seconds.observe(float(seconds))
            self.last_success.set(time.time() if finished_epoch is None else finished_epoch)
            self.last_success_at = document.get("finished_at")

    def counting(self, on_event: Callable[..., None]) -> Callable[..., None]:
        """`on_event` for the workers: counts child starts and exits, then logs as before."""

        def event(name: str, message: str, **fields: Any) -> None:
            if name == "child_started":
                self.child_starts.inc()
            elif name == "child_exited":  # how it ended, as process.ExitReason.label says
                self.child_exits.labels(fields["exit_reason"]).inc()
            on_event(name, message, **fields)

        return event

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot  # one reference replaced: readers see the old one or the new one

    # -- the ways out ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the HTTP listener and the textfile writer, as configured. A listener that cannot
        bind is a configuration problem (ConfigError: exit 78), said before any file is claimed."""
        if self.settings.listen:
            host, port = parse_listen(self.settings.listen, source=self.source)
            from prometheus_client import start_http_server

            try:
                self._http, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {self.settings.listen}: {exc.strerror or exc}",
                    key="metrics.listen",
                    source=self.source,
                ) from None
            log.info("Metrics on http://%s/metrics", self.settings.listen)
        if self.settings.textfile is not None:
            self._thread = threading.Thread(target=self._write_loop, name="watcherd-metrics", daemon=True)
            self._thread.start()

    def _write_loop(self) -> None:
        self.write_textfile()
        while not self._stop.wait(self.settings.interval_s):
            self.write_textfile()

    def write_textfile(self) -> None:
        """Replace the textfile (temp file + rename in its folder); a failure is logged once."""
        path = self.settings.textfile
        if path is None:
            return
        try:
            write_to_textfile(os.fspath(path), self.registry)
        except OSError as exc:
            if not self._write_failing:
                log.error("Cannot write metrics.textfile %s (%s); retrying quietly", path, exc.strerror or exc)
            self._write_failing = True
            return
        if self._write_failing:
            log.warning("metrics.textfile %s is written again", path)
        self._write_failing = False

    def stop(self) -> None:
        """At exit: the textfile says up 0, the listener closes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.snapshot = dataclasses.replace(self.snapshot, up=False, ready=False)
        self.write_textfile()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
