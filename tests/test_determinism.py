"""Parallel output must be byte-identical to the serial one, even when workers
finish in the reverse order of submission (the brief's model: squashfs-tools-ng's
"workers finish in reverse order" test)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pyimg
import pyimg.content as content
from pyimg.formats.squashfs_data import CHUNK_TARGET

from .oracles import fix_mtimes, make_varied_tree


def _reverse_finishing(real: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """ordered_map whose tasks sleep less the later they were submitted: within each
    window, the last task finishes first."""

    def ordered_map(
        fn: Callable[[Any], Any], items: Iterable[Any], jobs: int, window: int | None = None
    ) -> Iterator[Any]:
        counter = iter(range(1_000_000))

        def numbered(item: Any) -> tuple[int, Any]:
            return next(counter), item

        def slow(pair: tuple[int, Any]) -> Any:
            index, item = pair
            time.sleep(0.004 * (7 - index % 8))
            return fn(item)

        return real(slow, (numbered(item) for item in items), jobs, window)

    return ordered_map


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_reverse_finishing_workers_give_the_serial_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    tree = make_varied_tree(tmp_path / "src")
    serial = pyimg.build([str(tree)], str(tmp_path / "serial.img"), format=fmt, jobs=1).digest
    import pyimg.formats.ext4 as ext4
    import pyimg.formats.squashfs_data as squashfs_data

    for module in (squashfs_data, ext4):
        monkeypatch.setattr(module, "ordered_map", _reverse_finishing(content.ordered_map))
    parallel = pyimg.build([str(tree)], str(tmp_path / "parallel.img"), format=fmt, jobs=4).digest
    assert parallel == serial


# -- trees aimed at the places where layout is decided ------------------------------------

ALL_JOBS = (1, 2, 3, 4, 8)
MiB = 1 << 20


def _digests(tree: Path, out: Path, fmt: str, jobs: Iterable[int] = ALL_JOBS, **options: Any) -> set[str]:
    return {
        pyimg.build([str(tree)], str(out), format=fmt, jobs=j, epoch=1_600_000_000, **options).digest
        for j in jobs
    }


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_files_around_the_chunk_size(tmp_path: Path, fmt: str) -> None:
    """squashfs cuts contents above CHUNK_TARGET (1 MiB) into 1 MiB tasks: files of
    exactly that size, one byte either side, and several MiB, between small files
    (names sort them in between), with a shared tail and a duplicate big file."""
    assert MiB == CHUNK_TARGET  # the sizes below are chosen around it
    src = tmp_path / "src"
    src.mkdir()
    sizes = [MiB - 1, MiB, MiB + 1, 2 * MiB - 1, 3 * MiB + 5, 5 * MiB + 4096]
    for i, size in enumerate(sizes):
        (src / f"{i}-big").write_bytes(_random(i, size))
        (src / f"{i}-small").write_bytes(_random(100 + i, 3000 + i))
        # The same 1 MiB + 1 head as file 2, and a different tail: dedup of whole
        # contents must not confuse them.
        (src / f"{i}-like-2").write_bytes(_random(2, MiB + 1)[: MiB + 1 - 7] + b"%07d" % i)
    (src / "9-dup-of-4").write_bytes(_random(4, sizes[4]))
    for block in ("4K", "128K", "1M") if fmt == "squashfs" else (None,):
        options = {"block_size": block} if block else {}
        assert len(_digests(src, tmp_path / "img", fmt, **options)) == 1, block


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_many_duplicates_of_a_large_file(tmp_path: Path, fmt: str) -> None:
    """24 copies of a 2.5 MiB file (three tasks each: found to be duplicates only by the
    committer, which takes their blocks back) and 24 of a 700 KiB one (one task:
    claimed before compression), in directories that interleave them."""
    src = tmp_path / "src"
    big, medium = _random(1, 5 * MiB // 2), _random(2, 700 << 10)
    for i in range(5):
        (src / f"d{i}").mkdir(parents=True)
    for i in range(24):
        (src / f"d{i % 5}/big{i:02d}").write_bytes(big)
        (src / f"d{(i + 2) % 5}/medium{i:02d}").write_bytes(medium)
    digests = _digests(src, tmp_path / "img", fmt)
    assert len(digests) == 1
    result = pyimg.build([str(src)], str(tmp_path / "img"), format=fmt, jobs=4)
    assert result.dedup_saved == 23 * (len(big) + len(medium))


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_a_tree_created_in_reverse_order(tmp_path: Path, fmt: str) -> None:
    """The same tree created in sorted and in reverse order (tmpfs and ext4 list a
    directory in neither): one image."""
    entries = [(f"d{i % 7}/sub{i % 3}/f{i:03d}", _random(i, (i * 997) % 20000)) for i in range(300)]
    trees = []
    for name, order in (("sorted", entries), ("reversed", entries[::-1])):
        root = tmp_path / name
        for rel, data in order:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        fix_mtimes(root)
        trees.append(root)
    digests = _digests(trees[0], tmp_path / "img", fmt, jobs=(1, 4)) | _digests(
        trees[1], tmp_path / "img", fmt, jobs=(1, 4)
    )
    assert len(digests) == 1


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_later_duplicates_finishing_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Duplicates in later tasks that finish before the earlier copy: the later one
    wins the dedup claim (squashfs compresses both and takes the later one's blocks
    back); the image must be the serial one.  Contents of one task (600 KiB, two per
    task) and of several (2.5 MiB)."""
    src = tmp_path / "src"
    src.mkdir()
    one, many = _random(1, 600 << 10), _random(2, 5 * MiB // 2)
    for i in range(16):
        data = one if i % 5 == 0 else many if i % 7 == 3 else _random(10 + i, (300 + 40 * i) << 10)
        (src / f"f{i:02d}").write_bytes(data)
    fix_mtimes(src)
    serial = pyimg.build([str(src)], str(tmp_path / "serial.img"), format=fmt, jobs=1).digest
    import pyimg.formats.ext4 as ext4
    import pyimg.formats.squashfs_data as squashfs_data

    for module in (squashfs_data, ext4):
        monkeypatch.setattr(module, "ordered_map", _reverse_finishing(content.ordered_map))
    for jobs in (2, 4, 8):
        parallel = pyimg.build([str(src)], str(tmp_path / "parallel.img"), format=fmt, jobs=jobs).digest
        assert parallel == serial, jobs


@pytest.mark.parametrize("compression", ["zstd", "gzip", "xz"])
@pytest.mark.parametrize("block_size", ["4K", "128K", "1M"])
def test_a_hole_and_written_zeros_give_one_squashfs_image(
    tmp_path: Path, compression: str, block_size: str
) -> None:
    """A block of zeros is a hole whether or not it was allocated in the source
    (docs/determinism.md).  A 1 MiB task that lies in a hole is not compressed at all,
    so the zero blocks of a written-out copy must be recognised after compression by
    every compressor (gzip and xz squeeze a zero block to more than 64 bytes)."""
    data = bytes(range(256)) * 4096  # 1 MiB of data, then 1 MiB of zeros (or a hole)
    for name, dense in (("sparse", False), ("dense", True)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "f", "wb") as f:
            f.write(data + (bytes(MiB) if dense else b""))
            f.truncate(2 * MiB)
        fix_mtimes(tmp_path / name)
    digests = {
        name: pyimg.build(
            [str(tmp_path / name)], str(tmp_path / "img"), compression=compression, block_size=block_size,
            jobs=1, epoch=1,
        ).digest
        for name in ("sparse", "dense")
    }  # fmt: skip
    assert digests["sparse"] == digests["dense"]
