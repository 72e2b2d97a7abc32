"""Which paths below the inbox are scans, and the problems found on the way, said once."""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from watcherd.core.settings import BUILTIN_IGNORE, WatchSettings

log = logging.getLogger("watcherd")

# How far below the inbox files are taken from. Scanner and office trees are a handful of levels
# deep; a share user can make one 1,100 levels deep in a second, and a file at its bottom once
# crashed the daemon (recursive mkdir of its mirror folders). Deeper folders are not descended
# into, with one warning: a bound on the work too (no path grows towards PATH_MAX).
MAX_DEPTH = 64


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for a list of fnmatch patterns, matched against lower-cased names: a junk pile of
    200,000 names is matched once per name, not once per name and pattern."""
    patterns = [p.lower() for p in patterns]
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)) if patterns else None


def matches_include(name: str, include: tuple[str, ...]) -> bool:
    regex = _compile(include)
    return regex is not None and regex.match(name.lower()) is not None


def appledouble_companion(path: Path) -> Path:
    """`dir/._name`, where macOS clients over SMB/AFP keep `dir/name`'s resource fork and Finder
    info. Ignored by the built-in '.*' pattern; whoever archives `name` should remove it too."""
    return path.with_name(f"._{path.name}")


class PathFilter:
    """Which paths below the inbox are scans: include patterns on the name (case-insensitive),
    ignore patterns (built-in + configured) on every component of the relative path."""

    def __init__(self, watch: WatchSettings):
        self.include = watch.include
        self.ignore = tuple(p.lower() for p in BUILTIN_IGNORE + watch.ignore)
        self.recursive = watch.recursive
        self._include = _compile(self.include)
        self._ignore = _compile(self.ignore)

    def ignored_component(self, name: str) -> bool:
        return self._ignore is not None and self._ignore.match(name.lower()) is not None

    def descend(self, name: str, depth: int, complaints: Complaints, inbox: Path) -> bool:
        """Whether scans and the poller go into subfolder `name` of a folder `depth` levels
        below the inbox; the first folder refused for its depth is reported once."""
        if not self.recursive or self.ignored_component(name):
            return False
        if depth + 1 > MAX_DEPTH:
            complaints.problem(
                "depth",
                str(inbox),
                f"Folders more than {MAX_DEPTH} levels below {inbox} are not looked into "
                f"(first seen: {name!r} at that depth); files there are left alone",
            )
            return False
        return True

    def wanted(self, rel_parts: tuple[str, ...]) -> bool:
        if not rel_parts or (not self.recursive and len(rel_parts) > 1) or len(rel_parts) > MAX_DEPTH + 1:
            return False
        if any(self.ignored_component(part) for part in rel_parts):
            return False
        return self._include is not None and self._include.match(rel_parts[-1].lower()) is not None

    def wanted_name(self, name: str, depth: int) -> bool:
        """`wanted` for a name `depth` folders below the inbox (0: in the inbox itself) whose
        folders are already known not to be ignored (scans and the poller only descend into
        those): checks one component, not the whole path, so deep trees cost nothing extra."""
        if (not self.recursive and depth > 0) or depth > MAX_DEPTH:
            return False
        lower = name.lower()
        if self._ignore is not None and self._ignore.match(lower):
            return False
        return self._include is not None and self._include.match(lower) is not None


class Complaints:
    """Log a problem about a folder once, and once more when it is fixed, not every scan.

    Keys are (what, folder): a folder can be listable and still not claimable.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def problem(self, what: str, folder: str, message: str) -> None:
        with self._lock:
            if self._open.get((what, folder)) == message:
                return
            self._open[(what, folder)] = message
        log.warning("%s", message)

    def fine(self, what: str, folder: str) -> None:
        if (what, folder) not in self._open:
            return
        with self._lock:
            if self._open.pop((what, folder), None) is None:
                return
        log.info("%s: %s works again", folder, what)
