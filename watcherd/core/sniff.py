"""What a file is (by content, not by name) and whether it looks completely written.

The parent uses `looks_complete` as the "it decodes" half of readiness without decoding pixels.
A file whose type is not recognised counts as complete: the child then says `unsupported_type`
instead of the file waiting forever.

Threat model (design §9): the bytes come from whoever can write to the inbox, and this code runs
in the parent's main loop, where a crash is a crash loop (the file stays in the inbox) and a
stall is a systemd watchdog kill. So a check works within a fixed budget, whatever the file
claims: at most `READ_BUDGET` bytes read, `MAX_IFDS` TIFF directories and `MAX_ENTRIES` entries
walked, `MAX_VALUES` strip/tile offsets compared, `TIME_BUDGET_S` of wall clock. A file that would
need more, or whose structure raises anything at all, is handed over as complete: the child,
which may die, decodes it and reports `unreadable` or `too_large`. Taught by a 104-byte BigTIFF
whose first directory claimed 2^44 entries (MemoryError in the parent) and a 0.8 MB TIFF of 600
chained 65,535-entry directories (13 s of main loop). `benchmarks/readiness.py` measures the
worst case over a crafted corpus; `tests/test_fuzz.py` fuzzes it.
"""

from __future__ import annotations

import operator
import os
import stat
import struct
import time
from collections.abc import Callable

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


READ_BUDGET = 4 * 1024 * 1024  # bytes read per check, all reads together
MAX_IFDS = 1024  # TIFF directories (pages, thumbnails, EXIF) walked per check
IFD_READ = 1024  # bytes read at a directory's offset: its count and (usually) all its entries
MAX_ENTRIES = 65_536  # TIFF directory entries walked per check; one directory may have at most
MAX_ENTRIES_PER_IFD = 4096  # ... this many (real files have tens): more is hostile or garbage
MAX_VALUES = 262_144  # strip/tile offsets and byte counts compared per check
TIME_BUDGET_S = 0.25  # a backstop: the caps above keep a check in the milliseconds


class OverBudget(Exception):
    """The check would cost more than its budget: hand the file over to the child."""


Opener = Callable[[str | os.PathLike[str], int], int]  # os.open's shape: (path, flags) -> fd


def looks_complete(path: str | os.PathLike[str], opener: Opener = os.open) -> bool:
    """True when the file's own structure says it is whole (trailer present, sizes fit).

    Empty files are incomplete: Samba creates the file at 0 bytes when a copy starts. A structure
    too damaged to walk, too big to walk within the budget, or that makes anything at all go
    wrong counts as complete, so that the child reports it as unreadable; never an exception.
    """
    try:
        return _looks_complete(path, opener)
    except Exception:  # noqa: BLE001 - any surprise from hostile bytes: the child judges the file
        return True


class _Reader:
    """pread() on a file descriptor, charged to the check's byte and time budget."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.budget = READ_BUDGET
        self.deadline = time.monotonic() + TIME_BUDGET_S

    def read(self, offset: int, length: int) -> bytes:
        if length > self.budget or time.monotonic() > self.deadline:
            raise OverBudget
        self.budget -= length
        return os.pread(self.fd, length, offset)


def _looks_complete(path: str | os.PathLike[str], opener: Opener = os.open) -> bool:
    fd = opener(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return True  # replaced by something else since its lstat: the claim sorts it out
        size = st.st_size
        if size == 0:
            return False
        f = _Reader(fd, size)
        head = f.read(0, SNIFF_BYTES)
        kind = sniff(head)
        if kind is None:
            return True
        tail = f.read(max(0, size - 1024), 1024)  # bounded even if the file grows meanwhile
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
        return _tiff_complete(f, head)
    finally:
        os.close(fd)


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS = 273, 279, 324, 325
_WANTED = frozenset((_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS))
_INT_FORMATS = {2: "H", 4: "I", 8: "Q"}


def _tiff_complete(f: _Reader, head: bytes) -> bool:
    """Walk the IFD chain; each directory, and every strip or tile it points at, must lie inside
    the file. False means "still being written" (something points past the end); over budget or
    damaged raises, and `looks_complete` hands the file over."""
    size = f.size
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte counts and offsets
    if len(head) < (16 if big else 8):
        return False  # not even the header yet
    if big:
        (offset,) = struct.unpack(order + "Q", head[8:16])
        count_fmt, entry_fmt, value_size = "Q", "HHQ8s", 8
    else:
        (offset,) = struct.unpack(order + "I", head[4:8])
        count_fmt, entry_fmt, value_size = "H", "HHI4s", 4
    count_size = struct.calcsize(count_fmt)
    entry = struct.Struct(order + entry_fmt)
    next_offset = struct.Struct(order + ("Q" if value_size == 8 else "I"))
    seen: set[int] = set()
    entries_left, values_left = MAX_ENTRIES, MAX_VALUES
    while offset:
        if offset in seen:
            raise ValueError("IFD loop")
        if len(seen) >= MAX_IFDS:
            raise OverBudget
        seen.add(offset)
        if offset + count_size > size:
            return False
        # One read usually holds the whole directory (real ones have 10-30 entries).
        chunk = f.read(offset, min(IFD_READ, size - offset))
        (n,) = struct.unpack(order + count_fmt, chunk[:count_size])
        if n > MAX_ENTRIES_PER_IFD or n > entries_left:
            raise OverBudget
        entries_left -= n
        table_size = n * entry.size + value_size
        if offset + count_size + table_size > size:
            return False
        table = chunk[count_size : count_size + table_size]
        if len(table) < table_size:
            table = f.read(offset + count_size, table_size)
        arrays: dict[int, tuple[int, ...]] = {}
        # iter_unpack walks the table in C; only the four tags we need reach Python code.
        for tag, typ, count, raw in entry.iter_unpack(table[: n * entry.size]):
            if tag not in _WANTED:
                continue
            if tag in arrays:  # the spec forbids it; it would cost a read per copy
                raise ValueError(f"tag {tag} repeated")
            item = _TIFF_TYPE_SIZES.get(typ, 0)
            fmt = _INT_FORMATS.get(item)
            if fmt is None:
                raise ValueError(f"tag {tag} has type {typ}")
            if count > values_left:
                raise OverBudget
            values_left -= count
            length = item * count
            if length > value_size:
                (where,) = next_offset.unpack(raw)
                if where + length > size:
                    return False
                raw = f.read(where, length)
            arrays[tag] = struct.unpack(f"{order}{count}{fmt}", raw[:length])
        for offsets_tag, counts_tag in ((_STRIP_OFFSETS, _STRIP_COUNTS), (_TILE_OFFSETS, _TILE_COUNTS)):
            ends = map(operator.add, arrays.get(offsets_tag, ()), arrays.get(counts_tag, ()))
            if max(ends, default=0) > size:
                return False
        (offset,) = next_offset.unpack(table[n * entry.size :])
    return True
