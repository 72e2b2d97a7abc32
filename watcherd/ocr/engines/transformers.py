"""Native image-text-to-text models through Hugging Face transformers (design §6): DeepSeek-OCR-2,
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
live in `engines/common.py`, which imports nothing heavy, so `deepseek_ocr` shares them under
transformers 4.46 as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def ocr(self, image: Image.Image) -> str | PageText:
        return self.ocr_batch([image])[0]

    def ocr_batch(self, images: list[Image.Image]) -> list[str | PageText]:
        """Several pages in one `generate()` (prompts padded on the left), which is how a GPU is
        kept busy (`ocr.batch_pages`); greedy decoding gives each page the text it gets alone."""
        torch = self._torch
        tokenizer = self._tokenizer
        if len(images) > 1:
            tokenizer.padding_side = "left"  # decoder-only models continue from the prompt's end
        # BatchFeature.to casts only floating tensors (pixel values, local tiles), not token ids.
        inputs = self._inputs([image.convert("RGB") for image in images]).to(self.device, dtype=self.dtype)
        pad = getattr(tokenizer, "pad_token_id", None) if len(images) > 1 else None
        guard = None
        if self.repeat_window:
            guard = RepetitionGuard(self.repeat_window, self.repeat_max_distinct, pad_token_id=pad)
        with torch.inference_mode():
            output = self.net.generate(
                **inputs,
                **self.generate_kwargs,
                max_new_tokens=self.max_new_tokens,
                stopping_criteria=self._criteria([guard] if guard else []),
            )
        start = 0 if self.net.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        pages: list[str | PageText] = []
        for row, image in enumerate(images):
            new_tokens = output[row, start:].tolist()
            while new_tokens and pad is not None and new_tokens[-1] == pad:
                new_tokens.pop()  # a row that ended before the others is padded to their length
            if guard is not None and row in guard.fired_rows:
                new_tokens = guard.trim(new_tokens)
                note(f"repetition guard stopped a page after {guard.fired_rows[row]} tokens ({self.model})")
            elif len(new_tokens) >= self.max_new_tokens:
                note(f"a page reached max_new_tokens ({self.max_new_tokens}); its text may be cut ({self.model})")
            pages.append(self._answer(new_tokens, image))
        return pages

    def _answer(self, new_tokens: list[int], image: Image.Image) -> str | PageText:
        text = self._decode(new_tokens)
        if not self.grounding:
            return text
        # The same answer, tags kept: its <|det|> boxes become the page's lines (design §6). An
        # answer without a box stays a str (what as_page() would make of it anyway).
        lines = grounding_lines(str(self._tokenizer.decode(new_tokens, skip_special_tokens=False)), image.size)
        return PageText(lines=lines, text=text) if lines else text

    def _inputs(self, images: list[Image.Image]) -> Any:
        kwargs = {"return_tensors": "pt", **self.processor_kwargs}
        if len(images) > 1:
            kwargs["padding"] = True
        one = images[0] if len(images) == 1 else images
        if self.prompt is None:
            return self.processor(images=one, **kwargs)
        if self.family.chat and getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = self.prompt
            image_token = getattr(self.processor, "image_token", None)
            if image_token and image_token not in text:
                text = f"{image_token}\n{text}"  # a prompt given without the placeholder still sees the page
        return self.processor(images=one, text=text if len(images) == 1 else [text] * len(images), **kwargs)

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
