"""pyimg_ext4_dirhash (the htree name hash the layout sorts by) against debugfs's
dx_hash: half_md4 over unsigned chars (hash version 4, EXT2_HASH_HALF_MD4_UNSIGNED,
which pyimg's superblock selects with EXT2_FLAGS_UNSIGNED_HASH), with a seed."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

import pyimg
from pyimg._ffi import lib

from ..oracles import require_tool

SEEDS = ["01234567-89ab-cdef-0123-456789abcdef", "00000000-0000-0000-0000-000000000000"]
NAMES = [
    b"a",
    b"hello",
    b"lost+found",
    "h\u00e9llo-\u00fcnicode".encode(),  # bytes >= 0x80: where signed and unsigned differ
    b"\xff\xfe\x80" * 11,  # not UTF-8, and longer than one 32-byte round
    b"n" * 255,  # the longest name: eight rounds
    b"x" * 32,  # exactly one round
    b"y" * 33,  # one byte into the second
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dirhash")
    (root / "src").mkdir()
    out = root / "img.ext4"
    pyimg.build([str(root / "src")], str(out), format="ext4", epoch=0)
    return out


def _debugfs_hash(image: Path, name: bytes, seed: str) -> int:
    command = b"dx_hash -h 4 -s " + seed.encode() + b" " + name
    proc = subprocess.run([require_tool("debugfs"), b"-R", command, bytes(image)], capture_output=True)
    match = re.search(rb"Hash of .* is 0x([0-9a-f]+)", proc.stdout + proc.stderr, re.S)
    assert match, proc.stderr
    return int(match.group(1), 16)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NAMES)
def test_dirhash_matches_debugfs(image: Path, name: bytes, seed: str) -> None:
    ours = lib.pyimg_ext4_dirhash(name, len(name), uuid.UUID(seed).bytes)
    assert ours == _debugfs_hash(image, name, seed)
