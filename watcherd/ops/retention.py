"""Retention: originals in `paths.archive` / `paths.failed` older than N days are removed.

A sweep runs on a thread of its own at start and then every `retention.interval_s` (an hour): the
trees can hold millions of files, and the main loop must never wait for them.

What it may touch, and how (design §9): the archive and failed folders hold files whose names
and folder shapes came from whoever could write the inbox, and an operator may have planted
links there. Each tree is walked by descriptor from its configured root (`safefs`): folders are
opened one component at a time without following links, only regular files are unlinked, links,
FIFOs and devices are left alone, and nothing outside the root is reached. Hidden names (`.x`:
watcherd's own temp files and copies in progress, `failed/.retried/`) are never touched. Folders
that are themselves configured roots or watcherd's own (the work area, the state folder, the
inbox, the outbox, the other of archive/failed), when configured inside a swept root, are
skipped whole.

Age: `retention.age_from: ctime` (default) counts from the inode's change time, which a rename
into archive/failed sets to now and nobody can set back (utime sets it to now too): "N days since
watcherd put it there". `mtime` counts from the file's own modification time, which moving keeps:
a scan of 2019 copied in with its times kept would be removed at the first sweep after it is
archived. Error JSON (`failed/**/*.json`) is kept unless `retention.remove_json`; result JSON in
the outbox is never touched. A folder left empty is removed in the same sweep when it had not
changed for `interval_s` before the sweep began, so a folder the daemon is publishing into right
now is not pulled from under it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watcherd.core import logs, safefs
from watcherd.core.settings import Settings

log = logging.getLogger("watcherd")

DAY_S = 86400.0
MAX_DEPTH = 256  # deeper folders are not swept (the inbox's writers choose the shapes)


@dataclass
class SweepResult:
    removed: list[str] = field(default_factory=list)  # "<root key>/<rel>"
    pruned: int = 0
    skipped_deep: int = 0


class Retention:
    """The sweeping thread. `update()` takes new settings (SIGHUP); `stop()` ends it."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0  # finished sweeps, for a look from outside

    @staticmethod
    def wanted(settings: Settings) -> bool:
        return settings.retention.archive_days > 0 or settings.retention.failed_days > 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watcherd-retention", daemon=True)
        self._thread.start()

    def update(self, settings: Settings) -> None:
        self.settings = settings
        self._kick.set()  # sweep with the new numbers now

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a sweep checks for the stop between folders

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.wanted(self.settings):
                    self.sweep()
            except Exception:  # a bug here must not end retention silently, nor the daemon
                log.exception("Retention sweep failed; trying again at the next one")
            self.sweeps += 1
            self._kick.wait(self.settings.retention.interval_s)
            self._kick.clear()

    def sweep(self) -> SweepResult:
        s = self.settings
        result = SweepResult()
        now = self.clock()
        for key, root, days in (
            ("archive", s.paths.archive, s.retention.archive_days),
            ("failed", s.paths.failed, s.retention.failed_days),
        ):
            if root is None or days <= 0 or self._stop.is_set():
                continue
            self._sweep_root(key, root, now - days * DAY_S, now - s.retention.interval_s, result)
        log.log(
            logging.INFO if result.removed or result.pruned else logging.DEBUG,
            "Retention sweep done: removed %d file(s) and %d empty folder(s)",
            len(result.removed),
            result.pruned,
        )
        if result.skipped_deep:
            log.warning("Retention: %d folder(s) deeper than %d levels were not swept", result.skipped_deep, MAX_DEPTH)
        return result

    def _skipped(self, root: Path) -> set[tuple[int, int]]:
        """(dev, ino) of every other folder watcherd owns or was given, to be left out of `root`."""
        s = self.settings
        others = [s.paths.inbox, s.paths.outbox, s.paths.archive, s.paths.failed, s.work_dir, s.paths.state]
        if s.metrics.textfile is not None:
            others.append(s.metrics.textfile.parent)
        found = set()
        for path in others:
            if path is None or os.path.abspath(path) == os.path.abspath(root):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(path)
                found.add((st.st_dev, st.st_ino))
        return found

    def _sweep_root(self, key: str, root: Path, cutoff: float, prune_before: float, result: SweepResult) -> None:
        s = self.settings
        age_of = (lambda st: st.st_ctime) if s.retention.age_from == "ctime" else (lambda st: st.st_mtime)
        keep_json = key == "failed" and not s.retention.remove_json
        try:
            root_fd = safefs.open_root(root)
        except OSError as exc:
            log.warning("Retention: cannot open paths.%s %s (%s)", key, root, exc.strerror or exc)
            return
        skip = self._skipped(root)
        try:
            # Files first, then (its subfolders done) the folder itself, removed if empty. A folder
            # that vanished, or is a link now, is not followed (the walk tells nobody: no log).
            for folder in safefs.walk(root_fd, max_depth=MAX_DEPTH, bottom_up=True, on_error=lambda path, exc: None):
                if self._stop.is_set():
                    break
                if folder.leaving:
                    if folder.st.st_mtime < prune_before and self._rmdir(folder.fd, folder.name):
                        result.pruned += 1
                    continue
                if (folder.st.st_dev, folder.st.st_ino) in skip:
                    folder.skip()
                    continue
                try:
                    self._sweep_folder(folder, key, cutoff, age_of, keep_json, result)
                except OSError:
                    folder.skip()
                    continue
                folder.descend = [name for name in folder.descend if not name.startswith(".")]
                if folder.at_limit:
                    result.skipped_deep += len(folder.descend)
        finally:
            os.close(root_fd)

    def _sweep_folder(
        self,
        folder: safefs.Folder,
        key: str,
        cutoff: float,
        age_of: Callable[[os.stat_result], float],
        keep_json: bool,
        result: SweepResult,
    ) -> None:
        """Unlink the old regular files in one folder."""
        for name, is_folder in folder.entries.items():
            if name.startswith(".") or self._stop.is_set():
                continue
            st = None if is_folder else safefs.lstat_at(folder.fd, name)
            if st is None or not stat.S_ISREG(st.st_mode) or (keep_json and name.endswith(".json")):
                continue
            when = age_of(st)
            if when >= cutoff:
                continue
            rel = "/".join([*folder.path, name])
            try:
                os.unlink(name, dir_fd=folder.fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("Retention: cannot remove %s/%s (%s)", key, rel, exc)
                continue
            result.removed.append(f"{key}/{rel}")
            logs.event(
                "removed",
                f"Retention: removed {key}/{rel} ({(self.clock() - when) / DAY_S:.1f} days old)",
                source=rel,
            )

    @staticmethod
    def _rmdir(parent_fd: int, name: str) -> bool:
        """Remove the folder if it is empty (the kernel checks, atomically); never follows a link."""
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError:
            return False
        return True
