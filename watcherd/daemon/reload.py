"""SIGHUP: re-read the config file and switch to it, restarting OCR children only if the engine
or GPU settings changed.

A bad new config is logged and the running one kept: a typo must not stop a service. Settings
that only a restart can change (paths, dedupe, hooks and webhook, metrics outputs) are kept as
they are, each with a warning. A new engine is probed beside the loop before anything switches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from watcherd.core import config_file
from watcherd.core.settings import ConfigError, Settings
from watcherd.daemon.arrivals import Arrivals
from watcherd.daemon.pool import Pool
from watcherd.daemon.sdnotify import Notifier
from watcherd.daemon.status import Status
from watcherd.ocr.supervisor import EngineProbe
from watcherd.ops.retention import Retention

log = logging.getLogger("watcherd")


class Configured(Protocol):
    """A part that reads the running settings, and is handed the new ones on a switch."""

    settings: Settings


class Reloader:
    def __init__(
        self,
        settings: Settings,
        *,
        readers: Sequence[Configured],
        notifier: Notifier,
        pool: Pool,
        arrivals: Arrivals,
        retention: Retention,
        status: Status,
        wake: Callable[[], None],
    ):
        self.settings = settings  # the running configuration
        self.readers = readers
        self.notifier = notifier
        self.pool = pool
        self.arrivals = arrivals
        self.retention = retention
        self.status = status
        self.wake = wake
        self.probe: tuple[EngineProbe, Settings] | None = None  # a reload waiting for its new engine to import

    def reload(self) -> None:
        """Re-read the config file (SIGHUP); switch now, or once a new engine has been probed."""
        self.notifier.reloading()
        try:
            new = config_file.load(self.settings.source)
            new.require_paths()
        except ConfigError as exc:
            self._keep(exc)
            return
        self.cancel()  # this reload supersedes one still probing its engine
        old = self.settings
        if (new.ocr.engine, new.ocr.python) != (old.ocr.engine, old.ocr.python):
            # Importing a model's package can take minutes, longer than the watchdog allows the
            # loop to stand still: probe it beside the loop and switch when it answers (probed()).
            self.probe = (EngineProbe(new.ocr, on_done=self.wake), new)
            return
        self._switch(new)

    def probed(self) -> None:
        """If a reload's engine probe has answered: switch to the new configuration, or keep ours.
        Not to be called once the daemon is stopping."""
        if self.probe is None or not self.probe[0].done:
            return
        probe, new = self.probe
        self.probe = None
        if probe.problem is not None:
            self._keep(probe.problem)
            return
        self._switch(new)

    def cancel(self) -> None:
        if self.probe is not None:
            self.probe[0].cancel()
            self.probe = None

    def _keep(self, problem: object) -> None:
        log.error("Reload failed, keeping the running configuration: %s", problem)
        self.notifier.ready()

    def _switch(self, new: Settings) -> None:
        old = self.settings
        new = kept_until_restart(old, new)
        self.settings = new
        for reader in self.readers:
            reader.settings = new
        self.retention.update(new)
        logging.getLogger("watcherd").setLevel(new.logging.level.upper())
        if new.watch != old.watch:
            self.arrivals.rewatch(new.watch)
        if new.ocr != old.ocr or new.gpu != old.gpu:
            log.info("Engine settings changed: replacing the OCR child(ren)")
            self.pool.replace(new)  # busy ones finish their file first (Pool.reap_retired)
            self.status.ready = False  # READY=1 again once the new children have loaded
        else:
            self.notifier.ready()
        log.info("Configuration reloaded from %s", new.source)


def kept_until_restart(old: Settings, new: Settings) -> Settings:
    """`new`, with what only a restart can change kept as in `old` (each said once)."""
    if new.paths != old.paths:
        log.warning("paths.* changed: that takes a restart; keeping the current folders until then")
        new = dataclasses.replace(new, paths=old.paths)
    if new.dedupe != old.dedupe:
        log.warning("dedupe.* changed: that takes a restart; keeping the current setting until then")
        new = dataclasses.replace(new, dedupe=old.dedupe)
    if (new.hooks, new.webhook) != (old.hooks, old.webhook):
        log.warning("hooks.* or webhook.* changed: that takes a restart; keeping the current ones until then")
        new = dataclasses.replace(new, hooks=old.hooks, webhook=old.webhook)
    if new.metrics != old.metrics:  # the listener and the textfile are set up once, at start
        log.warning("metrics.* changed: that takes a restart; keeping the current metrics outputs until then")
    return new
