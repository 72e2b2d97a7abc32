"""A fake engine for tests/test_workers.py, chosen by configuration: it answers with the thread
settings its child was given, after `delay_s`, so tests see several files in flight at once."""

from __future__ import annotations

import os
import sys
from typing import Any

from PIL import Image

from tests.engines import Echo


class Threads(Echo):
    def ocr(self, image: Image.Image) -> str:
        super().ocr(image)  # sleeps delay_s
        torch = "loaded" if "torch" in sys.modules else "not loaded"
        omp, ours = os.environ.get("OMP_NUM_THREADS"), os.environ.get("WATCHERD_OCR_THREADS")
        return f"pid {os.getpid()} omp {omp} threads {ours} torch {torch}"


class TorchThreads(Echo):
    """Loads torch, as the model engines do: the child sets its intra-op pool to its share."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        import torch  # noqa: F401

    def ocr(self, image: Image.Image) -> str:
        import torch

        return f"torch threads {torch.get_num_threads()}"
