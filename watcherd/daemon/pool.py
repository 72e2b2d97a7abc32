"""The slots files are OCR'd in: supervised children on this host, or remote slots for a dispatcher.

`active` slots take files. A reload that changes the engine moves them to `retiring` and starts
new ones: a retiring slot that is busy finishes its file (its outcome is settled like any other),
then it is stopped, and it leaves the pool once nothing of it is left to reap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from watcherd.core.settings import Settings
from watcherd.ocr import workers as workers_mod
from watcherd.ocr.supervisor import State, Worker
from watcherd.work.slot import Slot

if TYPE_CHECKING:
    from watcherd.cluster.dispatcher import Hub


def busy(slots: Iterable[Slot]) -> bool:
    return any(s.state == State.BUSY for s in slots)


class Pool:
    def __init__(
        self,
        settings: Settings,
        *,
        wake: Callable[[], None],
        on_event: Callable[..., None],
        clock: Callable[[], float],
    ):
        self.wake = wake
        self.on_event = on_event
        self.clock = clock
        self.hub: Hub | None = None  # cluster.role: dispatcher: what the remote slots share
        self.active: list[Slot] = self._make(settings)
        self.retiring: list[Slot] = []

    def _make(self, settings: Settings) -> list[Slot]:
        # Neither Worker nor RemoteSlot names Slot: these typed returns are where mypy checks
        # that both have what the loop uses.
        if settings.cluster.role == "dispatcher":  # docs/cluster.md; kombu only where it is used
            from watcherd.cluster.dispatcher import make_hub

            self.hub = make_hub(settings, wake=self.wake, clock=self.clock)
            return [*self.hub.slots]
        self.hub = None
        ocr, gpu, on_event, clock = settings.ocr, settings.gpu, self.on_event, self.clock
        if ocr.devices:
            return [Worker(ocr=ocr, gpu=gpu, device=d, on_event=on_event, clock=clock) for d in ocr.devices]
        count, threads = workers_mod.plan(ocr.workers)  # CPU: ocr.workers children
        return [Worker(ocr=ocr, gpu=gpu, threads=threads, on_event=on_event, clock=clock) for _ in range(count)]

    def all(self) -> list[Slot]:
        return self.active + self.retiring

    def spawn(self) -> None:
        for slot in self.active:
            slot.spawn()

    def replace(self, settings: Settings) -> None:
        """New slots for new engine settings; the current ones retire (busy ones finish first)."""
        self.retiring.extend(self.active)
        self.active = self._make(settings)
        self.spawn()

    def reap_retired(self) -> None:
        for slot in list(self.retiring):
            if slot.state != State.BUSY:
                slot.stop()  # returns at once; a child is reaped by its tick()
            if slot.gone:
                self.retiring.remove(slot)

    def stop(self, wait_s: float) -> None:
        for slot in self.all():
            slot.stop(wait_s=wait_s)

    def remote_workers(self) -> dict[str, dict[str, float]]:
        """A dispatcher's worker hosts, as its replies described them (empty on one host)."""
        if self.hub is None:
            return {}
        return {
            h.host: {"files_done": h.files_done, "busy": 1.0 if h.busy_with else 0.0, "last_heard": h.last_heard}
            for h in self.hub.hosts.values()
        }

    def refused_messages(self) -> int:
        return self.hub.refused if self.hub is not None else 0

    def cluster_status(self) -> dict[str, Any]:
        """The status file's `cluster` entry: {} on one host."""
        return {"cluster": self.hub.status()} if self.hub is not None else {}
