"""Pages in flight: the tiny random DeepSeek-OCR-2 (tests/tiny_models.py) on the CPU through the
daemon, one 16-page TIFF at `ocr.batch_pages` 1, 4 and 8. Prints a markdown table.

On a CPU the batch mostly saves per-call overhead; on a GPU it is what keeps the card busy (see
scripts/gpu-check). The pages differ in size, so prompts are padded in a batch.

    .venv/bin/python benchmarks/batch.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, BenchDaemon, wait_for
from PIL import Image

sys.path.insert(0, str(REPO))
from tests.tiny_models import build_deepseek_ocr2  # noqa: E402

PAGES = 16


def run(model: Path, batch: int) -> tuple[float, float]:
    daemon = BenchDaemon(
        {
            "engine": "transformers",
            "model": str(model),
            "batch_pages": batch,
            "auto_rotate": False,
            "timeout_s": 600,
            "options": {"max_new_tokens": 16, "repeat_window": 0},
        }
    ).start()
    try:
        frames = [Image.effect_noise((64 + 8 * (i % 4), 48), 40).convert("RGB") for i in range(PAGES)]
        tmp = daemon.inbox.parent / "pages.tif"
        frames[0].save(tmp, save_all=True, append_images=frames[1:])
        started = time.monotonic()
        tmp.rename(daemon.inbox / "pages.tif")
        result = daemon.outbox / "pages.tif.json"
        wait_for(result.exists, 600, "result")
        wall = time.monotonic() - started
        document = json.loads(result.read_bytes())
        assert document["status"] == "ok", document
        return PAGES / wall, PAGES / document["processing_time"]
    finally:
        daemon.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_deepseek_ocr2(Path(tmp) / "tiny-deepseek-ocr2")
        print(f"| `ocr.batch_pages` | pages/s, drop to JSON ({PAGES} pages) | pages/s in the child (processing_time) |")
        print("|---|---|---|")
        for batch in (1, 4, 8):
            wall, child = run(model, batch)
            print(f"| {batch} | {wall:.2f} | {child:.2f} |")


if __name__ == "__main__":
    main()
