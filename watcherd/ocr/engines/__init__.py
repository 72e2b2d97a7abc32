"""OCR engines. An engine is any class with the design §6 interface:

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
from typing import Any

# The records an engine returns: engines import them from here, their interface.
from watcherd.core.text import Box, Line, PageText, Point, Word, as_page, box_from_points, box_from_rect

__all__ = [
    "BUILTIN",
    "Box",
    "EngineConfigError",
    "EngineNotFound",
    "EngineUnavailable",
    "Line",
    "PageText",
    "Point",
    "Word",
    "as_page",
    "box_from_points",
    "box_from_rect",
    "resolve",
]

BUILTIN = {
    "rapidocr": "watcherd.ocr.engines.rapidocr:RapidOcrEngine",
    "transformers": "watcherd.ocr.engines.transformers:TransformersEngine",
    "deepseek-ocr": "watcherd.ocr.engines.deepseek_ocr:DeepseekOcrEngine",
    "openai": "watcherd.ocr.engines.openai:OpenAiEngine",
    "vllm": "watcherd.ocr.engines.vllm:VllmEngine",
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


# -- what `engine.ocr()` may return besides a str (design §6) ---------------------------------
