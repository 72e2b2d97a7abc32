"""OCR engines. An engine is any class with the DESIGN §6 interface:

    Engine(*, model, prompt, device, **options)   # loads the model, once, in the child
    engine.ocr(image: PIL.Image.Image) -> str      # one page's text (markdown welcome)
    engine.clear_cache() / engine.close()          # optional
    engine.gpu_info() -> dict                      # optional: the engine's own memory figures

`ocr.engine` is a built-in name or "package.module:Class". Resolving imports the engine's module,
so it happens in the child (or a throw-away probe process): the parent never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN = {
    "rapidocr": "watcherd.engines.rapidocr:RapidOcrEngine",
    "transformers": "watcherd.engines.transformers:TransformersEngine",
    "deepseek-ocr": "watcherd.engines.deepseek_ocr:DeepseekOcrEngine",
}


class EngineNotFound(Exception):
    """`ocr.engine` names nothing importable: a configuration error, not worth retrying."""


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
