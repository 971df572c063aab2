"""The image digest (pyimg/imagehash.py), checked against its definition written
out here from docs/manifest.md; the SHA-256 is that of every byte, holes included.
Neither reads (or allocates) the holes of a sparse image."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

import blake3
import pytest

from pyimg.errors import OutputError
from pyimg.imagehash import ImageHasher, digest_image

MiB = 1 << 20
HEADER = b"pyimg image digest 1: (index, BLAKE3) of the non-zero 1 MiB segments, then the size\n"


def reference_digest(content: bytes) -> str:
    """The definition, byte by byte: BLAKE3 of the header, (u64le index, BLAKE3)
    of every 1 MiB segment holding a non-zero byte, then u64le(size)."""
    outer = blake3.blake3(HEADER)
    for index, at in enumerate(range(0, len(content), MiB)):
        segment = content[at : at + MiB]
        if segment.count(0) != len(segment):
            outer.update(index.to_bytes(8, "little") + blake3.blake3(segment).digest())
    outer.update(len(content).to_bytes(8, "little"))
    return outer.hexdigest()


def _sparse_file(path: Path) -> bytes:
    """A file with data, holes (leading, inner, trailing) and an unaligned tail, and
    a data range that begins mid-segment (the window it starts in reaches into the
    hole before it); returns its full content."""
    pieces = [
        (3 * MiB, os.urandom(5000)),
        (10 * MiB + MiB // 2, os.urandom(9 * MiB)),
        (40 * MiB + 123, os.urandom(33 * MiB + 7)),
    ]
    size = 80 * MiB + 11
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    content = bytearray(size)
    for offset, data in pieces:
        content[offset : offset + len(data)] = data
    return bytes(content)


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, pos))
    return ranges


def _inside(ranges: list[tuple[int, int]], at: int, length: int) -> bool:
    return any(start <= at and at + length <= end for start, end in ranges)


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_digest_of_a_sparse_image(tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # /dev/shm is tmpfs, where mapping a hole would allocate it.
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    path = base / f"pyimg-test-sparse-{os.getpid()}.img"
    try:
        content = _sparse_file(path)
        content_ranges = _data_ranges(path)
        blocks = os.stat(path).st_blocks
        digest = digest_image(str(path))
        assert digest.blake3 == reference_digest(content)
        assert digest.sha256 == hashlib.sha256(content).hexdigest()
        assert digest.size == len(content)
        assert os.stat(path).st_blocks == blocks, "hashing allocated the holes"
        assert digest_image(str(path), sha256=False).blake3 == digest.blake3
        maps: list[tuple[int, int]] = []
        real_mmap = mmap.mmap

        def counting(fd: int, length: int, **kwargs: Any) -> mmap.mmap:
            maps.append((kwargs["offset"], length))
            return real_mmap(fd, length, **kwargs)

        monkeypatch.setattr(mmap, "mmap", counting)
        with open(path, "rb") as f:  # an open file (a build's temp file) is mapped, not read
            assert digest_image(f.fileno()) == digest
            assert digest_image(f.fileno(), sha256=False).blake3 == digest.blake3
        # Only windows wholly inside a data range (the mid-segment one: 14-18 MiB, not 10-14)
        assert maps and all(_inside(content_ranges, at, n) for at, n in maps)
        if any(start == 10 * MiB + MiB // 2 for start, _ in content_ranges):  # (holes reported exactly)
            assert (14 * MiB, 4 * MiB) in maps and (10 * MiB, 4 * MiB) not in maps
        assert os.stat(path).st_blocks == blocks, "hashing a mapped file allocated its holes"
    finally:
        path.unlink(missing_ok=True)


def test_a_file_that_cannot_be_mapped_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmap refused (ENODEV: a file system without it; ENOMEM): the same digest, read."""
    import errno

    path = tmp_path / "img"
    content = _sparse_file(path)
    calls: list[int] = []

    def refusing(*args: Any, **kwargs: Any) -> mmap.mmap:
        calls.append(1)
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", refusing)
    with open(path, "rb") as f:
        assert digest_image(f.fileno()).blake3 == reference_digest(content)
    assert calls == [1]  # tried once, then read


def test_only_a_local_file_is_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A temp file on a network file system is read: a server's error there would be a
    SIGBUS through a mapping."""
    import pyimg.imagehash as imagehash

    path = tmp_path / "img"
    content = _sparse_file(path)
    with open(path, "rb") as f:
        assert imagehash._mappable(f.fileno())  # (the test's temp directory is local)
    with open("/dev/shm/pyimg-test-mappable", "wb") as f:
        try:
            assert imagehash._mappable(f.fileno())
        finally:
            os.unlink(f.name)
    monkeypatch.setattr(imagehash, "_mappable", lambda fd: False)
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: pytest.fail("mapped"))
    with open(path, "rb") as f:
        assert digest_image(f.fileno()).blake3 == reference_digest(content)


def test_an_interrupt_mid_hash_is_the_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a mapped window is hashed, its view still held by the SHA-256
    thread: the KeyboardInterrupt comes out (the CLI exits 130), not the BufferError
    of closing a mapping still exported; a later digest of the file is right."""
    import threading

    import pyimg.imagehash as imagehash

    real_sha256 = hashlib.sha256
    updates: list[int] = []
    holding = threading.Event()  # the SHA-256 thread holds the second window
    closed = threading.Event()  # ...until the interrupted digest has tried to unmap it

    class SlowSha:  # holds the window's buffer (an export) while it hashes
        def __init__(self) -> None:
            self.sha = real_sha256()

        def update(self, data: Any) -> None:
            with memoryview(data) as held:
                updates.append(1)
                if len(updates) == 2:
                    holding.set()
                    assert closed.wait(10)
                self.sha.update(held)

        def hexdigest(self) -> str:
            return self.sha.hexdigest()

    real_close = imagehash._Windows.close

    def close(self: Any) -> None:
        real_close(self)
        if holding.is_set():
            closed.set()

    maps: list[int] = []
    real_mmap = mmap.mmap

    def counting(*args: Any, **kwargs: Any) -> mmap.mmap:
        maps.append(1)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", SlowSha)
    monkeypatch.setattr(imagehash._Windows, "close", close)
    monkeypatch.setattr(mmap, "mmap", counting)
    path = tmp_path / "img"
    content = os.urandom(12 * MiB)
    path.write_bytes(content)
    window = ImageHasher.window
    seen = [0]

    def interrupted(self: ImageHasher, view: Any) -> None:
        seen[0] += 1
        if seen[0] == 2:
            assert holding.wait(10)
            raise KeyboardInterrupt
        window(self, view)

    monkeypatch.setattr(ImageHasher, "window", interrupted)
    with open(path, "rb") as f:
        with pytest.raises(KeyboardInterrupt):
            digest_image(f.fileno())
        assert len(maps) == 2, "the windows were read, not mapped: nothing was tested"
        monkeypatch.setattr(ImageHasher, "window", window)
        monkeypatch.setattr(hashlib, "sha256", real_sha256)
        assert digest_image(f.fileno()) == digest_image(str(path))
    assert digest_image(str(path)).blake3 == reference_digest(content)
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("pyimg-sha256")]  # the feeder is gone


def test_digest_of_an_empty_file_and_a_missing_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digest_image(str(empty)).blake3 == reference_digest(b"")
    with open(empty, "rb") as f:
        assert digest_image(f.fileno()).blake3 == reference_digest(b"")
    with pytest.raises(OutputError, match="cannot read the image"):
        digest_image(str(tmp_path / "missing"))


def test_holes_and_written_zeros_give_one_digest(tmp_path: Path) -> None:
    """Copying an image with its holes filled (or made) keeps its digest."""
    sparse = tmp_path / "sparse"
    content = _sparse_file(sparse)
    dense = tmp_path / "dense"
    dense.write_bytes(content)
    assert digest_image(str(dense)) == digest_image(str(sparse))


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 9 * MiB])
def test_streamed_pieces_give_the_files_digest(tmp_path: Path, size: int) -> None:
    """ImageHasher.update (a pull from a registry) equals digest_image, whatever
    the pieces, for sizes on and off segment boundaries, zeros and data mixed."""
    content = bytearray(os.urandom(size))
    content[MiB : 2 * MiB] = bytes(len(content[MiB : 2 * MiB]))  # one zero segment
    path = tmp_path / "img"
    path.write_bytes(content)
    expected = reference_digest(bytes(content))
    assert digest_image(str(path)).blake3 == expected
    with open(path, "rb") as f:
        assert digest_image(f.fileno()).blake3 == expected
    for piece in (1 if size <= MiB + 1 else 4093, 4096, 65536 + 3, MiB, 5 * MiB):
        hasher = ImageHasher()
        for at in range(0, size, piece):
            hasher.update(content[at : at + piece])
        assert hasher.size == size
        assert hasher.hexdigest() == expected


def test_a_terabyte_hole_costs_nothing(tmp_path: Path) -> None:
    """The point of the definition: a 1 TiB sparse file is digested without
    hashing its zeros (a plain BLAKE3 of it takes minutes)."""
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.seek(512 << 30)
        f.write(b"data")
        f.truncate(1 << 40)
    got = digest_image(str(path), sha256=False)
    outer = blake3.blake3(HEADER)
    segment = (512 << 30) // MiB
    outer.update(segment.to_bytes(8, "little") + blake3.blake3(b"data" + bytes(MiB - 4)).digest())
    outer.update((1 << 40).to_bytes(8, "little"))
    assert got.blake3 == outer.hexdigest()
    assert got.size == 1 << 40


def test_the_definition_is_fixed() -> None:
    """A golden value: the digest's definition is part of the contract (every
    recorded and promoted image names its digest); change it only on purpose,
    with a new HEADER."""
    content = bytes(range(256)) * 4096 * 3 + bytes(2 * MiB) + b"tail"
    assert reference_digest(content) == "0890dc6ab51f9418a6daae066d0b90c5a83b59be1138bc7d2eb16345fd44869c"
