"""What the main loop needs of a place files are OCR'd in: a slot.

Two kinds satisfy it, structurally (neither inherits from it): a supervised child on this host
(`watcherd.ocr.supervisor.Worker`) and, for `cluster.role: dispatcher`, a file in flight on some
worker host (`watcherd.cluster.dispatcher.RemoteSlot`). The daemon drives both through these
members only, so intake, claiming, the pending records and publication are the same either way.

Members are read-only properties here so that an implementation may keep them as plain
attributes, properties or class attributes, and may narrow their types (a `StrEnum` state, an
`int` device). Times are on the clock the slot was given, which is the daemon's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from watcherd.core.records import Job, Outcome


class Waitable(Protocol):
    """Anything `multiprocessing.connection.wait` can wait on."""

    def fileno(self) -> int: ...


class Flight(Protocol):
    """A file in a slot, as the loop shows it (status line, status file, metrics)."""

    @property
    def job(self) -> Job: ...

    @property
    def started_at(self) -> float:
        """When the slot was handed the file (the slot's clock)."""
        ...

    @property
    def current_page(self) -> int: ...

    @property
    def page_count(self) -> int:
        """0 until the slot knows it."""
        ...


class Slot(Protocol):
    @property
    def state(self) -> str:
        """One of `watcherd.ocr.supervisor.State`'s values (a `StrEnum`, so comparable with it):
        stopped, loading, idle, busy, exiting."""
        ...

    @property
    def ready(self) -> bool:
        """Idle, and may be handed a file now."""
        ...

    @property
    def hungry(self) -> bool:
        """Busy, and takes more files now (an engine that reads pages of several files at once)."""
        ...

    @property
    def room(self) -> int:
        """Pages to hand over now."""
        ...

    @property
    def flights(self) -> Sequence[Flight]: ...

    @property
    def conn_in(self) -> Waitable | None:
        """What the loop waits on for this slot's messages; None: it wakes the loop otherwise."""
        ...

    @property
    def pid(self) -> int | None:
        """Its child's process id, if it has one on this host."""
        ...

    @property
    def device(self) -> int | str | None: ...

    @property
    def engine_name(self) -> str | None: ...

    @property
    def files_done(self) -> int: ...

    @property
    def gone(self) -> bool:
        """Stopped, and nothing of it is left to reap."""
        ...

    def spawn(self) -> None: ...

    def assign(self, *jobs: Job) -> bool:
        """Take `jobs` (at most `room` pages' worth); False: it could not, they go back to the queue."""
        ...

    def pump(self) -> list[Outcome]:
        """Read what arrived; the outcomes of files it has finished with."""
        ...

    def tick(self) -> list[Outcome]:
        """Act on deadlines passed (timeouts, respawns); the outcomes that cost."""
        ...

    def next_wakeup(self) -> float | None:
        """When `tick` has something to do next (the slot's clock), if ever."""
        ...

    def drained(self) -> None:
        """Nothing is queued: a chance to give memory back."""
        ...

    def kill(self, reason: str = "stopping") -> None:
        """Drop the files in flight now, without an outcome for them (the caller puts them back):
        a child's process group is killed, a remote copy still running becomes stale."""
        ...

    def stop(self, wait_s: float | None = None) -> None:
        """Retire it, never to start again. Returns at once (what is left is reaped by `tick`);
        with `wait_s` (at exit) waits up to that long for it to be `gone`."""
        ...
