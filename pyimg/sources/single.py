"""A single-file source: one regular file placed at a full image path (`dest`).

The SourceSpec's mode/uid/gid, when given, override what the file has, after the
owner policy and id maps (an explicit value for one file beats a general rule).
"""

from __future__ import annotations

import os
import stat
import struct

from .._ffi import lib
from ..cache import IDENT_KEY
from ..errors import SourceError, SpecError
from ..options import SourceSpec
from ..tree import DataRef, Inode, Kind, Tree
from . import Rules, read_xattrs


def add_file(tree: Tree, spec: SourceSpec, dest: bytes, rules: Rules, identities: bool = False) -> None:
    """`identities`: keep the file's identity in its DataRef (`ident`, for the build cache)."""
    if not dest:
        raise SpecError(
            'a single-file source needs a dest path in the image (e.g. dest = "/etc/hosts")', spec.path
        )
    raw = spec.path
    try:
        st = os.stat(raw)  # the source is named explicitly: a symlink to it is followed
    except FileNotFoundError as exc:
        raise SourceError("no such file or directory", spec.path) from exc
    except OSError as exc:
        raise SourceError(f"cannot stat: {exc.strerror}", spec.path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceError("not a regular file", spec.path)
    if not os.access(raw, os.R_OK):
        raise SourceError("permission denied: cannot read the file", spec.path)
    if rules.excluded_within(dest):
        return
    inode = Inode(Kind.FILE, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, size=st.st_size)
    if st.st_size:
        inode.data = DataRef.at(spec.path, 0, st.st_size, (st.st_size, st.st_mtime_ns))
        if identities:
            inode.data.ident = _identity(raw, st)
    inode.xattrs = read_xattrs(raw, follow_symlinks=True)
    rules.apply(inode, recorded_owner=False)
    if spec.mode is not None:
        inode.mode = spec.mode & 0o7777
    if spec.uid is not None:
        inode.uid = spec.uid
    if spec.gid is not None:
        inode.gid = spec.gid
    tree.add(dest, inode, parent_template=rules.parent_template)


def _identity(path: str, st: os.stat_result) -> bytes:
    """The file's identity for whole-image reuse (DataRef.ident), as the walk takes
    it: b"" on a file system whose attributes may be stale, or for a time beyond an
    int64 of ns."""
    if not lib.pyimg_local_fs(os.fsencode(path)):
        return b""
    try:
        return IDENT_KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except struct.error:
        return b""
