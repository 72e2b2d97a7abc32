"""A private RabbitMQ node for the many-hosts tests and benchmark (RECIPES.md "RabbitMQ for
tests"): its own node name, ports and data folder on loopback, run by the `rabbitmq` user."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil

from tests.conftest import wait_until

RABBITMQ = shutil.which("rabbitmq-server") or (
    "/usr/sbin/rabbitmq-server" if os.path.exists("/usr/sbin/rabbitmq-server") else None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Rabbit:
    """A private RabbitMQ node (RECIPES.md): own node name, ports and folder, owned by `rabbitmq`."""

    def __init__(self) -> None:
        # Not under pytest's 0700 temp folder: the node runs as the rabbitmq user and must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="watcherd-rabbit-"))
        self.dir.chmod(0o755)
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"wdtest{self.port}@localhost"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "consumer_timeout = 3600000\n"  # above the longest file (docs/cluster.md: raise it in production)
            "log.console = false\n"
        )
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.dir / "plugins-expand"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        log = open(self.dir / "server.out", "ab")
        assert RABBITMQ is not None
        self.proc = subprocess.Popen(
            [RABBITMQ], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir
        )
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 120, "RabbitMQ to listen")
        assert self.proc.poll() is None, (self.dir / "server.out").read_text()

    def _ours(self, name: str, var: str, value: str) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == name and p.environ().get(var) == value:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        """Stop the node (SIGTERM to beam.smp: Erlang shuts down cleanly), wait for it."""
        for p in self._ours("beam.smp", "RABBITMQ_NODENAME", self.node):
            p.terminate()
        wait_until(lambda: not self._ours("beam.smp", "RABBITMQ_NODENAME", self.node), 60, "RabbitMQ to stop")
        if self.proc is not None:
            self.proc.wait(timeout=30)
        wait_until(lambda: not port_open(self.port), 30, "the AMQP port to close")

    def close(self) -> None:
        for p in self._ours("beam.smp", "RABBITMQ_NODENAME", self.node):
            p.kill()
        for p in self._ours("epmd", "ERL_EPMD_PORT", str(self.epmd_port)):
            p.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
