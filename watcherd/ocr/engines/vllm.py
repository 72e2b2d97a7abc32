"""`ocr.engine: vllm`: DeepSeek-OCR (v1 or 2) through vLLM's offline `LLM`, in the child (design §6).

    ocr: {engine: vllm, model: /srv/models/DeepSeek-OCR, python: /opt/vllm-venv/bin/python, batch_pages: 16}

It follows vLLM's published DeepSeek-OCR recipe (docs.vllm.ai/projects/recipes, "DeepSeek-OCR";
vllm-project/recipes DeepSeek/DeepSeek-OCR.md):
- `LLM(model, enable_prefix_caching=False, mm_processor_cache_gb=0,
  logits_processors=[NGramPerReqLogitsProcessor])`: OCR pages share no prefix and no image, so the
  recipe turns both caches off; the n-gram logits processor (from
  `vllm.model_executor.models.deepseek_ocr`) bans a token that would repeat an n-gram of the last
  `window_size` tokens, which is what stops DeepSeek-OCR's repetition loops;
- `llm.generate([{"prompt": ..., "multi_modal_data": {"image": pil_image}}, ...], SamplingParams(
  temperature=0, max_tokens, extra_args={ngram_size: 30, window_size: 90, whitelist_token_ids:
  {128821, 128822}}, skip_special_tokens=False))`: the whitelist is DeepSeek-OCR's `<td>`/`</td>`,
  which a table repeats legitimately.

`ocr_batch(images)` is one `generate()` call over the pages in flight: vLLM schedules them with
continuous batching (a page that finishes early frees its slot for the next), so `ocr.batch_pages`
(8-16) is what feeds it. One `generate()` is one call under the parent's deadline, as for the
transformers engine.

**Killing the child frees the GPU.** vLLM's V1 engine runs its engine core in a separate process
unless `VLLM_ENABLE_V1_MULTIPROCESSING=0` (docs.vllm.ai, "V1 engine / multiprocessing"). This
engine sets it to 0 before importing vllm (option `multiprocessing: false`, the default): with one
GPU (tensor parallel 1) vLLM then runs everything inside the child, so there is no helper process
that could outlive the supervisor's `killpg` and keep the GPU's memory. With `multiprocessing:
true` vLLM's helpers are `multiprocessing` children, which do not call setsid and so stay in the
child's process group, which the supervisor kills as a whole; `scripts/gpu-check` checks with
nvidia-smi that nothing survives a kill mid-batch.

**The VRAM guard.** vLLM reserves `gpu_memory_utilization` of the device up front (weights plus a
fixed KV-cache pool), so device-wide free memory is always low and the guard would always defer.
`gpu_info()` reports the KV-cache pool instead (`kv_cache_info`): `usage_percent` is vLLM's own
KV-cache usage (the `vllm:kv_cache_usage_perc` gauge from `LLM.get_metrics()`, which needs
`disable_log_stats=False`) and `free_mb` the unused part of the pool, i.e. "room for more pages".
`clear_cache()` is a no-op: the pool is vLLM's for the child's lifetime (an `empty_cache()` would
give nothing back), and the caches it could reset (prefix, multimodal) are off.

vllm is an optional extra (`watcherd[vllm]`), usually in its own venv named by `ocr.python` since it
pins its own torch. A missing vllm is a configuration error (exit 78) naming the extra.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from watcherd.core.text import PageText
from watcherd.ocr.engines import EngineConfigError
from watcherd.ocr.engines.common import grounding_lines, note, strip_grounding

DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
# The recipe's values: ban a repeated 30-gram within the last 90 tokens; <td> and </td> may repeat.
DEFAULT_NGRAM_SIZE = 30
DEFAULT_WINDOW_SIZE = 90
DEFAULT_WHITELIST = (128821, 128822)
DEFAULT_MAX_TOKENS = 4096  # as the other model engines; DeepSeek-OCR's own limit is 8192
DTYPES = ("auto", "bfloat16", "float16", "float32")
MB = 1024 * 1024

_END = re.compile(r"<｜end▁of▁sentence｜>|<\|end▁of▁sentence\|>")  # kept by skip_special_tokens=False


def kv_cache_info(
    *,
    usage: float,
    pool_mb: float,
    device: str,
    total_mb: int,
    kv_tokens: int | None = None,
) -> dict[str, Any]:
    """The guard's figures for a vLLM engine, from its KV-cache pool rather than the device.

    `usage` is vLLM's KV-cache usage (0-1), `pool_mb` the pool's size. `free_mb` is the unused part
    of the pool and `usage_percent` the used part, so `gpu.min_free_mb` / `gpu.max_usage_percent`
    mean "room for more pages in the pool". The device's own total is kept for the operator."""
    usage = min(max(float(usage), 0.0), 1.0)
    info: dict[str, Any] = {
        "available": True,
        "source": "vllm_kv_cache",
        "device": device,
        "total_mb": total_mb,
        "kv_cache_mb": round(pool_mb),
        "used_mb": round(pool_mb * usage),
        "free_mb": round(pool_mb * (1.0 - usage)),
        "usage_percent": round(100.0 * usage, 1),
    }
    if kv_tokens is not None:
        info["kv_cache_tokens"] = kv_tokens
        info["kv_cache_free_tokens"] = int(kv_tokens * (1.0 - usage))
    return info


def kv_usage_from_metrics(metrics: Sequence[Any]) -> float | None:
    """vLLM's KV-cache usage (0-1) from `LLM.get_metrics()`: the `vllm:kv_cache_usage_perc` gauge
    (`vllm:gpu_cache_usage_perc` before vLLM 0.10.2). None when neither is there."""
    for metric in metrics:
        if getattr(metric, "name", None) in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            return float(metric.value)
    return None


def check_options(
    *,
    model: str | None,
    device: str | None,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    max_tokens: int,
    ngram_size: int,
    window_size: int,
    dtype: str,
) -> None:
    """Everything about the options that can be wrong, checked before vllm is imported, each
    message naming its key (EngineConfigError: the daemon exits 78)."""
    if not model:
        raise EngineConfigError("ocr.model: the vllm engine needs a model folder")
    if device is not None and not device.startswith("cuda"):
        raise EngineConfigError(f"ocr.devices: the vllm engine runs on a CUDA GPU, not {device!r}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise EngineConfigError(
            f"ocr.options.gpu_memory_utilization must be above 0 and at most 1, not {gpu_memory_utilization}"
        )
    if max_model_len is not None and max_model_len < 1:
        raise EngineConfigError(f"ocr.options.max_model_len must be at least 1 (or null), not {max_model_len}")
    if max_tokens < 1:
        raise EngineConfigError(f"ocr.options.max_tokens must be at least 1, not {max_tokens}")
    if ngram_size < 0:
        raise EngineConfigError(f"ocr.options.ngram_size must be 0 (off) or more, not {ngram_size}")
    if ngram_size and window_size < ngram_size:
        raise EngineConfigError(
            f"ocr.options.window_size ({window_size}) must be at least ocr.options.ngram_size ({ngram_size})"
        )
    if dtype not in DTYPES:
        raise EngineConfigError(f"ocr.options.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


class VllmEngine:
    """DeepSeek-OCR (or another vLLM multimodal model) from `model`, a local folder. Options:

    gpu_memory_utilization  share of the GPU vLLM reserves (weights + KV cache), default 0.9
    max_model_len           context bound (prompt + output); null: the model's
    max_tokens              bound on generated tokens per page (default 4096)
    ngram_size, window_size the recipe's NGramPerReqLogitsProcessor (30, 90); ngram_size 0: off
                            (a model other than DeepSeek-OCR has no such processor)
    whitelist_token_ids     tokens the processor lets repeat (DeepSeek-OCR's <td>, </td>)
    keep_grounding          keep the <|ref|>/<|det|> layout tags in the text (default false)
    trust_remote_code       for a checkpoint whose config needs it (default false)
    dtype                   auto | bfloat16 | float16 | float32
    multiprocessing         run vLLM's engine core in its own process (default false: in the child)
    enforce_eager           skip CUDA-graph capture (faster load, slower decode; default false)
    image_placeholder       the model's image token, put before a prompt that lacks it (default
                            DeepSeek-OCR's "<image>")
    ignore_eos              decode max_tokens on every page (benchmarks and scripts/gpu-check only)
    """

    name = "vllm"

    def __init__(
        self,
        *,
        model: str | None = None,
        prompt: str | None = None,
        device: str | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        ngram_size: int = DEFAULT_NGRAM_SIZE,
        window_size: int = DEFAULT_WINDOW_SIZE,
        whitelist_token_ids: Sequence[int] = DEFAULT_WHITELIST,
        keep_grounding: bool = False,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        multiprocessing: bool = False,
        enforce_eager: bool = False,
        image_placeholder: str = "<image>",
        ignore_eos: bool = False,
    ):
        check_options(
            model=model,
            device=device,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_tokens=max_tokens,
            ngram_size=ngram_size,
            window_size=window_size,
            dtype=dtype,
        )
        # Read by vllm when it is imported: set first (see the module's docstring).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        try:
            import vllm
        except ImportError as exc:
            raise EngineConfigError(
                f"ocr.engine: vllm needs the vllm package ({exc}); install the extra "
                "(pip install 'watcherd[vllm]'), usually into its own venv named by ocr.python"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the vllm engine needs a CUDA GPU, and torch sees none")
        self.model = str(model)
        self.prompt = prompt or DEFAULT_PROMPT
        if image_placeholder not in self.prompt:
            self.prompt = f"{image_placeholder}\n{self.prompt}"  # one image per page
        self.keep_grounding = keep_grounding
        self._torch = torch
        extra: dict[str, Any] = {}
        extra_args: dict[str, Any] | None = None
        if ngram_size:
            from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

            extra["logits_processors"] = [NGramPerReqLogitsProcessor]
            extra_args = {
                "ngram_size": ngram_size,
                "window_size": window_size,
                "whitelist_token_ids": set(whitelist_token_ids),
            }
        if max_model_len is not None:
            extra["max_model_len"] = max_model_len
        self.llm = vllm.LLM(
            model=self.model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            disable_log_stats=False,  # get_metrics() (the guard's KV-cache usage) needs the stats
            enforce_eager=enforce_eager,
            limit_mm_per_prompt={"image": 1},
            **extra,
        )
        self.sampling = vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            extra_args=extra_args,
            skip_special_tokens=False,
            ignore_eos=ignore_eos,
        )
        self._device = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        self._total_mb = round(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / MB)
        self._kv_tokens, self._pool_mb = self._kv_pool(gpu_memory_utilization)

    def _kv_pool(self, utilization: float) -> tuple[int | None, float]:
        """The KV-cache pool: its size in tokens (blocks × block size, as vLLM's engine core
        reports back at start-up) and in MB (tokens × bytes a token takes in every layer). If the
        model's geometry cannot be read, vLLM's whole budget stands in for the pool, which the
        figures then say (`kv_cache_mb` equal to the budget)."""
        budget_mb = self._total_mb * utilization
        try:
            config = self.llm.llm_engine.vllm_config
            cache, model_config = config.cache_config, config.model_config
            tokens = int(cache.num_gpu_blocks) * int(cache.block_size)
            per_token = (
                2  # K and V
                * model_config.get_num_layers(config.parallel_config)
                * model_config.get_num_kv_heads(config.parallel_config)
                * model_config.get_head_size()
                * self._torch.tensor([], dtype=model_config.dtype).element_size()
            )
            return tokens, min(tokens * per_token / MB, budget_mb)
        except Exception as exc:  # noqa: BLE001 - the figures degrade to the budget, never fail the load
            note(f"vllm: KV-cache pool size not readable ({type(exc).__name__}: {exc}); the guard uses the budget")
            return None, budget_mb

    def gpu_info(self) -> dict[str, Any]:
        usage = kv_usage_from_metrics(self.llm.get_metrics())
        return kv_cache_info(
            usage=usage or 0.0,
            pool_mb=self._pool_mb,
            device=self._device,
            total_mb=self._total_mb,
            kv_tokens=self._kv_tokens,
        )

    def ocr(self, image: Image.Image) -> str | PageText:
        return self.ocr_batch([image])[0]

    def ocr_batch(self, images: Sequence[Image.Image]) -> list[str | PageText]:
        requests = [{"prompt": self.prompt, "multi_modal_data": {"image": image.convert("RGB")}} for image in images]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        pages: list[str | PageText] = []
        for image, output in zip(images, outputs, strict=True):
            completion = output.outputs[0]
            if completion.finish_reason == "length":
                note(f"a page reached max_tokens ({self.sampling.max_tokens}) ({self.model})")
            pages.append(self._page(_END.sub("", completion.text), image.size))
        return pages

    def _page(self, text: str, size: tuple[int, int]) -> str | PageText:
        if self.keep_grounding:
            return text.strip()
        stripped = strip_grounding(text).strip()
        if "<|grounding|>" not in self.prompt:
            return stripped
        lines = grounding_lines(text, size)  # 0-999 boxes scaled to the page as given
        return PageText(lines=lines, text=stripped) if lines else stripped

    def clear_cache(self) -> None:
        """Nothing to give back: vLLM's KV pool is fixed for the engine's life, and the caches it
        could reset (prefix, multimodal) are off (see the module's docstring)."""

    def close(self) -> None:
        del self.llm
