"""Writers write into the Region they are handed: an image built at an offset of a
larger file is the image built alone, byte for byte, and nothing outside its
region changes.  Checked with the real oracles on the cut-out slice."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyimg.api import options_for, writer_for
from pyimg.collect import collect
from pyimg.errors import OutputError
from pyimg.region import Region
from pyimg.tree import FrozenTree

from ..ext4_oracle import e2fsck_clean
from ..oracles import require_tool

OFFSET = 1 << 20
BEFORE = bytes(range(256)) * (OFFSET // 256)  # a pattern no writer would produce
AFTER = b"\x5a\xa5" * (OFFSET // 2)
EPOCH = 1_700_000_000


def _source(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "small").write_bytes(b"hello region\n")
    (root / "dir" / "big").write_bytes(os.urandom(300_000))
    (root / "dir" / "sparse").write_bytes(b"x" + bytes(200_000) + b"y")
    (root / "dir" / "sub" / "empty").write_bytes(b"")
    (root / "link").symlink_to("dir/big")
    for path in root.rglob("*"):
        os.utime(path, ns=(EPOCH * 10**9, EPOCH * 10**9), follow_symlinks=False)
    return root


def _tree(source: Path, fmt: str) -> tuple[FrozenTree, object]:
    options = options_for([str(source)], "unused", format=fmt, epoch=EPOCH, jobs=2)
    with collect(options) as collected:
        return collected.freeze(), options


def _write(fmt: str, source: Path, path: Path, offset: int, limit: int | None) -> int:
    tree, options = _tree(source, fmt)
    fd = os.open(path, os.O_RDWR)
    try:
        result = writer_for(options).write(tree, Region(fd, offset, limit), lambda _n: None)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    return result.image_size


def _alone(fmt: str, source: Path, path: Path) -> bytes:
    path.write_bytes(b"")
    size = _write(fmt, source, path, 0, None)
    os.truncate(path, size)  # what the region's owner does
    return path.read_bytes()


def _framed(path: Path, room: int) -> None:
    """Pattern, then `room` bytes of hole (a fresh region reads as zeros), then pattern."""
    with open(path, "wb") as f:
        f.write(BEFORE)
        f.seek(OFFSET + room)
        f.write(AFTER)


def _check(fmt: str, image: Path, tmp_path: Path) -> None:
    if fmt == "ext4":
        e2fsck_clean(image)
    else:
        proc = subprocess.run(
            [require_tool("unsquashfs"), "-lln", str(image)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert "squashfs-root/dir/sub/empty" in proc.stdout


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_an_image_at_an_offset_is_the_image_alone(tmp_path: Path, fmt: str) -> None:
    source = _source(tmp_path / "src")
    alone = _alone(fmt, source, tmp_path / "alone.img")
    room = len(alone) + 3 * 4096  # more than it needs: the writer reports what it used
    big = tmp_path / "big.img"
    _framed(big, room)
    used = _write(fmt, source, big, OFFSET, room)
    assert used == len(alone)
    data = big.read_bytes()
    assert len(data) == OFFSET + room + len(AFTER)  # the file was not sized by the writer
    assert data[:OFFSET] == BEFORE
    assert data[OFFSET + room :] == AFTER
    assert data[OFFSET + used : OFFSET + room] == bytes(room - used)  # nothing past its length
    cut = tmp_path / "cut.img"
    cut.write_bytes(data[OFFSET : OFFSET + used])
    assert data[OFFSET : OFFSET + used] == alone
    _check(fmt, cut, tmp_path)


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_a_region_too_small_is_an_output_error(tmp_path: Path, fmt: str) -> None:
    source = _source(tmp_path / "src")
    need = len(_alone(fmt, source, tmp_path / "alone.img"))
    room = need - 4096
    big = tmp_path / "big.img"
    _framed(big, room)
    with pytest.raises(OutputError, match="region"):
        _write(fmt, source, big, OFFSET, room)
    data = big.read_bytes()
    assert data[:OFFSET] == BEFORE and data[OFFSET + room :] == AFTER


def test_the_c_core_keeps_to_the_region_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the Python check up front, ext4's C writes are bounded too (pyimg_out)."""
    source = _source(tmp_path / "src")
    need = len(_alone("ext4", source, tmp_path / "alone.img"))
    room = need - 4096
    big = tmp_path / "big.img"
    _framed(big, room)
    monkeypatch.setattr(Region, "check_fits", lambda self, end: None)
    with pytest.raises(OutputError, match="outside its region"):
        _write("ext4", source, big, OFFSET, room)
    data = big.read_bytes()
    assert data[:OFFSET] == BEFORE and data[OFFSET + room :] == AFTER
