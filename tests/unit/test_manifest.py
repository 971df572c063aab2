"""The image digest: the same BLAKE3/SHA-256 as hashing every byte, holes included,
without reading (or allocating) the holes of a sparse image."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from pyimg.errors import OutputError
from pyimg.manifest import digest_image

MiB = 1 << 20


def _sparse_file(path: Path) -> bytes:
    """A file with data, holes (leading, inner, trailing) and an unaligned tail;
    returns its full content."""
    pieces = [(3 * MiB, os.urandom(5000)), (40 * MiB + 123, os.urandom(33 * MiB + 7))]
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


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_digest_of_a_sparse_image(tmp_path: Path, where: str) -> None:
    # /dev/shm is tmpfs, where mapping a hole would allocate it.
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    path = base / f"pyimg-test-sparse-{os.getpid()}.img"
    try:
        content = _sparse_file(path)
        blocks = os.stat(path).st_blocks
        digest = digest_image(str(path))
        assert digest.blake3 == blake3.blake3(content).hexdigest()
        assert digest.sha256 == hashlib.sha256(content).hexdigest()
        assert digest.size == len(content)
        assert os.stat(path).st_blocks == blocks, "hashing allocated the holes"
        assert digest_image(str(path), sha256=False).blake3 == digest.blake3
    finally:
        path.unlink(missing_ok=True)


def test_digest_of_an_empty_file_and_a_missing_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digest_image(str(empty)).blake3 == blake3.blake3(b"").hexdigest()
    with pytest.raises(OutputError, match="cannot read the image"):
        digest_image(str(tmp_path / "missing"))
