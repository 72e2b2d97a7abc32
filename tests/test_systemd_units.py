"""The systemd units in systemd/: real `systemd-analyze verify` and `security`, key directives.

systemd-analyze works without a running systemd. It is required: without it these tests
fail (CI installs the `systemd` package), they are never skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from watcherd.daemon.service import STOP_GRACE_S  # the daemon's own SIGTERM grace period (design §8)

REPO = Path(__file__).resolve().parents[1]
UNIT_DIR = REPO / "systemd"
PLAIN = "watcherd.service"
TEMPLATE = "watcherd@.service"
INSTANCE = "watcherd@0.service"
UNITS = [PLAIN, TEMPLATE]

WATCHERD_BIN = "/opt/watcherd/venv/bin/watcherd"
MAX_EXPOSURE = 2.0

NVIDIA_DEVICES = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "char-nvidia-frontend",
    "char-nvidia-caps",
]


# ---------------------------------------------------------------------------------------
# A small unit-file parser: sections, comments, continuation lines, repeated keys.


@dataclass
class Unit:
    name: str
    sections: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def values(self, section: str, key: str) -> list[str]:
        """All assignments of `key` in order, with systemd's reset-on-empty applied."""
        result: list[str] = []
        for value in self.sections.get(section, {}).get(key, []):
            if value == "":
                result = []
            else:
                result.append(value)
        return result

    def raw(self, section: str, key: str) -> list[str]:
        return list(self.sections.get(section, {}).get(key, []))

    def last(self, section: str, key: str) -> str | None:
        raw = self.raw(section, key)
        return raw[-1] if raw else None

    def words(self, section: str, key: str) -> list[str]:
        """Every value split on whitespace (for list settings such as ReadWritePaths=)."""
        return [w for v in self.values(section, key) for w in shlex.split(v)]

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.values("Service", "Environment"):
            for assignment in shlex.split(value):
                key, _, val = assignment.partition("=")
                env[key] = val
        return env


def parse_unit(path: Path) -> Unit:
    unit = Unit(path.name)
    section: str | None = None
    pending = ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        stripped, pending = (pending + stripped).strip(), ""
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            unit.sections.setdefault(section, {})
            continue
        assert section is not None, f"{path}:{number}: assignment outside a section"
        assert "=" in stripped, f"{path}:{number}: not KEY=VALUE: {line!r}"
        key, _, value = stripped.partition("=")
        unit.sections[section].setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path}: dangling continuation line"
    return unit


def seconds(value: str) -> float:
    """systemd time span ("60", "60s", "1min 30s", "900") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


# ---------------------------------------------------------------------------------------
# systemd-analyze


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze") or next(
        (p for p in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze") if os.access(p, os.X_OK)),
        None,
    )
    if exe is None:
        pytest.fail(
            "systemd-analyze not found: these tests need it (Debian/Ubuntu: apt-get install "
            "systemd); it runs without a running systemd",
            pytrace=False,
        )
    return exe


@pytest.fixture(scope="session")
def checkable_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Copies of the units whose ExecStart= names an executable that exists here.

    `systemd-analyze verify` refuses a missing ExecStart= binary, and the daemon is only
    installed on real hosts, so /opt/watcherd/venv/bin/watcherd is replaced by this
    interpreter. Nothing else changes (ExecReload=/bin/kill must exist as written).
    """
    directory = tmp_path_factory.mktemp("units")
    stand_in = sys.executable
    assert os.access(stand_in, os.X_OK)
    for name in UNITS:
        text = (UNIT_DIR / name).read_text(encoding="utf-8")
        assert f"ExecStart={WATCHERD_BIN} " in text, f"{name}: ExecStart= must run {WATCHERD_BIN}"
        (directory / name).write_text(
            text.replace(f"ExecStart={WATCHERD_BIN} ", f"ExecStart={stand_in} "), encoding="utf-8"
        )
    yield directory


def run_analyze(systemd_analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [systemd_analyze, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Verify the single unit, the template file itself and a concrete instance (specifiers
# such as %i resolved), which is what systemd will load.
VERIFY_TARGETS = [PLAIN, TEMPLATE, INSTANCE]


@pytest.mark.parametrize("target", VERIFY_TARGETS)
def test_systemd_analyze_verify_is_clean(systemd_analyze: str, checkable_dir: Path, target: str) -> None:
    result = run_analyze(systemd_analyze, "verify", "--man=no", str(checkable_dir / target), cwd=checkable_dir)
    assert result.returncode == 0, f"verify {target} failed:\n{result.stderr}{result.stdout}"
    assert result.stderr == "", f"verify {target} warned:\n{result.stderr}"


def test_verify_catches_errors(systemd_analyze: str, checkable_dir: Path, tmp_path: Path) -> None:
    """Guard against a verify that silently checks nothing (e.g. a template not loaded)."""
    broken = (
        (checkable_dir / TEMPLATE)
        .read_text(encoding="utf-8")
        .replace("KillMode=mixed", "KillMode=mixed\nNoSuchDirective=1")
    )
    (tmp_path / TEMPLATE).write_text(broken, encoding="utf-8")
    result = run_analyze(systemd_analyze, "verify", "--man=no", str(tmp_path / INSTANCE), cwd=tmp_path)
    assert "NoSuchDirective" in result.stderr


@pytest.mark.parametrize("target", [PLAIN, INSTANCE])
def test_security_exposure_is_low(systemd_analyze: str, checkable_dir: Path, target: str) -> None:
    result = run_analyze(
        systemd_analyze, "security", "--offline=yes", "--no-pager", str(checkable_dir / target), cwd=checkable_dir
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in systemd-analyze security output:\n{output}"
    assert match.group(1) == target
    exposure = float(match.group(2))
    assert exposure <= MAX_EXPOSURE, f"{target}: exposure {exposure} > {MAX_EXPOSURE}\n{output}"


# ---------------------------------------------------------------------------------------
# Directives


@pytest.fixture(params=UNITS)
def unit(request: pytest.FixtureRequest) -> Unit:
    return parse_unit(UNIT_DIR / request.param)


@pytest.fixture
def plain() -> Unit:
    return parse_unit(UNIT_DIR / PLAIN)


@pytest.fixture
def template() -> Unit:
    return parse_unit(UNIT_DIR / TEMPLATE)


def test_service_lifecycle_directives(unit: Unit) -> None:
    s = "Service"
    assert unit.last(s, "Type") == "notify"
    assert unit.last(s, "NotifyAccess") == "main"
    assert seconds(unit.last(s, "WatchdogSec") or "") == 60
    assert unit.last(s, "Restart") == "on-failure"
    assert seconds(unit.last(s, "RestartSec") or "") == 5
    assert "78" in unit.words(s, "RestartPreventExitStatus")
    assert unit.last(s, "KillMode") == "mixed"
    assert seconds(unit.last(s, "TimeoutStartSec") or "") == 900
    stop = seconds(unit.last(s, "TimeoutStopSec") or "")
    assert stop == 60 and stop > STOP_GRACE_S
    assert unit.last(s, "OOMPolicy") == "continue"
    assert any(v.startswith("/bin/kill -HUP $MAINPID") for v in unit.values(s, "ExecReload"))


def test_start_limits_live_in_unit_section(unit: Unit) -> None:
    assert int(unit.last("Unit", "StartLimitBurst") or 0) >= 1
    assert seconds(unit.last("Unit", "StartLimitIntervalSec") or "") > 0
    # In [Service] these names are deprecated aliases that newer systemd warns about.
    assert unit.raw("Service", "StartLimitBurst") == []
    assert unit.raw("Service", "StartLimitIntervalSec") == []


def test_identity_environment_and_directories(unit: Unit) -> None:
    s = "Service"
    assert unit.last(s, "User") == "watcherd"
    assert unit.last(s, "Group") == "watcherd"
    assert unit.last(s, "SyslogIdentifier") == "watcherd"
    assert "-/etc/default/watcherd" in unit.values(s, "EnvironmentFile")
    assert unit.environment().get("PYTHONUNBUFFERED") == "1"
    rw = [p.lstrip("-") for p in unit.words(s, "ReadWritePaths")]
    assert rw == ["/srv/ocr"], "only the configured folders' root may be writable"
    assert "/srv/ocr" in unit.words("Unit", "RequiresMountsFor")
    assert unit.values("Install", "WantedBy") == ["multi-user.target"]


def test_plain_unit_specifics(plain: Unit) -> None:
    s = "Service"
    assert plain.values(s, "ExecStart") == [f"{WATCHERD_BIN} run --config /etc/watcherd/watcherd.yaml"]
    assert plain.words(s, "StateDirectory") == ["watcherd"]
    assert plain.words(s, "RuntimeDirectory") == ["watcherd"]
    assert plain.last(s, "PrivateDevices") == "yes"


def test_template_specifics(template: Unit) -> None:
    s = "Service"
    assert template.values(s, "ExecStart") == [f"{WATCHERD_BIN} run --config /etc/watcherd/watcherd@%i.yaml"]
    assert template.environment().get("CUDA_VISIBLE_DEVICES") == "%i"
    assert template.words(s, "StateDirectory") == ["watcherd/%i"]
    assert template.words(s, "RuntimeDirectory") == ["watcherd/%i"]


def test_common_hardening(unit: Unit) -> None:
    s = "Service"
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert unit.last(s, key) == value, f"{unit.name}: {key}={unit.last(s, key)!r}"
    # CAP_LEASE alone: the write-in-progress check (a read lease) on files owned by other users.
    assert unit.words(s, "CapabilityBoundingSet") == ["CAP_LEASE"], "no capability but CAP_LEASE"
    assert unit.words(s, "AmbientCapabilities") == ["CAP_LEASE"]
    assert "@system-service" in unit.words(s, "SystemCallFilter")
    assert set(unit.words(s, "RestrictAddressFamilies")) <= {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_gpu_template_keeps_nvidia_reachable(template: Unit) -> None:
    s = "Service"
    # torch needs W+X memory (JIT) and /dev/nvidia* must stay visible.
    assert template.last(s, "MemoryDenyWriteExecute") in (None, "no")
    assert template.last(s, "PrivateDevices") in (None, "no")
    assert template.last(s, "ProcSubset") in (None, "all")
    assert template.last(s, "DevicePolicy") == "closed"
    allowed = {}
    for value in template.values(s, "DeviceAllow"):
        device, _, access = value.partition(" ")
        allowed[device] = access.strip()
    for device in NVIDIA_DEVICES:
        assert "r" in allowed.get(device, "") and "w" in allowed.get(device, ""), device
    assert any(d in allowed for d in ("char-nvidia", "char-nvidia-uvm")), allowed


def test_plain_unit_has_no_device_access(plain: Unit) -> None:
    assert plain.values("Service", "DeviceAllow") == []
