"""ALTO 4 XML from the text found on a file's pages.

Writes one document, MeasurementUnit pixel: Page > PrintSpace > TextBlock > TextLine > String/SP,
with HPOS/VPOS/WIDTH/HEIGHT from `layout.rows` (the boxes the PDF and the hOCR use too, rounded
outwards the same way as the hOCR's). Trusts nothing of the text or the file name: `layout.clean`
makes them XML-safe and lxml escapes the rest. At least one page is needed (the schema wants a Page).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

from watcherd.outputs.render import layout

ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"


def alto(pages: Sequence[layout.RenderedPage], *, filename: str) -> bytes:
    """ALTO 4 XML, MeasurementUnit pixel: Page > PrintSpace > TextBlock > TextLine > String/SP,
    with HPOS/VPOS/WIDTH/HEIGHT from the same boxes as the hOCR and the PDF, WC (0-1) where the
    engine gave a score."""
    from lxml import etree

    if not pages:
        raise layout.RenderError("ALTO needs at least one page")
    layout.by_number(pages)

    def el(parent: typing.Any, tag: str, **attrs: str) -> typing.Any:
        return etree.SubElement(parent, f"{{{ALTO_NS}}}{tag}", attrs)

    root = etree.Element(f"{{{ALTO_NS}}}alto", nsmap={None: ALTO_NS, "xsi": _XSI})
    root.set(f"{{{_XSI}}}schemaLocation", f"{ALTO_NS} http://www.loc.gov/standards/alto/v4/alto-4-2.xsd")
    description = el(root, "Description")
    el(description, "MeasurementUnit").text = "pixel"
    el(el(description, "sourceImageInformation"), "fileName").text = layout.clean(filename)
    layout_el = el(root, "Layout")
    for page in pages:
        n = page.number
        page_el = el(
            layout_el, "Page", ID=f"page_{n}", PHYSICAL_IMG_NR=str(n), WIDTH=str(page.width), HEIGHT=str(page.height)
        )
        space = el(page_el, "PrintSpace", HPOS="0", VPOS="0", WIDTH=str(page.width), HEIGHT=str(page.height))
        page_rows = layout.rows(page)
        if not page_rows:
            continue
        block = el(space, "TextBlock", ID=f"block_{n}_1", **_position(layout.union(r.rect for r in page_rows)))
        for i, row in enumerate(page_rows, 1):
            # No ROTATION: ALTO 4 has it on blocks, not lines; the box is the tilted line's envelope.
            line_el = el(block, "TextLine", ID=f"line_{n}_{i}", **_position(row.rect))
            for j, token in enumerate(row.tokens, 1):
                if j > 1:
                    after = layout.pixels(row.tokens[j - 2].rect)[2]
                    gap = max(layout.pixels(token.rect)[0] - after, 0)
                    el(line_el, "SP", WIDTH=str(gap), HPOS=str(after), VPOS=str(layout.pixels(row.rect)[1]))
                string = el(line_el, "String", ID=f"string_{n}_{i}_{j}", CONTENT=token.text, **_position(token.rect))
                conf = layout.confidence_percent(token.score)
                if conf is not None:
                    string.set("WC", f"{conf / 100:.2f}")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _position(rect: layout.Rect) -> dict[str, str]:
    left, top, right, bottom = layout.pixels(rect)
    return {"HPOS": str(left), "VPOS": str(top), "WIDTH": str(right - left), "HEIGHT": str(bottom - top)}
