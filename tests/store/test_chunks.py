"""The content-defined chunker (pyimg/chunks.py, csrc/common/cdc.c): properties."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyimg.chunks import DEFAULT_PARAMS, ChunkParams, Cutter, chunk_file, cut_points, gear_table

# Small sizes, so that a few hundred KiB of data make many chunks.
SMALL = ChunkParams(256, 1024, 4096)


def data_of(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def lengths(data: bytes, params: ChunkParams = SMALL, pieces: list[int] | None = None) -> list[int]:
    """Chunk lengths of data scanned in pieces (split at the given offsets)."""
    cutter = Cutter(params)
    out: list[int] = []
    at = 0
    for end in [*sorted(pieces or []), len(data)]:
        out += cutter.scan(data[at:end])
        at = max(at, end)
    if cutter.open_length:
        out.append(cutter.open_length)
    return out


def test_gear_table_comes_from_blake3() -> None:
    want = [
        int.from_bytes(blake3.blake3(b"pyimg cdc gear v1" + i.to_bytes(4, "little")).digest()[:8], "little")
        for i in range(256)
    ]
    assert gear_table() == want


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 200_000), st.lists(st.integers(0, 200_000), max_size=8))
def test_chunks_tile_the_data_within_bounds_whatever_the_buffers(
    seed: int, size: int, splits: list[int]
) -> None:
    data = data_of(seed, size)
    whole = lengths(data)
    assert sum(whole) == len(data)
    assert all(SMALL.min_size < n <= SMALL.max_size for n in whole[:-1])
    assert not whole or 0 < whole[-1] <= SMALL.max_size
    # The cuts depend on the content only, not on how it was read.
    assert lengths(data, pieces=[min(s, size) for s in splits]) == whole


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32),
    st.integers(50_000, 150_000),
    st.integers(0, 49_999),
    st.binary(min_size=1, max_size=5000),
)
def test_an_insertion_changes_only_nearby_chunks(seed: int, size: int, where: int, inserted: bytes) -> None:
    old = data_of(seed, size)
    new = old[:where] + inserted + old[where:]

    def chunks(data: bytes) -> list[bytes]:
        out, at = [], 0
        for n in lengths(data):
            out.append(data[at : at + n])
            at += n
        return out

    before, after = chunks(old), chunks(new)
    fresh = [c for c in after if c not in set(before)]
    # The chunk the bytes went into changes, and the cut after it may move once or twice
    # before the hash falls back on an old cut: a handful of chunks, whatever the size.
    assert sum(map(len, fresh)) <= len(inserted) + 4 * SMALL.max_size
    assert b"".join(after) == new
    # Everything before the insertion's chunk is unchanged.
    ends, at = [], 0
    for c in before:
        at += len(c)
        ends.append(at)
    kept = sum(1 for e in ends if e <= where)
    assert after[:kept] == before[:kept]


def test_default_chunks_of_a_file(tmp_path: Path) -> None:
    data = data_of(7, 6 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    whole = hashlib.sha256()
    chunks = chunk_file(str(path), DEFAULT_PARAMS, whole)
    assert whole.hexdigest() == hashlib.sha256(data).hexdigest()
    assert [(c.offset, c.size) for c in chunks] == list(cut_points(str(path)))
    assert chunks[0].offset == 0 and sum(c.size for c in chunks) == len(data)
    for c in chunks:
        assert c.digest == "sha256:" + hashlib.sha256(data[c.offset : c.offset + c.size]).hexdigest()
    assert all(DEFAULT_PARAMS.min_size < c.size <= DEFAULT_PARAMS.max_size for c in chunks[:-1])
    mean = len(data) / len(chunks)
    assert 48 << 10 < mean < 96 << 10  # ~64 KiB
    # The 4 MiB read buffers leave no trace: the same cuts as one scan of everything.
    assert [c.size for c in chunks] == lengths(data, DEFAULT_PARAMS)


def test_zeros_cut_at_the_maximum() -> None:
    assert set(lengths(bytes(1 << 20), DEFAULT_PARAMS)) == {DEFAULT_PARAMS.max_size}


@pytest.mark.parametrize("bad", [(64, 1024, 4096), (512, 1000, 4096), (2048, 1024, 4096), (256, 1024, 1024)])
def test_bad_parameters(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        Cutter(ChunkParams(*bad))


def test_labels_round_trip() -> None:
    assert ChunkParams.parse(DEFAULT_PARAMS.label()) == DEFAULT_PARAMS
    assert ChunkParams.parse(DEFAULT_PARAMS.scaled(2).label()) == ChunkParams(64 << 10, 256 << 10, 1 << 20)
    with pytest.raises(ValueError):
        ChunkParams.parse("rabin:1/2/3")
