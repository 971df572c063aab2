"""A directory source: walk it with os.scandir, lstat everything, follow nothing.

The directory itself becomes the image root (or the directory at `dest`): its own
mode, owner and mtime become that entry's.  Symlinks are stored as their raw target
bytes, whatever they point at (dangling, absolute, looping).  Paths sharing one
(st_dev, st_ino) share one Inode object: that is how hard links reach the tree.
Memory: one Inode per entry, plus one dict entry per multiply linked file.
"""

from __future__ import annotations

import os
import stat

from ..errors import SourceError
from ..tree import DataRef, Inode, Kind, Tree, kind_from_mode
from . import Rules, join_image_path, read_xattrs


def add_directory(tree: Tree, path: str, dest: bytes, rules: Rules) -> None:
    """Add the directory `path` and everything below it at image path `dest`."""
    # str paths (undecodable bytes kept by surrogateescape, os.fsdecode) for the walk:
    # DataRef wants str anyway; image names are converted back with os.fsencode.
    top = os.fsdecode(path)
    try:
        st = os.stat(top)  # the source itself may be a symlink to a directory: follow that one
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

    links: dict[tuple[int, int], Inode] = {}
    pending = [(top, dest)]
    while pending:
        fs_dir, image_dir = pending.pop()
        for entry in _list(fs_dir):
            image_path = join_image_path(image_dir, os.fsencode(entry.name))
            if rules.excluded(image_path):
                continue  # an excluded directory is never entered: its subtree goes too
            inode = _entry_inode(entry, links, rules)
            tree.add(image_path, inode, parent_template=rules.parent_template)
            if inode.kind is Kind.DIR:
                pending.append((entry.path, image_path))


def _list(fs_dir: str) -> list[os.DirEntry[str]]:
    """The entries of one directory, sorted by name so that nothing (not even which
    name of a hard-link group is read) depends on readdir order."""
    try:
        with os.scandir(fs_dir) as it:
            entries = list(it)
    except OSError as exc:
        raise SourceError(f"cannot read directory: {exc.strerror}", fs_dir) from exc
    entries.sort(key=lambda e: e.name)
    return entries


def _entry_inode(entry: os.DirEntry[str], links: dict[tuple[int, int], Inode], rules: Rules) -> Inode:
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError as exc:
        raise SourceError(f"cannot stat: {exc.strerror}", entry.path) from exc
    kind = kind_from_mode(st.st_mode)
    if kind is None:
        raise SourceError(f"unsupported file type {stat.S_IFMT(st.st_mode):o}", entry.path)
    key = (st.st_dev, st.st_ino)
    if kind is not Kind.DIR and st.st_nlink > 1:
        known = links.get(key)
        if known is not None:
            return known  # another name of a file already collected
    inode = Inode(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    if kind is Kind.FILE:
        _check_readable(entry.path)
        inode.size = st.st_size
        if st.st_size:
            inode.data = DataRef(entry.path, 0, st.st_size, (st.st_size, st.st_mtime_ns))
    elif kind is Kind.SYMLINK:
        try:
            inode.target = os.fsencode(os.readlink(entry.path))
        except OSError as exc:
            raise SourceError(f"cannot read symlink: {exc.strerror}", entry.path) from exc
        inode.size = len(inode.target)
    elif kind in (Kind.CHAR, Kind.BLOCK):
        inode.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    inode.xattrs = read_xattrs(entry.path)
    rules.apply(inode, recorded_owner=False)
    if kind is not Kind.DIR and st.st_nlink > 1:
        links[key] = inode
    return inode


def _check_readable(path: str) -> None:
    # Checked now, not when the data is read much later, so the error comes before
    # any work and names the file.  (As root this always passes.)
    if not os.access(path, os.R_OK):
        raise SourceError("permission denied: cannot read the file", path)
