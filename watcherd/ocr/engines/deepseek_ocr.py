"""DeepSeek-OCR v1 (the original service's model) through its own remote code (design §6).

    ocr: {engine: deepseek-ocr, model: /srv/models/DeepSeek-OCR, python: /opt/deepseek-ocr-venv/bin/python}

The checkpoint ships its modeling code (`trust_remote_code`), written for transformers 4.46.3 and
torch 2.6: newer transformers fail to import it, so the child usually runs under `ocr.python`, a
venv pinned to those versions, while the daemon stays on current packages. This module therefore
keeps to what both transformers 4.46 and 5.x offer (e.g. `torch_dtype=`, not `dtype=`).

Its entry point is `model.infer(tokenizer, prompt, image_file, output_path, base_size, image_size,
crop_mode, test_compress, save_results, eval_mode)`, and it has traps this engine exists to avoid:
- Without `eval_mode=True` it returns None and only prints the text (the seed service's blank
  results). With it, it returns the text.
- It takes a file name, not an image, and always creates `output_path` (plus `images/` in it):
  each page goes through a fresh temp folder that is removed afterwards, so nothing accumulates.
- It hard-codes `.cuda()`: it runs on a GPU only (a CPU machine gets a warning at load and an
  error per page; the fake checkpoint in the tests runs anywhere).
- It hard-codes `max_new_tokens=8192`. The engine wraps this model's `generate()` so that
  `max_new_tokens` (default 4096) and the repetition guard apply (see engines/transformers.py).
- In eval mode the answer to a grounding prompt keeps its `<|ref|>…<|det|>[[box]]<|/det|>` tags;
  they are stripped from the text, and their boxes (0-999, scaled to the page's pixels) become the
  page's lines (`common.grounding_lines`); `keep_grounding: true` keeps them in the text instead.

The default prompt is the markdown one, "<image>\\n<|grounding|>Convert the document to markdown.":
the outputs are markdown files, and this prompt is what gives v1 its layout (headings, tables,
reading order of columns); "Free OCR." reads plain text only. Its layout tags cost some tokens
per block and are stripped, so the text is clean markdown either way.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, NamedTuple

from PIL import Image

from watcherd.core.text import PageText
from watcherd.ocr.engines.common import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPEAT_MAX_DISTINCT,
    DEFAULT_REPEAT_WINDOW,
    RepetitionGuard,
    clear_torch_cache,
    grounding_lines,
    note,
    pick_device,
    pick_dtype,
    strip_grounding,
)

DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


class Resolution(NamedTuple):
    base_size: int
    image_size: int
    crop_mode: bool


# DeepSeek-OCR's named modes. Gundam (a 1024 px global view plus 640 px tiles) is the one the model
# card recommends for documents and the seed service used; the others trade accuracy for speed.
PRESETS: dict[str, Resolution] = {
    "tiny": Resolution(512, 512, False),
    "small": Resolution(640, 640, False),
    "base": Resolution(1024, 1024, False),
    "large": Resolution(1280, 1280, False),
    "gundam": Resolution(1024, 640, True),
}


def resolve_preset(
    preset: str = "gundam",
    base_size: int | None = None,
    image_size: int | None = None,
    crop_mode: bool | None = None,
) -> Resolution:
    """The named preset (case-insensitive), with any explicitly given value taking precedence."""
    try:
        chosen = PRESETS[preset.lower()]
    except KeyError:
        raise ValueError(f"ocr.options.preset: {preset!r} is not one of {', '.join(PRESETS)}") from None
    return Resolution(
        base_size if base_size is not None else chosen.base_size,
        image_size if image_size is not None else chosen.image_size,
        crop_mode if crop_mode is not None else chosen.crop_mode,
    )


class DeepseekOcrEngine:
    """DeepSeek-OCR v1 from `model` (a local folder). Options (`ocr.options`):

    preset                  tiny | small | base | large | gundam (default gundam)
    base_size, image_size, crop_mode    override the preset's values
    max_new_tokens          bound on generated tokens per page (default 4096; the model's own is 8192)
    repeat_window, repeat_max_distinct  the repetition guard (engines/transformers.py); 0 turns it off
    keep_grounding          keep the <|ref|>/<|det|> layout tags in the text (default false)
    dtype                   auto | bfloat16 | float16 | float32 (auto: bf16 on CUDA, fp32 on CPU)
    attn_implementation     e.g. flash_attention_2, as the model card suggests where it is installed
    """

    name = "deepseek-ocr"

    def __init__(
        self,
        *,
        model: str | None = None,
        prompt: str | None = None,
        device: str | None = None,
        preset: str = "gundam",
        base_size: int | None = None,
        image_size: int | None = None,
        crop_mode: bool | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        repeat_window: int = DEFAULT_REPEAT_WINDOW,
        repeat_max_distinct: float = DEFAULT_REPEAT_MAX_DISTINCT,
        keep_grounding: bool = False,
        dtype: str = "auto",
        attn_implementation: str | None = None,
    ):
        if not model:
            raise ValueError("ocr.model: the deepseek-ocr engine needs a model folder")
        self.resolution = resolve_preset(preset, base_size, image_size, crop_mode)
        if max_new_tokens < 1:
            raise ValueError(f"ocr.options.max_new_tokens must be at least 1, not {max_new_tokens}")
        if repeat_window:
            RepetitionGuard(repeat_window, repeat_max_distinct)  # validate now, not on the first page
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model = str(model)
        self.prompt = prompt or DEFAULT_PROMPT
        if "<image>" not in self.prompt:
            # infer() only returns text for a prompt with an image placeholder
            self.prompt = f"<image>\n{self.prompt}"
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.repeat_window = repeat_window
        self.repeat_max_distinct = repeat_max_distinct
        self.keep_grounding = keep_grounding
        self._torch = torch
        if not self.device.startswith("cuda"):
            note("DeepSeek-OCR's infer() calls .cuda(): without a GPU its pages will fail")

        extra: dict[str, Any] = {}
        if attn_implementation:
            extra["attn_implementation"] = attn_implementation
        self.tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=True)
        net = AutoModel.from_pretrained(
            self.model, trust_remote_code=True, use_safetensors=True, torch_dtype=self.dtype, **extra
        )
        self.net = net.eval().to(self.device, self.dtype)
        self._guard: RepetitionGuard | None = None
        self._generate = self.net.generate
        # infer() calls self.generate(...) with max_new_tokens=8192 and no stopping criteria: an
        # instance attribute shadows the class's generate for this model object only.
        self.net.generate = self._bounded_generate

    def ocr(self, image: Image.Image) -> str | PageText:
        base_size, image_size, crop_mode = self.resolution
        with tempfile.TemporaryDirectory(prefix="watcherd-deepseek-ocr-") as work:
            page = os.path.join(work, "page.png")  # lossless: the model sees the page as decoded
            image.convert("RGB").save(page)
            with self._torch.inference_mode():
                text = self.net.infer(
                    self.tokenizer,
                    prompt=self.prompt,
                    image_file=page,
                    output_path=os.path.join(work, "out"),
                    base_size=base_size,
                    image_size=image_size,
                    crop_mode=crop_mode,
                    test_compress=False,
                    save_results=False,
                    eval_mode=True,
                )
        if text is None:
            raise RuntimeError("DeepSeek-OCR infer() returned no text")
        guard, self._guard = self._guard, None
        if guard is not None and guard.fired:
            note(f"repetition guard stopped a page after {guard.fired_at} tokens ({self.model})")
        text = str(text)
        if self.keep_grounding:
            return text.strip()
        stripped = strip_grounding(text).strip()
        if "<|grounding|>" not in self.prompt:
            return stripped
        # infer() was given the page as decoded, so 0-999 scales to this image's pixels. An
        # answer without a box stays a str (what as_page() would make of it anyway).
        lines = grounding_lines(text, image.size)
        return PageText(lines=lines, text=stripped) if lines else stripped

    def _bounded_generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's generate() with our token bound and the repetition guard added; an exact loop
        is cut back to one turn in the returned ids, which infer() then decodes."""
        kwargs["max_new_tokens"] = self.max_new_tokens
        if not self.repeat_window:
            return self._generate(*args, **kwargs)
        from transformers import StoppingCriteriaList

        guard = RepetitionGuard(self.repeat_window, self.repeat_max_distinct)
        self._guard = guard
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), guard])
        output = self._generate(*args, **kwargs)
        if not guard.fired or guard.start is None or not hasattr(output, "shape"):
            return output
        generated = output[0, guard.start :].tolist()
        kept = guard.trim(generated)
        return output[:, : guard.start + len(kept)]

    def clear_cache(self) -> None:
        clear_torch_cache(self._torch, self.device)

    def close(self) -> None:
        del self.net
        self.clear_cache()
