"""The C directory walker (csrc/common/walk.c) and the directory source built on it,
on real files: odd byte names and their order, every file type, hard links, times
beyond an int64 of ns, and real failures (made by dropping root's capabilities to
override file permissions, so that chmod means what it says)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyimg._ffi import ffi, lib
from pyimg.cache import IDENT_KEY
from pyimg.collect import collect
from pyimg.options import BuildOptions, Policy, SourceSpec
from pyimg.sources import _NO_XATTR_SUPPORT, read_xattrs
from pyimg.tree import NO_XATTRS, DataRef, Inode, Kind, kind_from_mode

from ..oracles import IN_CI, IS_ROOT, can_xattr, collect_unprivileged, make_socket

ODD_NAMES = [
    b"a",
    b"ab",
    b"a\x01",
    b"a b",
    b"B",
    b"\x80",  # not UTF-8: kept by surrogateescape
    b"\xff\xfe",
    "一".encode(),  # U+4E00: sorts *after* b"\x80" by bytes, before its surrogate as str
    "\ud7ff".encode("utf-8", "surrogatepass"),
    b"-",
    b".hidden",
    b"..x",
    b"z" * 255,
]


def listing(path: bytes) -> tuple[int, Any]:
    walker = ffi.gc(lib.pyimg_walk_new(), lib.pyimg_walk_free)
    lib.pyimg_walk_want_identities(walker, 1)
    out = ffi.new("pyimg_walk_listing *")
    n = lib.pyimg_walk_list(walker, path, out)
    return n, (walker, out)  # the walker owns what out points at: keep it alive


def names_of(out: Any) -> list[bytes]:
    return list(ffi.unpack(out.names, out.names_len - 1).split(b"\0")) if out.count else []


def run(path: Path, **policy: Any) -> dict[bytes, Inode]:
    options = BuildOptions(
        sources=(SourceSpec(str(path)),), output="/nonexistent/out.img", policy=Policy(**policy)
    )
    with collect(options) as c:
        return c.tree.entries


def test_names_sorted_by_raw_bytes(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "src")
    os.mkdir(root)
    for i, name in enumerate(reversed(ODD_NAMES)):
        with open(os.path.join(root, name), "wb") as f:
            f.write(bytes([i]))
    n, (_, out) = listing(root)
    assert n == len(ODD_NAMES)
    assert names_of(out) == sorted(ODD_NAMES)
    entries = run(tmp_path / "src")
    assert sorted(p for p in entries if p) == sorted(ODD_NAMES)
    for name in ODD_NAMES:
        data = entries[name].data
        assert data is not None and os.fsencode(data.path) == os.path.join(root, name)


def test_empty_directory_and_errors_of_the_directory_itself(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    n, (_, out) = listing(os.fsencode(tmp_path / "empty"))
    assert n == 0 and out.count == 0
    n, (walker, out) = listing(os.fsencode(tmp_path / "nope"))
    assert n == -lib.PYIMG_ESOURCE and out.dir_errno == errno.ENOENT
    assert ffi.string(lib.pyimg_walk_error(walker))
    n, (_, out) = listing(os.fsencode(tmp_path / "file"))
    assert n == -lib.PYIMG_ESOURCE and out.dir_errno == errno.ENOTDIR


def test_one_walker_lists_many_directories(tmp_path: Path) -> None:
    """Buffers are reused and grown: a big directory after a small one and back."""
    walker = ffi.gc(lib.pyimg_walk_new(), lib.pyimg_walk_free)
    out = ffi.new("pyimg_walk_listing *")
    for count in (1, 3000, 2, 700):
        d = tmp_path / f"d{count}"
        d.mkdir()
        for i in range(count):
            (d / f"{i:05}").write_bytes(b"")
        assert lib.pyimg_walk_list(walker, os.fsencode(d), out) == count
        assert names_of(out) == [f"{i:05}".encode() for i in range(count)]
        assert ffi.unpack(out.flags, count) == [0] * count


def _every_type(root: Path) -> None:
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/sub/deep").write_bytes(b"deep")
    (root / "empty").write_bytes(b"")
    (root / "file").write_bytes(b"content")
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec", 0o4755)
    os.symlink("/does/not/exist", root / "dangling")
    os.symlink("x" * 4000, root / "long-target")  # longer than the first readlink buffer
    os.symlink("loop", root / "loop")
    os.symlink("dir", root / "to-dir")  # never followed
    os.mkfifo(root / "fifo")
    make_socket(root / "sock")
    if IS_ROOT:
        os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop0", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    # Hard links: across directories (which name is read first follows the walk).
    os.link(root / "file", root / "dir/sub/file-link")
    os.link(root / "file", root / "zz-link")
    (root / "old").write_bytes(b"old")
    os.utime(root / "old", ns=(0, -123_456_789_123))  # before 1970, fractional
    os.chmod(root / "dir", 0o700)


def _reference(top: str, dest: bytes) -> dict[bytes, tuple[Any, ...]]:
    """What the directory source collects, for comparison: os.scandir, lstat,
    os.readlink, listxattr, in the tree's order (depth first, entries by name, a
    directory's subtree right after it), which decides the path a hard-link group
    is read from: its first in that order.  The dict's order is that order too."""
    out: dict[bytes, tuple[Any, ...]] = {}
    links: dict[tuple[int, int], str] = {}

    def walk(fs_dir: str, image_dir: bytes) -> None:
        with os.scandir(fs_dir) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            name = os.fsencode(entry.name)
            image_path = image_dir + b"/" + name if image_dir else name
            st = entry.stat(follow_symlinks=False)
            kind = kind_from_mode(st.st_mode)
            key = (st.st_dev, st.st_ino)
            data_path = entry.path
            if kind is not Kind.DIR and st.st_nlink > 1:
                data_path = links.setdefault(key, entry.path)
            target = os.fsencode(os.readlink(entry.path)) if kind is Kind.SYMLINK else b""
            size = st.st_size if kind is Kind.FILE else len(target)
            has_data = kind is Kind.FILE and size > 0
            data = _data_key(DataRef.at(data_path, 0, size, (size, st.st_mtime_ns)) if has_data else None)
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)
            out[image_path] = (kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size, target, rdev, data)
            out[image_path] += (read_xattrs(entry.path),)
            if kind is Kind.DIR:
                walk(entry.path, image_path)

    walk(top, dest)
    return out


def _data_key(ref: DataRef | None) -> tuple[Any, ...] | None:
    """What a DataRef says, whichever way its path is split (base + rel)."""
    return None if ref is None else (ref.path, ref.offset, ref.size, ref.stamp)


@pytest.mark.parametrize("spelling", ["plain", "trailing-slash"])
def test_every_file_type_as_a_plain_walk_saw_it(tmp_path: Path, spelling: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    _every_type(root)
    if can_xattr(root):
        os.setxattr(root / "file", "user.b", b"2")
        os.setxattr(root / "file", "user.a", b"\x00one")
        os.setxattr(root / "dir", "user.d", b"")
        if IS_ROOT:  # user.* is not allowed on symlinks; trusted.* needs root
            os.setxattr(root / "dangling", "trusted.t", b"t", follow_symlinks=False)
    top = str(root) + ("/" if spelling == "trailing-slash" else "")
    entries = run(Path(top), owner="preserve")
    want = _reference(top, b"")
    assert list(entries)[1:] == list(want)  # the walk's order is the tree's order
    for path, (kind, mode, mtime_ns, size, target, rdev, data, xattrs) in want.items():
        inode = entries[path]
        data_key = _data_key(inode.data)
        got = (inode.kind, inode.mode, inode.mtime_ns, inode.size, inode.target, inode.rdev, data_key)
        assert got == (kind, mode, mtime_ns, size, target, rdev, data), path
        assert inode.xattrs == xattrs and list(inode.xattrs) == list(xattrs), path
    assert entries[b"file"] is entries[b"zz-link"] is entries[b"dir/sub/file-link"]
    assert entries[b"long-target"].target == b"x" * 4000
    assert all(entries[p].xattrs is NO_XATTRS for p in (b"empty", b"exec", b"fifo", b"loop", b"dir/sub"))
    assert entries[b"old"].mtime_ns == -123_456_789_123
    if IS_ROOT:
        assert entries[b"null"].kind is Kind.CHAR and entries[b"loop0"].kind is Kind.BLOCK


def test_mtime_beyond_int64_ns(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    far = root / "far"
    far.write_bytes(b"x")
    wide = 10**10 * 10**9 + 5  # year 2286: st_mtime_ns does not fit an int64
    try:
        os.utime(far, ns=(wide, wide))
        kept = os.stat(far).st_mtime_ns == wide
    except OSError:
        kept = False
    if not kept:
        # ext4 (256-byte inodes) and tmpfs keep such times: CI's file systems must.
        if IN_CI:
            pytest.fail("CI's file system must keep mtimes past 2262")
        pytest.skip("the file system does not keep such times")
    n, (_, out) = listing(os.fsencode(root))
    assert n == 1 and out.flags[0] & lib.PYIMG_WALK_WIDE_TIME
    assert ffi.buffer(out.ident, IDENT_KEY.size)[:] == bytes(IDENT_KEY.size)  # no identity: no reuse
    inode = run(root, owner="preserve")[b"far"]
    assert inode.mtime_ns == wide and inode.data is not None and inode.data.stamp == (1, wide)
    assert run(root, epoch=1000)[b"far"].mtime_ns == 1000 * 10**9  # still clamped


def test_excluded_entries_are_never_entered(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "keep").mkdir(parents=True)
    (root / "skip/deeper").mkdir(parents=True)
    (root / "keep/a.o").write_bytes(b"")
    (root / "keep/a.c").write_bytes(b"")
    entries = run(root, excludes=("skip", "*.o"))
    assert sorted(entries) == [b"", b"keep", b"keep/a.c"]


# ----------------------------------------------------------------------------- real failures


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "a/fine").write_bytes(b"fine")
    yield root
    for path in (root / "a", root / "a/secret", root / "a/locked"):
        if path.exists() or path.is_symlink():
            path.chmod(0o700)  # let pytest clean up


def test_real_unreadable_file(locked: Path) -> None:
    (locked / "a/secret").write_bytes(b"x")
    (locked / "a/secret").chmod(0)
    assert collect_unprivileged(locked) == {
        "path": str(locked / "a/secret"),
        "reason": "permission denied: cannot read the file",
    }
    assert collect_unprivileged(locked, "secret") == {"entries": 3}  # excluded: never checked


def test_real_unreadable_directory(locked: Path) -> None:
    (locked / "a/locked").mkdir()
    (locked / "a/locked").chmod(0)
    assert collect_unprivileged(locked) == {
        "path": str(locked / "a/locked"),
        "reason": "cannot read directory: Permission denied",
    }
    assert collect_unprivileged(locked, "/a/locked") == {"entries": 3}


def test_real_stat_failure(locked: Path) -> None:
    (locked / "a").chmod(0o600)  # names can be listed, not looked up
    assert collect_unprivileged(locked) == {
        "path": str(locked / "a/fine"),
        "reason": "cannot stat: Permission denied",
    }


def test_c_listing_as_os_sees_it(tmp_path: Path) -> None:
    """Every column of the C listing, entry by entry, against os: lstat, readlink,
    listxattr (no failures here: those are the tests above)."""
    from pyimg.sources.directory import _list_in_c

    root = tmp_path / "src"
    root.mkdir()
    _every_type(root)
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(root), name), "wb"):
            pass
    if can_xattr(root):
        os.setxattr(root / "file", "user.x", b"1")
        os.setxattr(root / "dir", "user.y", b"")
    list_in_c, with_idents = _list_in_c(), _list_in_c(identities=True)
    for directory in (root, root / "dir", root / "dir/sub"):
        c, idents = list_in_c(str(directory)), with_idents(str(directory))
        assert c is not None and idents is not None
        assert c.idents == b""  # only asked for with a build cache (the C column is then NULL)
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        assert c.names == [os.fsencode(e.name) for e in entries]
        assert c.fs_names == [e.name for e in entries]
        types = {stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) for e in entries}
        rare = any(c.flags) or not types <= {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK}
        for i, entry in enumerate(entries):
            st = entry.stat(follow_symlinks=False)
            target = os.fsencode(os.readlink(entry.path)) if stat.S_ISLNK(st.st_mode) else b""
            flags = lib.PYIMG_WALK_HAS_XATTRS if _xattr_names(entry.path) else 0
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                flags |= lib.PYIMG_WALK_LINKED
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            want = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, flags, target)
            got = (c.mode[i], c.uid[i], c.gid[i], c.mtime_ns[i], c.size[i], c.flags[i], c.targets[i])
            assert got == want, entry.name
            # A regular file's identity, as the build cache keys it; zeros for the rest.
            ident = IDENT_KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            want_ident = ident if stat.S_ISREG(st.st_mode) else bytes(IDENT_KEY.size)
            assert idents.idents[IDENT_KEY.size * i : IDENT_KEY.size * (i + 1)] == want_ident, entry.name
            # The rare columns come with every listing that has an entry needing them.
            assert (c.err is not None) == rare, directory
            if c.err is not None and c.dev is not None and c.ino is not None and c.rdev is not None:
                rare_got = (c.err[i], c.dev[i], c.ino[i], c.rdev[i])
                assert rare_got == (0, st.st_dev, st.st_ino, rdev), entry.name
        assert len(c.targets) == len(entries)


def _xattr_names(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_XATTR_SUPPORT:
            return []
        raise


def test_identities_only_when_asked(tmp_path: Path) -> None:
    """A walker fills the ident column only for a build with a cache: else NULL."""
    (tmp_path / "f").write_bytes(b"x")
    walker = ffi.gc(lib.pyimg_walk_new(), lib.pyimg_walk_free)
    out = ffi.new("pyimg_walk_listing *")
    assert lib.pyimg_walk_list(walker, os.fsencode(tmp_path), out) == 1 and out.ident == ffi.NULL
    lib.pyimg_walk_want_identities(walker, 1)
    assert lib.pyimg_walk_list(walker, os.fsencode(tmp_path), out) == 1 and out.ident != ffi.NULL


def test_identities_only_on_file_systems_whose_attributes_are_current() -> None:
    """The walk's identities serve whole-image reuse: not on a file system that may
    answer stat from a cache another host's write has not reached (NFS, CIFS, FUSE,
    9p), where a change could hide from the key."""
    for local in (0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x794C7630):
        assert lib.pyimg_local_fs_type(local) == 1
    for remote in (0x6969, 0xFF534D42, 0x65735546, 0x01021997, 0xFE534D42, 0):
        assert lib.pyimg_local_fs_type(remote) == 0
    assert lib.pyimg_local_fs(b"/proc") == 0 and lib.pyimg_local_fs(b"/nonexistent") == 0
