"""systemd's sd_notify protocol (sd_notify(3)), hand-written so that start-up notification never
depends on the optional compiled systemd-python: only what watcherd sends.

Without NOTIFY_SOCKET (not under systemd, tests, `watcherd ocr`) every method does nothing and
returns False. Sending never raises: a failure is logged at DEBUG and returns False. Only the
process that built the notifier sends (NotifyAccess=main would reject a forked copy); children
started with exec must not inherit the variables: `unset_environment=True` removes them. The
watchdog is on when WATCHDOG_USEC is a positive integer and WATCHDOG_PID is unset or names this
process (as sd_watchdog_enabled(3)).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
SEND_TIMEOUT_S = 1.0  # a full manager queue blocks a datagram send: never for long


def _positive_int(value: str | None) -> int | None:
    try:
        number = int((value or "").strip(), 10)
    except ValueError:
        return None
    return number if number > 0 else None


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        name = env.get("NOTIFY_SOCKET") or ""
        # /path: a socket file; @name: a Linux abstract socket (leading NUL).
        self._address: str | bytes | None = (
            name if name.startswith("/") else b"\0" + name[1:].encode() if name.startswith("@") and name[1:] else None
        )
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        if env.get("WATCHDOG_PID") is not None and _positive_int(env.get("WATCHDOG_PID")) != self._pid:
            usec = None  # the watchdog belongs to another process
        self.watchdog_interval_s: float | None = usec / 2e6 if usec and self._address is not None else None
        if unset_environment and isinstance(env, MutableMapping):
            for var in NOTIFY_ENV_VARS:
                env.pop(var, None)

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, as systemd 253+ expects; `ready()` ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def watchdog(self) -> bool:
        return self.watchdog_interval_s is not None and self.notify("WATCHDOG=1")

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one datagram; True if it was handed to the socket."""
        if self._address is None or not lines or os.getpid() != self._pid:
            return False
        payload = "\n".join(lines).encode("utf-8", "surrogateescape")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s (message %r)", self._address, exc, payload)
                return False
        return True


def _status(text: str | None) -> tuple[str, ...]:
    """STATUS= flattened to one line (systemctl shows one), or nothing."""
    return () if text is None else ("STATUS=" + " ".join(str(text).splitlines()),)
