"""An explicit ext4 --size costs the metadata it must write, not the size; a size
the target cannot hold is refused before any work (issue #9)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import pyimg
from pyimg.errors import OutputError

from .ext4_oracle import e2fsck_clean
from .oracles import require_tool


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    for i in range(50):
        (src / "etc" / f"f{i}").write_bytes(os.urandom(3000 + i))
    return src


def test_a_terabyte_image_of_a_small_tree_costs_megabytes(tmp_path: Path) -> None:
    """--size 1T: unused inode tables are holes and the digest skips holes, so the
    build writes a few MB and reads nothing of the terabyte; e2fsck accepts it."""
    require_tool("e2fsck")
    out = tmp_path / "big.ext4"
    result = pyimg.build([str(_tree(tmp_path))], str(out), format="ext4", size="1T")
    assert out.stat().st_size == 1 << 40 == result.image_size
    allocated = out.stat().st_blocks * 512
    # 8192 groups: descriptors and their backups, the used groups' bitmaps (measured 17 MB)
    assert allocated < 40 << 20, f"{allocated} bytes allocated for a 1 TiB image of 150 kB"
    assert result.digest == pyimg.digest(str(out), sha256=False).blake3
    e2fsck_clean(out)


def test_a_size_larger_than_the_file_limit_is_refused_up_front(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (as a file system's maximum file size would) refuses the size
    before any byte is written: a clear error, exit 6, nothing left behind."""
    src = _tree(tmp_path)
    out = tmp_path / "o" / "img.ext4"
    out.parent.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyimg.cli",
            "build",
            str(src),
            "-o",
            str(out),
            "--format",
            "ext4",
            "--size",
            "1G",
        ],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 6, run.stderr
    assert str(out) in run.stderr and "larger than this file system" in run.stderr
    assert "Traceback" not in run.stderr
    assert os.listdir(out.parent) == []


def test_a_size_the_file_system_has_no_room_for_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """statvfs: the blocks the image must write (not its holes) exceed the free space."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(4 << 20))
    real = os.fstatvfs

    class Full:
        def __init__(self, fd: int) -> None:
            self.f_frsize = real(fd).f_frsize
            self.f_bavail = (1 << 20) // self.f_frsize  # 1 MiB free

    monkeypatch.setattr(os, "fstatvfs", Full)
    out = tmp_path / "img.ext4"
    with pytest.raises(
        OutputError, match=r"needs about \d+ bytes of space, and its file system has 1048576 free"
    ):
        pyimg.build([str(src)], str(out), format="ext4", size="64M")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    # A size whose holes exceed the free space is fine: only written blocks count.
    (src / "big").write_bytes(b"small")
    pyimg.build([str(src)], str(out), format="ext4", size="64M")
    assert out.stat().st_size == 64 << 20
