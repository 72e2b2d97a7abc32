"""systemd/watcherd-worker@.service: `systemd-analyze verify` and `security`, key directives.

Runs wherever tests/test_systemd_units.py does (it needs systemd-analyze, not RabbitMQ).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.test_systemd_units import (  # noqa: F401  (systemd_analyze is a fixture)
    MAX_EXPOSURE,
    NVIDIA_DEVICES,
    UNIT_DIR,
    WATCHERD_BIN,
    parse_unit,
    run_analyze,
    systemd_analyze,
)

TEMPLATE = "watcherd-worker@.service"
INSTANCE = "watcherd-worker@0.service"


def checkable(tmp_path: Path) -> Path:
    text = (UNIT_DIR / TEMPLATE).read_text(encoding="utf-8")
    assert f"ExecStart={WATCHERD_BIN} worker " in text
    (tmp_path / TEMPLATE).write_text(text.replace(f"ExecStart={WATCHERD_BIN} ", f"ExecStart={sys.executable} "))
    return tmp_path


def test_worker_unit_verifies_clean(systemd_analyze: str, tmp_path: Path) -> None:  # noqa: F811
    directory = checkable(tmp_path)
    for target in (TEMPLATE, INSTANCE):
        result = run_analyze(systemd_analyze, "verify", "--man=no", str(directory / target), cwd=directory)
        assert result.returncode == 0 and result.stderr == "", f"{target}:\n{result.stderr}{result.stdout}"


def test_worker_unit_exposure_is_low(systemd_analyze: str, tmp_path: Path) -> None:  # noqa: F811
    directory = checkable(tmp_path)
    result = run_analyze(
        systemd_analyze, "security", "--offline=yes", "--no-pager", str(directory / INSTANCE), cwd=directory
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_worker_unit_directives() -> None:
    unit = parse_unit(UNIT_DIR / TEMPLATE)
    service = unit.sections["Service"]
    assert service["ExecStart"][-1].split()[1:3] == ["worker", "--config"]
    assert unit.values("Service", "RestartPreventExitStatus") == ["78"]
    assert unit.values("Service", "OOMPolicy") == ["continue"]  # a dead pool process is Celery's to replace
    assert unit.values("Service", "Environment").count("CUDA_VISIBLE_DEVICES=%i") == 1
    assert unit.values("Service", "ProtectSystem") == ["strict"] and "ReadWritePaths" not in service
    assert "PrivateDevices" not in service and "MemoryDenyWriteExecute" not in service
    allowed = " ".join(unit.values("Service", "DeviceAllow"))
    assert all(device in allowed for device in NVIDIA_DEVICES)
