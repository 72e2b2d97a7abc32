"""The model engines (`transformers`, `deepseek-ocr`) on tiny models built here, through the real
daemon: real engine code, real transformers loading from a local folder, no hub (HF_HUB_OFFLINE).

The models are random or deliberately looping, so their text means nothing: the daemon tests
assert the JSON's structure (status, engine, model, timings, page sizes), never its text. The
repetition guard and the presets are also tested on their own, on token sequences.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, make_image
from tests.tiny_models import LOOP, build_deepseek_ocr2, build_fake_deepseek_ocr
from watcherd.ocr.engines.common import RepetitionGuard, collapse_loop, strip_grounding, trailing_loop
from watcherd.ocr.engines.deepseek_ocr import PRESETS, Resolution, resolve_preset


@pytest.fixture(scope="session")
def deepseek_ocr2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deepseek_ocr2(tmp_path_factory.mktemp("models") / "tiny-deepseek-ocr2")


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    # HF_HOME: trust_remote_code copies modeling files into $HF_HOME/modules; keep that in the test.
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


def assert_result(result: dict[str, Any], *, engine: str, model: Path, sizes: list[list[int]]) -> None:
    assert result["status"] == "ok", result
    assert result["engine"] == engine
    assert result["model"] == str(model)
    assert [p["page"] for p in result["pages"]] == list(range(1, len(sizes) + 1))
    assert [p["size"] for p in result["pages"]] == sizes
    for page in result["pages"]:
        assert isinstance(page["text"], str)
        assert 0 < page["processing_time"] < 60
    assert result["text"] == "\n\n".join(p["text"] for p in result["pages"])
    assert result["processing_time"] >= max(p["processing_time"] for p in result["pages"])
    assert result["gpu_info_before"] == {"available": False}  # CPU build of torch
    for key in ("sha256", "received_at", "finished_at", "watcherd_version", "image_path"):
        assert result[key], key


def load_time(daemon: Daemon) -> float:
    """The child's model load time, from its ready line ("OCR child N ready: E loaded in 1.2 s")."""
    match = re.search(r" ready: .* loaded in ([0-9.]+) s", daemon.log())
    assert match, daemon.log()
    return float(match.group(1))


# -- transformers engine: a tiny random DeepSeek-OCR-2 -------------------------------------------


def test_tiny_deepseek_ocr2_through_the_daemon(daemon_factory, deepseek_ocr2: Path, offline_env) -> None:
    daemon = daemon_factory(
        ocr={"engine": "transformers", "model": str(deepseek_ocr2), "timeout_s": 120, "options": {"max_new_tokens": 16}}
    )
    started = time.monotonic()
    daemon.start(env=offline_env)
    ready_s = time.monotonic() - started
    make_image(daemon.inbox / "page.png", width=64, height=48)
    make_image(daemon.inbox / "wide.png", width=300, height=120)  # tiled into local views
    first = daemon.wait_json("page.png", daemon.outbox, timeout=120)
    second = daemon.wait_json("wide.png", daemon.outbox, timeout=120)
    assert_result(first, engine="transformers", model=deepseek_ocr2, sizes=[[64, 48]])
    assert_result(second, engine="transformers", model=deepseek_ocr2, sizes=[[300, 120]])
    assert (daemon.outbox / "page.png.md").read_text() == first["text"]
    assert daemon.alive()
    print(
        f"\ntiny DeepSeek-OCR-2: daemon ready in {ready_s:.1f} s (model load {load_time(daemon):.1f} s); "
        f"pages {first['processing_time']:.2f} s, {second['processing_time']:.2f} s"
    )


def test_transformers_engine_defaults_and_guard(deepseek_ocr2: Path) -> None:
    """In-process: the family prompt, CPU/fp32, and the guard cutting the random model's loop."""
    import torch
    from PIL import Image

    from watcherd.ocr.engines.transformers import TransformersEngine

    engine = TransformersEngine(model=str(deepseek_ocr2), max_new_tokens=600, repeat_window=128)
    assert engine.prompt == "<image>\nFree OCR."
    assert engine.device == "cpu" and engine.dtype == torch.float32
    assert engine.model == str(deepseek_ocr2)
    calls: list[int] = []
    generate = engine.net.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        output = generate(*args, **kwargs)
        calls.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    engine.net.generate = counting_generate
    text = engine.ocr(Image.new("RGB", (64, 48), "white"))
    assert isinstance(text, str)
    # A random tiny model falls into a loop within a few dozen tokens; whichever way it goes,
    # generation never reaches the bound, and whatever it left is bounded too.
    assert calls and calls[0] <= 600
    engine.clear_cache()  # a no-op on the CPU, but must not fail
    engine.close()


def test_a_batch_reads_each_page_as_it_is_read_alone(deepseek_ocr2: Path) -> None:
    """ocr_batch: pages of different sizes (different numbers of image tokens, so the prompts are
    padded) in one generate() give exactly the texts of one page at a time (greedy decoding)."""
    from PIL import Image

    from watcherd.ocr.engines.transformers import TransformersEngine

    engine = TransformersEngine(model=str(deepseek_ocr2), max_new_tokens=24)
    pages = [
        Image.new("RGB", (64, 48), "white"),
        Image.new("RGB", (300, 120), "white"),
        Image.effect_noise((80, 80), 60).convert("RGB"),
    ]
    alone = [engine.ocr(page) for page in pages]
    assert engine.ocr_batch(pages) == alone
    assert len(set(alone)) > 1  # the pages do read differently: the comparison means something


def test_a_prompt_without_the_image_placeholder_still_gets_the_page(deepseek_ocr2: Path) -> None:
    from PIL import Image

    from watcherd.ocr.engines.transformers import TransformersEngine

    engine = TransformersEngine(model=str(deepseek_ocr2), prompt="Free OCR.", max_new_tokens=4)
    inputs = engine._inputs([Image.new("RGB", (64, 48), "white")])
    image_token = engine.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_token).sum() > 0
    assert isinstance(engine.ocr(Image.new("RGB", (64, 48), "white")), str)


def test_transformers_engine_refuses_unknown_options_as_a_config_error(
    daemon_factory, deepseek_ocr2: Path, offline_env
) -> None:
    daemon = daemon_factory(ocr={"engine": "transformers", "model": str(deepseek_ocr2), "options": {"bogus": 1}})
    daemon.start(wait_ready=False, env=offline_env)
    assert daemon.proc is not None
    code = daemon.proc.wait(timeout=60)
    assert code == 78, daemon.log()  # EX_CONFIG: retrying cannot help
    assert "bogus" in daemon.log()


# -- deepseek-ocr engine: a trust_remote_code checkpoint with v1's infer() ----------------------


def test_fake_deepseek_ocr_v1_through_the_daemon(daemon_factory, tmp_path: Path, offline_env) -> None:
    calls_log = tmp_path / "infer-calls.jsonl"
    model = build_fake_deepseek_ocr(tmp_path / "fake-deepseek-ocr", calls_log=calls_log)
    daemon = daemon_factory(
        ocr={"engine": "deepseek-ocr", "model": str(model), "timeout_s": 120, "options": {"preset": "base"}}
    )
    daemon.start(env=offline_env)
    make_image(daemon.inbox / "scan.png", width=80, height=60)
    result = daemon.wait_json("scan.png", daemon.outbox, timeout=120)
    assert_result(result, engine="deepseek-ocr", model=model, sizes=[[80, 60]])
    assert result["text"].strip()  # eval_mode=True: infer() returned the text, it was not just printed

    (call,) = [json.loads(line) for line in calls_log.read_text().splitlines()]
    assert call["eval_mode"] is True and call["save_results"] is False
    assert call["prompt"] == "<image>\n<|grounding|>Convert the document to markdown."
    assert (call["base_size"], call["image_size"], call["crop_mode"]) == (1024, 1024, False)
    assert call["image_px"] == [80, 60]  # the page itself went through the temp file
    assert (call["device"], call["dtype"]) == ("cpu", "torch.float32")
    # a fresh temp folder per page, removed afterwards: infer() litters output_path
    assert Path(call["output_path"]).parent == Path(call["image_file"]).parent
    assert not Path(call["image_file"]).parent.exists()
    # its hard-coded max_new_tokens=8192 did not apply: the repetition guard stopped the loop
    assert call["generated_tokens"] <= 512 + 8
    assert "repetition guard stopped a page" in daemon.log()
    assert daemon.alive()


def test_deepseek_ocr_engine_bounds_tokens_and_collapses_an_exact_loop(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from watcherd.ocr.engines.deepseek_ocr import DeepseekOcrEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    calls_log = tmp_path / "calls.jsonl"
    model = build_fake_deepseek_ocr(tmp_path / "fake", calls_log=calls_log)
    page = Image.new("RGB", (40, 30), "white")

    bounded = DeepseekOcrEngine(model=str(model), max_new_tokens=9, repeat_window=0)
    assert bounded.ocr(page) == (LOOP * 3)[:9].strip()
    assert json.loads(calls_log.read_text().splitlines()[-1])["generated_tokens"] == 9

    # no_repeat_ngram_size=35 in infer() turns the exact loop into a near one after ~35 tokens;
    # within that, a small window sees an exact loop and cuts it back to one turn.
    exact = DeepseekOcrEngine(model=str(model), repeat_window=16, repeat_max_distinct=0.5)
    assert exact.ocr(page) == LOOP.strip()

    custom = DeepseekOcrEngine(model=str(model), prompt="Free OCR.", preset="Tiny", crop_mode=True, max_new_tokens=4)
    custom.ocr(page)
    call = json.loads(calls_log.read_text().splitlines()[-1])
    assert call["prompt"] == "<image>\nFree OCR."
    assert (call["base_size"], call["image_size"], call["crop_mode"]) == (512, 512, True)


def test_deepseek_ocr_engine_fails_a_page_when_infer_returns_nothing(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from watcherd.ocr.engines.deepseek_ocr import DeepseekOcrEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    engine = DeepseekOcrEngine(model=str(build_fake_deepseek_ocr(tmp_path / "fake")), max_new_tokens=4)
    infer = engine.net.infer
    engine.net.infer = lambda tokenizer, **kw: infer(tokenizer, **{**kw, "eval_mode": False})  # the seed's bug
    with pytest.raises(RuntimeError, match="returned no text"):
        engine.ocr(Image.new("RGB", (40, 30), "white"))


# -- presets, guard, grounding: no model needed --------------------------------------------------


def test_presets_are_deepseek_ocr_modes_and_explicit_values_win() -> None:
    assert resolve_preset() == Resolution(1024, 640, True)  # Gundam is the default
    assert PRESETS["tiny"] == Resolution(512, 512, False)
    assert PRESETS["small"] == Resolution(640, 640, False)
    assert PRESETS["base"] == Resolution(1024, 1024, False)
    assert PRESETS["large"] == Resolution(1280, 1280, False)
    assert resolve_preset("LARGE") == Resolution(1280, 1280, False)
    assert resolve_preset("gundam", image_size=768) == Resolution(1024, 768, True)
    assert resolve_preset("base", crop_mode=True) == Resolution(1024, 1024, True)
    assert resolve_preset("tiny", base_size=640, image_size=640, crop_mode=False) == Resolution(640, 640, False)
    with pytest.raises(ValueError, match="huge.*tiny, small, base, large, gundam"):
        resolve_preset("huge")


def feed(guard: RepetitionGuard, prompt: list[int], generated: list[int]) -> int | None:
    """Run the guard as generate() does: once per new token. The step it stops at, or None."""
    import torch

    for step in range(1, len(generated) + 1):
        ids = torch.tensor([prompt + generated[:step]])
        if bool(guard(ids, None)[0]):
            return step
    return None


def prose(n: int, seed: int = 1) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(5, 5000) for _ in range(n)]


def test_repetition_guard_stops_an_exact_loop_and_cuts_it_to_one_turn() -> None:
    text = prose(100)
    row = [7, 8, 9, 10, 11, 12]
    generated = text + row * 200
    guard = RepetitionGuard(window=64, max_distinct=0.25)
    stopped = feed(guard, [1] * 300, generated)  # 300 identical image tokens must not count
    assert stopped is not None and stopped <= 100 + 64 + len(row)
    assert guard.fired and guard.fired_at == stopped
    assert guard.trim(generated[:stopped]) == text + row


def test_repetition_guard_stops_a_near_loop_that_no_repeat_ngram_allows() -> None:
    # DeepSeek-OCR bans repeated 35-grams and still runs away: a row of ~30 tokens with a counter
    # in it never repeats a 35-gram, yet it is the same line over and over.
    row = list(range(200, 229))
    generated = prose(50) + [t for n in range(300) for t in (*row[:10], 100 + n % 50, *row[10:])]
    guard = RepetitionGuard()  # the defaults: 512 tokens, at most 128 distinct 4-grams
    stopped = feed(guard, [3], generated)
    assert stopped is not None and stopped < 50 + 512 + 2 * 30
    assert guard.trim(generated[:stopped]) == generated[:stopped]  # no exact loop: nothing cut


def test_repetition_guard_leaves_ordinary_text_and_real_tables_alone() -> None:
    text = prose(1200)
    text[300:330] = [42] * 30  # a dotted leader in a table of contents
    # a long table whose rows differ in a number every 8 tokens: structure, not a loop
    table = [t for n in range(150) for t in (20, 21, 22, 100 + n, 23, 24, 25, 26)]
    for tokens in (text, table):
        guard = RepetitionGuard()
        assert feed(guard, [1] * 50, tokens) is None
        assert not guard.fired


def test_repetition_guard_checks_its_window() -> None:
    with pytest.raises(ValueError, match="repeat_window"):
        RepetitionGuard(window=4)


def test_trailing_loop_finds_the_longest_loop_and_prefers_the_shortest_period() -> None:
    assert trailing_loop([1, 2, 3, 4], 8) is None
    assert trailing_loop([5, 6] + [1, 2] * 5, 8) == (2, 2)
    assert trailing_loop([9] * 10, 8) == (0, 1)
    assert collapse_loop([5, 6] + [1, 2, 3] * 4 + [1], 8) == [5, 6, 1, 2, 3]
    assert collapse_loop([5, 6, 7], 8) == [5, 6, 7]


def test_strip_grounding_leaves_the_markdown() -> None:
    raw = (
        "<|ref|>title<|/ref|><|det|>[[330, 198, 558, 230]]<|/det|>\n# R&D QUALITY\n\n"
        "<|ref|>text<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>\nName/Phone Ext.\n\n"
        "<|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n"
    )
    assert strip_grounding(raw) == "# R&D QUALITY\n\nName/Phone Ext.\n\n"
    assert strip_grounding("plain text") == "plain text"
