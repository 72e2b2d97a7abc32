"""Fake engines for the many-hosts tests (tests/test_cluster.py), chosen by configuration."""

from __future__ import annotations

import os
import signal
import time

from PIL import Image

from tests.engines import Echo

KILL_WORKER_WIDTH = 19


class KillsItsWorker(Echo):
    """On a page of width 19, SIGKILLs its parent — a Celery pool process — as the OOM killer
    would: the whole worker process is gone, not just the OCR child (which follows it through
    PR_SET_PDEATHSIG)."""

    def ocr(self, image: Image.Image) -> str:
        if image.width == KILL_WORKER_WIDTH:
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)
        return super().ocr(image)
