"""What the model engines share (`transformers`, and `deepseek_ocr` under its own pinned
transformers 4.46): device and dtype choice, cache clearing, the repetition guard, grounding tags,
notes to the log. Nothing here imports torch or transformers at module level, so the v1 engine's
venv and the tests can use it whatever those versions are.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Sequence
from typing import Any

from watcherd.core.text import Line, box_from_rect

DEFAULT_MAX_NEW_TOKENS = 4096
# 512 tokens holding at most 128 distinct 4-grams: an exact loop with a period up to 128 tokens (a
# line, a table row) after four turns, or a near-loop that changes a token every ~30 (all that
# no_repeat_ngram_size=35 forces). Ordinary text has ~500; a real table whose rows differ in a
# number every few tokens has ~250 and is left alone.
DEFAULT_REPEAT_WINDOW = 512
DEFAULT_REPEAT_MAX_DISTINCT = 0.25
NGRAM = 4


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

    def __init__(
        self,
        window: int = DEFAULT_REPEAT_WINDOW,
        max_distinct: float = DEFAULT_REPEAT_MAX_DISTINCT,
        *,
        pad_token_id: int | None = None,
    ):
        if window < 2 * NGRAM:
            raise ValueError(f"repeat_window must be 0 (off) or at least {2 * NGRAM}, not {window}")
        self.window = window
        self.max_distinct = max(1, int(window * max_distinct))
        self.start: int | None = None
        self.fired_rows: dict[int, int] = {}  # batch row → generated tokens when it fired there
        self.pad = pad_token_id  # in a batch, a row that has ended is padded: not a loop

    @property
    def fired(self) -> bool:
        return bool(self.fired_rows)

    @property
    def fired_at(self) -> int | None:
        return min(self.fired_rows.values(), default=None)

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
            if (self.pad is None or tail[-1] != self.pad) and self.looping(tail):
                done[row] = True
                self.fired_rows.setdefault(row, input_ids.shape[1] - self.start)
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


_BLOCK = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>(.*?)<\|/det\|>", re.DOTALL)
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>|<｜[^｜<>]*｜>")  # <|ref|>, <｜end▁of▁sentence｜>, ...
GROUNDING_SCALE = 999  # DeepSeek-OCR's boxes are normalised to 0-999 (its own drawing code divides by 999)
MAX_GROUNDING_BLOCKS = 10_000  # a looping answer is cut at max_new_tokens anyway; this bounds the parse


def grounding_lines(text: str, size: tuple[int, int]) -> tuple[Line, ...]:
    """The blocks of a grounding answer as Lines, in the order the model wrote them.

    A block is `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` followed by its text (up
    to the next block). Coordinates are normalised 0-999 and scaled here to `size` (width, height),
    the pixels of the image the engine was given. A block with several boxes gets the box around all
    of them; a block without text (a figure) or without a readable box is left out. The model gives
    no confidence, so `score` is None. Malformed answers never raise: what cannot be read is skipped.
    """
    width, height = size
    lines = []
    for match in itertools.islice(_BLOCK.finditer(text), MAX_GROUNDING_BLOCKS):
        end = text.find("<|ref|>", match.end())  # the next block, or a tag cut off by max_new_tokens
        end = len(text) if end < 0 else end
        body = _SPECIAL.sub("", text[match.end() : end]).strip()
        boxes = [[min(max(float(v), 0.0), GROUNDING_SCALE) for v in b.groups()] for b in _BOX.finditer(match.group(2))]
        if not body or not boxes:
            continue
        left = min(min(b[0], b[2]) for b in boxes) / GROUNDING_SCALE * width
        top = min(min(b[1], b[3]) for b in boxes) / GROUNDING_SCALE * height
        right = max(max(b[0], b[2]) for b in boxes) / GROUNDING_SCALE * width
        bottom = max(max(b[1], b[3]) for b in boxes) / GROUNDING_SCALE * height
        lines.append(Line(text=body, box=box_from_rect(left, top, right, bottom)))
    return tuple(lines)


def note(message: str) -> None:
    # The child's stderr is the daemon's log (journald): operators see which pages were cut.
    print(f"watcherd engine: {message}", file=sys.stderr, flush=True)
