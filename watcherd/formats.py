"""What a file is (by content, not by name) and whether it looks completely written.

The parent uses `looks_complete` as the "it decodes" half of readiness without decoding pixels:
it reads only headers and trailers, so a hostile file cannot hurt the parent and a 500 MB TIFF
costs a few reads. A file whose type is not recognised counts as complete: the child then says
`unsupported_type` instead of the file waiting forever.
"""

from __future__ import annotations

import os
import struct

SNIFF_BYTES = 1024


def sniff(head: bytes) -> str | None:
    """Return jpeg, png, tiff, bmp, webp, gif or pdf from a file's first bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if b"%PDF-" in head[:SNIFF_BYTES]:  # the spec allows junk before the header
        return "pdf"
    return None


def looks_complete(path: str | os.PathLike[str]) -> bool:
    """True when the file's own structure says it is whole (trailer present, sizes fit).

    Empty files are incomplete: Samba creates the file at 0 bytes when a copy starts. A structure
    too damaged to walk counts as complete, so that the child reports it as unreadable.
    """
    try:
        return _looks_complete(path)
    except (struct.error, ValueError, OverflowError):
        return True


def _looks_complete(path: str | os.PathLike[str]) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        head = f.read(SNIFF_BYTES)
        kind = sniff(head)
        if kind is None:
            return True
        f.seek(max(0, size - 1024))
        tail = f.read()
        if kind == "jpeg":
            return b"\xff\xd9" in tail[-32:]  # EOI; some scanners pad after it
        if kind == "png":
            return b"IEND\xaeB`\x82" in tail[-64:]
        if kind == "pdf":
            return b"%%EOF" in tail
        if kind == "gif":
            return tail.rstrip(b"\x00").endswith(b";")
        if kind == "webp":
            return len(head) >= 8 and struct.unpack("<I", head[4:8])[0] + 8 <= size
        if kind == "bmp":
            declared = struct.unpack("<I", head[2:6])[0] if len(head) >= 6 else 0
            return declared <= size  # 0 (unknown) is allowed by the format
        return _tiff_complete(f, size)


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS = 273, 279, 324, 325


def _tiff_complete(f, size: int) -> bool:  # type: ignore[no-untyped-def]
    """Walk every IFD; each one, and every strip or tile it points at, must lie inside the file."""
    f.seek(0)
    header = f.read(16)
    order = "<" if header[:2] == b"II" else ">"
    big = header[2:4] in (b"+\x00", b"\x00+")
    if big:
        offset = struct.unpack(order + "Q", header[8:16])[0]
        count_fmt, entry_size, value_fmt, value_size = "Q", 20, "Q", 8
    else:
        offset = struct.unpack(order + "I", header[4:8])[0]
        count_fmt, entry_size, value_fmt, value_size = "H", 12, "I", 4
    count_size = struct.calcsize(count_fmt)  # entries in an IFD: 2 bytes (8 in BigTIFF)
    seen: set[int] = set()
    while offset:
        if offset in seen or len(seen) > 100_000 or offset + count_size > size:
            return False
        seen.add(offset)
        f.seek(offset)
        (n,) = struct.unpack(order + count_fmt, f.read(count_size))
        table = f.read(n * entry_size + value_size)
        if len(table) < n * entry_size + value_size:
            return False
        arrays: dict[int, list[int]] = {}
        for i in range(n):
            entry = table[i * entry_size : (i + 1) * entry_size]
            tag, typ = struct.unpack(order + "HH", entry[:4])
            if tag not in (_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS):
                continue
            (count,) = struct.unpack(order + value_fmt, entry[4 : 4 + value_size])
            item = _TIFF_TYPE_SIZES.get(typ, 0)
            fmt = {2: "H", 4: "I", 8: "Q"}.get(item)
            if fmt is None or count > 1_000_000:
                return False
            raw = entry[4 + value_size :]
            if item * count > value_size:
                (where,) = struct.unpack(order + value_fmt, raw)
                if where + item * count > size:
                    return False
                f.seek(where)
                raw = f.read(item * count)
            arrays[tag] = list(struct.unpack(order + fmt * count, raw[: item * count]))
        for offsets_tag, counts_tag in ((_STRIP_OFFSETS, _STRIP_COUNTS), (_TILE_OFFSETS, _TILE_COUNTS)):
            for start, length in zip(arrays.get(offsets_tag, []), arrays.get(counts_tag, []), strict=False):
                if start + length > size:
                    return False
        (offset,) = struct.unpack(order + value_fmt, table[n * entry_size :])
    return True
