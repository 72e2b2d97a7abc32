"""The `vllm` engine. Without vllm and a GPU (this build machine) what runs is: the options refused
with exit 78 and the key named, a missing vllm refused through a real daemon with the extra named,
and the guard's KV-cache arithmetic. The daemon tests with a real vLLM model are skipped with the
missing piece named ("no CUDA device" / "vllm not installed"); `scripts/gpu-check` runs the rest.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import REPO, make_image
from watcherd.ocr.engines import BUILTIN, EngineConfigError, resolve
from watcherd.ocr.engines.vllm import VllmEngine, kv_cache_info, kv_usage_from_metrics


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


VLLM = importlib.util.find_spec("vllm") is not None
needs_gpu_and_vllm = pytest.mark.skipif(
    not (_cuda() and VLLM),
    reason=" and ".join(
        why for why, missing in (("no CUDA device", not _cuda()), ("vllm not installed", not VLLM)) if missing
    ),
)


def test_vllm_is_a_built_in_engine_whose_module_imports_neither_vllm_nor_torch() -> None:
    assert BUILTIN["vllm"] == "watcherd.ocr.engines.vllm:VllmEngine"
    assert resolve("vllm") is VllmEngine
    # In a fresh interpreter: this test module has imported torch already (_cuda, above).
    code = (
        "import sys; from watcherd.ocr.engines import resolve; resolve('vllm'); "
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"model": None}, "ocr.model"),
        ({"device": "cpu"}, "ocr.devices"),
        ({"gpu_memory_utilization": 0}, "ocr.options.gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "ocr.options.gpu_memory_utilization"),
        ({"max_model_len": 0}, "ocr.options.max_model_len"),
        ({"max_tokens": 0}, "ocr.options.max_tokens"),
        ({"ngram_size": -1}, "ocr.options.ngram_size"),
        ({"ngram_size": 30, "window_size": 20}, "ocr.options.window_size"),
        ({"dtype": "int8"}, "ocr.options.dtype"),
    ],
)
def test_wrong_options_are_refused_before_vllm_is_imported(options: dict[str, Any], key: str) -> None:
    kwargs: dict[str, Any] = {"model": "/srv/models/DeepSeek-OCR", **options}
    with pytest.raises(EngineConfigError, match=key.replace(".", r"\.")):
        VllmEngine(**kwargs)
    assert "vllm" not in sys.modules


@pytest.mark.skipif(VLLM, reason="vllm is installed here: its absence cannot be shown")
def test_a_missing_vllm_stops_the_daemon_with_exit_78_naming_the_extra(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(ocr={"engine": "vllm", "model": str(tmp_path / "model")})
    make_image(daemon.inbox / "waiting.png")
    daemon.start(wait_ready=False)
    assert daemon.proc.wait(timeout=120) == 78  # EX_CONFIG: a restart cannot help
    assert "ocr.engine: vllm needs the vllm package" in daemon.log()
    assert "pip install 'watcherd[vllm]'" in daemon.log()
    assert "retrying in" not in daemon.log()
    assert (daemon.inbox / "waiting.png").exists()  # nothing was failed for it


def test_an_option_the_engine_does_not_have_stops_the_daemon_with_78(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(ocr={"engine": "vllm", "model": str(tmp_path / "m"), "options": {"tensor_parallel": 2}})
    daemon.start(wait_ready=False)
    assert daemon.proc.wait(timeout=120) == 78
    assert "tensor_parallel" in daemon.log()


# -- the guard's figures: the KV-cache pool, not the device --------------------------------------


def test_kv_cache_info_is_the_pool_not_the_device() -> None:
    info = kv_cache_info(usage=0.25, pool_mb=40_000, device="cuda:0 (H200)", total_mb=143_000, kv_tokens=800_000)
    assert info == {
        "available": True,
        "source": "vllm_kv_cache",
        "device": "cuda:0 (H200)",
        "total_mb": 143_000,
        "kv_cache_mb": 40_000,
        "used_mb": 10_000,
        "free_mb": 30_000,
        "usage_percent": 25.0,
        "kv_cache_tokens": 800_000,
        "kv_cache_free_tokens": 600_000,
    }


def test_an_idle_vllm_engine_passes_the_default_guard() -> None:
    # vLLM holds 90 % of the device from the start; idle, its pool is empty: room for pages.
    info = kv_cache_info(usage=0.0, pool_mb=30_000, device="cuda:0", total_mb=81_000)
    assert info["free_mb"] >= 500 and info["usage_percent"] <= 95  # gpu.min_free_mb / max_usage_percent
    full = kv_cache_info(usage=0.99, pool_mb=30_000, device="cuda:0", total_mb=81_000)
    assert full["free_mb"] < 500 or full["usage_percent"] > 95


@pytest.mark.parametrize("usage", [-0.5, 1.7])
def test_kv_usage_out_of_range_is_clamped(usage: float) -> None:
    info = kv_cache_info(usage=usage, pool_mb=1000, device="cuda:0", total_mb=2000)
    assert 0 <= info["usage_percent"] <= 100 and 0 <= info["free_mb"] <= 1000


def test_kv_usage_is_read_from_either_gauge_name() -> None:
    gauge = SimpleNamespace
    assert kv_usage_from_metrics([gauge(name="vllm:num_requests_running", value=3.0)]) is None
    assert kv_usage_from_metrics([gauge(name="vllm:kv_cache_usage_perc", value=0.4)]) == 0.4
    assert kv_usage_from_metrics([gauge(name="vllm:gpu_cache_usage_perc", value=0.1)]) == 0.1


# -- with a GPU and vllm: the real engine through the daemon --------------------------------------


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_qwen2_vl

    return build_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


def tiny_ocr(model: Path, **options: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": str(model),
        "devices": [0],
        "timeout_s": 300,
        "batch_pages": 4,
        "prompt": "<|vision_start|><|image_pad|><|vision_end|>Free OCR.",
        "options": {
            "ngram_size": 0,
            "max_tokens": 16,
            "gpu_memory_utilization": 0.3,
            "max_model_len": 2048,
            "image_placeholder": "<|image_pad|>",
            "enforce_eager": True,
            **options,
        },
    }


@needs_gpu_and_vllm
def test_tiny_model_through_the_daemon_in_batches(daemon_factory, tiny_vllm_model: Path) -> None:
    daemon = daemon_factory(ocr=tiny_ocr(tiny_vllm_model))
    daemon.start(env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    for i in range(6):
        make_image(daemon.inbox / f"p{i}.png", width=64 + 8 * i, height=48)
    results = [daemon.wait_json(f"p{i}.png", daemon.outbox, timeout=300) for i in range(6)]
    for result in results:
        assert result["status"] == "ok", result
        assert result["engine"] == "vllm"
        assert result["gpu_info_after"]["source"] == "vllm_kv_cache"
        assert result["gpu_info_after"]["free_mb"] > 0
    assert daemon.alive()
