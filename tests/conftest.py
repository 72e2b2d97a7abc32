"""Fixtures that run the real daemon as a process on real folders.

Tests wait on conditions with deadlines (`wait_until`), never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character each."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def without_spaces(text: str) -> str:
    return "".join(text.split())


def cer(expected: str, actual: str, *, normalise: Callable[[str], str] = without_spaces) -> float:
    """Character error rate of `actual` against `expected`, both normalised first (by default:
    whitespace removed, since layout spaces are not the text)."""
    want, got = normalise(expected), normalise(actual)
    return edit_distance(want, got) / max(1, len(want))


def run_watcherd(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m watcherd ARGS` from the repo, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "watcherd", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


PATHS = "paths: {inbox: ROOT/inbox, outbox: ROOT/outbox, failed: ROOT/failed, archive: ROOT/archive}\n"


def assert_config_error(tmp_path: Path, text: str, key: str, words: str) -> subprocess.CompletedProcess[str]:
    """`watcherd run` on a config made of `text` (ROOT is `tmp_path`) exits 78 with one line that
    names the file and `key` and says `words`."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    config = tmp_path / "watcherd.yaml"
    config.write_text(text.replace("ROOT", str(tmp_path)))
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"{config}: {key}:" in message and words in message, message
    return result


def make_image(path: Path, width: int = 64, height: int = 48, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), "white").save(path, format=fmt or "PNG")
    return path


class Daemon:
    """One `watcherd run` process over folders in a temp dir."""

    prefix: list[str] = []  # a command to run it under (e.g. unshare), if any

    def __init__(self, root: Path, **overrides: Any):
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.failed = root / "failed"
        self.archive = root / "archive"
        self.state = root / "state"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "watcherd.yaml"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.configure(**overrides)

    def configure(self, **overrides: Any) -> None:
        config: dict[str, Any] = {
            "paths": {k: str(getattr(self, k)) for k in ("inbox", "outbox", "failed", "archive", "state")},
            "watch": {"settle_s": 0.3, "mode": "events"},
            "ocr": {"engine": "tests.engines:Echo", "timeout_s": 20},
            "output": {"locale": "en"},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        if config["ocr"]["engine"].startswith("tests."):
            # The fakes read the image size ("echo WxH"): turning blank test images is not their
            # business. Orientation is tested with the real engine (test_outputs, test_positions).
            config["ocr"].setdefault("auto_rotate", False)
        self.config_path.write_text(yaml.safe_dump(config, allow_unicode=True))

    def start(self, wait_ready: bool = True, env: dict[str, str] | None = None, cwd: Path = REPO) -> Daemon:
        """Run the daemon (from `cwd`: elsewhere than the repo, pass PYTHONPATH in `env`)."""
        self._log = open(self.log_path, "ab")
        self._log_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "watcherd", "run", "--config", str(self.config_path)],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if wait_ready:
            wait_until(lambda: " ready: " in self.log() or self.proc.poll() is not None, 60, "the child to load")
            assert self.proc.poll() is None, self.log()
        return self

    @property
    def status_path(self) -> Path:
        """Where `watcherd status` finds this daemon's status file (its state folder)."""
        from watcherd.core import config_file
        from watcherd.ops import report

        return report.status_file(config_file.load(self.config_path))

    def log(self) -> str:
        return self.log_path.read_bytes()[self._log_start :].decode("utf-8", "replace")

    def child_pids(self) -> list[int]:
        """Every OCR child this daemon started, oldest first, from its log."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text("utf-8", "replace")
        return [
            int(line.split("(pid ")[1].split(",")[0]) for line in text.splitlines() if "OCR child started (pid " in line
        ]

    def child_pid(self) -> int:
        pids = self.child_pids()
        assert pids, self.log()
        return pids[-1]

    def results(self, folder: Path | None = None) -> list[Path]:
        folder = folder or self.outbox
        return sorted(p for p in folder.rglob("*.json") if not p.name.startswith(".")) if folder.exists() else []

    def wait_json(self, name: str, folder: Path | None = None, timeout: float = 30) -> dict[str, Any]:
        """Wait for `<name>.json` in the outbox or failed folder (folder=None: either)."""
        folders = [folder] if folder else [self.outbox, self.failed]

        def find() -> Path | None:
            for f in folders:
                if (f / f"{name}.json").exists():
                    return f / f"{name}.json"
            return None

        path = wait_until(find, timeout, f"{name}.json ({self.log()[-2000:]})")
        # The JSON is published first, then the original moves: wait for the whole publication.
        claimed = self.inbox / ".watcherd" / "processing" / name
        wait_until(lambda: not os.path.lexists(claimed), 10, f"{name} to leave the work area")
        return json.loads(path.read_bytes())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(**overrides: Any) -> Daemon:
        d = Daemon(tmp_path, **overrides)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        if d.alive():
            d.stop(signal.SIGKILL)
    for d in daemons:  # a leaked OCR child would hold GPU memory in production
        wait_until(lambda: all(gone_or_zombie(pid) for pid in d.child_pids()), 10, "OCR children to exit")


def gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def samples() -> Path:
    assert (SAMPLES / "truth.json").exists(), f"sample scans missing: {SAMPLES}"
    return SAMPLES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """The fault-injection table (tests/test_chaos.py), printed after a run that included it."""
    from tests.test_chaos import CHAOS_ROWS

    rows = config.stash.get(CHAOS_ROWS, [])
    if not rows:
        return
    write = terminalreporter.write_line
    write("")
    write("| fault | iterations | files | lost | duplicated | outcome |")
    write("|---|---|---|---|---|---|")
    for row in rows:
        write("| " + " | ".join(str(c) for c in row) + " |")


# Test modules whose tests run a real daemon or server of their own making (RabbitMQ, Samba,
# journald, Prometheus; the daemon as another user in test_security).
SERVER_MODULES = {
    "test_cluster",
    "test_shares",
    "test_systemd_integration",
    "test_metrics",
    "test_chaos",
    "test_security",
}


def pytest_collection_modifyitems(config, items) -> None:  # type: ignore[no-untyped-def]
    """`slow`: the tests that run a real daemon or server; `make test-fast` runs the rest (units,
    contracts, engines and writers called in-process)."""
    for item in items:
        if (
            "daemon_factory" in getattr(item, "fixturenames", ())
            or item.module.__name__.split(".")[-1] in SERVER_MODULES
        ):
            item.add_marker(pytest.mark.slow)
