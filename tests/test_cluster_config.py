"""`cluster.*` keys: each bad value is one message naming the key, exit code 78; and path_map.

Needs no broker (tests/test_cluster.py runs the real thing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_watcherd
from watcherd.cluster.app import map_path
from watcherd.core import config_file, settings

URL = "amqp://watcherd:s3cret@broker.example:5672/ocr"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / "watcherd.yaml"
    base = "paths: {inbox: ROOT/inbox, outbox: ROOT/outbox, failed: ROOT/failed, archive: ROOT/archive}\n"
    path.write_text((base + text).replace("ROOT", str(tmp_path)))
    return path


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("cluster: {role: master}", "cluster.role", "standalone | dispatcher | worker"),
        ("cluster: {role: worker}", "cluster.broker_url", "is required when cluster.role is 'worker'"),
        ("cluster: {role: dispatcher, broker_url: 'redis://localhost'}", "cluster.broker_url", "amqp://"),
        ("cluster: {progress_grace_s: 0}", "cluster.progress_grace_s", "greater than 0"),
        ("cluster: {progress_grace_s: .nan}", "cluster.progress_grace_s", "finite"),
        ("cluster: {max_deliveries: 0}", "cluster.max_deliveries", "greater than 0"),
        ("cluster: {max_in_flight: 1.5}", "cluster.max_in_flight", "whole number"),
        ("cluster: {queue: 'a b'}", "cluster.queue", "letters, digits"),
        ("cluster: {path_map: {relative: /mnt}}", "cluster.path_map", "absolute"),
        ("cluster: {path_map: {/srv: 3}}", "cluster.path_map", "absolute"),
        ("cluster: {brokers: []}", "cluster.brokers", "unknown key"),
    ],
)
def test_bad_cluster_keys_name_the_key_and_exit_78(tmp_path: Path, extra: str, key: str, words: str) -> None:
    config = write(tmp_path, extra)
    with pytest.raises(settings.ConfigError) as caught:
        config_file.load(config)
    assert caught.value.key == key and words in str(caught.value), str(caught.value)
    result = run_watcherd("check", "--config", str(config))
    assert result.returncode == 78 and key in result.stderr, result.stderr


def test_a_broker_password_never_reaches_a_message(tmp_path: Path) -> None:
    config = write(tmp_path, "cluster: {role: dispatcher, broker_url: 'http://u:s3cret@host/'}")
    result = run_watcherd("check", "--config", str(config))
    assert result.returncode == 78 and "s3cret" not in result.stderr and "u:***@" in result.stderr
    assert settings.redact_url(URL) == "amqp://watcherd:***@broker.example:5672/ocr"
    assert settings.redact_url("amqp://host//") == "amqp://host//"


def test_roles_and_commands_must_agree(tmp_path: Path) -> None:
    worker = write(tmp_path, f"cluster: {{role: worker, broker_url: '{URL}'}}")
    result = run_watcherd("run", "--config", str(worker))
    assert result.returncode == 78 and "watcherd worker" in result.stderr, result.stderr
    standalone = write(tmp_path, "")
    result = run_watcherd("worker", "--config", str(standalone))
    assert result.returncode == 78 and "cluster.role" in result.stderr, result.stderr


def test_a_worker_with_an_engine_it_cannot_import_exits_78_before_the_broker(tmp_path: Path) -> None:
    config = write(
        tmp_path, "ocr: {engine: 'tests.engines:NoSuchEngine'}\ncluster: {role: worker, broker_url: 'amqp://h:1//'}"
    )
    result = run_watcherd("worker", "--config", str(config))
    assert result.returncode == 78 and "ocr.engine" in result.stderr and "NoSuchEngine" in result.stderr


def test_defaults_are_standalone() -> None:
    c = config_file.from_dict({}).cluster
    assert (c.role, c.queue, c.max_deliveries, c.path_map) == ("standalone", "watcherd", 3, {})


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/ocr/inbox/.watcherd/processing/a.png", "/mnt/ocr/inbox/.watcherd/processing/a.png"),
        ("/srv/ocr2/a.png", "/srv/ocr2/a.png"),  # whole folder names only
        ("/srv/ocr/special/x.png", "/fast/x.png"),  # the longest prefix wins
        ("/elsewhere/a.png", "/elsewhere/a.png"),  # unmapped: mounted alike
    ],
)
def test_path_map(path: str, expected: str) -> None:
    assert map_path(path, {"/srv/ocr": "/mnt/ocr", "/srv/ocr/special/": "/fast"}) == expected
