"""Native image-text-to-text models through Hugging Face transformers (DESIGN §6): DeepSeek-OCR-2,
GOT-OCR2 and other `AutoModelForImageTextToText` models, from a local folder.

    ocr: {engine: transformers, model: /srv/models/DeepSeek-OCR-2}

The model loads once, on CUDA in bfloat16 when torch sees a GPU (float16 where the GPU has no
bf16), otherwise on the CPU in float32. Each page is one greedy `generate()` call; only the new
tokens are decoded. The prompt comes from the model family (see `FAMILIES`) unless `ocr.prompt`
sets one.

Runaway generation is stopped here, not by the timeout: DeepSeek-OCR is reported to loop until
8,192 tokens on ~9 % of newspaper pages, which on a GPU costs minutes per page and then a timeout
that throws away everything it had read. Two guards, both options:
- `max_new_tokens` (default 4096) bounds every page. A dense newspaper page in Chinese is ~2,500
  tokens of text plus markup, so 4096 keeps real pages whole and halves the worst case.
- `RepetitionGuard` (`repeat_window`, `repeat_max_distinct`) stops a page whose last tokens have
  collapsed into a loop, and an exact loop is cut back to one copy. It looks at distinct 4-grams,
  not exact periods, because DeepSeek-OCR v1 already bans repeated 35-grams and still loops: its
  loops vary a token now and then (a counter, a cell), which defeats an exact-cycle test.
`no_repeat_ngram_size` and `repetition_penalty` pass through to `generate()` for models that
need them; other `generate()` arguments go in the `generate` option.

torch and transformers are imported when the engine is built, in the OCR child only: the daemon
process never imports them. The helpers at module level (`RepetitionGuard`, `strip_grounding`)
import nothing heavy, so `deepseek_ocr` reuses them under transformers 4.46 as well.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

DEFAULT_MAX_NEW_TOKENS = 4096
# 512 tokens holding at most 128 distinct 4-grams: an exact loop with a period up to 128 tokens (a
# line, a table row) after four turns, or a near-loop that changes a token every ~30 (all that
# no_repeat_ngram_size=35 forces). Ordinary text has ~500; a real table whose rows differ in a
# number every few tokens has ~250 and is left alone.
DEFAULT_REPEAT_WINDOW = 512
DEFAULT_REPEAT_MAX_DISTINCT = 0.25
NGRAM = 4

GENERIC_PROMPT = "Transcribe all the text in this image, in reading order, as markdown."


@dataclass(frozen=True)
class Family:
    """How to prompt one model family. `prompt=None`: the processor builds its own prompt."""

    prompt: str | None
    generate: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # wrap the prompt in the processor's chat template


FAMILIES: dict[str, Family] = {
    # The transformers docs' plain-OCR prompt. "<|grounding|>Convert the document to markdown."
    # also works (its boxes are stripped, see strip_grounding) but spends tokens on a box per block.
    "deepseek_ocr2": Family(prompt="<image>\nFree OCR."),
    # GOT-OCR2's processor writes its own conversation ("OCR: "; `processor: {format: true}` asks
    # for markdown/LaTeX) and the checkpoint ends its answer with <|im_end|>, not EOS.
    "got_ocr2": Family(prompt=None, generate={"stop_strings": "<|im_end|>"}),
}
GENERIC = Family(prompt=GENERIC_PROMPT, chat=True)


class TransformersEngine:
    """`AutoProcessor` + `AutoModelForImageTextToText` from `model` (a local folder, or a hub id
    where the host can reach a hub). Options (`ocr.options`):

    max_new_tokens          bound on generated tokens per page (default 4096)
    repeat_window           tokens the repetition guard looks at (default 512; 0 turns it off)
    repeat_max_distinct     stop when that window holds at most this share of distinct 4-grams (0.25)
    no_repeat_ngram_size, repetition_penalty    passed to generate() when set
    generate                other generate() keyword arguments, e.g. {num_beams: 1}
    processor               extra processor() keyword arguments, e.g. {format: true} for GOT-OCR2
    dtype                   auto | bfloat16 | float16 | float32 (auto: bf16 on CUDA, fp32 on CPU)
    trust_remote_code       for checkpoints whose image-text-to-text class is remote code (default off)
    """

    name = "transformers"

    def __init__(
        self,
        *,
        model: str | None = None,
        prompt: str | None = None,
        device: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        repeat_window: int = DEFAULT_REPEAT_WINDOW,
        repeat_max_distinct: float = DEFAULT_REPEAT_MAX_DISTINCT,
        no_repeat_ngram_size: int | None = None,
        repetition_penalty: float | None = None,
        generate: dict[str, Any] | None = None,
        processor: dict[str, Any] | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        if not model:
            raise ValueError("ocr.model: the transformers engine needs a model folder")
        if max_new_tokens < 1:
            raise ValueError(f"ocr.options.max_new_tokens must be at least 1, not {max_new_tokens}")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteriaList

        self.model = str(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        net: Any = AutoModelForImageTextToText.from_pretrained(
            self.model, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self.net = net.to(self.device).eval()
        self._torch = torch
        self._criteria = StoppingCriteriaList

        model_type = getattr(self.net.config, "model_type", "")
        self.family = FAMILIES.get(model_type, GENERIC)
        self.prompt = prompt if prompt is not None else self.family.prompt
        self.processor_kwargs = dict(processor or {})
        self.max_new_tokens = max_new_tokens
        self.repeat_window = repeat_window
        self.repeat_max_distinct = repeat_max_distinct
        self.generate_kwargs: dict[str, Any] = {"do_sample": False, **self.family.generate, **(generate or {})}
        if no_repeat_ngram_size:
            self.generate_kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
        if repetition_penalty:
            self.generate_kwargs["repetition_penalty"] = repetition_penalty
        if "stop_strings" in self.generate_kwargs:
            self.generate_kwargs["tokenizer"] = self._tokenizer  # generate() needs it to match strings
        # Grounding prompts answer with <|ref|>/<|det|> tags, which are special tokens: decode with
        # them kept so strip_grounding can remove whole tags, not leave their boxes behind.
        self.grounding = "<|grounding|>" in (self.prompt or "")

    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def ocr(self, image: Image.Image) -> str:
        torch = self._torch
        # BatchFeature.to casts only floating tensors (pixel values, local tiles), not token ids.
        inputs = self._inputs(image.convert("RGB")).to(self.device, dtype=self.dtype)
        guard = RepetitionGuard(self.repeat_window, self.repeat_max_distinct) if self.repeat_window else None
        with torch.inference_mode():
            output = self.net.generate(
                **inputs,
                **self.generate_kwargs,
                max_new_tokens=self.max_new_tokens,
                stopping_criteria=self._criteria([guard] if guard else []),
            )
        if self.net.config.is_encoder_decoder:
            new_tokens = output[0].tolist()
        else:
            new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        if guard is not None and guard.fired:
            new_tokens = guard.trim(new_tokens)
            _note(f"repetition guard stopped a page after {guard.fired_at} tokens ({self.model})")
        elif len(new_tokens) >= self.max_new_tokens:
            _note(f"a page reached max_new_tokens ({self.max_new_tokens}); its text may be cut ({self.model})")
        return self._decode(new_tokens)

    def _inputs(self, image: Image.Image) -> Any:
        kwargs = {"return_tensors": "pt", **self.processor_kwargs}
        if self.prompt is None:
            return self.processor(images=image, **kwargs)
        if self.family.chat and getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.processor(images=image, text=text, **kwargs)
        text = self.prompt
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token not in text:
            text = f"{image_token}\n{text}"  # a prompt given without the placeholder still sees the page
        return self.processor(images=image, text=text, **kwargs)

    def _decode(self, tokens: list[int]) -> str:
        tokenizer = self._tokenizer
        if not self.grounding:
            return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        text = strip_grounding(str(tokenizer.decode(tokens, skip_special_tokens=False)))
        for special in getattr(tokenizer, "all_special_tokens", []):
            text = text.replace(special, "")
        return text.strip()

    def clear_cache(self) -> None:
        clear_torch_cache(self._torch, self.device)

    def close(self) -> None:
        del self.net
        self.clear_cache()


# -- shared with deepseek_ocr: no torch or transformers at import time ------------------------


def pick_device(device: str | None) -> str:
    """`ocr.devices` gives "cuda" (the supervisor sets CUDA_VISIBLE_DEVICES); None: CUDA if torch
    sees a GPU, else the CPU. Asking for CUDA on a machine without it is an error, not a slow
    silent fallback."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def pick_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32  # bf16 matmuls on CPU are slow and lose accuracy for no memory gain here
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"ocr.options.dtype: {name!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def clear_torch_cache(torch: Any, device: str) -> None:
    """Return cached blocks to the driver. synchronize() first: memory still used by queued kernels
    is only released once they finish."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def distinct_ngrams(tokens: Sequence[int], n: int = NGRAM) -> int:
    return len({tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)})


def trailing_loop(tokens: Sequence[int], max_period: int, min_turns: int = 3) -> tuple[int, int] | None:
    """`(start, period)` of the longest exact loop that ends `tokens`: from `start` on, every token
    equals the one `period` later, over at least `min_turns` turns. The smallest period wins a tie.
    None when there is no such loop."""
    tokens = list(tokens)
    n = len(tokens)
    best: tuple[int, int] | None = None
    for period in range(1, min(max_period, n // min_turns) + 1):
        start = n - period
        while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
            start -= 1
        if n - start >= min_turns * period and (best is None or start < best[0]):
            best = (start, period)
    return best


def collapse_loop(tokens: Sequence[int], max_period: int) -> list[int]:
    """`tokens` with an exact loop at the end (see trailing_loop) cut back to its first turn."""
    loop = trailing_loop(tokens, max_period)
    return list(tokens) if loop is None else list(tokens)[: loop[0] + loop[1]]


class RepetitionGuard:
    """A `generate()` stopping criterion: stop a sequence once its last `window` generated tokens
    hold at most `window * max_distinct` distinct 4-grams (a loop, exact or nearly so).

    Only generated tokens are looked at: the prompt (hundreds of identical `<image>` tokens) would
    otherwise trip it at once. The first call sees the prompt plus one new token, which is how the
    guard finds where generation began, for decoder-only and encoder-decoder models alike; so use
    one guard per `generate()` call. A plain callable, not a `StoppingCriteria` subclass, so that
    importing it needs no transformers: `generate()` only calls its criteria.
    """

    def __init__(self, window: int = DEFAULT_REPEAT_WINDOW, max_distinct: float = DEFAULT_REPEAT_MAX_DISTINCT):
        if window < 2 * NGRAM:
            raise ValueError(f"repeat_window must be 0 (off) or at least {2 * NGRAM}, not {window}")
        self.window = window
        self.max_distinct = max(1, int(window * max_distinct))
        self.start: int | None = None
        self.fired_at: int | None = None  # generated tokens when it fired

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def looping(self, generated: Sequence[int]) -> bool:
        if len(generated) < self.window:
            return False
        return distinct_ngrams(generated[-self.window :]) <= self.max_distinct

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        import torch

        if self.start is None:
            self.start = input_ids.shape[1] - 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] - self.start < self.window:
            return done
        # One small copy to the host per step; generate() already syncs every step for its own
        # end-of-sequence check, so this adds no stall on a GPU.
        for row, tail in enumerate(input_ids[:, -self.window :].tolist()):
            if self.looping(tail):
                done[row] = True
                self.fired_at = input_ids.shape[1] - self.start
        return done

    def trim(self, generated: Sequence[int]) -> list[int]:
        """The generated tokens with an exact loop at the end cut back to one turn; a near-loop is
        left as generated (there is no clean place to cut it)."""
        return collapse_loop(generated, self.max_distinct)


_GROUNDING = re.compile(r"<\|ref\|>.*?<\|/ref\|>\s*<\|det\|>.*?<\|/det\|>[ \t]*\n?", re.DOTALL)


def strip_grounding(text: str) -> str:
    """Remove DeepSeek-OCR's layout tags (`<|ref|>title<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`)
    from a grounding answer, leaving the markdown. Their `save_results` mode does the same (and
    crops figures); `eval_mode` returns them raw."""
    return _GROUNDING.sub("", text)


def _note(message: str) -> None:
    # The child's stderr is the daemon's log (journald): operators see which pages were cut.
    print(f"watcherd engine: {message}", file=sys.stderr, flush=True)
