"""OCR engines. An engine is any class with the DESIGN §6 interface:

    Engine(*, model, prompt, device, **options)   # loads the model, once, in the child
    engine.ocr(image: PIL.Image.Image) -> str | PageText   # one page: its text (markdown welcome),
                                                          # or its lines with boxes (below)
    engine.clear_cache() / engine.close()          # optional
    engine.gpu_info() -> dict                      # optional: the engine's own memory figures
    engine.ocr_batch(images) -> list               # optional: several pages at once, results in order

An engine that depends on something outside the child (a server) raises `EngineUnavailable` for
"this file cannot be done now, try it later": the file is deferred, not failed. One whose options
are wrong raises `EngineConfigError` (or TypeError): the daemon exits 78 instead of retrying.

`ocr.engine` is a built-in name or "package.module:Class". Resolving imports the engine's module,
so it happens in the child (or a throw-away probe process): the parent never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

BUILTIN = {
    "rapidocr": "watcherd.engines.rapidocr:RapidOcrEngine",
    "transformers": "watcherd.engines.transformers:TransformersEngine",
    "deepseek-ocr": "watcherd.engines.deepseek_ocr:DeepseekOcrEngine",
    "openai": "watcherd.engines.openai:OpenAiEngine",
    "vllm": "watcherd.engines.vllm:VllmEngine",
}


class EngineNotFound(Exception):
    """`ocr.engine` names nothing importable: a configuration error, not worth retrying."""


class EngineConfigError(ValueError):
    """`ocr.options` (or `ocr.model`/`ocr.prompt`) are wrong for this engine: the message names the
    key; retrying cannot help, so the daemon exits 78."""


class EngineUnavailable(Exception):
    """Something the engine needs is not there now (its server is down, overloaded, or answers
    5xx/429): the file is deferred and retried later, never failed for it. The message says why,
    for the log; it must not contain secrets."""


def resolve(spec: str) -> Any:
    target = BUILTIN.get(spec, spec)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        known = ", ".join(BUILTIN)
        raise EngineNotFound(f"ocr.engine: {spec!r} is neither a built-in engine ({known}) nor 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineNotFound(f"ocr.engine: cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise EngineNotFound(f"ocr.engine: module {module_name!r} has no {class_name!r}") from None


# -- what `engine.ocr()` may return besides a str (DESIGN §6) ---------------------------------

Point = tuple[float, float]
Box = tuple[Point, Point, Point, Point]  # corners clockwise from the top left, in pixels


@dataclass(frozen=True)
class Word:
    """A word (Latin) or a character (CJK) of a line, with its own box."""

    text: str
    box: Box
    score: float | None = None


@dataclass(frozen=True)
class Line:
    """One line of text on a page: its box, in the pixels of the image the engine was given, and
    the engine's confidence (0-1, None when it gives none)."""

    text: str
    box: Box
    score: float | None = None
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class PageText:
    """A page with positions. `text` is the page as the engine would have it read (markdown, in
    reading order); None means the lines joined by newlines."""

    lines: tuple[Line, ...]
    text: str | None = None

    @property
    def full_text(self) -> str:
        return self.text if self.text is not None else "\n".join(line.text for line in self.lines)


def as_page(result: object) -> PageText:
    """An engine's answer for one page as a PageText: a str becomes a page without lines."""
    if isinstance(result, PageText):
        return result
    if isinstance(result, str):
        return PageText(lines=(), text=result)
    raise TypeError(f"engine returned {type(result).__name__}, not str or PageText")


def box_from_points(points: object) -> Box:
    """Four (x, y) points from any sequence of pairs (numpy arrays included)."""
    pts = [(float(p[0]), float(p[1])) for p in points]  # type: ignore[attr-defined, index]
    if len(pts) != 4:
        raise ValueError(f"a box has 4 corners, not {len(pts)}")
    return (pts[0], pts[1], pts[2], pts[3])


def box_from_rect(left: float, top: float, right: float, bottom: float) -> Box:
    return ((left, top), (right, top), (right, bottom), (left, bottom))
