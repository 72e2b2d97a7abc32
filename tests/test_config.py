"""Configuration errors: one clear message naming the key and the file, exit code 78."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_config_error, make_image, run_watcherd
from watcherd.core import config_file, settings


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / "watcherd.yaml"
    path.write_text(text.replace("ROOT", str(tmp_path)))
    return path


GOOD = """
paths: {inbox: ROOT/inbox, outbox: ROOT/outbox, failed: ROOT/failed, archive: ROOT/archive}
"""


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("ocr: {timeout: 5}", "ocr.timeout", "unknown key"),
        ("ocr: {timeout_s: soon}", "ocr.timeout_s", "expected a number"),
        ("watch: {mode: inotify}", "watch.mode", "must be one of auto | events | polling"),
        ("watch: {include: '*.jpg'}", "watch.include", "expected a list"),
        ("gpu: {max_usage_percent: 120}", "gpu.max_usage_percent", "(0, 100]"),
        ("output: {on_success: keep}", "output.on_success", "archive | delete"),
        ("logging: {level: 3}", "logging.level", "must be one of"),
        ("scanner: {}", "scanner", "unknown key"),
        ("ocr: {timeout_s: .nan}", "ocr.timeout_s", "must be a finite number"),
        ("watch: {settle_s: .inf}", "watch.settle_s", "must be a finite number"),
        ("ocr: {max_file_mb: -.inf}", "ocr.max_file_mb", "must be a finite number"),
        ("gpu: {wait_for_memory_s: 1e999}", "gpu.wait_for_memory_s", "must be a finite number"),
        ("ocr: {load_timeout_s: " + "9" * 400 + "}", "ocr.load_timeout_s", "must be a finite number"),
    ],
)
def test_bad_values_exit_78_naming_the_key_and_file(tmp_path: Path, extra: str, key: str, words: str) -> None:
    assert_config_error(tmp_path, GOOD + extra, key, words)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_ocr_timeout_from_the_environment_must_be_finite(tmp_path: Path, value: str) -> None:
    config = write(tmp_path, GOOD)
    result = run_watcherd("run", "--config", str(config), env={**os.environ, "OCR_TIMEOUT": value})
    assert result.returncode == 78, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "ocr.timeout_s (from OCR_TIMEOUT)" in message and "must be a finite number" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("ocr", "timeout_s", float("nan")),
        ("ocr", "load_timeout_s", float("inf")),
        ("watch", "settle_s", float("inf")),
        ("watch", "poll_interval_s", float("nan")),
        ("gpu", "max_usage_percent", float("nan")),
        ("gpu", "wait_for_memory_s", float("-inf")),
        ("ocr", "timeout_s", "nan"),
    ],
)
def test_non_finite_numbers_are_config_errors(section: str, key: str, value: object) -> None:
    with pytest.raises(settings.ConfigError, match=f"{section}.{key}: must be a finite number"):
        config_file.from_dict({section: {key: value}}, env={})


def test_missing_paths_and_loops_are_refused(tmp_path: Path) -> None:
    config = write(tmp_path, "paths: {inbox: ROOT/inbox, failed: ROOT/failed, archive: ROOT/a}")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and "paths.outbox: is required" in result.stderr

    config = write(tmp_path, "paths: {inbox: ROOT/inbox, outbox: ROOT/inbox/out, failed: ROOT/f, archive: ROOT/a}")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and "paths.outbox" in result.stderr and "inside the inbox" in result.stderr

    config = write(tmp_path, "paths: {inbox: ROOT/nowhere, outbox: ROOT/o, failed: ROOT/f, archive: ROOT/a}")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and "paths.inbox" in result.stderr


def test_unloadable_engine_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD + "ocr: {engine: 'tests.engines:Missing'}")
    waiting = make_image(tmp_path / "inbox" / "waiting.png")
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78
    assert "ocr.engine" in result.stderr and "Missing" in result.stderr
    assert waiting.exists()  # files stay in the inbox while no engine can take them


def test_config_from_environment_and_ocr_timeout_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, GOOD + "ocr: {timeout_s: 300}")
    monkeypatch.setenv("WATCHERD_CONFIG", str(config))
    monkeypatch.setenv("OCR_TIMEOUT", "42")
    loaded = config_file.load()
    assert loaded.ocr.timeout_s == 42.0
    assert loaded.paths.inbox == tmp_path / "inbox"
    monkeypatch.setenv("OCR_TIMEOUT", "never")
    with pytest.raises(settings.ConfigError, match="OCR_TIMEOUT"):
        config_file.load()


def test_the_documented_example_config_is_complete_and_valid() -> None:
    example = config_file.load(REPO / "config" / "watcherd.yaml", env={})
    assert example == settings.Settings(
        paths=settings.PathsSettings(
            Path("/srv/ocr/inbox"),
            Path("/srv/ocr/outbox"),
            Path("/srv/ocr/failed"),
            Path("/srv/ocr/archive"),
            state=config_file.default_state_dir({}),
        ),
        source=example.source,
    ), "config/watcherd.yaml must list every key with its default"


def test_check_reports_folders_and_engine(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD + "ocr: {engine: 'tests.engines:Echo'}")
    result = run_watcherd("check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "create, rename, delete: allowed" in result.stdout
    assert "tests.engines:Echo imports" in result.stdout
    config = write(tmp_path, GOOD + "ocr: {engine: 'nosuchpackage:Engine'}")
    result = run_watcherd("check", "--config", str(config))
    assert result.returncode == 1 and "FAIL  ocr.engine" in result.stdout


def test_check_reports_the_gpu_guards(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    result = run_watcherd("check", "--config", str(config))
    assert "ok    gpu           not used (rapidocr runs on the CPU)" in result.stdout
    config = write(tmp_path, GOOD + "ocr: {engine: 'tests.engines:Echo', devices: [0]}")
    result = run_watcherd("check", "--config", str(config))
    # torch is installed (CPU build) but this machine has no CUDA device: a configured GPU fails.
    assert result.returncode == 1
    assert "FAIL  gpu 0         no CUDA device visible" in result.stdout


def test_file_mode_takes_octal_bits_and_nothing_else() -> None:
    for value, bits in ((0o640, 0o640), ("0600", 0o600), ("644", 0o644)):
        assert config_file.from_dict({"output": {"file_mode": value}}, env={}).output.file_mode == bits
    assert config_file.from_dict({}, env={}).output.dir_mode == 0o750
    for bad in (0o777, "rw-r-----", True, -1, 1.5):
        with pytest.raises(settings.ConfigError, match="output.file_mode"):
            config_file.from_dict({"output": {"file_mode": bad}}, env={})


def test_the_state_folder_comes_from_systemd_and_never_from_the_inbox(tmp_path: Path) -> None:
    assert config_file.from_dict({}, env={"STATE_DIRECTORY": "/var/lib/watcherd"}).paths.state == Path(
        "/var/lib/watcherd"
    )
    assert config_file.from_dict({}, env={"XDG_STATE_HOME": "/x"}).paths.state == Path("/x/watcherd")
    for key in ("state", "work"):
        inside = {"inbox": str(tmp_path), "outbox": "/o", "failed": "/f", "archive": "/a", key: str(tmp_path / "w")}
        with pytest.raises(settings.ConfigError, match=f"paths.{key}"):
            config_file.from_dict({"paths": inside}, env={}).require_paths()
