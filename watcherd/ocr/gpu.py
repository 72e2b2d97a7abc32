"""GPU memory figures and cache clearing, child side only.

torch is used only if the engine already imported it: a CPU engine such as rapidocr must not pay
for importing torch just to report `{"available": false}`.
"""

from __future__ import annotations

import sys
from typing import Any

MB = 1024 * 1024


def info(engine: Any = None) -> dict[str, Any]:
    """Device-wide memory (other processes count) plus torch's own reserved/allocated, in MB."""
    if engine is not None and hasattr(engine, "gpu_info"):
        return dict(engine.gpu_info())
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {"available": False}
    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return {
        "available": True,
        "device": f"cuda:{device} ({torch.cuda.get_device_name(device)})",
        "total_mb": round(total / MB),
        "used_mb": round(used / MB),
        "free_mb": round(free / MB),
        "usage_percent": round(100 * used / total, 1),
        "torch_reserved_mb": round(torch.cuda.memory_reserved(device) / MB),
        "torch_allocated_mb": round(torch.cuda.memory_allocated(device) / MB),
    }


def clear_cache(engine: Any = None) -> None:
    if engine is not None and hasattr(engine, "clear_cache"):
        engine.clear_cache()
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
