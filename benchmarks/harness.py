"""A real daemon over temp folders, for benchmarks (the tests have their own, with assertions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
    return value


class BenchDaemon:
    def __init__(self, ocr: dict[str, Any], watch: dict[str, Any] | None = None, **sections: Any):
        self.tmp = tempfile.TemporaryDirectory(prefix="watcherd-bench-")
        root = Path(self.tmp.name)
        self.inbox, self.outbox, self.failed, self.archive = (
            root / n for n in ("inbox", "outbox", "failed", "archive")
        )
        self.inbox.mkdir()
        config = {
            "paths": {
                **{n: str(getattr(self, n)) for n in ("inbox", "outbox", "failed", "archive")},
                "state": str(root / "state"),
            },
            "watch": {"mode": "events", "settle_s": 0.2, **(watch or {})},
            "ocr": ocr,
            "output": {"text_file": "none"},
            **sections,
        }
        self.config = root / "watcherd.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BenchDaemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcherd", "run", "--config", str(self.config)],
            cwd=REPO,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "watcherd ready" in self.log.read_text(errors="replace"), 120, "daemon ready")
        return self

    def results(self) -> list[Path]:
        return [p for p in self.outbox.rglob("*.json")] if self.outbox.exists() else []

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in self.results()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.tmp.cleanup()


def iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
