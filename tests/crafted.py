"""Crafted files for the readiness checks: structures that claim more than they hold.

Used by the fuzz target (tests/test_fuzz.py), the readiness benchmark (benchmarks/readiness.py)
and the daemon tests (tests/test_crafted.py). Each builder returns the file's bytes; `sparse`
files are written with a hole instead of real bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

from tests.conftest import SAMPLES

STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS = 273, 279, 324, 325
SHORT, LONG, LONG8 = 3, 4, 16


def tiff_ifd(entries: list[tuple[int, int, int, int]], next_offset: int = 0, *, big: bool = False) -> bytes:
    """One little-endian IFD: (tag, type, count, value or offset) entries, then the next offset."""
    if big:
        out = struct.pack("<Q", len(entries))
        out += b"".join(struct.pack("<HHQQ", *e) for e in entries)
        return out + struct.pack("<Q", next_offset)
    out = struct.pack("<H", len(entries))
    out += b"".join(struct.pack("<HHII", *e) for e in entries)
    return out + struct.pack("<I", next_offset)


def bigtiff_bomb() -> bytes:
    """104 bytes: a BigTIFF whose first IFD claims 2^44 entries (it killed the parent with
    MemoryError: the old walker read n * 20 bytes)."""
    header = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
    return (header + struct.pack("<Q", 2**44)).ljust(104, b"\x00")


def ifd_chain_of_giants(ifds: int = 600) -> bytes:
    """~0.8 MB: `ifds` chained IFDs 8 bytes apart, each claiming 65,535 entries over the same
    0xFF bytes; each IFD's next pointer (after its 786,420-byte table) leads to the next one.
    (8 apart: the pointers, read as entries of later IFDs, are multiples of 8 and so never one of
    the strip/tile tags, which would end the old walk early.) The old walker parsed every entry
    in Python: 600 x 65,535 = 39 M entries."""
    table = 65535 * 12
    first = 8
    data = bytearray(b"II*\x00" + struct.pack("<I", first))
    data += b"\xff" * (first + table + 2 + 8 * ifds - len(data))
    for i in range(ifds):
        here = first + 8 * i
        following = here + 8 if i < ifds - 1 else 0
        data[here + 2 + table : here + 2 + table + 4] = struct.pack("<I", following)
    return bytes(data)


def long_chain(ifds: int, entries: int = 8) -> bytes:
    """Many small IFDs one after the other (a 'TIFF' with thousands of pages)."""
    data = bytearray(b"II*\x00" + struct.pack("<I", 8))
    ifd_size = 2 + 12 * entries + 4
    for i in range(ifds):
        following = 8 + (i + 1) * ifd_size if i < ifds - 1 else 0
        data += tiff_ifd([(256 + k, SHORT, 1, 1) for k in range(entries)], following)
    return bytes(data)


def huge_strip_arrays(count: int = 262_144) -> bytes:
    """One IFD whose StripOffsets/StripByteCounts hold `count` values each (2 MB at 262,144)."""
    entries_at = 8
    arrays_at = entries_at + 2 + 2 * 12 + 4
    offsets_at, counts_at = arrays_at, arrays_at + 4 * count
    ifd = tiff_ifd([(STRIP_OFFSETS, LONG, count, offsets_at), (STRIP_COUNTS, LONG, count, counts_at)])
    offsets = struct.pack(f"<{count}I", *([8] * count))
    counts = struct.pack(f"<{count}I", *([1] * count))
    return b"II*\x00" + struct.pack("<I", entries_at) + ifd + offsets + counts


def claimed_counts(count: int = 2**32 - 1) -> bytes:
    """StripOffsets claiming 4 billion values, pointing inside the file."""
    ifd = tiff_ifd([(STRIP_OFFSETS, LONG, count, 8), (STRIP_COUNTS, LONG, count, 8)])
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def many_wanted_tags(entries: int = 4096) -> bytes:
    """One IFD of `entries` StripOffsets entries, each with 2 values stored out of line: one read
    per entry if nothing caps them."""
    ifd = tiff_ifd([(STRIP_OFFSETS, LONG, 2, 8)] * entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def many_ifds_many_wanted(ifds: int = 16, entries: int = 4096) -> bytes:
    """`ifds` IFDs of `entries` out-of-line StripOffsets each: the entry budget's worst case."""
    ifd_size = 2 + 12 * entries + 4
    data = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(ifds):
        following = 8 + (i + 1) * ifd_size if i < ifds - 1 else 0
        data += tiff_ifd([(STRIP_OFFSETS, LONG, 2, 8)] * entries, following)
    return bytes(data)


def many_ifds_other_tags(ifds: int = 16, entries: int = 4096) -> bytes:
    """`ifds` IFDs of `entries` tags the check does not need: walked in C, not in Python."""
    ifd_size = 2 + 12 * entries + 4
    data = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(ifds):
        following = 8 + (i + 1) * ifd_size if i < ifds - 1 else 0
        data += tiff_ifd([(1000 + k, LONG, 2, 8) for k in range(entries)], following)
    return bytes(data)


def ifd_loop() -> bytes:
    """An IFD whose next pointer is itself."""
    return b"II*\x00" + struct.pack("<I", 8) + tiff_ifd([(256, SHORT, 1, 1)], 8)


def bigtiff_far_offsets() -> bytes:
    """BigTIFF offsets near 2^64."""
    header = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
    ifd = tiff_ifd([(STRIP_OFFSETS, LONG8, 1, 2**64 - 8), (STRIP_COUNTS, LONG8, 1, 2**63)], 2**64 - 1, big=True)
    return header + ifd


def truncated(sample: str, keep: float) -> Callable[[], bytes]:
    def build() -> bytes:
        data = (SAMPLES / sample).read_bytes()
        return data[: int(len(data) * keep)]

    return build


def pdf_truncated() -> bytes:
    return b"%PDF-1.7\n" + b"1 0 obj << /Type /Catalog >> endobj\n" * 2000


def random_bytes(size: int, prefix: bytes = b"", seed: int = 10) -> Callable[[], bytes]:
    def build() -> bytes:
        return prefix + random.Random(seed).randbytes(size - len(prefix))

    return build


# name → builder; "sparse:<size>:<name>" entries are written by `write` as a hole after the bytes.
CORPUS: dict[str, Callable[[], bytes]] = {
    "bigtiff-bomb-2^44-entries.tif": bigtiff_bomb,
    "600-ifds-of-65535-entries.tif": ifd_chain_of_giants,
    "10000-small-ifds.tif": lambda: long_chain(10_000),
    "131072-strips.tif": lambda: huge_strip_arrays(131_072),
    "262144-strips.tif": huge_strip_arrays,
    "4G-strip-count.tif": claimed_counts,
    "4096-out-of-line-strip-tags.tif": many_wanted_tags,
    "16-ifds-x-4096-strip-tags.tif": many_ifds_many_wanted,
    "16-ifds-x-4096-other-tags.tif": many_ifds_other_tags,
    "1024-small-ifds.tif": lambda: long_chain(1024),
    "ifd-loop.tif": ifd_loop,
    "bigtiff-offsets-near-2^64.tif": bigtiff_far_offsets,
    "truncated.jpg": truncated("receipt_zh.jpg", 0.5),
    "truncated.png": truncated("memo_en.png", 0.5),
    "truncated.tif": truncated("two_pages.tif", 0.7),
    "truncated.pdf": pdf_truncated,
    "random-1MB.jpg": random_bytes(1 << 20),
    "random-1MB-tiff-header.tif": random_bytes(1 << 20, b"II*\x00\x08\x00\x00\x00"),
    "random-1MB-bigtiff-header.tif": random_bytes(1 << 20, b"II+\x00\x08\x00\x00\x00\x10" + b"\x00" * 7),
    "receipt_zh.jpg": lambda: (SAMPLES / "receipt_zh.jpg").read_bytes(),
    "two_pages.tif": lambda: (SAMPLES / "two_pages.tif").read_bytes(),
}
SPARSE = {  # name → (leading bytes, total size): a 500 MB file that costs no disk
    "500MB-sparse.tif": (b"II*\x00" + struct.pack("<I", 499 * 2**20), 500 * 2**20),
    "500MB-sparse.pdf": (b"%PDF-1.7\n", 500 * 2**20),
    "500MB-sparse-bigtiff.tif": (bigtiff_bomb(), 500 * 2**20),
}


def write(folder: Path, name: str) -> Path:
    """Write corpus entry `name` into `folder`; returns its path."""
    path = folder / name
    if name in SPARSE:
        head, size = SPARSE[name]
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(size)
    else:
        path.write_bytes(CORPUS[name]())
    return path


def names() -> list[str]:
    return [*CORPUS, *SPARSE]
