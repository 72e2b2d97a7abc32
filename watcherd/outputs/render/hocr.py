"""hOCR 1.2 (XHTML) from the text found on a file's pages.

Writes one document: ocr_page per page, one ocr_carea/ocr_par around its rows, ocr_line per row and
ocrx_word per token, each with its bbox in page pixels (`layout.rows`: the boxes the PDF and the
ALTO use too). Trusts nothing of the text or the title: `layout.clean` makes them XML-safe and lxml
escapes the rest; a page's dpi that is no positive number is written as `DEFAULT_DPI`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from watcherd.outputs.render import layout

_XHTML = "http://www.w3.org/1999/xhtml"


def hocr(pages: Sequence[layout.RenderedPage], *, title: str) -> bytes:
    """hOCR 1.2 (XHTML): one ocr_page per page, ocr_line per line, ocrx_word per token, each with
    its bbox in page pixels; x_wconf (0-100) where the engine gave a score."""
    from lxml import etree

    layout.by_number(pages)
    html = etree.Element(f"{{{_XHTML}}}html", nsmap={None: _XHTML})
    html.set("{http://www.w3.org/XML/1998/namespace}lang", "und")
    html.set("lang", "und")
    head = etree.SubElement(html, f"{{{_XHTML}}}head")
    etree.SubElement(head, f"{{{_XHTML}}}title").text = layout.clean(title)
    for attrs in (
        {"http-equiv": "Content-Type", "content": "text/html;charset=utf-8"},
        {"name": "ocr-system", "content": "watcherd"},
        {"name": "ocr-capabilities", "content": "ocr_page ocr_carea ocr_par ocr_line ocrx_word"},
        {"name": "ocr-number-of-pages", "content": str(len(pages))},
    ):
        etree.SubElement(head, f"{{{_XHTML}}}meta", attrs)
    body = etree.SubElement(html, f"{{{_XHTML}}}body")
    for page in pages:
        n = page.number
        page_el = etree.SubElement(body, f"{{{_XHTML}}}div", {"class": "ocr_page", "id": f"page_{n}"})
        dpi = round(page.dpi) if math.isfinite(page.dpi) and page.dpi > 0 else round(layout.DEFAULT_DPI)
        page_el.set("title", f"bbox 0 0 {page.width} {page.height}; ppageno {n - 1}; scan_res {dpi} {dpi}")
        page_rows = layout.rows(page)
        if not page_rows:
            continue
        area = etree.SubElement(page_el, f"{{{_XHTML}}}div", {"class": "ocr_carea", "id": f"block_{n}_1"})
        area.set("title", f"bbox {_bbox(layout.union(r.rect for r in page_rows))}")
        par = etree.SubElement(area, f"{{{_XHTML}}}p", {"class": "ocr_par", "id": f"par_{n}_1"})
        par.set("title", area.get("title"))
        for i, row in enumerate(page_rows, 1):
            line_el = etree.SubElement(par, f"{{{_XHTML}}}span", {"class": "ocr_line", "id": f"line_{n}_{i}"})
            props = [f"bbox {_bbox(row.rect)}"]
            if row.angle:
                props.append(f"textangle {row.angle:.1f}")
            line_el.set("title", "; ".join(props))
            for j, token in enumerate(row.tokens, 1):
                word = etree.SubElement(line_el, f"{{{_XHTML}}}span", {"class": "ocrx_word", "id": f"word_{n}_{i}_{j}"})
                props = [f"bbox {_bbox(token.rect)}"]
                conf = layout.confidence_percent(token.score)
                if conf is not None:
                    props.append(f"x_wconf {conf}")
                word.set("title", "; ".join(props))
                word.text = token.text
                word.tail = " " if j < len(row.tokens) else None
            line_el.tail = "\n"
    doctype = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">'
    )
    return etree.tostring(html, xml_declaration=True, encoding="UTF-8", doctype=doctype)


def _bbox(rect: layout.Rect) -> str:
    return " ".join(str(v) for v in layout.pixels(rect))
