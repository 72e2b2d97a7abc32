"""Logging: journald with structured fields when running under it, one readable line otherwise.

`event()` puts the DESIGN §8 fields (WATCHERD_EVENT, WATCHERD_SOURCE, ...) on the log record as
attributes. systemd-python's JournalHandler sends every record attribute as a journal field and
journald keeps the UPPERCASE ones, so `journalctl -u watcherd WATCHERD_EVENT=failed` works; the
stderr format ignores them and stays a plain line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("watcherd")

FIELD_NAMES = {
    "source": "WATCHERD_SOURCE",
    "error_code": "WATCHERD_ERROR_CODE",
    "processing_time": "WATCHERD_PROCESSING_TIME",
    "pages": "WATCHERD_PAGES",
    "gpu_free_mb": "WATCHERD_GPU_FREE_MB",
    "child_pid": "WATCHERD_CHILD_PID",
}


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup(level: str = "info", target: str = "auto") -> str:
    """Configure the `watcherd` logger; returns where logs go ("journal" or "stderr")."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())
    where = "stderr"
    if target == "journal" or (target == "auto" and under_journald()):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]
        except ImportError:
            JournalHandler = None
        if JournalHandler is not None:
            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="watcherd"))
            return "journal"
        where = "stderr (systemd-python is not installed, so no WATCHERD_* journal fields)"
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(message)s" if under_journald() else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    if where != "stderr":
        log.warning("Logging to %s", where)
    return "stderr"


def event(name: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` as event `name`; keyword fields become WATCHERD_* journal fields."""
    structured = {"WATCHERD_EVENT": name}
    for key, value in fields.items():
        if value is not None:
            structured[FIELD_NAMES[key]] = str(value)
    log.log(level, message, extra=structured)
