"""Paths of PATH_MAX (4096) bytes or more, opened a piece at a time: pyimg/longpath.py
and its C twin (csrc/common/longpath.c, through the readers and the walker that use
it), at the boundary and past it, and the one path no piece can open (a component of
4096 bytes: ENAMETOOLONG, as the kernel says for any call)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyimg import longpath
from pyimg._ffi import ffi, lib
from pyimg.content import ContentReader, read_batch
from pyimg.errors import SourceError
from pyimg.sources import read_xattrs
from pyimg.tree import DataRef

PATH_MAX = longpath.PATH_MAX


def _deep_dir(root: Path, length: int) -> bytes:
    """A directory whose absolute path is `length` bytes (made through descriptors)."""
    path = os.fsencode(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while len(path) < length:
            name = b"d" * min(200, length - len(path) - 1)
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
            path += b"/" + name
        assert len(path) == length
        return path
    finally:
        os.close(fd)


def test_is_long_counts_bytes() -> None:
    assert not longpath.is_long(b"x" * (PATH_MAX - 1)) and longpath.is_long(b"x" * PATH_MAX)
    assert longpath.is_long("é" * (PATH_MAX // 2)) and not longpath.is_long("é" * (PATH_MAX // 2 - 1))
    assert longpath.is_long("\udcff" * PATH_MAX)  # undecodable bytes, one each (surrogateescape)


@pytest.mark.parametrize("length", [PATH_MAX - 2, PATH_MAX - 1, PATH_MAX, PATH_MAX + 1, 3 * PATH_MAX + 7])
def test_files_at_any_depth_are_read_in_python_and_c(tmp_path: Path, length: int) -> None:
    directory = _deep_dir(tmp_path, length - 2)
    fd = longpath.open_directory(directory)
    try:
        with open(os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep content\n")
    finally:
        os.close(fd)
    path = directory + b"/f"
    assert len(path) == length
    st = longpath.stat_long(path)
    ref = DataRef.at(path, 0, st.st_size, (st.st_size, st.st_mtime_ns))
    with ContentReader(ref) as reader:
        assert reader.read(0, st.st_size) == b"deep content\n"
    data, _ = read_batch([ref, ref])  # the C batch reader
    assert bytes(data) == b"deep content\n" * 2


def test_a_component_of_path_max_bytes_is_refused(tmp_path: Path) -> None:
    impossible = os.fsencode(tmp_path) + b"/" + b"x" * PATH_MAX + b"/f"
    with pytest.raises(OSError) as err:
        longpath.open_long(impossible, os.O_RDONLY)
    assert err.value.errno == errno.ENAMETOOLONG
    ref = DataRef.at(impossible, 0, 1, (1, 0))
    with pytest.raises(SourceError, match="File name too long"):
        read_batch([ref])
    with pytest.raises(SourceError, match="File name too long"):
        ContentReader(ref)
    walker = ffi.gc(lib.pyimg_walk_new(), lib.pyimg_walk_free)
    out = ffi.new("pyimg_walk_listing *")
    assert lib.pyimg_walk_list(walker, impossible, out) == -lib.PYIMG_ESOURCE
    assert out.dir_errno == errno.ENAMETOOLONG


def test_the_walker_lists_a_long_directory_and_its_xattrs(tmp_path: Path) -> None:
    directory = _deep_dir(tmp_path, 2 * PATH_MAX + 100)
    fd = longpath.open_directory(directory)
    try:
        os.close(os.open(b"plain", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.close(os.open(b"tagged", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.setxattr(longpath.via_fd(fd, b"tagged"), "user.x", b"1", follow_symlinks=False)
        os.symlink(b"tagged", b"link", dir_fd=fd)
    finally:
        os.close(fd)
    walker = ffi.gc(lib.pyimg_walk_new(), lib.pyimg_walk_free)
    out = ffi.new("pyimg_walk_listing *")
    assert lib.pyimg_walk_list(walker, directory, out) == 3
    names = ffi.unpack(out.names, out.names_len - 1).split(b"\0")
    flags = dict(zip(names, ffi.unpack(out.flags, 3), strict=True))
    assert flags == {b"link": 0, b"plain": 0, b"tagged": lib.PYIMG_WALK_HAS_XATTRS}  # the link not followed
    assert read_xattrs(directory + b"/tagged") == {b"user.x": b"1"}
    assert read_xattrs(directory + b"/link") == {}  # lgetxattr: the link itself
    assert read_xattrs(directory + b"/link", follow_symlinks=True) == {b"user.x": b"1"}
