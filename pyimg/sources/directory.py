"""A directory source: list each directory in C, lstat everything, follow nothing.

The directory itself becomes the image root (or the directory at `dest`): its own
mode, owner and mtime become that entry's.  Symlinks are stored as their raw target
bytes, whatever they point at (dangling, absolute, looping).  Paths sharing one
(st_dev, st_ino) share one Inode object: that is how hard links reach the tree.
Memory: one Inode per entry, plus one dict entry per multiply linked file.

Why C: on a tree of small files the walk is all per-entry overhead (lstat, access,
listxattr, each a Python call dropping and retaking the GIL, plus a stat_result).
One call of `pyimg_walk_list` (csrc/common/walk.c) lists a whole directory with the
GIL released, sorted by raw name bytes, and hands back columns that are converted
in bulk here.  Policy stays in Python: excludes (an excluded directory is never
entered), hard-link groups, Rules.apply, the tree.  The loop below is the cost that
remains, so the common entry (a file, directory or symlink with nothing special
about it) is handled inline; everything else goes through `_entry_inode`, which
follows the order of checks (and so reports the same first error) of a plain walk.
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
from collections.abc import Callable, Iterator

from .._ffi import check, check_handle, ffi, lib
from ..errors import SourceError
from ..longpath import stat_long
from ..tree import NO_XATTRS, DataRef, Inode, Kind, Tree, kind_from_mode
from . import Rules, read_xattrs

# Kind by the file type bits of st_mode (mode >> 12); None: not a type images hold.
_KINDS = [kind_from_mode(ifmt << 12) for ifmt in range(16)]
IDENT = lib.PYIMG_WALK_IDENT  # bytes of a file's identity in a listing (cache.IDENT_KEY)

# The names blob is NUL-separated; decoding it at once gives what os.fsdecode gives
# name by name only where NUL is one byte never found inside another character.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_BULK_DECODE = codecs.lookup(_FS_ENCODING).name in ("utf-8", "ascii", "iso8859-1")


FileCallback = Callable[[DataRef], None]
"""Told of each regular file with data as it is collected (see add_directory)."""

# One listing's entries being read: (index, (name, fs_name, mode, uid, gid, mtime_ns,
# size, flags, symlink target)).
_Columns = Iterator[tuple[int, tuple[bytes, str, int, int, int, int, int, int, bytes]]]

# Every permission value as one shared int: 0o644 is above the small ints Python
# caches, so `mode & 0o7777` would make a new 28-byte object for every entry.
_PERMS = list(range(0o10000))


def add_directory(
    tree: Tree,
    path: str,
    dest: bytes,
    rules: Rules,
    on_file: FileCallback | None = None,
    identities: bool = False,
) -> None:
    """Add the directory `path` and everything below it at image path `dest`;
    `on_file`, when given, is called with the DataRef of every regular file with
    data as it is collected, in the tree's order (see _walk).  `identities`: keep
    each file's identity as walked in its DataRef (`ident`, for the build cache)."""
    # str paths (undecodable bytes kept by surrogateescape, os.fsdecode) for the walk:
    # DataRef wants str anyway; the C walker gets them back as bytes (os.fsencode).
    top = os.fsdecode(path)
    try:
        st = stat_long(top)  # the source itself may be a symlink to a directory: follow that one
    except FileNotFoundError as exc:
        raise SourceError("no such file or directory", path) from exc
    except OSError as exc:
        raise SourceError(f"cannot stat: {exc.strerror}", path) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError("not a directory", path)
    if rules.excluded_within(dest):
        return
    root = Inode(Kind.DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    root.xattrs = read_xattrs(top, follow_symlinks=True)
    tree.add(dest, rules.apply(root, recorded_owner=False), parent_template=rules.parent_template)
    _walk(tree, top, dest, rules, on_file, identities)


def _walk(
    tree: Tree, top: str, dest: bytes, rules: Rules, on_file: FileCallback | None, identities: bool
) -> None:
    """Everything below `top` in the tree's own order: depth first, each directory's
    entries by name, a directory's subtree right after its own entry (a stack of
    listings being read).  Regular files therefore come in the order the writers
    store them, and `on_file` sees each new one (with data) in that order."""
    lister = _list_in_c(identities)
    links: dict[tuple[int, int], Inode] = {}
    # Locals for the loop below: it runs once per entry.
    entries = tree.entries
    add = tree.add
    template = rules.parent_template
    apply = rules.apply
    excluded = rules.excluded if rules.has_excludes else None
    kinds = _KINDS
    no_xattrs = NO_XATTRS  # shared by every inode without xattrs, never edited
    FILE, DIR, SYMLINK = Kind.FILE, Kind.DIR, Kind.SYMLINK
    perms = _PERMS
    # A file's DataRef names it as base + its image path minus `dest`: with the
    # source as the image root, that is the tree's own bytes object (see DataRef).
    base = os.fsencode(top if top.endswith("/") else top + "/")
    skip = len(dest) + 1 if dest else 0
    reading: list[tuple[_Columns, _Listing, str, bytes]] = []  # the listings being read

    def enter(fs_dir: str, image_dir: bytes) -> None:
        listing = lister(fs_dir)
        if listing is None:
            return  # empty
        # Same spelling as os.scandir's entry.path: "dir/name", "dir/" kept as it is.
        fs_prefix = fs_dir if fs_dir.endswith("/") else fs_dir + "/"
        prefix = image_dir + b"/" if image_dir else b""
        columns = zip(
            listing.names,
            listing.fs_names,
            listing.mode,
            listing.uid,
            listing.gid,
            listing.mtime_ns,
            listing.size,
            listing.flags,
            listing.targets,
            strict=True,
        )
        reading.append((enumerate(columns), listing, fs_prefix, prefix))

    enter(top, dest)
    while reading:
        columns, listing, fs_prefix, prefix = reading[-1]
        for i, (name, fs_name, mode, uid, gid, mtime_ns, size, flags, target) in columns:
            image_path = prefix + name
            if excluded is not None and excluded(image_path):
                continue  # an excluded directory is never entered: its subtree goes too
            kind = kinds[mode >> 12]
            if flags or (kind is not FILE and kind is not DIR and kind is not SYMLINK):
                inode = _entry_inode(listing, i, fs_prefix + fs_name, links, rules, on_file)
                kind = inode.kind
            elif kind is FILE:
                perm = perms[mode & 0o7777]
                if size:
                    # (a slice of b"", the shared empty bytes, without identities)
                    ident = listing.idents[IDENT * i : IDENT * i + IDENT]
                    rel = image_path[skip:] if skip else image_path
                    data = DataRef(base, rel, 0, size, size, mtime_ns, ident)
                    inode = Inode(FILE, perm, uid, gid, mtime_ns, size, b"", (0, 0), no_xattrs, data)
                    if on_file is not None:
                        on_file(data)
                else:
                    inode = Inode(FILE, perm, uid, gid, mtime_ns)
                apply(inode, recorded_owner=False)
            elif kind is DIR:
                inode = apply(Inode(DIR, perms[mode & 0o7777], uid, gid, mtime_ns), recorded_owner=False)
            else:
                inode = Inode(SYMLINK, perms[mode & 0o7777], uid, gid, mtime_ns, len(target), target)
                apply(inode, recorded_owner=False)
            # What tree.add does, minus its general cases: the parent is the directory
            # added just before this listing, so only an existing entry (from an
            # earlier source) needs tree.add's rules for replacing.
            if image_path in entries:
                add(image_path, inode, parent_template=template)
            else:
                entries[image_path] = inode
            if kind is DIR:
                enter(fs_prefix + fs_name, image_path)
                break  # its subtree first; this listing goes on after it
        else:
            reading.pop()


class _Listing:
    """One directory's entries as columns, sorted by raw name bytes so that nothing
    (not even which name of a hard-link group is read) depends on readdir order.
    Column i of each describes entry i, as pyimg_walk_listing (csrc/common/walk.h)
    says; the rare columns are copied only for listings with an entry that needs
    them."""

    __slots__ = ("dev", "err", "flags", "fs_names", "gid", "idents", "ino", "mode", "mtime_ns",
                 "mtime_nsec", "mtime_sec", "names", "rdev", "size", "targets", "uid")  # fmt: skip

    names: list[bytes]
    fs_names: list[str]  # os.fsdecode of each name
    targets: list[bytes]  # symlink targets (b"" for the others)
    mode: list[int]
    uid: list[int]
    gid: list[int]
    mtime_ns: list[int]
    size: list[int]
    flags: list[int]  # PYIMG_WALK_*
    idents: bytes  # IDENT bytes per entry (csrc/common/walk.h), or b"" when not asked for
    # The rest, read only by _entry_inode: lists of ints, or None when no entry of
    # the listing needs them (no flags, only files, directories and symlinks).
    err: list[int] | None
    dev: list[int] | None
    ino: list[int] | None
    rdev: list[int] | None
    mtime_sec: list[int] | None
    mtime_nsec: list[int] | None


def _decode_names(blob: bytes, names: list[bytes]) -> list[str]:
    if _BULK_DECODE:
        return blob.decode(_FS_ENCODING, _FS_ERRORS).split("\0")
    return [os.fsdecode(name) for name in names]


# Types whose entries the walk's fast path makes without the rare columns.
_COMMON_TYPES = {stat.S_IFREG >> 12, stat.S_IFDIR >> 12, stat.S_IFLNK >> 12}


def _list_in_c(identities: bool = False) -> Callable[[str], _Listing | None]:
    """A lister of directories through one C walker, whose buffers it reuses; each
    listing owns the columns it needs (lists), so several can be read at once.
    `identities`: also the files' identities (_Listing.idents)."""
    walker = ffi.gc(check_handle(lib.pyimg_walk_new(), "directory walker"), lib.pyimg_walk_free)
    lib.pyimg_walk_want_identities(walker, identities)
    out = ffi.new("pyimg_walk_listing *")
    unpack = ffi.unpack

    def list_one(fs_dir: str) -> _Listing | None:
        n = lib.pyimg_walk_list(walker, os.fsencode(fs_dir), out)
        if n == -lib.PYIMG_ESOURCE:  # the errno says more than the message
            raise SourceError(f"cannot read directory: {os.strerror(out.dir_errno)}", fs_dir)
        check(n, lambda: lib.pyimg_walk_error(walker), fs_dir)
        if n == 0:
            return None
        listing = _Listing()
        blob = unpack(out.names, out.names_len - 1)  # without the last NUL
        listing.names = blob.split(b"\0")
        listing.fs_names = _decode_names(blob, listing.names)
        listing.targets = unpack(out.targets, out.targets_len - 1).split(b"\0")
        listing.mode = unpack(out.mode, n)
        listing.uid = unpack(out.uid, n)
        listing.gid = unpack(out.gid, n)
        listing.mtime_ns = unpack(out.mtime_ns, n)
        listing.size = unpack(out.size, n)
        listing.flags = unpack(out.flags, n)
        listing.idents = ffi.buffer(out.ident, IDENT * n)[:] if identities else b""
        if any(listing.flags) or not {mode >> 12 for mode in listing.mode} <= _COMMON_TYPES:
            # Some entry needs the rare columns (_entry_inode): copied, because the
            # walker's buffers are reused by the next listing, which may come (a
            # subdirectory) before this one is read to its end.
            listing.err, listing.dev, listing.ino = unpack(out.err, n), unpack(out.dev, n), unpack(out.ino, n)
            listing.rdev = unpack(out.rdev, n)
            listing.mtime_sec, listing.mtime_nsec = unpack(out.mtime_sec, n), unpack(out.mtime_nsec, n)
        else:
            listing.err = listing.dev = listing.ino = listing.rdev = None
            listing.mtime_sec = listing.mtime_nsec = None
        return listing

    return list_one


def _entry_inode(
    listing: _Listing,
    i: int,
    path: str,
    links: dict[tuple[int, int], Inode],
    rules: Rules,
    on_file: FileCallback | None,
) -> Inode:
    """Entry `i` of the listing, in full: failures, hard links, xattrs, devices and
    times beyond an int64 of ns.  The order of checks decides which error is
    reported: stat, the file type, a known hard link (whose other name was already
    checked), then what failed after the stat."""
    # Copied by the lister for every listing with such an entry:
    assert listing.err is not None and listing.dev is not None and listing.ino is not None
    assert listing.rdev is not None and listing.mtime_sec is not None and listing.mtime_nsec is not None
    flags = listing.flags[i]
    failed = flags & lib.PYIMG_WALK_FAILED
    if failed == lib.PYIMG_WALK_STAT:
        raise SourceError(f"cannot stat: {os.strerror(listing.err[i])}", path)
    mode = listing.mode[i]
    kind = kind_from_mode(mode)
    if kind is None:
        raise SourceError(f"unsupported file type {stat.S_IFMT(mode):o}", path)
    key = (listing.dev[i], listing.ino[i])
    linked = flags & lib.PYIMG_WALK_LINKED
    if linked:
        known = links.get(key)
        if known is not None:
            return known  # another name of a file already collected
    if failed == lib.PYIMG_WALK_ACCESS:
        # Checked when collected, not when the data is read much later, so the error
        # comes before any work and names the file.  (As root this always passes.)
        raise SourceError("permission denied: cannot read the file", path)
    if failed == lib.PYIMG_WALK_READLINK:
        raise SourceError(f"cannot read symlink: {os.strerror(listing.err[i])}", path)
    if failed == lib.PYIMG_WALK_XATTRS:
        raise SourceError(f"cannot list xattrs: {os.strerror(listing.err[i])}", path)
    if flags & lib.PYIMG_WALK_WIDE_TIME:
        mtime_ns = listing.mtime_sec[i] * 1_000_000_000 + listing.mtime_nsec[i]
    else:
        mtime_ns = listing.mtime_ns[i]
    inode = Inode(kind, mode & 0o7777, listing.uid[i], listing.gid[i], mtime_ns)
    if kind is Kind.FILE:
        size = listing.size[i]
        inode.size = size
        if size:
            inode.data = DataRef.at(path, 0, size, (size, mtime_ns))
            inode.data.ident = listing.idents[IDENT * i : IDENT * i + IDENT]
            if on_file is not None:
                on_file(inode.data)
    elif kind is Kind.SYMLINK:
        inode.target = listing.targets[i]
        inode.size = len(inode.target)
    elif kind in (Kind.CHAR, Kind.BLOCK):
        rdev = listing.rdev[i]
        inode.rdev = (os.major(rdev), os.minor(rdev))
    if flags & lib.PYIMG_WALK_HAS_XATTRS:
        inode.xattrs = read_xattrs(path)
    rules.apply(inode, recorded_owner=False)
    if linked:
        links[key] = inode
    return inode
