"""What the child says about a file and writes for it: its pages as `page` messages, with their
boxes in the original's pixels; its searchable PDF, hOCR and ALTO in scratch files; `done` or
`failed`. Which pages go to the engine together, and when, is batch.py's.

A box the engine gave is on the image the engine saw: turned upright (ocr.auto_rotate), maybe
shrunk to ocr.max_side_px, a PDF page rendered at decode.PDF_DPI. It leaves here on the
original page's pixel grid (as displayed: EXIF orientation applied; a PDF page at PDF_DPI), the
grid the parent's JSON and the renderers speak.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watcherd.core.records import InputError
from watcherd.core.text import Line, Word, box_from_points
from watcherd.ocr import protocol
from watcherd.ocr.child.decode import PDF_DPI, Document, Page

# A page as the renderers need it: render.RenderedPage's fields, so that watcherd.outputs.render
# (and the PDF libraries behind it) is imported only by a child that writes something.
Rendered = tuple[Any, ...]


class EngineError(Exception):
    """The engine failed on a page, or answered something that is not a page: `engine_error`."""


@dataclass(eq=False)
class File:
    """A file of an `ocr` request, open: where its turn stands and what it has read so far."""

    id: int  # its request id: every message about it carries it
    path: str
    render: dict[str, Any]  # {formats: {fmt: scratch path}, pdfa}
    document: Document
    sha256: str
    original: bytes | None  # its bytes, when the searchable PDF is built around them
    first: int  # the first page of this turn (0-based)
    next: int  # the next page to read
    stop: int  # where this turn ends (exclusive): the page count, or earlier for a long file
    before: dict[str, Any]  # GPU figures as it was opened
    rendered: list[Rendered] = field(default_factory=list)  # its pages, for the renderers
    layers: dict[int, Any] = field(default_factory=dict)  # text layers looked at
    failed: bool = False  # `failed` was sent: nothing more about it

    def go_on(self) -> bool:
        """Its turn is over but it is alone in a batch engine's request: nothing else waits (the
        parent sends a batch engine every file it queues), so the next turn follows at once,
        in full batches, without reopening the file. False if it has no more pages."""
        if self.stop >= len(self.document):
            return False
        length = self.stop - self.first  # a turn's length, so a newcomer waits one turn at most
        self.first, self.stop = self.stop, min(len(self.document), self.stop + length)
        return True


class Reporter:
    """Sends the messages about a file's pages and outcome (`send(op, **fields)`) and writes its
    outputs. `memory_max_mb` (ocr.memory_max_mb) is named in what a MemoryError is reported as."""

    def __init__(self, send: Callable[..., None], *, memory_max_mb: float | None):
        self.send = send
        self.memory_max_mb = memory_max_mb

    # -- pages ---------------------------------------------------------------------------------

    def ocr_page(
        self, f: File, page: Page, rotated: int | None, seen: tuple[int, int], result: Any, timing: dict[str, Any]
    ) -> None:
        """Report the engine's `result` (a PageText) for `page`, read on an image of size `seen`
        turned upright by `rotated` degrees; positions that are not boxes fail the file."""
        try:
            text = result.full_text
            lines = tuple(_to_original(line, rotated or 0, seen, page) for line in result.lines if _finite(line.box))
        except (TypeError, ValueError, IndexError) as exc:
            self.fail(f, EngineError(f"engine returned positions that are not boxes: {exc}"))
            return
        self._page(
            f,
            page.number,
            text,
            lines,
            size=page.size,
            resized_from=page.resized_from,
            original=page.original_size,
            dpi=page.dpi,
            source="ocr",
            rotated=rotated,
            timing=timing,
        )

    def layer_page(self, f: File, index: int, layer: Any) -> None:
        """Report PDF page `index` by its own text layer (born-digital, or OCR'd before): no engine."""
        self.send("page_start", id=f.id, page=index + 1)
        started = time.monotonic()
        width, height = f.document.nominal_size(index)
        self._page(
            f,
            index + 1,
            layer.full_text,
            tuple(layer.lines),
            size=(width, height),
            resized_from=None,
            original=(width, height),
            dpi=float(PDF_DPI),
            source="pdf_text",
            rotated=None,
            timing={"processing_time": round(time.monotonic() - started, 3)},
        )

    def _page(
        self,
        f: File,
        number: int,
        text: str,
        lines: tuple[Line, ...],
        *,
        size: tuple[int, int],
        resized_from: tuple[int, int] | None,
        original: tuple[int, int],
        dpi: float,
        source: str,
        rotated: int | None,
        timing: dict[str, Any],
    ) -> None:
        """Send one page to the parent, and keep what the renderers need of it."""
        text, replaced = protocol.valid_text(text)
        extra: dict[str, Any] = {"replaced_characters": replaced} if replaced else {}
        if rotated is not None:
            extra["rotated"] = rotated
        if lines:
            extra["lines"] = [_line_json(line) for line in lines]
        self.send(
            "page",
            id=f.id,
            page=number,
            text=text,
            size=list(size),
            resized_from=list(resized_from) if resized_from else None,
            source=source,
            **timing,
            **extra,
        )
        f.rendered.append((number, original[0], original[1], dpi, lines, text, source))

    # -- outcomes ------------------------------------------------------------------------------

    def render(self, f: File) -> tuple[list[str], dict[str, str]]:
        """Write the searchable PDF, hOCR and ALTO asked for to their scratch files in the state
        folder (trusted: never inside the inbox), durably, for the parent to publish. A format
        that cannot be written is reported, not fatal: the text and the JSON are worth having."""
        render = f.render
        targets: dict[str, str] = render.get("formats") or {}
        if not targets:
            return [], {}
        from watcherd.outputs.render import RenderedPage, alto, hocr, write_pdf

        pages = [RenderedPage(*fields) for fields in f.rendered]
        self.send("rendering", id=f.id)
        name = os.path.basename(f.path)
        original, kind = f.original, f.document.kind
        written, errors = [], {}
        for fmt, target in targets.items():
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with open(fd, "wb") as out:
                    if fmt == "pdf":
                        assert original is not None and kind is not None
                        write_pdf(out, data=original, kind=kind, pages=pages, pdfa=bool(render.get("pdfa")))
                    elif fmt == "hocr":
                        out.write(hocr(pages, title=name))
                    else:
                        out.write(alto(pages, filename=name))
                    out.flush()
                    os.fsync(out.fileno())
                written.append(fmt)
            except Exception as exc:  # noqa: BLE001 - a renderer's failure costs that output only
                traceback.print_exc()
                errors[fmt] = f"{type(exc).__name__}: {exc}"[:500]
        if written:
            folder = os.open(os.path.dirname(next(iter(targets.values()))), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return written, errors

    def done(self, f: File, after: dict[str, Any], written: list[str], errors: dict[str, str]) -> None:
        """Every page of the file is read and its outputs written (`render`'s answer)."""
        self.send(
            "done", id=f.id, gpu_info_before=f.before, gpu_info_after=after, rendered=written, render_errors=errors
        )

    def turn_over(self, f: File) -> None:
        """A turn of a long file is over: the parent queues the rest from `next_page`."""
        self.send("done", id=f.id, next_page=f.stop, gpu_info_before=f.before, gpu_info_after={})

    def fail(self, f: File, exc: BaseException) -> None:
        """The file fails (once: nothing more is said about it)."""
        if not f.failed:
            f.failed = True
            self.failed(f.id, exc, f.sha256)

    def failed(self, request_id: int, exc: BaseException, sha256: str | None) -> None:
        code, detail = self._failure(exc)
        self.send("failed", id=request_id, code=code, detail=detail, sha256=sha256)

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """The error code and detail for what went wrong with a file."""
        if isinstance(exc, InputError):
            return exc.code, exc.detail
        if isinstance(exc, EngineError):
            return "engine_error", str(exc)
        if isinstance(exc, OSError):
            return "unreadable", f"{exc.strerror or exc}"
        if isinstance(exc, MemoryError):
            return "too_large", f"out of memory decoding it{self.memory_note()}"
        traceback.print_exception(exc)  # a decoder bug on a hostile file (bad EXIF...)
        return "unreadable", f"{type(exc).__name__}: {exc}"

    def memory_note(self) -> str:
        """What a MemoryError's report adds when the child runs under ocr.memory_max_mb."""
        limit = self.memory_max_mb
        return f" (memory limit ocr.memory_max_mb = {limit:g} MB exceeded)" if limit else ""


def earlier_page(page: dict[str, Any], document: Document) -> Rendered:
    """A page read in an earlier turn, as the parent kept it (its `page` message), for the renderers."""
    width, height = page.get("resized_from") or page["size"]
    lines = tuple(
        Line(
            line["text"],
            box_from_points(line["box"]),
            line.get("score"),
            tuple(Word(w["text"], box_from_points(w["box"]), w.get("score")) for w in line.get("words") or ()),
        )
        for line in page.get("lines") or ()
    )
    number = page["page"]
    return (number, width, height, document.page_dpi(number - 1), lines, page["text"], page.get("source", "ocr"))


def _to_original(line: Line, rotated: int, seen: tuple[int, int], page: Page) -> Line:
    """A line found on the image the engine saw (turned upright, maybe shrunk) in the pixels of
    the original page, with its words."""
    scale_x = page.original_size[0] / page.size[0]
    scale_y = page.original_size[1] / page.size[1]

    def place(box: Any) -> Any:
        if rotated:
            from watcherd.ocr.child.orientation import box_to_original

            box = box_to_original(box, rotated, seen)
        return box_from_points([(x * scale_x, y * scale_y) for x, y in box])

    words = tuple(Word(w.text, place(w.box), w.score) for w in line.words if _finite(w.box))
    return Line(line.text, place(line.box), line.score, words)


def _finite(box: Any) -> bool:
    """A box the engine gave with a NaN or an infinity in it is dropped: it places nothing."""
    return all(math.isfinite(v) for point in box for v in point)


def _line_json(line: Line) -> dict[str, Any]:
    entry = _positioned(line.text, line.box, line.score)
    if line.words:
        entry["words"] = [_positioned(w.text, w.box, w.score) for w in line.words]
    return entry


def _positioned(text: str, box: Any, score: float | None) -> dict[str, Any]:
    """A line or word as the `page` message carries it: valid text, a score clamped to [0, 1]
    (None when the engine gave none or a NaN), the box rounded to a tenth of a pixel."""
    score = None if score is None or not math.isfinite(score) else round(min(1.0, max(0.0, float(score))), 4)
    return {"text": protocol.valid_text(text)[0], "score": score, "box": [[round(x, 1), round(y, 1)] for x, y in box]}
