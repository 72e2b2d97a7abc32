"""Fuzzing the parent's readiness check (`sniff.looks_complete`, design §9): random bytes,
mutations of the real samples, and generated TIFF structures. No exception may escape and no
call may take long. The bound asserted here is generous (1 s) so the test never flakes on a busy
machine; benchmarks/readiness.py reports the real worst cases (milliseconds).

Bounded in CI: WATCHERD_FUZZ_SECONDS (default 24) is shared by the targets below. `make fuzz`
runs only these tests, for longer.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import crafted
from tests.conftest import SAMPLES
from watcherd.core import sniff

pytestmark = pytest.mark.fuzz

FUZZ_SECONDS = float(os.environ.get("WATCHERD_FUZZ_SECONDS", "24"))
CALL_LIMIT_S = 1.0
# What the inner walker may raise on hostile bytes; looks_complete turns these into "complete".
# Anything else (MemoryError, OverflowError, IndexError...) is a finding even though looks_complete
# would swallow it too: it means the walker did something the budget does not cover.
EXPECTED = (sniff.OverBudget, ValueError, struct.error)
SAMPLE_BYTES = {p.name: p.read_bytes() for p in sorted(SAMPLES.glob("*")) if p.suffix in (".jpg", ".png", ".tif")}
CRAFTED = {name: build() for name, build in crafted.CORPUS.items() if not name.endswith("-strips.tif")}
SEEDS = {**SAMPLE_BYTES, **CRAFTED}
MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM", b"%PDF-"]


def check(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    started = time.perf_counter()
    result = sniff.looks_complete(path)
    elapsed = time.perf_counter() - started
    assert isinstance(result, bool)
    assert elapsed < CALL_LIMIT_S, f"{elapsed:.2f} s on {data[:64]!r}... ({len(data)} bytes)"
    try:
        sniff._looks_complete(path)
    except EXPECTED:
        pass


def for_a_while(target: Callable[[], None], share: float) -> None:
    """Run a hypothesis target again and again (fresh random examples each time) for its share
    of WATCHERD_FUZZ_SECONDS."""
    deadline = time.monotonic() + FUZZ_SECONDS * share
    runs = 0
    while runs == 0 or time.monotonic() < deadline:
        target()
        runs += 1


FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A sample or crafted file with bytes flipped, overwritten, cut, repeated or inserted."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        how = draw(st.sampled_from(["flip", "overwrite", "cut", "insert", "int"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 4096))]
        elif how == "insert":
            data[at:at] = draw(st.binary(max_size=64))
        elif how == "int" and len(data) > at + 8:  # a count or offset made extreme
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1, len(data), len(data) - 1]))
            data[at : at + 8] = value.to_bytes(8, draw(st.sampled_from(["little", "big"])))
    return bytes(data)


@st.composite
def tiff_structure(draw: st.DrawFn) -> bytes:
    """A TIFF or BigTIFF built from generated IFDs: counts, types, tags and offsets anywhere."""
    big = draw(st.booleans())
    order = draw(st.sampled_from(["<", ">"]))
    offset_fmt, count_fmt, entry_fmt = ("Q", "Q", "HHQQ") if big else ("I", "H", "HHII")
    header = (b"II" if order == "<" else b"MM") + (
        struct.pack(order + "HHHQ", 43, 8, 0, 16) if big else struct.pack(order + "HI", 42, 8)
    )
    body = bytearray(header)
    ifds = draw(st.integers(1, 6))
    limit = 2**64 - 1 if big else 2**32 - 1
    anywhere = st.one_of(st.integers(0, 4096), st.integers(0, limit))
    for _ in range(ifds):
        entries = draw(
            st.lists(
                st.tuples(
                    st.sampled_from([256, 257, 273, 279, 324, 325, 0, 65535]),
                    st.integers(0, 20),
                    st.one_of(st.integers(0, 64), st.integers(0, limit)),
                    anywhere,
                ),
                max_size=12,
            )
        )
        claimed = draw(st.one_of(st.just(len(entries)), st.integers(0, 2**16 - 1 if not big else limit)))
        following = draw(st.one_of(st.just(0), st.just(len(body) + 64), anywhere))
        body += struct.pack(order + count_fmt, claimed)
        body += b"".join(struct.pack(order + entry_fmt, *e) for e in entries)
        body += struct.pack(order + offset_fmt, following)
        body += draw(st.binary(max_size=64))
    return bytes(body)


def test_random_bytes_behind_every_magic(tmp_path: Path) -> None:
    path = tmp_path / "f"

    @FUZZ
    @given(st.sampled_from(MAGICS + [b""]), st.binary(max_size=4096))
    def target(magic: bytes, rest: bytes) -> None:
        check(path, magic + rest)

    for_a_while(target, 0.2)


def test_mutated_samples_and_crafted_files(tmp_path: Path) -> None:
    path = tmp_path / "f"

    @FUZZ
    @given(mutated())
    def target(data: bytes) -> None:
        check(path, data)

    for_a_while(target, 0.4)


def test_generated_tiff_structures(tmp_path: Path) -> None:
    path = tmp_path / "f"

    @FUZZ
    @given(tiff_structure())
    def target(data: bytes) -> None:
        check(path, data)

    for_a_while(target, 0.4)


def test_the_crafted_corpus_stays_within_budget(tmp_path: Path) -> None:
    """Every crafted file, 500 MB sparse ones included: a bounded answer, quickly."""
    for name in crafted.names():
        path = crafted.write(tmp_path, name)
        started = time.perf_counter()
        assert isinstance(sniff.looks_complete(path), bool)
        assert time.perf_counter() - started < CALL_LIMIT_S, name
        path.unlink()
