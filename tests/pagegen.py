"""Full pages with exact truth, drawn here: the dense office page the embedded engine must read.

Pillow's own font (`ImageFont.load_default(size=...)`, Aileron, inside the wheel) draws them, so
nothing outside the venv is needed. Lines are random common English words, justified to the
margins, so every line is long and the page is as full as an office letter.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

A4_IN = (8.27, 11.69)
LETTER_IN = (8.5, 11.0)

WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you "
    "were there been one all we their has would when if so no will more can who out said what up its about than "
    "into them only other time new some could these two may first then do any like now over such our even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see work long get here between both "
    "life being under never day same another know while last might great old year off come since against go came "
    "right used take three invoice account record archive office letter number total date page scan folder"
).split()


def dense_page(
    seed: int = 0, *, dpi: int = 300, pt: float = 10, lines: int = 40, size_in: tuple[float, float] = A4_IN
) -> tuple[Image.Image, str]:
    """A greyscale page of `lines` lines of `pt`-point text at `dpi`, and its text (lines joined
    by newlines)."""
    rng = random.Random(seed)
    width, height = round(size_in[0] * dpi), round(size_in[1] * dpi)
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=round(pt * dpi / 72))
    margin = round(dpi * 0.8)
    step = (height - 2 * margin) / lines
    text = []
    for index in range(lines):
        words: list[str] = []
        while draw.textlength(" ".join([*words, "invoice"]), font=font) < width - 2 * margin:
            words.append(rng.choice(WORDS))
        line = " ".join(words)
        if index % 5 == 0:
            line = line[0].upper() + line[1:]
        draw.text((margin, margin + index * step), line, fill=0, font=font)
        text.append(line)
    return page, "\n".join(text)


def turn_lines(page: Image.Image, lines: int, which: tuple[int, ...], *, dpi: int = 300) -> Image.Image:
    """`page` (from dense_page with these `lines`) with the lines `which` upside down in place,
    as on a form with a label printed the other way up."""
    page = page.copy()
    margin = round(dpi * 0.8)
    step = (page.height - 2 * margin) / lines
    for index in which:
        top = round(margin + index * step) - dpi // 30
        box = (0, top, page.width, round(top + step * 0.8))
        page.paste(page.crop(box).rotate(180), box)
    return page
