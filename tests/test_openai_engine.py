"""`ocr.engine: openai` against a real OpenAI-compatible server on loopback (tests/openai_server.py),
through real daemons: a server that is down or busy defers the file, an error fails it with the
server's message, a hang is cut by the page deadline, and the API key stays out of every log."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_image, run_watcherd, wait_until
from tests.openai_server import OcrServer, free_port
from watcherd.ocr.engines import EngineConfigError, EngineUnavailable
from watcherd.ocr.engines.openai import OpenAiEngine, data_url

KEY = "sk-test-9f8e7d6c5b4a"


@pytest.fixture
def server() -> Iterator[OcrServer]:
    s = OcrServer().start()
    yield s
    s.stop()


def openai_ocr(base_url: str, **options: object) -> dict[str, object]:
    return {"engine": "openai", "model": "test-ocr", "timeout_s": 20, "options": {"base_url": base_url, **options}}


def test_a_page_gets_the_servers_text(daemon_factory, server: OcrServer) -> None:
    server.text = "收據編號 0042\n| a | b |"
    ocr = {**openai_ocr(server.base_url, extra_body={"vllm_xargs": {"ngram_size": 30}}), "prompt": "Free OCR."}
    daemon = daemon_factory(ocr=ocr).start()
    make_image(daemon.inbox / "scan.png", 120, 80)
    result = daemon.wait_json("scan.png")
    assert result["status"] == "ok" and result["text"] == "收據編號 0042\n| a | b |"
    assert result["engine"] == "openai" and result["model"] == "test-ocr"
    body = json.loads(server.requests[-1]["body"])
    assert body["model"] == "test-ocr" and body["messages"][0]["content"][1]["text"] == "Free OCR."
    assert body["vllm_xargs"] == {"ngram_size": 30}  # options.extra_body
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert "Authorization" not in server.requests[-1]["headers"]


def test_a_server_that_is_down_defers_the_file_until_it_is_up(daemon_factory) -> None:
    port = free_port()
    daemon = daemon_factory(ocr=openai_ocr(f"http://127.0.0.1:{port}/v1")).start()
    make_image(daemon.inbox / "waits.png")
    wait_until(lambda: "waiting for the OCR engine" in daemon.log(), 30, "the deferral")
    status = daemon.status_path
    wait_until(lambda: status.exists() and json.loads(status.read_text())["engine_unavailable"], 10, "the status")
    summary = json.loads(status.read_text())["summary"]
    assert "OCR engine unavailable since" in summary
    shown = run_watcherd("status", "--config", str(daemon.config_path))
    assert "OCR engine unavailable since" in shown.stdout and "Connection refused" in shown.stdout
    wait_until(lambda: daemon.log().count("waits.png") >= 1 and "ConnectError" in daemon.log(), 10, "the reason")
    assert daemon.results(daemon.failed) == []
    server = OcrServer(port=port, text="finally").start()
    try:
        result = daemon.wait_json("waits.png", timeout=60)
    finally:
        server.stop()
    assert result["status"] == "ok" and result["text"] == "finally" and result["attempts"] == 1
    assert daemon.log().count("waits.png: waiting for the OCR engine") == 1  # logged once per file
    assert "The OCR engine answers again" in daemon.log()


@pytest.mark.parametrize("answers", [("429",), ("500", "503"), ("reset",)])
def test_busy_failing_or_resetting_servers_defer_then_the_file_succeeds(
    daemon_factory, server: OcrServer, answers: tuple[str, ...]
) -> None:
    server.script(*answers)
    server.text = "after a while"
    daemon = daemon_factory(ocr=openai_ocr(server.base_url)).start()
    make_image(daemon.inbox / "retry.png")
    result = daemon.wait_json("retry.png", timeout=60)
    assert result["status"] == "ok" and result["text"] == "after a while"
    assert len(server.requests) == len(answers) + 1
    assert daemon.log().count("retry.png: waiting for the OCR engine") == 1


def test_a_client_error_fails_the_file_with_the_servers_message(daemon_factory, server: OcrServer) -> None:
    server.script("400", "malformed")
    daemon = daemon_factory(ocr=openai_ocr(server.base_url)).start()
    make_image(daemon.inbox / "big.png")
    first = daemon.wait_json("big.png", daemon.failed)
    assert first["error_code"] == "engine_error"
    assert "HTTP 400: image too large: 9000 tokens > max_model_len 8192" in first["detail"]
    assert "\x1b" not in daemon.log() and "\\x1b[2J" in daemon.log()  # escaped for the operator
    make_image(daemon.inbox / "odd.png")
    second = daemon.wait_json("odd.png", daemon.failed)
    assert second["error_code"] == "engine_error" and "not a chat completion" in second["detail"]
    make_image(daemon.inbox / "fine.png")
    assert daemon.wait_json("fine.png")["status"] == "ok"


def test_a_hung_request_is_cut_by_the_page_deadline(daemon_factory, server: OcrServer) -> None:
    server.script("hang")
    daemon = daemon_factory(ocr={**openai_ocr(server.base_url), "timeout_s": 2}).start()
    make_image(daemon.inbox / "hung.png")
    result = daemon.wait_json("hung.png", daemon.failed)
    assert result["error_code"] == "timeout"
    make_image(daemon.inbox / "next.png")
    assert daemon.wait_json("next.png")["status"] == "ok"


def test_a_hung_request_is_cut_by_the_request_timeout(daemon_factory, server: OcrServer) -> None:
    server.script("hang")
    daemon = daemon_factory(ocr=openai_ocr(server.base_url, timeout_s=1)).start()
    make_image(daemon.inbox / "slow.png")
    result = daemon.wait_json("slow.png", daemon.failed)
    assert result["error_code"] == "engine_error" and "ocr.options.timeout_s (1 s)" in result["detail"]


@pytest.mark.parametrize("source", ["env", "file"])
def test_the_api_key_is_sent_as_bearer_and_never_logged(
    daemon_factory, server: OcrServer, tmp_path: Path, source: str
) -> None:
    if source == "env":
        options, env = {"api_key_env": "WATCHERD_TEST_OCR_KEY"}, {"WATCHERD_TEST_OCR_KEY": KEY}
    else:
        key_file = tmp_path / "ocr.key"
        key_file.write_text(KEY + "\n")
        key_file.chmod(0o600)
        options, env = {"api_key_file": str(key_file)}, {}
    server.script("400")  # an error message too: the key must not be in it
    daemon = daemon_factory(ocr=openai_ocr(server.base_url, **options))
    daemon.start(env=env)
    make_image(daemon.inbox / "a.png")
    make_image(daemon.inbox / "b.png", 70)
    assert {daemon.wait_json(n)["status"] for n in ("a.png", "b.png")} == {"ok", "failed"}
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    check = run_watcherd("check", "--config", str(daemon.config_path), env={**os.environ, **env})
    daemon.stop(signal.SIGTERM)
    outputs = [p.read_text() for p in daemon.results() + daemon.results(daemon.failed)]
    for text in [daemon.log_path.read_text(), check.stdout, check.stderr, *outputs]:
        assert KEY not in text


def test_a_missing_key_variable_is_a_config_error_that_does_not_echo_it(daemon_factory, server: OcrServer) -> None:
    daemon = daemon_factory(ocr=openai_ocr(server.base_url, api_key_env=KEY))  # a key pasted in the wrong place
    daemon.start(wait_ready=False)
    assert daemon.proc is not None and daemon.proc.wait(60) == 78
    assert "ocr.options.api_key_env" in daemon.log() and KEY not in daemon.log()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "ocr.options.base_url"),
        ({"base_url": "127.0.0.1:8000"}, "ocr.options.base_url"),
        ({"base_url": "http://127.0.0.1:1/v1", "api_key": KEY}, "ocr.options.api_key"),
        ({"base_url": "http://127.0.0.1:1/v1", "concurrency": 0}, "ocr.options.concurrency"),
        ({"base_url": "http://127.0.0.1:1/v1", "max_tokns": 10}, "ocr.options.max_tokns"),
        ({"base_url": "http://127.0.0.1:1/v1", "extra_body": {"model": "x"}}, "ocr.options.extra_body"),
    ],
)
def test_bad_options_exit_78_naming_the_key(daemon_factory, options: dict[str, object], key: str) -> None:
    daemon = daemon_factory(ocr={"engine": "openai", "model": "m", "options": options})
    daemon.start(wait_ready=False)
    assert daemon.proc is not None and daemon.proc.wait(60) == 78
    assert key in daemon.log() and KEY not in daemon.log()


# -- the engine called directly, against the same real server ---------------------------------


def test_ocr_batch_keeps_order_and_holds_concurrency_requests_in_flight() -> None:
    server = OcrServer(latency_s=0.3, capacity=8).start()
    try:
        engine = OpenAiEngine(model="m", base_url=server.base_url, concurrency=4)
        images = [Image.new("RGB", (20 + i, 20), "white") for i in range(8)]
        texts = engine.ocr_batch(images)
        engine.close()
    finally:
        server.stop()
    assert texts == [f"echo {20 + i}x20" for i in range(8)] and len(server.requests) == 8
    assert server.max_in_flight == 4


def test_ocr_batch_raises_unavailable_when_the_server_is_down() -> None:
    engine = OpenAiEngine(model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", concurrency=3)
    with pytest.raises(EngineUnavailable):
        engine.ocr_batch([Image.new("RGB", (8, 8))] * 3)
    engine.close()


def test_credentials_in_the_base_url_stay_out_of_messages() -> None:
    engine = OpenAiEngine(model="m", base_url=f"http://user:{KEY}@127.0.0.1:{free_port()}/v1")
    with pytest.raises(EngineUnavailable) as caught:
        engine.ocr(Image.new("RGB", (8, 8)))
    engine.close()
    assert KEY not in str(caught.value) and "http://127.0.0.1:" in str(caught.value)


def test_a_model_name_is_required() -> None:
    with pytest.raises(EngineConfigError, match="ocr.model"):
        OpenAiEngine(model=None, base_url="http://127.0.0.1:1/v1")


def test_gray_pages_go_as_png_and_colour_pages_as_jpeg() -> None:
    gray = Image.new("RGB", (300, 200), "white")
    colour = Image.new("RGB", (300, 200), (200, 30, 30))
    assert data_url(gray).startswith("data:image/png;base64,")
    assert data_url(colour).startswith("data:image/jpeg;base64,")
    assert data_url(colour, "png").startswith("data:image/png;base64,")
    assert data_url(gray, "jpeg").startswith("data:image/jpeg;base64,")
