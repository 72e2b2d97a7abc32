"""Logging: one readable line per event on stderr, with structured fields kept on the record.

`event()` attaches the DESIGN §8 fields (WATCHERD_EVENT, WATCHERD_SOURCE, ...) to the log record
as `record.watcherd_fields`, so a journald handler can send them as journal fields while the
stderr format stays a plain line.
"""

from __future__ import annotations

import logging
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


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())


def event(name: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` as event `name`; keyword fields become WATCHERD_* journal fields."""
    structured = {"WATCHERD_EVENT": name}
    for key, value in fields.items():
        if value is not None:
            structured[FIELD_NAMES[key]] = str(value)
    log.log(level, message, extra={"watcherd_fields": structured})
