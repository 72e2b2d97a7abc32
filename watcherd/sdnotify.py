"""A tiny, dependency-free client for systemd's ``sd_notify`` protocol.

systemd (``Type=notify``) hands the service a datagram socket in ``NOTIFY_SOCKET``; the
service sends newline-separated ``KEY=VALUE`` lines to it (``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``...). See sd_notify(3).

Contract of this module:

* :class:`Notifier` reads its settings once, from the environment it is given (by default
  ``os.environ``) when it is built.
* Without ``NOTIFY_SOCKET`` (not started by systemd, tests, ``watcherd ocr``) every method
  does nothing at all: no socket is created and nothing is sent; methods return ``False``.
* Sending never raises. Failures (socket gone, queue full, bad address) are logged at
  DEBUG level on ``logging.getLogger(__name__)`` and reported by a ``False`` return value.
* Only the process that built the notifier sends: after ``fork()`` the child's copy is
  silent, because with ``NotifyAccess=main`` systemd would reject (and log) its messages
  anyway. Child processes started with ``exec`` should not inherit the variables at all:
  build the notifier with ``unset_environment=True`` or remove :data:`NOTIFY_ENV_VARS` from
  the child's environment.
* The watchdog is enabled when ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID``
  is unset or names this process (as ``sd_watchdog_enabled(3)``); otherwise
  :meth:`Notifier.watchdog` sends nothing and :attr:`Notifier.watchdog_interval_s` is
  ``None``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["NOTIFY_ENV_VARS", "Notifier"]

log = logging.getLogger(__name__)

#: Variables systemd sets for the notify protocol; strip them from a child's environment.
NOTIFY_ENV_VARS: tuple[str, ...] = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

#: Longest time one send may block (a datagram socket blocks when the manager's queue is
#: full). Short, so that a stuck service manager cannot freeze the daemon's main loop.
SEND_TIMEOUT_S = 1.0


def _socket_address(value: str) -> str | bytes | None:
    """Turn a ``NOTIFY_SOCKET`` value into an ``AF_UNIX`` address, or ``None`` if unusable.

    ``/path`` is a file-system socket; ``@name`` is a Linux abstract socket (leading NUL).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


def _parse_positive_int(value: str | None) -> int | None:
    """``int(value)`` if it is a positive decimal integer, else ``None``."""
    if value is None:
        return None
    try:
        number = int(value.strip(), 10)
    except ValueError:
        return None
    return number if number > 0 else None


class Notifier:
    """Send notifications to the service manager; a silent no-op outside systemd.

    Build one in the main process, at start-up::

        notifier = Notifier(unset_environment=True)
        ...                                   # load the model
        notifier.ready("idle")
        while running:
            ...
            notifier.watchdog()               # every watchdog_interval_s, if not None
        notifier.stopping()

    All sending methods return ``True`` when the datagram was handed to the socket and
    ``False`` when nothing was sent (disabled, forked child, or a send error). They never
    raise. The object is safe to use from several threads.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``.

        ``environ`` defaults to ``os.environ``. With ``unset_environment=True`` those three
        variables are removed from it afterwards (when it is mutable), so processes started
        later do not inherit them.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

        raw_socket = env.get("NOTIFY_SOCKET") or None
        self._socket_name: str | None = raw_socket
        self._address: str | bytes | None = None
        if raw_socket is not None:
            self._address = _socket_address(raw_socket)
            if self._address is None:
                log.debug(
                    "NOTIFY_SOCKET=%r is not an absolute path or @abstract name; notifications disabled", raw_socket
                )

        usec = _parse_positive_int(env.get("WATCHDOG_USEC"))
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid is not None and _parse_positive_int(watchdog_pid) != self._pid:
            # The watchdog belongs to another process (e.g. we were started by the daemon).
            usec = None
        self._watchdog_usec: int | None = usec if self._address is not None else None

        if unset_environment and isinstance(env, MutableMapping):
            for name in NOTIFY_ENV_VARS:
                env.pop(name, None)

    # -- properties ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when ``NOTIFY_SOCKET`` named a usable socket (we run under systemd)."""
        return self._address is not None

    @property
    def socket_name(self) -> str | None:
        """The ``NOTIFY_SOCKET`` value as given, or ``None``."""
        return self._socket_name

    @property
    def watchdog_enabled(self) -> bool:
        """True when this process is expected to send ``WATCHDOG=1`` keep-alive pings."""
        return self._watchdog_usec is not None

    @property
    def watchdog_usec(self) -> int | None:
        """The watchdog timeout in microseconds, or ``None`` when the watchdog is off."""
        return self._watchdog_usec

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`: half of ``WATCHDOG_USEC``, in seconds.

        ``None`` when the watchdog is off (no socket, no or invalid ``WATCHDOG_USEC``, or
        ``WATCHDOG_PID`` naming another process).
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # -- messages --------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Send ``READY=1`` (start-up finished; the model is loaded), optionally with STATUS."""
        return self.notify("READY=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """Send ``STATUS=text``, shown by ``systemctl status``; newlines become spaces."""
        return self.notify(*self._status_lines(text))

    def stopping(self, status: str | None = None) -> bool:
        """Send ``STOPPING=1`` (shutdown has begun), optionally with STATUS."""
        return self.notify("STOPPING=1", *self._status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """Send ``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds).

        Call :meth:`ready` once the new configuration is in effect.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_lines(status))

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` if the watchdog is enabled for this process, else nothing."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Send ``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more from now to start or stop."""
        usec = max(0, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=VALUE`` each) as one datagram, joined by newlines.

        Returns ``True`` if the datagram was sent; ``False`` if notifications are disabled,
        this is a forked copy in another process, there is nothing to send, or sending
        failed (logged at DEBUG). Never raises.
        """
        if self._address is None or not lines:
            return False
        if os.getpid() != self._pid:
            log.debug("sd_notify from forked pid %d ignored (main pid %d): %r", os.getpid(), self._pid, lines)
            return False
        try:
            payload = "\n".join(lines).encode("utf-8", "surrogateescape")
        except (TypeError, UnicodeError) as exc:
            log.debug("sd_notify: cannot encode %r: %s", lines, exc)
            return False
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                log.debug("sd_notify to %s failed: %s (message %r)", self._socket_name, exc, payload)
                return False
        return True

    def close(self) -> None:
        """Close the socket, if one was opened. Later sends open a new one."""
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                except OSError:  # pragma: no cover - close() on a datagram socket
                    pass
                self._sock = None

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        """``("STATUS=...",)`` with the text flattened to one line, or ``()``."""
        if text is None:
            return ()
        return ("STATUS=" + " ".join(str(text).splitlines()),)

    def __repr__(self) -> str:
        return f"Notifier(socket={self._socket_name!r}, watchdog_usec={self._watchdog_usec!r}, pid={self._pid})"
