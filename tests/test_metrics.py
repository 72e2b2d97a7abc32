"""Prometheus metrics, end to end: a real daemon writes the textfile and serves /metrics, both are
read with prometheus_client's own parser, and (where Debian's prometheus is installed) a real
Prometheus scrapes the endpoint."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PATHS, assert_config_error, make_image, run_watcherd, wait_until
from tests.engines import HANG_WIDTH, MEMORY_ERROR_WIDTH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from exposition text, by prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(port: int) -> dict[Any, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return samples(response.read().decode())


def textfile(path: Path) -> dict[Any, float]:
    return samples(path.read_text()) if path.exists() else {}


def two_page_tiff(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [Image.new("RGB", (64, 48), "white"), Image.new("RGB", (66, 48), "white")]
    pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])
    return path


def test_counters_equal_the_json_written(daemon_factory, tmp_path: Path) -> None:
    port = free_port()
    prom = tmp_path / "textfile" / "watcherd.prom"
    prom.parent.mkdir()
    d = daemon_factory(
        ocr={"engine": "tests.engines:Misbehaving"},
        metrics={"textfile": str(prom), "listen": f"127.0.0.1:{port}", "interval_s": 0.2},
    ).start()
    for i in range(3):
        make_image(d.inbox / f"ok{i}.png")
    two_page_tiff(d.inbox / "two.tif")
    for i in range(2):
        make_image(d.inbox / f"bad{i}.png", width=MEMORY_ERROR_WIDTH)
    wait_until(lambda: len(d.results()) + len(d.results(d.failed)) == 6, 60, "six JSON")
    ok_json, failed_json = d.results(), d.results(d.failed)
    assert len(ok_json) == 4 and len(failed_json) == 2
    pages = 3 + 2

    def settled(found: dict[Any, float]) -> bool:  # the state gauges follow about once a second
        return (
            value(found, "watcherd_files_total", status="ok", error_code="") == 4
            and value(found, "watcherd_files_total", status="failed", error_code="engine_error") == 2
            and value(found, "watcherd_oldest_unfinished_age_seconds") == 0
            and value(found, "watcherd_queue_files", state="in_flight") == 0
        )

    for read in (lambda: scrape(port), lambda: textfile(prom)):
        found = wait_until(lambda: (f := read()) and settled(f) and f, 30, "the counters")
        assert value(found, "watcherd_files_total", status="failed", error_code="timeout") == 0
        assert value(found, "watcherd_pages_total") == pages
        assert value(found, "watcherd_page_seconds_count") == pages
        assert value(found, "watcherd_child_starts_total") == 1
        assert value(found, "watcherd_up") == 1
        assert value(found, "watcherd_ready") == 1
        assert value(found, "watcherd_last_success_timestamp_seconds") > 0

    # The key figures are in the status file too, and `watcherd status` shows them.
    wait_until(
        lambda: f"{pages} pages read; last success 20" in run_watcherd("status", "--config", str(d.config_path)).stdout,
        30,
        "watcherd status to show the figures",
    )

    assert d.stop() == 0
    assert value(textfile(prom), "watcherd_up") == 0  # a clean stop says so
    assert not [p for p in prom.parent.iterdir() if p != prom]  # no temp file left beside it


def test_oldest_age_grows_while_the_child_is_blocked(daemon_factory, tmp_path: Path) -> None:
    port = free_port()
    d = daemon_factory(ocr={"engine": "tests.engines:Slow"}, metrics={"listen": f"127.0.0.1:{port}"}).start()
    make_image(d.inbox / "stuck.png")
    first = wait_until(
        lambda: (f := scrape(port)) and value(f, "watcherd_queue_files", state="in_flight") == 1 and f,
        30,
        "the file in the child",
    )
    age = value(first, "watcherd_oldest_unfinished_age_seconds")
    assert age is not None and age > 0
    make_image(d.inbox / "behind.png")  # waits behind it: ready, not claimed (one child)
    wait_until(lambda: value(scrape(port), "watcherd_oldest_unfinished_age_seconds") > age + 1.0, 30, "the age to grow")
    later = wait_until(
        lambda: (f := scrape(port)) and value(f, "watcherd_queue_files", state="ready") == 1 and f, 30, "one queued"
    )
    # The oldest is the file in the child, not the one that came later.
    assert value(later, "watcherd_oldest_unfinished_age_seconds") > age + 1.0


def test_a_page_timeout_counts_as_a_child_exit_by_timeout(daemon_factory, tmp_path: Path) -> None:
    port = free_port()
    d = daemon_factory(
        ocr={"engine": "tests.engines:Hang", "timeout_s": 1}, metrics={"listen": f"127.0.0.1:{port}"}
    ).start()
    make_image(d.inbox / "hang.png", width=HANG_WIDTH)
    assert d.wait_json("hang.png", d.failed)["error_code"] == "timeout"
    found = wait_until(
        lambda: (f := scrape(port)) and value(f, "watcherd_child_starts_total") == 2 and f, 30, "the respawn"
    )
    assert value(found, "watcherd_child_exits_total", reason="timeout") == 1
    assert value(found, "watcherd_files_total", status="failed", error_code="timeout") == 1


def test_a_recycled_child_counts_as_an_exit_by_recycling(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(ocr={"recycle_after_files": 2}, metrics={"listen": f"127.0.0.1:{port}"}).start()
    for i in range(2):
        make_image(d.inbox / f"r{i}.png")
    wait_until(lambda: len(d.results()) == 2, 30, "two results")
    found = wait_until(
        lambda: (f := scrape(port)) and value(f, "watcherd_child_exits_total", reason="recycled") == 1 and f,
        30,
        "the recycled child",
    )
    assert value(found, "watcherd_child_starts_total") == 2


def test_gpu_memory_and_files_waiting_for_it(daemon_factory, tmp_path: Path) -> None:
    memory = tmp_path / "free_mb"
    memory.write_text("200")  # below gpu.min_free_mb (500): the file waits
    port = free_port()
    d = daemon_factory(
        ocr={"engine": "tests.engines:ScriptedMemory", "options": {"memory_file": str(memory)}},
        metrics={"listen": f"127.0.0.1:{port}"},
    ).start()
    make_image(d.inbox / "big.png")
    found = wait_until(
        lambda: (f := scrape(port)) and value(f, "watcherd_queue_files", state="waiting_for_memory") == 1 and f,
        30,
        "the file to wait for memory",
    )
    assert value(found, "watcherd_gpu_free_bytes", device="default") == 200 * 1024 * 1024
    assert value(found, "watcherd_gpu_total_bytes", device="default") == 16000 * 1024 * 1024
    assert value(found, "watcherd_oldest_unfinished_age_seconds") > 0
    memory.write_text("8000")
    assert d.wait_json("big.png", d.outbox)["status"] == "ok"
    # The state gauges follow the loop's snapshot (about once a second), the counters at once.
    found = wait_until(
        lambda: (
            (f := scrape(port)) and value(f, "watcherd_gpu_free_bytes", device="default") == 8000 * 1024 * 1024 and f
        ),
        30,
        "the figures after the file",
    )
    assert value(found, "watcherd_files_total", status="ok", error_code="") == 1
    assert value(found, "watcherd_queue_files", state="waiting_for_memory") == 0


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("metrics: {listen: '9464'}", "metrics.listen", "expected HOST:PORT"),
        ("metrics: {listen: '127.0.0.1:99999'}", "metrics.listen", "expected HOST:PORT"),
        ("metrics: {listen: 'http://x:1/'}", "metrics.listen", "expected HOST:PORT"),
        ("metrics: {textfile: ROOT/watcherd.txt}", "metrics.textfile", "must end in .prom"),
        ("metrics: {interval_s: 0}", "metrics.interval_s", "greater than 0"),
        ("metrics: {port: 9464}", "metrics.port", "unknown key"),
    ],
)
def test_bad_metrics_settings_exit_78_naming_the_key(tmp_path: Path, extra: str, key: str, words: str) -> None:
    assert_config_error(tmp_path, PATHS + extra, key, words)


def test_a_port_in_use_exits_78_before_claiming_anything(daemon_factory, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
        make_image(d.inbox / "waits.png")
        d.start(wait_ready=False)
        assert d.proc is not None and d.proc.wait(timeout=60) == 78
    assert "metrics.listen: cannot listen on" in d.log()
    assert (d.inbox / "waits.png").exists()


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)")
def test_a_real_prometheus_scrapes_the_endpoint(daemon_factory, tmp_path: Path) -> None:
    port, web = free_port(), free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"}).start()
    for i in range(2):
        make_image(d.inbox / f"p{i}.png")
    wait_until(lambda: len(d.results()) == 2, 30, "two results")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: watcherd, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
    )
    assert PROMETHEUS is not None
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115 - closed with the process
    )

    def query(expr: str) -> float | None:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                import json

                result = json.loads(response.read())["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        assert wait_until(lambda: query('up{job="watcherd"}') == 1, 60, "Prometheus to scrape watcherd") == 1
        wait_until(lambda: query('watcherd_files_total{status="ok"}') == 2, 30, "the ok counter in Prometheus")
        assert query("watcherd_pages_total") == 2
        assert query("watcherd_oldest_unfinished_age_seconds") == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


PROMTOOL = shutil.which("promtool")
RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'watcherd_oldest_unfinished_age_seconds{instance="stuck"}'
        values: '0 0 60+60x60'
      - series: 'watcherd_oldest_unfinished_age_seconds{instance="moving"}'
        values: '0 30 0 45 0 10 0 0x60'
      - series: 'watcherd_files_total{instance="bad",status="ok",error_code=""}'
        values: '0+8x120'
      - series: 'watcherd_files_total{instance="bad",status="failed",error_code="timeout"}'
        values: '0+2x120'
      - series: 'watcherd_files_total{instance="quiet",status="ok",error_code=""}'
        values: '0x120'
      - series: 'watcherd_files_total{instance="quiet",status="failed",error_code="timeout"}'
        values: '0 1x119'
      - series: 'node_textfile_mtime_seconds{instance="n",file="/var/lib/prometheus/node-exporter/watcherd.prom"}'
        values: '0+60x10 600x30'
    alert_rule_test:
      - {eval_time: 20m, alertname: WatcherdFolderNotMoving, exp_alerts: []}
      - eval_time: 40m
        alertname: WatcherdFolderNotMoving
        exp_alerts:
          - exp_labels: {severity: page, instance: stuck}
            exp_annotations: {summary: "watcherd on stuck: a file has waited 39m 0s"}
      - eval_time: 90m
        alertname: WatcherdFailureRatio
        exp_alerts:
          - exp_labels: {severity: ticket, instance: bad}
            exp_annotations: {summary: "watcherd on bad: 20% of files failed in the last hour"}
      - eval_time: 9m
        alertname: WatcherdTextfileStale
        exp_alerts: []
      - eval_time: 25m
        alertname: WatcherdTextfileStale
        exp_alerts:
          - exp_labels: {severity: page, instance: n, file: /var/lib/prometheus/node-exporter/watcherd.prom}
"""


def documented_alert_rules() -> str:
    """The rules block of docs/metrics.md, below its `<!-- alert-rules -->` marker."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    block = text.split("<!-- alert-rules -->\n```yaml\n", 1)[1]
    return block.split("\n```", 1)[0] + "\n"


@pytest.mark.skipif(PROMTOOL is None, reason="the promtool binary is not installed (apt-get install prometheus)")
def test_the_documented_alert_rules_fire_as_documented(tmp_path: Path) -> None:
    """The rules in docs/metrics.md are valid, page for a stuck folder and a high failure ratio, and stay quiet
    for a folder that moves and for one failure on a quiet night."""
    assert PROMTOOL is not None
    (tmp_path / "rules.yml").write_text(documented_alert_rules())
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    check = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_hook_outcomes_and_backlog_are_metrics(daemon_factory, tmp_path: Path) -> None:
    """The hand-off figures reach /metrics: hook runs by outcome, and the hook backlog."""
    import sys

    port = free_port()
    d = daemon_factory(
        hooks={"on_success": [sys.executable, "-c", "pass"], "on_failure": ["/bin/false"]},
        metrics={"listen": f"127.0.0.1:{port}"},
    ).start()
    make_image(d.inbox / "good.png")
    (d.inbox / "bad.png").write_bytes(b"not an image at all")  # unsupported_type
    wait_until(lambda: len(d.results()) + len(d.results(d.failed)) == 2, 30, "two results")
    found = wait_until(
        lambda: (
            (f := scrape(port))
            and value(f, "watcherd_handoffs_total", kind="hook", outcome="done") == 1
            and value(f, "watcherd_handoffs_total", kind="hook", outcome="failed") == 1
            and f
        ),
        30,
        "the hook outcomes",
    )
    assert value(found, "watcherd_handoff_backlog", kind="hook") == 0
