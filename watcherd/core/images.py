"""Image helpers shared by the child's decoder and the PDF writer (Pillow: child side only)."""

from __future__ import annotations

from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit greyscale scans
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
