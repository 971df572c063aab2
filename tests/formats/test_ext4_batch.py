"""The ext4 writer's batch paths: small files scanned (read, hashed, zero blocks
found) and written back by one C call per batch, against plain Python references."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import blake3
import pytest

import pyimg
from pyimg.errors import OutputError, SourceError
from pyimg.formats import ext4
from pyimg.tree import DataRef, Inode, Kind, Tree, new_dir

from .test_ext4 import T0, build, debugfs

BLOCK = ext4.BLOCK


def reference_runs(data: bytes, first_block: int = 0) -> list[tuple[int, int]]:
    """Non-zero 4 KiB blocks of data as (first, count) runs, the slow obvious way."""
    runs: list[tuple[int, int]] = []
    for i in range(0, len(data), BLOCK):
        if not any(data[i : i + BLOCK]):
            continue
        block = first_block + i // BLOCK
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def patterned(seed: int, blocks: int, tail: int) -> bytes:
    """Blocks that are zero, all 0xff, or zero but for one byte, then a partial block."""
    rng = random.Random(seed)
    out = bytearray()
    for _ in range(blocks):
        block = bytearray(BLOCK)
        kind = rng.randrange(3)
        if kind == 1:
            block[:] = b"\xff" * BLOCK
        elif kind == 2:
            block[rng.randrange(BLOCK)] = 1
        out += block
    if tail:
        out += bytes(tail - 1) + bytes([rng.randrange(2)])
    return bytes(out)


SHAPES = ((0, 1), (1, 0), (3, 17), (9, 4095), (64, 0))  # (whole blocks, bytes of a partial one)
CASES = [(seed, blocks, tail) for seed in range(8) for blocks, tail in SHAPES]


@pytest.mark.parametrize(("seed", "blocks", "tail"), CASES)
def test_block_runs_match_the_reference(seed: int, blocks: int, tail: int) -> None:
    data = patterned(seed, blocks, tail)
    first, count = ext4.block_runs(data, 1000)
    assert list(zip(first, count, strict=True)) == reference_runs(data, 1000)


def _ref(path: Path) -> DataRef:
    st = path.stat()
    return DataRef.at(str(path), 0, st.st_size, (st.st_size, st.st_mtime_ns))


def test_scan_small_matches_the_references(tmp_path: Path) -> None:
    datas = [patterned(seed, blocks, tail) for seed, blocks, tail in CASES]
    datas += [b"x", bytes(ext4.C_HASH_MAX), os.urandom(ext4.C_HASH_MAX + 1), os.urandom(ext4.SMALL_FILE)]
    paths = []
    for i, data in enumerate(datas):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(data)
    scanned = ext4.scan_small([_ref(p) for p in paths])
    assert scanned.buffer == b"".join(datas)
    assert scanned.digests == b"".join(blake3.blake3(data).digest() for data in datas)
    runs = list(zip(scanned.first, scanned.count, strict=True))
    at = 0
    for i, data in enumerate(datas):
        expected = reference_runs(data)
        assert runs[at : at + scanned.nruns[i]] == expected
        assert scanned.stored[i] == sum(min(len(data), (f + c) * BLOCK) - f * BLOCK for f, c in expected)
        at += scanned.nruns[i]
    assert at == len(runs)


def test_scan_small_names_the_failing_file(tmp_path: Path) -> None:
    good, changed = tmp_path / "good", tmp_path / "changed"
    good.write_bytes(b"x" * 5000)
    changed.write_bytes(b"y")
    refs = [_ref(good), _ref(changed)]
    os.utime(changed, ns=(0, 42))
    with pytest.raises(SourceError) as err:
        ext4.scan_small(refs)
    assert err.value.path == str(changed) and "changed while" in err.value.reason


def small_tree(src: Path) -> tuple[Tree, dict[str, bytes]]:
    """Small files with holes, zero tails, all-zero files, duplicates; one big file."""
    src.mkdir()
    tree = Tree(new_dir(mtime_ns=T0))
    datas: dict[str, bytes] = {}
    for i, (seed, blocks, tail) in enumerate(CASES * 3):
        datas[f"f{i:03d}"] = patterned(seed + i // len(CASES), blocks, tail)
    datas["zeros"] = bytes(3 * BLOCK)
    datas["victim"] = b"v" * 10000
    datas["big"] = patterned(99, 300, 5)
    for name, data in datas.items():
        path = src / name
        path.write_bytes(data)
        st = path.stat()
        ref = DataRef.at(str(path), 0, st.st_size, (st.st_size, st.st_mtime_ns))
        tree.add(name.encode(), Inode(Kind.FILE, 0o644, 0, 0, T0, size=len(data), data=ref))
    return tree, datas


@pytest.mark.parametrize("jobs", [1, 3])
def test_written_back_whether_kept_or_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 jobs: int) -> None:  # fmt: skip
    tree, datas = small_tree(tmp_path / "src")
    kept, _ = build(tmp_path, tree, name="kept.ext4", jobs=jobs)
    monkeypatch.setattr(ext4, "CACHE_BUDGET", 0)  # every small file read again for the stream
    monkeypatch.setattr(ext4, "BATCH_FILES", 7)
    again, result = build(tmp_path, tree, name="again.ext4", jobs=jobs)
    assert kept.read_bytes() == again.read_bytes()
    assert result.bytes_stored == sum(
        min(len(d), (f + c) * BLOCK) - f * BLOCK
        for d in {d: None for d in datas.values()}
        for f, c in reference_runs(d)
    )
    out = tmp_path / "out"
    for name in ("f000", "f017", "f100", "zeros", "big"):
        debugfs(again, f"dump /{name} {out}")
        assert out.read_bytes() == datas[name], name


def _after_layout(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    real = ext4._Build.lay_out

    def lay_out_then_act(self: ext4._Build) -> Any:
        laid_out = real(self)
        action(self)
        return laid_out

    monkeypatch.setattr(ext4._Build, "lay_out", lay_out_then_act)


def test_file_changed_before_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, _ = small_tree(tmp_path / "src")
    monkeypatch.setattr(ext4, "CACHE_BUDGET", 0)
    victim = tmp_path / "src" / "victim"
    _after_layout(monkeypatch, lambda _build: os.utime(victim, ns=(0, 7)))
    with pytest.raises(SourceError) as err:
        build(tmp_path, tree)
    assert err.value.path == str(victim) and "changed while" in err.value.reason


def test_image_write_failure_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, _ = small_tree(tmp_path / "src")
    readonly = os.open(tmp_path / "src" / "zeros", os.O_RDONLY)

    def swap_fd(build: ext4._Build) -> None:
        build.out.fd = readonly

    _after_layout(monkeypatch, swap_fd)
    try:
        with pytest.raises(OutputError, match="writing the image"):
            build(tmp_path, tree)
    finally:
        os.close(readonly)


def test_a_file_changed_after_the_hash_pass_kept_its_bytes_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a prescan (--jobs 1) the hash pass keeps the first batches' bytes for
    the stream, which checks each such file's stamp again instead of reading it."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(10):
        (source / f"f{i}").write_bytes(b"content %d\n" % i)
    victim = source / "f3"
    real_stream = ext4._Build.stream
    kept: list[bool] = []

    def change_then_stream(self: Any) -> None:
        kept.append(any(batch.buffer is not None for batch in self.writes))
        os.utime(victim, ns=(0, 123))
        real_stream(self)

    monkeypatch.setattr(ext4._Build, "stream", change_then_stream)
    with pytest.raises(SourceError) as err:
        pyimg.build([str(source)], str(tmp_path / "out.ext4"), format="ext4", jobs=1)
    assert kept == [True]  # the bytes were kept: no read would have caught it
    assert str(victim) in str(err.value) and "changed while" in str(err.value)
    assert not (tmp_path / "out.ext4").exists()
