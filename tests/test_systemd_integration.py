"""The daemon as systemd sees it: sd_notify on a socket the test binds, a real journald, signals,
and the status file `watcherd status` reads."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, make_image, run_watcherd, wait_until


class NotifyReceiver:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; records (pid, message)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, int, str]] = []

    def poll(self) -> list[tuple[float, int, str]]:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                return self.messages
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), pid, line))

    def seen(self, prefix: str) -> list[tuple[float, int, str]]:
        return [m for m in self.poll() if m[2].startswith(prefix)]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    yield receiver
    receiver.sock.close()


def test_sd_notify_ready_status_watchdog_stopping_from_the_main_pid(daemon_factory, notify) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:SlowLoad", "options": {"load_s": 1.0}})
    started = time.monotonic()
    daemon.start(wait_ready=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    ready = wait_until(lambda: notify.seen("READY=1"), 30, "READY=1")
    assert ready[0][0] - started >= 1.0  # only after the model loaded
    assert " ready: tests.engines:SlowLoad loaded" in daemon.log()
    wait_until(lambda: len(notify.seen("WATCHDOG=1")) >= 4, 10, "watchdog pings every WATCHDOG_USEC/2")
    pings = [t for t, _, _ in notify.seen("WATCHDOG=1")]
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 0.4  # never later than WATCHDOG_USEC

    make_image(daemon.inbox / "one.png")
    wait_until(lambda: any("1 ok" in m for _, _, m in notify.seen("STATUS=")), 30, "STATUS with 1 ok")
    statuses = [m for _, _, m in notify.seen("STATUS=")]
    assert statuses[0].startswith("STATUS=loading model")
    assert any(m.startswith("STATUS=idle · 1 ok · 0 failed · queue 0") for m in statuses), statuses

    assert daemon.stop(signal.SIGTERM) == 0
    assert notify.seen("STOPPING=1")
    assert {pid for _, pid, _ in notify.poll()} == {daemon.proc.pid}  # NotifyAccess=main holds


def test_sighup_reloads_settle_time_without_dropping_the_queue(daemon_factory, notify) -> None:
    daemon = daemon_factory(watch={"settle_s": 3600})
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    make_image(daemon.inbox / "waiting.png")
    wait_until(lambda: '"settling": 1' in status_text(daemon), 30, "the file to be tracked")
    daemon.configure(watch={"settle_s": 0.2})
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_json("waiting.png")["status"] == "ok"
    assert notify.seen("RELOADING=1")
    assert "Configuration reloaded" in daemon.log()
    assert len(daemon.child_pids()) == 1  # engine settings unchanged: the child was kept


def test_a_bad_config_on_sighup_keeps_the_running_one(daemon_factory) -> None:
    daemon = daemon_factory().start()
    daemon.config_path.write_text("ocr: {timeout_s: soon}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "Reload failed, keeping the running configuration" in daemon.log(), 10)
    make_image(daemon.inbox / "still.png")
    assert daemon.wait_json("still.png")["status"] == "ok"


def status_text(daemon) -> str:
    path = daemon.status_path
    return path.read_text() if path.exists() else ""


def test_watcherd_status_shows_the_file_in_flight(daemon_factory) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Slow", "timeout_s": 300}).start()
    make_image(daemon.inbox / "long.png")
    wait_until(lambda: '"source": "long.png"' in status_text(daemon), 30, "the status file to show long.png")
    cmd = ["status", "--config", str(daemon.config_path)]
    shown = run_watcherd(*cmd, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "working" and status["pid"] == daemon.proc.pid
    assert status["in_flight"][0]["child_pid"] == daemon.child_pid()
    human = run_watcherd(*cmd).stdout
    assert "running" in human and "in flight: long.png" in human
    daemon.stop(signal.SIGKILL)
    dead = run_watcherd(*cmd)
    assert dead.returncode == 3 and "NOT running" in dead.stdout


def test_retry_moves_failed_originals_back(daemon_factory) -> None:
    daemon = daemon_factory().start()
    (daemon.inbox / "bad.png").write_text("not a png")
    daemon.wait_json("bad.png", daemon.failed)
    daemon.stop()
    result = run_watcherd("retry", "--config", str(daemon.config_path))
    assert result.returncode == 0 and "1 file(s) back in the inbox" in result.stdout
    assert (daemon.inbox / "bad.png").read_text() == "not a png"
    assert not (daemon.failed / "bad.png").exists() and not (daemon.failed / "bad.png.json").exists()
    assert len(list((daemon.failed / ".retried").glob("bad.png.*.json"))) == 1


JOURNAL_SCRIPT = r"""
set -eu
mount -t tmpfs tmpfs /run/systemd/journal
mkdir -p /run/log/journal && mount -t tmpfs tmpfs /run/log/journal
/lib/systemd/systemd-journald & J=$!
i=0; while [ ! -S /run/systemd/journal/socket ]; do i=$((i+1)); [ $i -lt 100 ] || exit 90; sleep 0.1; done
"$PYTHON" -m watcherd run --config "$CONFIG" 2>"$WORK/stderr.log" & D=$!
i=0; while [ ! -e "$WORK/outbox/good.png.json" ] || [ ! -e "$WORK/failed/bad.jpg.json" ]; do
  i=$((i+1)); [ $i -lt 600 ] || break; sleep 0.1; done
kill -TERM $D; wait $D || true
journalctl --sync || true
journalctl -D /run/log/journal -o json --no-pager SYSLOG_IDENTIFIER=watcherd > "$WORK/journal.json"
kill $J; wait $J || true
"""


def test_a_real_journald_receives_the_watcherd_fields(daemon_factory, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root for unshare -m and journald (CI runs as root)"
    assert Path("/lib/systemd/systemd-journald").exists(), "systemd-journald missing: run scripts/setup --test"
    daemon = daemon_factory(logging={"target": "journal"})
    make_image(daemon.inbox / "good.png")
    (daemon.inbox / "bad.jpg").write_text("text, not a jpeg")
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG": str(daemon.config_path), "WORK": str(tmp_path)}
    subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", JOURNAL_SCRIPT],
        cwd=REPO,
        env=env,
        check=True,
        timeout=120,
    )
    entries = [json.loads(line) for line in (tmp_path / "journal.json").read_text().splitlines()]
    by_event = {}
    for entry in entries:
        by_event.setdefault(entry.get("WATCHERD_EVENT"), []).append(entry)
    done, failed = by_event["done"][0], by_event["failed"][0]
    assert done["WATCHERD_SOURCE"] == "good.png" and done["PRIORITY"] == "6"
    assert float(done["WATCHERD_PROCESSING_TIME"]) > 0 and done["WATCHERD_PAGES"] == "1"
    assert failed["WATCHERD_SOURCE"] == "bad.jpg" and failed["PRIORITY"] == "3"
    assert failed["WATCHERD_ERROR_CODE"] == "unsupported_type"
    assert {"ready", "claimed", "child_started", "stopping"} <= set(by_event)
    assert (tmp_path / "outbox" / "good.png.json").exists()


def test_a_reload_to_an_engine_that_does_not_import_keeps_the_running_one(daemon_factory) -> None:
    daemon = daemon_factory().start()
    daemon.configure(ocr={"engine": "nosuchpackage:Engine"})
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "Reload failed, keeping the running configuration" in daemon.log(), 30)
    make_image(daemon.inbox / "kept.png")
    assert daemon.wait_json("kept.png")["status"] == "ok" and daemon.alive()
