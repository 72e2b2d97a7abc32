"""Logging: journald with structured fields when running under it, one readable line otherwise.

`event()` puts the design §8 fields (WATCHERD_EVENT, WATCHERD_SOURCE, ...) on the log record as
attributes. systemd-python's JournalHandler sends every record attribute as a journal field and
journald keeps the UPPERCASE ones, so `journalctl -u watcherd WATCHERD_EVENT=failed` works; the
stderr format ignores them and stays a plain line.

File names come from whoever can write to the inbox (design §9): a name holding a newline would
forge a second log line ("a\nINFO fake.png: 1 page(s)"), and one holding ESC sequences would
drive the operator's terminal. So every message is escaped once, here, by the formatter both
handlers use (`escape`: control characters, C1 controls, line separators, bidi overrides and
undecodable bytes become visible \n, \x1b, \u202e escapes), never at each call site. The
journal fields keep the exact bytes: WATCHERD_SOURCE is sent as bytes, so
`journalctl WATCHERD_SOURCE=...` finds a file by its real name.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("watcherd")

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that must not reach a terminal or a line-oriented log as themselves: C0 controls and
# DEL, C1 controls (0x9b is a one-byte CSI on many terminals), line/paragraph separators, the
# bidirectional overrides and isolates (text that reads differently from what it is), and lone
# surrogates (a non-UTF-8 byte in a name, PEP 383; shown as the byte, \xe9).
_UNSAFE = frozenset(
    [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)


def escape(value: object) -> str:
    """`value` as text with every character unsafe in a plain-text log or a terminal replaced by a
    visible escape (a name can neither forge a line nor drive the terminal)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and text.isascii():
        return text  # the common case, without building a new string
    out = []
    for char in text:
        code = ord(char)
        if code in _UNSAFE:
            out.append(_NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")  # surrogateescape: the original byte
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


class EscapingFormatter(logging.Formatter):
    """Escapes the message (the part that carries names), not the format's own text or a
    traceback's line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        clone = logging.makeLogRecord(record.__dict__)
        clone.message = escape(record.message)
        return super().formatMessage(clone)


def _escaping_journal_handler(base: type) -> type:
    """JournalHandler sends every record attribute, the raw `msg` and `args` too, and encodes
    each as UTF-8: a non-UTF-8 name (a surrogate escape) made it drop the whole event with a
    "Logging error". It gets a copy whose message is already formatted and escaped."""

    class EscapingJournalHandler(base):  # type: ignore[misc,valid-type]
        def emit(self, record: logging.LogRecord) -> None:
            clone = logging.makeLogRecord(record.__dict__)
            clone.msg, clone.args = escape(record.getMessage()), None
            super().emit(clone)

    return EscapingJournalHandler


FIELD_NAMES = {
    "source": "WATCHERD_SOURCE",
    "error_code": "WATCHERD_ERROR_CODE",
    "processing_time": "WATCHERD_PROCESSING_TIME",
    "pages": "WATCHERD_PAGES",
    "gpu_free_mb": "WATCHERD_GPU_FREE_MB",
    "child_pid": "WATCHERD_CHILD_PID",
    "exit_reason": "WATCHERD_EXIT_REASON",
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
            handler = _escaping_journal_handler(JournalHandler)(SYSLOG_IDENTIFIER="watcherd")
            handler.setFormatter(EscapingFormatter())
            root.addHandler(handler)
            return "journal"
        where = "stderr (systemd-python is not installed, so no WATCHERD_* journal fields)"
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(message)s" if under_journald() else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(EscapingFormatter(fmt))
    root.addHandler(handler)
    if where != "stderr":
        log.warning("Logging to %s", where)
    return "stderr"


def event(name: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` as event `name`; keyword fields become WATCHERD_* journal fields."""
    structured: dict[str, str | bytes] = {"WATCHERD_EVENT": name}
    for key, value in fields.items():
        if value is not None:
            # A name keeps its exact bytes in the journal (non-UTF-8, newlines and all).
            structured[FIELD_NAMES[key]] = os.fsencode(value) if key == "source" else str(value)
    log.log(level, message, extra=structured)
