"""watcherd.daemon.sdnotify against a real AF_UNIX datagram receiver (what systemd listens on)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from watcherd.daemon import sdnotify
except ImportError:  # run from elsewhere than the repo root, package not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from watcherd.daemon import sdnotify

Notifier = sdnotify.Notifier

RECV_TIMEOUT_S = 5.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """Plays systemd's side: a bound SOCK_DGRAM socket that reports each sender's pid."""

    def __init__(self, address: str | bytes, notify_socket: str) -> None:
        self.notify_socket = notify_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(RECV_TIMEOUT_S)

    def recv(self) -> tuple[list[str], int | None]:
        """Wait (up to RECV_TIMEOUT_S) for one datagram: its lines and the sender's pid."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        pid = None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CRED.unpack(cdata[: _CRED.size])[0]
        return data.decode().split("\n"), pid

    def messages(self) -> list[str]:
        return self.recv()[0]

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        recv = Receiver(path, path)
    else:
        name = f"watcherd-test-{uuid.uuid4().hex}"
        recv = Receiver(b"\0" + name.encode(), "@" + name)
    yield recv
    recv.close()


def test_messages_arrive_in_order_from_this_process(receiver: Receiver) -> None:
    n = Notifier(receiver.env(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid())))
    assert n.ready() is True
    assert n.status("working on scanner1/b.jpg, 3 queued") is True
    assert n.watchdog() is True
    assert n.stopping() is True

    first, pid = receiver.recv()
    assert first == ["READY=1"]
    assert pid == os.getpid()  # NotifyAccess=main: the main process itself sends
    assert receiver.messages() == ["STATUS=working on scanner1/b.jpg, 3 queued"]
    assert receiver.messages() == ["WATCHDOG=1"]
    assert receiver.messages() == ["STOPPING=1"]


def test_ready_and_stopping_carry_status_and_status_is_one_line(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    n.ready("idle")
    n.status("line one\nline two\r\nthree")
    n.stopping("finishing page 2")
    assert receiver.messages() == ["READY=1", "STATUS=idle"]
    assert receiver.messages() == ["STATUS=line one line two three"]
    assert receiver.messages() == ["STOPPING=1", "STATUS=finishing page 2"]


def test_reloading_sends_monotonic_usec(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.messages()
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after


def test_notify_sends_arbitrary_lines_as_one_datagram(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    assert n.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=loading model") is True
    assert n.notify() is False  # nothing to send
    assert receiver.messages() == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=loading model"]


def test_unset_notify_socket_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("Notifier opened a socket without NOTIFY_SOCKET")

    monkeypatch.setattr(sdnotify.socket, "socket", no_socket)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.DEBUG, logger=sdnotify.__name__)
    for n in (
        Notifier(),  # os.environ without NOTIFY_SOCKET
        Notifier({}),
        Notifier({"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "60000000"}),
    ):
        assert n.watchdog_interval_s is None
        assert n.ready() is False
        assert n.status("idle") is False
        assert n.watchdog() is False
        assert n.reloading() is False
        assert n.stopping() is False
        assert n.notify("READY=1") is False
    assert caplog.records == []


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: Receiver) -> None:
    n = Notifier(receiver.env(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid())))
    assert n.watchdog_interval_s == pytest.approx(30.0)
    # WATCHDOG_PID unset: the watchdog is ours too.
    assert Notifier(receiver.env(WATCHDOG_USEC="3000000")).watchdog_interval_s == pytest.approx(1.5)


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_no_or_bad_watchdog_usec_disables_watchdog(receiver: Receiver, usec: str | None) -> None:
    env = receiver.env() if usec is None else receiver.env(WATCHDOG_USEC=usec)
    n = Notifier(env)
    assert n.watchdog_interval_s is None
    assert n.watchdog() is False
    n.status("sentinel")
    assert receiver.messages() == ["STATUS=sentinel"]  # no WATCHDOG=1 queued before it


def test_watchdog_pid_of_another_process_disables_watchdog(receiver: Receiver) -> None:
    other = str(os.getpid() + 1)
    n = Notifier(receiver.env(WATCHDOG_USEC="60000000", WATCHDOG_PID=other))
    assert n.watchdog_interval_s is None
    assert n.watchdog() is False
    assert n.status("sentinel") is True  # other messages still go out
    assert receiver.messages() == ["STATUS=sentinel"]


def test_forked_child_stays_silent(receiver: Receiver) -> None:
    n = Notifier(receiver.env(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid())))
    pid = os.fork()
    if pid == 0:  # child: would be rejected by NotifyAccess=main, so must not send
        try:
            ok = n.ready() or n.watchdog() or n.status("from child") or n.stopping()
        finally:
            os._exit(1 if ok else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    n.status("parent")
    lines, sender = receiver.recv()
    assert lines == ["STATUS=parent"]  # the child's datagrams would have been queued first
    assert sender == os.getpid()


def test_unset_environment_removes_variables_for_children(receiver: Receiver) -> None:
    env = receiver.env(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid()), KEEP="1")
    n = Notifier(env, unset_environment=True)
    assert env == {"KEEP": "1"}
    assert n.watchdog_interval_s == pytest.approx(30.0)
    assert n.ready() is True
    assert receiver.messages() == ["READY=1"]


def test_send_errors_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=sdnotify.__name__)
    missing = str(tmp_path / "no-such.sock")
    n = Notifier({"NOTIFY_SOCKET": missing, "WATCHDOG_USEC": "1000000"})
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert any(r.levelno == logging.DEBUG and missing in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_relative_notify_socket_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=sdnotify.__name__)
    n = Notifier({"NOTIFY_SOCKET": "relative.sock", "WATCHDOG_USEC": "1000000"})
    assert n.watchdog_interval_s is None
    assert n.ready() is False


def test_one_socket_is_reused(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    n.status("a")
    first = n._sock
    n.status("b")
    assert n._sock is first and first is not None
    assert receiver.messages() == ["STATUS=a"]
    assert receiver.messages() == ["STATUS=b"]
