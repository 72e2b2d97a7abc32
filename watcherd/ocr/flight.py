"""The files in an OCR child (`Request`, `InFlight`): what the child is asked, and what becomes of
each: read, failed, deferred, lost with the child (`Lost`), or over time (`TimedOut`).

The pages a child reports are kept as `protocol.Page.record`s, the page objects of the result
JSON, from the message they came in to the document they go out in (and back to the child as
`earlier` for a long file's last turn, which writes the PDF/hOCR/ALTO of them all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watcherd.core.records import Job, Outcome
from watcherd.ocr import protocol
from watcherd.ocr.process import Child, Exit, ExitReason, describe_exit, summarise_stack

log = logging.getLogger("watcherd")

STACK_GRACE_S = 0.5  # after SIGUSR1 on a timeout: how long the child's stacks may take to arrive
STACK_LINES = 300  # of them logged
DEATH_GRACE_S = 1.0  # a child whose pipe closed: time to finish dying before SIGKILL


@dataclass(frozen=True)
class Engine:
    """The engine and model a child loaded, as its outcomes name them."""

    name: str | None = None
    model: str | None = None


@dataclass
class InFlight:
    """A file a child is working on: everything about it lives and dies together."""

    job: Job
    request_id: int
    started_at: float  # when it was handed over
    pages: list[dict[str, Any]] = field(default_factory=list)  # `protocol.Page.record`s
    sha256: str | None = None
    current_page: int = 0
    page_count: int = 0
    batch: int = 1  # pages in the engine call under way (ocr_batch)

    def request(self) -> protocol.FileRequest:
        """The file as the child is asked to read it: from the page its next turn starts on."""
        job = self.job
        earlier = job.pages_done if job.render else []  # the PDF/hOCR/ALTO are written at the last turn
        return protocol.FileRequest(self.request_id, str(job.path), job.render, job.next_page, earlier)

    def note(self, message: protocol.FileMessage) -> bool:
        """A step of the file before its end: does the clock restart for it?"""
        match message:
            case protocol.Pages():  # the file is open (in a request of several, the next one is opened next)
                self.sha256, self.page_count, self.job.opened = message.sha256, message.count, message.file
            case protocol.PageStart():
                self.current_page, self.batch = message.page, message.pages
            case protocol.Page():
                self.pages.append(message.record)
                return False
        return True  # and Rendering: writing the PDF/hOCR/ALTO gets a page's time of its own

    def finished(self, message: protocol.Finished, now: float, engine: Engine) -> Outcome:
        """`done` (with the pages of every turn) or `failed`."""
        job = self.job
        return Outcome(
            job=job,
            ok=message.ok,
            code=message.code,
            detail=message.detail,
            sha256=message.sha256 or self.sha256,
            pages=job.pages_done + self.pages,
            processing_time=round(job.elapsed + now - self.started_at, 3),
            gpu_info_before=message.gpu_info_before,
            gpu_info_after=message.gpu_info_after,
            engine=engine.name,
            model=engine.model,
            rendered=message.rendered,
            render_errors=message.render_errors,
        )

    def turn_over(self, next_page: int | None, now: float, engine: Engine) -> Outcome:
        """A turn of a long file is over (ocr.turn_pages): keep its pages, and queue its next turn.
        If its bytes are not those the earlier turns read, it changed meanwhile: start over."""
        job = self.job
        if job.turn_sha256 not in (None, self.sha256):
            log.warning("%s changed between its turns; reading it again from the first page", job.rel)
            job.start_over()
        else:
            job.pages_done += self.pages
            job.next_page = next_page or 0
            job.turn_sha256 = self.sha256
            job.elapsed += now - self.started_at
        job.attempts -= 1  # the file's attempts count its failures, not its turns
        return Outcome(job=job, ok=False, partial=True, engine=engine.name, model=engine.model)

    def deferred(self, message: protocol.Deferred, engine: Engine) -> Outcome:
        """Too little GPU memory, or the engine's server is down: the file waits, and this was no attempt."""
        self.job.attempts -= 1
        return Outcome(
            job=self.job,
            ok=False,
            deferred=True,
            defer_reason=message.reason,
            detail=message.detail,
            sha256=message.sha256,
            gpu_info_after=message.gpu_info,
            engine=engine.name,
            model=engine.model,
        )

    def crashed(self, grouped: bool, why: str, now: float, engine: Engine) -> Outcome:
        """The child died on the file: run again once (a page at a time and alone, when it shared
        engine calls: which page killed it?), or `child_crashed` the second time."""
        job = self.job
        if grouped and not job.solo:
            job.solo = True
        if job.attempts < 2:
            log.warning("OCR child %s on %s; retrying the file once with a new child", why, job.rel)
            return Outcome(job=job, ok=False, retry=True, detail=why)
        return Outcome(
            job=job,
            ok=False,
            code="child_crashed",
            detail=why,
            sha256=self.sha256,
            processing_time=round(now - self.started_at, 3),
            engine=engine.name,
            model=engine.model,
        )

    def timed_out(self, elapsed: float, where: str | None, engine: Engine) -> Outcome:
        """A page ran over ocr.timeout_s on its own; `where`: the child's stack then, if it gave one."""
        detail = f"page {self.current_page or 1}, {elapsed:g} s; " + (
            f"hung in {where}" if where else "no Python stack (signals blocked, or stuck in native code)"
        )
        return Outcome(
            job=self.job,
            ok=False,
            code="timeout",
            detail=detail,
            sha256=self.sha256,
            processing_time=elapsed,
            engine=engine.name,
            model=engine.model,
        )


@dataclass(frozen=True)
class Lost:
    """A child whose pipe closed (or that broke the protocol), until its exit status is known."""

    flights: list[InFlight]
    grouped: bool  # several files or pages in one engine call: which one killed it?
    why: str | None  # it broke the protocol (how); None: its exit status will say
    kill_at: float  # SIGKILL then if it has not exited
    loading: bool  # it was loading its engine

    @classmethod
    def of(cls, request: Request, why: str | None, now: float, *, loading: bool) -> Lost:
        """The child is lost with the files of `request`, which leave it."""
        grouped = request.grouped
        return cls(request.drop(), grouped, why, now + (0.0 if why else DEATH_GRACE_S), loading)

    def settle(self, child: Child, now: float, memory_max_mb: float | None) -> tuple[str, ExitReason | None] | None:
        """None while its exit status may still come; then how it died in words (for the log and
        its files' outcomes), and why we kill it if it has not exited (None: its status says)."""
        returncode = child.proc.poll()
        if returncode is None and now < self.kill_at:
            return None
        why = self.why
        if why is None:
            why = describe_exit(returncode) if returncode is not None else "closed its pipe without exiting"
        if memory_max_mb and (returncode is None or returncode < 0):
            why += f" (perhaps the memory limit ocr.memory_max_mb = {memory_max_mb:g} MB was exceeded)"
        return why, None if returncode is not None else ExitReason(Exit.KILLED, why)

    def outcomes(self, why: str, now: float, engine: Engine) -> list[Outcome]:
        """What the death costs its files: each is retried once, or `child_crashed`."""
        if not self.flights:
            log.warning("OCR child %s while idle; starting a new one", why)
        return [flight.crashed(self.grouped, why, now, engine) for flight in self.flights]


@dataclass(frozen=True)
class TimedOut:
    """A page is over time: the child's stacks are awaited until `stacks_until`, then it is killed."""

    stacks_until: float
    elapsed: float  # since the first file was handed over

    @classmethod
    def begin(cls, child: Child, first: InFlight, now: float) -> TimedOut:
        """Ask for the child's Python stacks, without waiting for them here (a child with signals
        blocked never answers)."""
        asked = child.ask_for_stacks()
        return cls(now + STACK_GRACE_S if asked else now, round(now - first.started_at, 3))

    def report(self, first: InFlight, child: Child, timeout_s: float, on_event: Callable[..., None]) -> str | None:
        """The `timeout` event, naming where the child was (its stack's top frames, returned) if it
        said; then its stacks in the log, one line per line (the formatter escapes line breaks)."""
        stacks = child.read_stacks()
        where = summarise_stack(stacks)
        job, pid = first.job, child.pid
        on_event(
            "timeout",
            f"{job.rel}: page {first.current_page or 1} exceeded ocr.timeout_s ({timeout_s:g} s); "
            f"killing OCR child {pid}"
            + (f"; it was in {where}" if where else "; it gave no Python stack (signals blocked, or native code)"),
            source=job.rel,
            child_pid=pid,
            level=logging.WARNING,
        )
        for line in stacks.rstrip().splitlines()[:STACK_LINES]:
            log.warning("Python stacks of OCR child %s at the timeout: %s", pid, line)
        return where

    def outcomes(self, flights: list[InFlight], grouped: bool, where: str | None, engine: Engine) -> list[Outcome]:
        """The first file fails with `timeout`. But pages in one engine call share one deadline:
        it may be the batch, not a page, that was too slow. Then each file is read again alone, a
        page at a time (not counted as an attempt): only a page over time by itself fails its file."""
        if not grouped or any(f.job.solo for f in flights):
            return [flights[0].timed_out(self.elapsed, where, engine)]
        names = ", ".join(f.job.rel for f in flights)
        log.warning("%s: a batch of %d pages ran over time; reading it again a page at a time", names, flights[0].batch)
        for f in flights:
            f.job.solo = True
            f.job.attempts -= 1
        return [Outcome(job=f.job, ok=False, retry=True, detail="batch timeout") for f in flights]


class Request:
    """The files in a child: one, or with an engine that reads pages in batches (ocr_batch) up to
    `room` more, whose pages share engine calls. Their ids match the child's replies to them."""

    def __init__(self) -> None:
        self.flights: list[InFlight] = []
        self.batch_pages = 1  # pages per engine call, as the child said when ready
        self._last_id = 0

    @property
    def grouped(self) -> bool:
        """Are pages of several files, or several pages, read in one engine call? Then a timeout
        or a death cannot say which page was at fault."""
        return len(self.flights) > 1 or any(f.batch > 1 for f in self.flights)

    @property
    def room(self) -> int:
        """Pages to hand over now: three batches' worth (the one read, the one decoded ahead, the
        one after it) less the files in the child; one file for an engine without batches."""
        return 3 * self.batch_pages - len(self.flights) if self.batch_pages > 1 else 1

    @property
    def joinable(self) -> bool:
        """May more files join these, a batch's worth? Only with batches, and none read alone."""
        if self.batch_pages < 2 or self.room < self.batch_pages:
            return False
        return not any(f.job.solo for f in self.flights)

    def add(self, jobs: tuple[Job, ...], now: float, turn_pages: int) -> protocol.OcrRequest:
        """`jobs` join the files in the child, each an attempt: what to send it."""
        added = []
        for job in jobs:
            self._last_id += 1
            added.append(InFlight(job=job, request_id=self._last_id, started_at=now))
            job.attempts += 1
        self.flights += added
        return protocol.OcrRequest(tuple(f.request() for f in added), any(j.solo for j in jobs), turn_pages)

    def take_back(self, count: int) -> None:
        """The last `count` files were never sent: no attempt, and not in the child."""
        kept = len(self.flights) - count
        for flight in self.flights[kept:]:
            flight.job.attempts -= 1
        del self.flights[kept:]

    def land(self, flight: InFlight) -> bool:
        """A file is over: are others left?"""
        self.flights.remove(flight)
        return bool(self.flights)

    def find(self, request_id: int) -> InFlight | None:
        return next((f for f in self.flights if f.request_id == request_id), None)

    def drop(self) -> list[InFlight]:
        """Every file in the child, no longer in it."""
        flights, self.flights = self.flights, []
        return flights
