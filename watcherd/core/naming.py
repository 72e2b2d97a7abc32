"""Names: how paths and names appear in JSON (faithful even when not UTF-8), and clash-free names
for a file's outputs (one suffix shared by every output, fitting NAME_MAX in bytes). The writing
itself (atomic, never overwriting, never through a link) is `safefs`; the order of the writes,
which makes them crash-safe, is `spool`; the documents themselves are `documents`.
"""

from __future__ import annotations

import base64
import json
import os
import string
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NAME_MAX = 255  # bytes, for ext4, xfs, btrfs, SMB and NFS alike
LAYOUT_FIELDS = ("yyyy", "mm", "dd", "rel", "name")  # output.layout's placeholders


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


def display_name(rel: str) -> dict[str, str]:
    """`source` for the JSON, faithful even for names that are not UTF-8.

    Paths are str with surrogate escapes (PEP 383). A name from an old Windows share in Big5 or
    Latin-1 cannot go into JSON as is: `source` shows it with \\x escapes and `source_b64` keeps
    the exact bytes.
    """
    raw = os.fsencode(rel)
    try:
        return {"source": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"source": raw.decode("utf-8", "backslashreplace"), "source_b64": base64.b64encode(raw).decode()}


def public_path(path: Path | str | None) -> str | None:
    if path is None:
        return None
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def dumps(document: dict[str, Any]) -> bytes:
    # "replace": a lone surrogate that slipped through must cost one character, never the file.
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8", "replace")


# -- names -----------------------------------------------------------------------------------


def fit_name(name: str, extra: int = 0) -> str:
    """Shorten `name` so that it plus `extra` bytes (a suffix such as `_12.json`) fits NAME_MAX."""
    raw = os.fsencode(name)
    if len(raw) + extra <= NAME_MAX:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or len(os.fsencode(ext)) > 16:
        stem, ext = name, ""
    keep = NAME_MAX - extra - len(os.fsencode(ext)) - (1 if ext else 0) - 1
    raw_stem = os.fsencode(stem)
    while 0 < keep < len(raw_stem) and raw_stem[keep] & 0xC0 == 0x80:
        keep -= 1  # never split a UTF-8 character; other bytes (Latin-1 names) are kept as they are
    short = os.fsdecode(raw_stem[:keep])
    return f"{short}~.{ext}" if ext else f"{short}~"


def with_suffix_number(name: str, n: int) -> str:
    """`b.jpg`, 1 → `b_1.jpg`; the extension stays last so tools still know the type."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}_{n}"
    return f"{stem}_{n}.{ext}"


def layout_problem(layout: str) -> str | None:
    """Why `output.layout` is not usable, or None: `mirror`, or a template of plain relative
    components whose last one holds `{rel}` or `{name}` (so a file keeps its own name)."""
    if layout == "mirror":
        return None
    try:
        parsed = list(string.Formatter().parse(layout))
    except ValueError as exc:  # a lone { or }
        return f"not a template ({exc}); write mirror or e.g. '{{yyyy}}/{{mm}}/{{dd}}/{{rel}}'"
    unknown = sorted({f for _, f, _, _ in parsed if f is not None and f not in LAYOUT_FIELDS})
    if unknown:
        known = ", ".join(f"{{{f}}}" for f in LAYOUT_FIELDS)
        return f"unknown placeholder {', '.join(f'{{{u}}}' for u in unknown)} (known: {known})"
    if any(spec or conv for _, _, spec, conv in parsed):
        return "placeholders take no format spec or conversion (write {yyyy}, not {yyyy:04})"
    if layout.startswith("/"):
        return "must be relative to the outbox, failed and archive folders, not an absolute path"
    components = layout.split("/")
    for component in components:
        if component in ("", ".", ".."):
            return f"has an empty, '.' or '..' component ({layout!r})"
        if component.startswith("."):
            return f"{component!r} would be a hidden folder or file (skipped by consumers and by watcherd retry)"
    if not {f for _, f, _, _ in string.Formatter().parse(components[-1])} & {"rel", "name"}:
        return "its last component must contain {rel} or {name}, so that every file keeps its own name"
    return None


def place(rel: str, layout: str, finished_at: datetime) -> str:
    """Where a file's outputs go below outbox/failed/archive (before any clash suffix): `rel`
    itself for `mirror`, else the template filled in with the finish date (local time)."""
    if layout == "mirror":
        return rel
    return layout.format(
        yyyy=f"{finished_at.year:04d}",
        mm=f"{finished_at.month:02d}",
        dd=f"{finished_at.day:02d}",
        rel=rel,
        name=rel.rpartition("/")[2],
    )


def choose_names(
    rel: str, *, targets: dict[str, tuple[Path, str]], layout: str = "mirror", finished_at: str | None = None
) -> dict[str, Path]:
    """Pick one clash-free name for a file's outputs.

    `targets` maps a role (json, text, original) to (folder root, appended extension). The same
    suffix number is used for every role so that `outbox/a_1.jpg.json` belongs with
    `archive/a_1.jpg`. Names that would exceed NAME_MAX with their suffix are shortened.
    `layout` (output.layout) places them below each root, dated by `finished_at` (ISO-8601).
    """
    when = datetime.fromisoformat(finished_at) if finished_at else datetime.now(UTC).astimezone()
    parent, _, name = place(rel, layout, when).rpartition("/")
    longest_ext = max(len(ext) for _, ext in targets.values())
    name = fit_name(name, extra=longest_ext + 8)
    n = 0
    while True:
        candidate = with_suffix_number(name, n)
        paths = {
            role: (root / parent / f"{candidate}{ext}" if parent else root / f"{candidate}{ext}")
            for role, (root, ext) in targets.items()
        }
        if not any(os.path.lexists(p) for p in paths.values()):
            return paths
        n += 1
