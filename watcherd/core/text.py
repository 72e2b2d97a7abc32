"""What an engine reads off a page: lines with boxes and words, in the pixels of the image it was
given. One record from the engine to the result JSON (docs/design.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

Point = tuple[float, float]


Box = tuple[Point, Point, Point, Point]  # corners clockwise from the top left, in pixels


@dataclass(frozen=True)
class Word:
    """A word (Latin) or a character (CJK) of a line, with its own box."""

    text: str
    box: Box
    score: float | None = None


@dataclass(frozen=True)
class Line:
    """One line of text on a page: its box, in the pixels of the image the engine was given, and
    the engine's confidence (0-1, None when it gives none)."""

    text: str
    box: Box
    score: float | None = None
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class PageText:
    """A page with positions. `text` is the page as the engine would have it read (markdown, in
    reading order); None means the lines joined by newlines."""

    lines: tuple[Line, ...]
    text: str | None = None

    @property
    def full_text(self) -> str:
        return self.text if self.text is not None else "\n".join(line.text for line in self.lines)


def as_page(result: object) -> PageText:
    """An engine's answer for one page as a PageText: a str becomes a page without lines."""
    if isinstance(result, PageText):
        return result
    if isinstance(result, str):
        return PageText(lines=(), text=result)
    raise TypeError(f"engine returned {type(result).__name__}, not str or PageText")


def box_from_points(points: object) -> Box:
    """Four (x, y) points from any sequence of pairs (numpy arrays included)."""
    pts = [(float(p[0]), float(p[1])) for p in points]  # type: ignore[attr-defined, index]
    if len(pts) != 4:
        raise ValueError(f"a box has 4 corners, not {len(pts)}")
    return (pts[0], pts[1], pts[2], pts[3])


def box_from_rect(left: float, top: float, right: float, bottom: float) -> Box:
    return ((left, top), (right, top), (right, bottom), (left, bottom))
