"""The dispatcher's side: remote slots in place of OCR children, and its one broker connection.

`Service` drives children through a small interface (`watcherd.work.slot.Slot`, which
`supervisor.Worker` satisfies). For `cluster.role: dispatcher` it gets `RemoteSlot`s instead,
`cluster.max_in_flight` of them, so intake, claiming, the pending records and publication stay
exactly as on one host and the dispatcher stays the only writer of outbox/failed/archive.

Everything that talks to RabbitMQ runs on the `Link`'s two threads: the main loop only appends
submissions to a deque and reads replies from another, and the consuming thread wakes it
(`Service._wake`) when a reply arrives. A broker that is down or slow therefore never stalls the loop (or its
systemd watchdog ping); submissions wait in the deque until the broker confirms them.

Every submission carries a fresh attempt id. A reply is taken only for the attempt a slot has in
flight; anything else (a redelivered copy that finished late, a reply meant for the dispatcher
before its restart, a file resubmitted after `cluster.progress_grace_s`) is logged and dropped, so
a file executed twice is published once. The service then checks, as on one host, that the
claimed file still has the signature it had when it was read.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watcherd.cluster import app as app_mod
from watcherd.cluster import wire
from watcherd.cluster.link import Link
from watcherd.core import logs
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import ClusterSettings, Settings, redact_url
from watcherd.ocr.supervisor import InFlight, State

log = logging.getLogger("watcherd")

MAX_HOSTS = 256  # worker hosts remembered for status and metrics; far more than a site runs
REFUSAL_LOG_S = 60.0  # after the first refused message, at most one line this often


class Complaint:
    """A warning said at once, then at most once every REFUSAL_LOG_S with the count so far: a
    publisher flooding the reply queue must not flood the journal too."""

    def __init__(self, what: str, *, clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.clock = clock
        self.last_said: float | None = None

    def say(self, why: str, count: int) -> None:
        now = self.clock()
        if self.last_said is None or now - self.last_said >= REFUSAL_LOG_S:
            self.last_said = now
            log.warning("%s (%d so far): %s", self.what, count, logs.escape(why))


@dataclass
class HostInfo:
    """A worker as the dispatcher knows it: from its replies (a worker never sent a file is not listed)."""

    host: str
    device: Any = None
    files_done: int = 0
    last_heard: float = 0.0
    busy_with: str | None = None


class Hub:
    """What the slots share: the link, routing of replies by attempt id, and what is known of workers."""

    def __init__(self, settings: Settings, *, wake: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.cluster: ClusterSettings = settings.cluster
        self.link = Link(settings, wake=wake)
        self.slots: list[RemoteSlot] = []
        self.hosts: dict[str, HostInfo] = {}
        self.tried: dict[str, list[str]] = {}  # job rel -> hosts it was started on (poison files)
        self.dropped = 0  # replies for attempts no longer in flight
        self.refused = 0  # messages no worker writes (not JSON, not a reply)
        self._refusals = Complaint("Refusing messages on the reply queue that are not a worker's reply", clock=clock)

    def start(self) -> None:
        self.link.start()

    def release(self, slot: RemoteSlot) -> None:
        if all(s.gone for s in self.slots):
            self.link.stop()

    def route(self) -> None:
        """Hand every reply that arrived to the slot whose attempt it is; drop the rest, and any
        message that is not one a worker or the broker writes (wire.py)."""
        while self.link.incoming:
            kind, body = self.link.incoming.popleft()
            try:
                if kind == "undecodable":
                    raise wire.WireError(f"not JSON ({body})")
                message: wire.Reply | wire.Dead = wire.decode_dead(body) if kind == "dead" else wire.decode_reply(body)
            except wire.WireError as exc:
                self.refused += 1
                self._refusals.say(str(exc), self.refused)
                continue
            slot = next((s for s in self.slots if s.attempt is not None and s.attempt == message.attempt), None)
            if slot is None:
                self.dropped += 1
                log.info(
                    "Dropping the %s for %s (attempt %s): not in flight any more (already published, "
                    "resubmitted, or from before a restart)",
                    "dead-lettered task" if isinstance(message, wire.Dead) else f"{message.kind} reply",
                    logs.escape(str(message.job)),
                    logs.escape(str(message.attempt)),
                )
                continue
            if isinstance(message, wire.Reply):
                self._note_host(message)  # only a holder of an attempt in flight names a host
            slot.handle(message)

    def _note_host(self, reply: wire.Reply) -> None:
        if reply.host not in self.hosts and len(self.hosts) >= MAX_HOSTS:
            # The oldest silent host makes room: hosts come and go, the table must not grow.
            del self.hosts[min(self.hosts.values(), key=lambda h: (h.busy_with is not None, h.last_heard)).host]
        info = self.hosts.setdefault(reply.host, HostInfo(reply.host))
        info.last_heard = time.time()
        if reply.kind == "started":
            info.device = reply.device
            info.busy_with = str(reply.job)
        elif reply.kind == "outcome":
            info.busy_with = None
            info.files_done += 1

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "role": "dispatcher",
            "broker": redact_url(self.cluster.broker_url or ""),
            "connected": self.link.connected,
            "queue": self.cluster.queue,
            "submitting": len(self.link.outgoing),
            "dropped_replies": self.dropped,
            "refused_messages": self.refused,
            "workers": [
                {
                    "host": h.host,
                    "device": h.device,
                    "state": "busy" if h.busy_with else "idle",
                    "files_done": h.files_done,
                    "last_heartbeat_s": round(now - h.last_heard, 1),
                    "in_flight": [s.flight.job.rel for s in self.slots if s.flight is not None and s.host == h.host],
                }
                for h in sorted(self.hosts.values(), key=lambda h: h.host)
            ],
        }


class RemoteSlot:
    """One file in flight on some worker: a `watcherd.work.slot.Slot`, backed by the broker.

    LOADING until the link first reaches the broker (READY=1 then), IDLE when free, BUSY with a
    file. `conn_in` is None: replies wake the loop through the service's own pipe."""

    conn_in = None
    pid = None
    retired = False
    batch_pages = 1  # one file per task: a worker host batches the pages of its own file
    hungry = False
    room = 1

    def __init__(self, hub: Hub, index: int, *, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.hub = hub
        self.index = index
        self.settings = settings
        self.clock = clock
        self.state = State.LOADING
        self.flight: InFlight | None = None
        self.attempt: str | None = None
        self.host: str | None = None
        self.last_word = 0.0
        self.files_done = 0
        self.engine_name: str | None = None
        self.device: str | None = None
        self.gone = False
        self._outcomes: list[Outcome] = []

    @property
    def ready(self) -> bool:
        return self.state == State.IDLE

    @property
    def flights(self) -> list[InFlight]:
        return [self.flight] if self.flight else []

    def spawn(self) -> None:
        self.hub.start()

    def assign(self, *jobs: Job) -> bool:
        assert self.state == State.IDLE
        (job,) = jobs  # room is 1
        job.attempts += 1
        self.flight = InFlight(job=job, request_id=0, started_at=self.clock())
        self.state = State.BUSY
        self.hub.tried.setdefault(job.rel, [])
        self._submit()
        return True

    def _submit(self) -> None:
        """Send the flight's file with a new attempt id (a resubmission makes the old one stale)."""
        assert self.flight is not None
        job = self.flight.job
        self.attempt = uuid.uuid4().hex
        self.host = None
        self.last_word = self.clock()
        try:
            st = os.lstat(job.path)  # the processing area is ours; nothing here is followed
            signature: list[int] | None = [st.st_size, st.st_mtime_ns, st.st_ino]
        except OSError:
            signature = None
        ocr = self.settings.ocr
        task = wire.Task(
            job=job.rel,
            attempt=self.attempt,
            path=app_mod.map_path(str(job.path), self.settings.cluster.path_map),
            signature=signature,
            received_at=job.received_at,
            reply_to=self.hub.link.replies.name,
            heartbeat_s=self.settings.cluster.progress_grace_s / 4,
            ocr={"engine": ocr.engine, "model": ocr.model, "prompt": ocr.prompt},
        )
        self.hub.link.submit(task.encode())

    def handle(self, message: wire.Reply | wire.Dead) -> None:
        flight = self.flight
        assert flight is not None
        job = flight.job
        self.last_word = self.clock()
        if isinstance(message, wire.Dead):
            hosts = self.hub.tried.pop(job.rel, [])
            self._done(
                Outcome(
                    job=job,
                    ok=False,
                    code="child_crashed",
                    detail=f"the worker died on it {self.settings.cluster.max_deliveries} time(s) "
                    f"(cluster.max_deliveries) on {', '.join(hosts) or 'unknown hosts'}",
                    processing_time=round(self.clock() - flight.started_at, 3),
                )
            )
            return
        if message.kind == "started":
            self.host = message.host
            self.device = message.device
            self.engine_name = message.engine or self.engine_name
            self.hub.tried.setdefault(job.rel, []).append(self.host)
            if len(self.hub.tried[job.rel]) > 1:
                log.warning(
                    "%s started again on %s (after %s)", job.rel, self.host, ", ".join(self.hub.tried[job.rel][:-1])
                )
        elif message.kind == "progress":
            flight.current_page = message.page
            flight.page_count = message.pages
        elif message.kind == "outcome":
            self._done(self._outcome(job, message.outcome or {}))

    def _outcome(self, job: Job, raw: dict[str, Any]) -> Outcome:
        hosts = self.hub.tried.pop(job.rel, [])
        try:
            got = wire.decode_outcome(raw)
        except wire.WireError:
            # Only a holder of the attempt id can reply at all; still, a reply this loop cannot
            # read must cost the file, never the loop.
            log.error("%s: malformed outcome from %s; failing the file", job.rel, self.host)
            return Outcome(job=job, ok=False, code="engine_error", detail=f"malformed reply from worker {self.host}")
        if got.opened_ino is not None and job.identity is not None:
            job.opened = (job.identity[0], got.opened_ino)  # the service's tamper check compares inodes
        detail = got.detail
        if got.code == "child_crashed":
            detail = f"{detail} on {', '.join(hosts) or self.host}"
        if got.deferred:
            job.attempts -= 1  # waiting for memory is not an attempt
            self.hub.tried[job.rel] = hosts
        return Outcome(
            job=job,
            ok=got.ok,
            code=got.code,
            detail=detail,
            sha256=got.sha256,
            pages=got.pages,
            processing_time=got.processing_time,
            gpu_info_before=got.gpu_info_before,
            gpu_info_after=got.gpu_info_after,
            engine=got.engine,
            model=got.model,
            deferred=got.deferred,
        )

    def _done(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self.flight = None
        self.attempt = None
        self.state = State.IDLE
        if not outcome.deferred:
            self.files_done += 1

    def pump(self) -> list[Outcome]:
        self.hub.route()
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def tick(self) -> list[Outcome]:
        now = self.clock()
        if self.state == State.LOADING and self.hub.link.ever_connected:
            self.state = State.IDLE
            self.engine_name = f"{self.settings.ocr.engine} via {self.settings.cluster.queue}"
        if self.state == State.BUSY and self.flight is not None:
            silent = now - self.last_word
            if silent >= self.settings.cluster.progress_grace_s:
                job = self.flight.job
                logs.event(
                    "resubmitted",
                    f"{job.rel}: no word from {self.host or 'any worker'} for {silent:.0f} s "
                    f"(cluster.progress_grace_s); submitting it again",
                    level=logging.WARNING,
                    source=job.rel,
                )
                self._submit()
        return []

    def next_wakeup(self) -> float | None:
        if self.state == State.LOADING:
            return self.clock() + 0.2
        if self.state == State.BUSY:
            return self.last_word + self.settings.cluster.progress_grace_s
        return None

    def drained(self) -> None:
        pass  # the workers clear their GPU caches themselves

    def kill(self, reason: str = "stopping") -> None:
        """Forget the file (the service puts it back); a copy still running somewhere is stale."""
        self.flight = None
        self.attempt = None
        if self.state == State.BUSY:
            self.state = State.IDLE

    def stop(self, wait_s: float | None = None) -> None:
        self.kill()
        self.state = State.STOPPED
        self.retired = True
        self.gone = True
        self.hub.release(self)


def make_hub(settings: Settings, *, wake: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> Hub:
    """A hub and its `cluster.max_in_flight` slots (`hub.slots`)."""
    hub = Hub(settings, wake=wake, clock=clock)
    hub.slots = [RemoteSlot(hub, i, settings=settings, clock=clock) for i in range(settings.cluster.max_in_flight)]
    return hub


def make_slots(settings: Settings, *, wake: Callable[[], None]) -> list[RemoteSlot]:
    return make_hub(settings, wake=wake).slots
