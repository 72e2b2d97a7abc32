"""An engine whose module takes long to import (like `import torch, transformers` on a cold
disk): WATCHERD_TEST_IMPORT_S seconds (default 6). For the reload test: probing it must not stop
the daemon's loop."""

from __future__ import annotations

import os
import time

from tests.engines import Echo

time.sleep(float(os.environ.get("WATCHERD_TEST_IMPORT_S", "6")))


class SlowImport(Echo):
    def ocr(self, image):  # type: ignore[no-untyped-def]
        return "new engine " + super().ocr(image)
