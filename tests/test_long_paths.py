"""Trees with paths longer than PATH_MAX (4096 bytes) build from a directory as they
do from a tar archive of it: the same image, byte for byte, in squashfs and ext4.

Linux refuses such a path whole in every call (ENAMETOOLONG), yet a valid tree may
hold files far deeper (tar archives carry them).  The directory source reads them
relative to their directory's descriptor (csrc/common/longpath.c, pyimg/longpath.py):
the walk, the batch readers, ContentReader, the xattr calls.  The tree here reaches
past 8192 bytes, with files, a big file and a sparse one, hard links between a short
and a deep path, a symlink, a fifo, a device, xattrs on files and directories and an
ACL deep down, and names placed so that absolute paths of 4095, 4096 and 4097 bytes
(and 8191..8193) occur.

Oracles: the reference is the source read through descriptors (oracles.snapshot);
ext4 goes through e2fsck -fn and debugfs (ext4_oracle, which cd's down long paths and
dumps deep files one by one).  unsquashfs cannot extract such a tree (it creates every
file by its full path: "File name too long"), so squashfs is checked by its listing
(`unsquashfs -lln`: every path) and in full by squashfs-tools-ng's `sqfs2tar`, another
implementation, whose archive is read like the source (oracles.tar_snapshot).  cpio
refuses the tree, from either source, naming the same first path: the kernel's
initramfs unpacker would skip it silently.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import pyimg
from pyimg.errors import LimitError

from .ext4_oracle import snapshot_image
from .oracles import (
    IN_CI,
    IS_ROOT,
    assert_same_snapshot,
    can_xattr,
    require_tool,
    snapshot,
    tar_snapshot,
    without_acls,
)

PATH_MAX = 4096
Snapshot = dict[str, tuple[object, ...]]


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _write(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _xattr(dir_fd: int, name: str | None, key: str, value: bytes) -> None:
    """Set an xattr on `name` in the directory dir_fd (not followed), or on it itself."""
    if name is None:
        os.setxattr(dir_fd, key, value)
    else:
        os.setxattr(f"/proc/self/fd/{dir_fd}/{name}", key, value, follow_symlinks=False)


def make_deep_tree(root: Path) -> list[int]:
    """The tree described above, made through descriptors; returns the absolute path
    lengths of its deepest entries, for the test to check they are long enough."""
    root.mkdir()
    base = len(os.fsencode(root))
    dirs = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    lengths = [base]  # the absolute path length of each open directory
    try:
        _write(dirs[0], "short", b"a short path\n")
        for level in range(44):  # 44 x 201 bytes: past 8192 whatever the root's own path
            name = f"{level:02d}-" + "d" * 197
            os.mkdir(name, dir_fd=dirs[-1])
            dirs.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirs[-1]))
            lengths.append(lengths[-1] + 1 + len(name))
            _write(dirs[-1], "small", b"level %d\n" % level * (level + 1))
            _xattr(dirs[-1], None, "user.level", b"%d" % level)
            for edge in (
                PATH_MAX - 1,
                PATH_MAX,
                PATH_MAX + 1,
                2 * PATH_MAX - 1,
                2 * PATH_MAX,
                2 * PATH_MAX + 1,
            ):
                name_len = edge - lengths[-1] - 1  # a file whose absolute path is `edge` bytes
                if 1 <= name_len <= 255:
                    _write(dirs[-1], "e" * name_len, b"%d bytes of path\n" % edge)
                    _xattr(dirs[-1], "e" * name_len, "user.edge", b"%d" % edge)
            if PATH_MAX - 255 <= lengths[-1] < PATH_MAX - 1:  # a directory of exactly 4096 bytes, and in it
                sub = "s" * (PATH_MAX - lengths[-1] - 1)
                os.mkdir(sub, dir_fd=dirs[-1])
                fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirs[-1])
                _write(fd, "inside", b"in a directory of 4096 bytes\n")
                os.close(fd)
        deep = dirs[-1]
        _write(deep, "big", os.urandom(700_000))  # read by ContentReader, not the batches
        _xattr(deep, "big", "user.big", b"\x00\xffbinary")
        fd = os.open("sparse", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=deep)
        os.pwrite(fd, b"data between holes", 1 << 20)
        os.ftruncate(fd, 3 << 20)
        os.close(fd)
        os.link("small", "hard", src_dir_fd=deep, dst_dir_fd=dirs[0])  # a short and a deep name
        os.symlink("small", "link", dir_fd=deep)
        os.mkfifo("fifo", dir_fd=deep)
        if IS_ROOT:
            os.mknod("null", 0o666 | stat.S_IFCHR, os.makedev(1, 3), dir_fd=deep)
            _xattr(deep, "small", "trusted.deep", b"y")
        _xattr(deep, "small", "system.posix_acl_access",
               _acl((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                    (0x20, 4, 0xFFFFFFFF)))  # fmt: skip
        _xattr(deep, None, "user.deepest", b"a directory past 8 KiB")
        return [lengths[-1] + 1 + len("sparse")]
    finally:
        for fd in dirs:
            os.close(fd)


@dataclass
class Deep:
    src: Path
    tar: Path
    reference: Snapshot


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Deep:
    src = tmp_path_factory.mktemp("long") / "src"
    if not can_xattr(src.parent):
        message = f"no user xattrs on {src.parent}'s file system"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    deepest = make_deep_tree(src)
    assert max(deepest) > 2 * PATH_MAX
    reference = snapshot(src, acls=True)
    lengths = {len(os.fsencode(src / p)) for p in reference}
    assert {PATH_MAX - 1, PATH_MAX, PATH_MAX + 1, 2 * PATH_MAX} <= lengths, "the edge cases are missing"
    tar = src.parent / "src.tar"
    # The xattr records of GNU tar (binary SCHILY.xattr.*, ACLs included) and its
    # pax mtimes in ns: the archive holds what the directory does.
    proc = subprocess.run(
        [require_tool("tar"), "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
         "-cf", str(tar), "-C", str(src), "."],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_same_snapshot(reference, tar_snapshot(tar, acls=True), names=("directory", "archive"))
    return Deep(src, tar, reference)


def _build(deep: Deep, source: str, fmt: str, out: Path, **options: object) -> pyimg.BuildResult:
    src = deep.src if source == "dir" else deep.tar
    drop = fmt == "squashfs"
    return pyimg.build([str(src)], str(out), format=fmt, owner="preserve", drop_acls=drop, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_directory_and_archive_give_one_image(deep: Deep, tmp_path: Path, fmt: str) -> None:
    digests = {
        (source, jobs): _build(deep, source, fmt, tmp_path / f"{source}-{jobs}.img", jobs=jobs).digest
        for source in ("dir", "tar")
        for jobs in (1, 2)
    }
    assert len(set(digests.values())) == 1, digests


def test_ext4_holds_the_deep_tree(deep: Deep, tmp_path: Path) -> None:
    image = tmp_path / "deep.ext4"
    _build(deep, "dir", "ext4", image)
    (tmp_path / "debugfs").mkdir()
    got = snapshot_image(image, tmp_path / "debugfs", acls=True)  # e2fsck -fn first
    assert_same_snapshot(deep.reference, got, names=("source", "ext4 image"))


def test_squashfs_holds_the_deep_tree(deep: Deep, tmp_path: Path) -> None:
    image = tmp_path / "deep.sqfs"
    result = _build(deep, "dir", "squashfs", image)
    # The deep "small" has the ACL, and "/hard" is another name of it.
    assert len(result.dropped_acls) == 2 and result.dropped_acls[0].endswith("/small")
    assert result.dropped_acls[1] == "/hard"
    # unsquashfs lists every path (it cannot extract them: each is created by its
    # full path, "File name too long").
    listing = subprocess.run(
        [require_tool("unsquashfs"), "-lln", "-d", "", str(image)],
        capture_output=True, text=True, errors="surrogateescape",
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    listed = set()
    for line in listing.stdout.splitlines():
        entry = re.match(
            r"^([-dlcbps])[-rwxsStT]{9} \S+ +\d+(?:, *\d+)? \d{4}-\d\d-\d\d \d\d:\d\d (.*)$", line
        )
        if entry:
            path = entry.group(2).rsplit(" -> ", 1)[0] if entry.group(1) == "l" else entry.group(2)
            listed.add(path.lstrip("/") or ".")
    assert listed == set(deep.reference)
    # sqfs2tar (squashfs-tools-ng) reads it all: the archive it makes holds the source.
    out = tmp_path / "sqfs2tar.tar"
    with out.open("wb") as f:
        proc = subprocess.run(
            [require_tool("sqfs2tar"), "-r", ".", str(image)], stdout=f, stderr=subprocess.PIPE
        )
    assert proc.returncode == 0, proc.stderr
    assert_same_snapshot(
        without_acls(deep.reference), tar_snapshot(out, acls=True), names=("source", "sqfs2tar")
    )


def test_cpio_refuses_what_the_kernel_would_skip(deep: Deep, tmp_path: Path) -> None:
    refused = []
    for src in (deep.src, deep.tar):
        with pytest.raises(LimitError) as err:
            pyimg.build([str(src)], str(tmp_path / "x.cpio"), format="cpio", drop_xattrs=True)
        assert "the kernel unpacks cpio names of at most 4095" in err.value.reason
        refused.append(err.value.path)
    assert not (tmp_path / "x.cpio").exists()
    assert refused[0] == refused[1] and refused[0] is not None and len(refused[0]) > PATH_MAX, refused


def test_a_source_directory_named_by_a_long_path(deep: Deep, tmp_path: Path) -> None:
    """The source's own path may be that long too (its stat and xattrs)."""
    levels = sorted(p for p in deep.reference if os.path.basename(p).startswith("2"))
    sub = next(p for p in levels if len(os.fsencode(deep.src / p)) > PATH_MAX)  # a level past 4096 bytes
    image = tmp_path / "sub.ext4"
    pyimg.build([str(deep.src / sub)], str(image), format="ext4", owner="preserve")
    want = {"." if p == sub else os.path.relpath(p, sub): item for p, item in deep.reference.items()
            if p == sub or p.startswith(sub + "/")}  # fmt: skip
    assert want["."][-1] == {"user.level": b"20"}
    (tmp_path / "debugfs").mkdir()
    # The deep file hard-linked from /hard is in the subtree alone: no group there.
    got = snapshot_image(image, tmp_path / "debugfs", acls=True)
    want = {
        p: tuple(x for x in item if not (isinstance(x, tuple) and x[:1] == ("group",)))
        for p, item in want.items()
    }
    assert_same_snapshot(want, got, names=("source", "ext4 image"))
