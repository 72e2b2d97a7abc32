"""Searchable PDF, hOCR and ALTO from a file's bytes and the text found on its pages.

Runs in the child, after OCR (nothing else imports it: pyproject.toml's import contracts): the
writers take the original file and one `RenderedPage` per page, whose boxes are in the pixels of the
page as displayed (images: full resolution, EXIF orientation applied; PDF pages: rendered at
`RenderedPage.dpi`, normally `decode.PDF_DPI`).

- `layout`: the page record, `RenderError`, and lines → rows of positioned words, shared by all three
- `pdf`: `write_pdf`, the original pages with `textlayer`'s invisible text over them; `images` turns
  an image input into those pages
- `hocr`, `alto`: the two XML formats, from the same boxes as the PDF

Threat model: the text comes from an engine reading a hostile scan, the file name from a hostile
share user. Characters XML cannot carry become U+FFFD in every output (lxml escapes the rest),
boxes are clipped to the page, empty and zero-size boxes are tolerated.
"""

from __future__ import annotations

from watcherd.outputs.render.alto import ALTO_NS, alto
from watcherd.outputs.render.hocr import hocr
from watcherd.outputs.render.images import image_dpi
from watcherd.outputs.render.layout import DEFAULT_DPI, RenderedPage, RenderError
from watcherd.outputs.render.pdf import PdfaError, write_pdf

__all__ = [
    "ALTO_NS",
    "DEFAULT_DPI",
    "PdfaError",
    "RenderError",
    "RenderedPage",
    "alto",
    "hocr",
    "image_dpi",
    "write_pdf",
]
