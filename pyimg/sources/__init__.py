"""Sources: each turns one SourceSpec into entries of the tree.

This package holds what every source shares: `Rules`, the build policy compiled
once (ownership, id maps, the epoch clamp, excludes), the xattr filter, and
`Spool`, the one temporary file that holds the data of compressed tar members.

Notes for format writers:
- Names may hold any byte except "/" and NUL.  Names longer than 255 bytes are
  *not* refused here: each format knows its own limit and raises LimitError.
- Every xattr a source carries is kept, system.* (POSIX ACLs) included: each
  format refuses by name what it cannot hold (pyimg/xattrs.py), and the policy's
  drop_acls leaves POSIX ACLs out, reported.  Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
from collections.abc import Mapping
from typing import Protocol

from .. import output
from ..errors import OutputError, SourceError, SpecError
from ..longpath import in_directory, is_long, via_fd
from ..options import Policy
from ..tree import NO_XATTRS, DataRef, Inode, new_dir
from ..values import is_decimal
from ..xattrs import acl_names, map_acl_ids

# errnos meaning "this file system has no xattrs": treated as none, not as an error.
_NO_XATTR_SUPPORT = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def read_xattrs(path: str | bytes, *, follow_symlinks: bool = False) -> Mapping[bytes, bytes]:
    """Every xattr of `path`, sorted by name (so the dict order never depends on the
    file system's listing order).  A path of PATH_MAX bytes or more is read within
    its directory (pyimg/longpath.py)."""
    if is_long(path):
        try:
            return in_directory(path, lambda fd, name: _read_xattrs(via_fd(fd, name), follow_symlinks, path))
        except OSError as exc:  # the directory could not be opened
            raise SourceError(f"cannot list xattrs: {exc.strerror}", path) from exc
    return _read_xattrs(path, follow_symlinks, path)


def _read_xattrs(path: str | bytes, follow_symlinks: bool, shown: str | bytes) -> Mapping[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in _NO_XATTR_SUPPORT:
            return NO_XATTRS
        raise SourceError(f"cannot list xattrs: {exc.strerror}", shown) from exc
    if not names:  # the common case: keep it cheap
        return NO_XATTRS
    xattrs: dict[bytes, bytes] = {}
    for name in sorted(os.fsencode(n) for n in names):
        try:
            xattrs[name] = os.getxattr(path, name, follow_symlinks=follow_symlinks)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed between list and get
                continue
            raise SourceError(f"cannot read xattr {name!r}: {exc.strerror}", shown) from exc
    return xattrs


def join_image_path(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def owner_pair(owner: str) -> tuple[int, int] | None:
    """(uid, gid) for "root" and "UID:GID", None for "auto" and "preserve"."""
    if owner in ("auto", "preserve"):
        return None
    if owner == "root":
        return (0, 0)
    uid, sep, gid = owner.partition(":")
    if sep and is_decimal(uid) and is_decimal(gid):
        return (int(uid), int(gid))
    raise SpecError(f"invalid owner policy {owner!r}: expected auto, preserve, root or UID:GID")


class Rules:
    """The build policy, compiled once and applied to every entry as it is collected."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._fixed_owner = owner_pair(policy.owner)
        self._uid_map = dict(policy.uid_map)
        self._gid_map = dict(policy.gid_map)
        self.epoch_ns = None if policy.epoch is None else policy.epoch * 1_000_000_000
        # Parents that Tree.add creates on its own: never the builder's ids or the clock.
        self.parent_template = new_dir(0o755, 0, 0, self.epoch_ns or 0)
        names: list[str] = []
        paths: list[str] = []
        for pattern in policy.excludes:
            if "/" in pattern:
                # A path pattern matches the whole image path, spelled with a leading "/".
                paths.append("/" + pattern.strip("/"))
            else:
                names.append(pattern)
        self._name_re = _compile(names)
        self._path_re = _compile(paths)
        self._dir_verdicts: dict[bytes, bool] = {}  # memo for excluded_within on parents

    def apply(self, inode: Inode, *, recorded_owner: bool) -> Inode:
        """Owner policy, then the id maps, then the epoch clamp, in place.

        `recorded_owner` is True for tar members, whose owners are part of the
        archive; False for files on disk, whose owner is just whoever ran the build
        (which "auto" turns into root).
        """
        if self._fixed_owner is not None:
            inode.uid, inode.gid = self._fixed_owner
        elif self.policy.owner == "auto" and not recorded_owner:
            inode.uid, inode.gid = 0, 0
        inode.uid = self._uid_map.get(inode.uid, inode.uid)
        inode.gid = self._gid_map.get(inode.gid, inode.gid)
        if (self._uid_map or self._gid_map) and inode.xattrs:
            self._map_acls(inode)
        inode.mtime_ns = self.clamp(inode.mtime_ns)
        return inode

    def _map_acls(self, inode: Inode) -> None:
        """Named ACL entries name uids and gids too: the maps rename them as they
        rename owners (an idmapped mount does the same), or a mapped tree's ACLs
        would grant rights to the ids it was mapped away from."""
        names = acl_names(inode.xattrs)
        if names:
            xattrs = dict(inode.xattrs)
            for name in names:
                xattrs[name] = map_acl_ids(xattrs[name], self._uid_map, self._gid_map)
            inode.xattrs = xattrs

    def clamp(self, mtime_ns: int) -> int:
        if self.epoch_ns is not None and mtime_ns > self.epoch_ns:
            return self.epoch_ns
        return mtime_ns

    @property
    def has_excludes(self) -> bool:
        return self._name_re is not None or self._path_re is not None

    def excluded(self, path: bytes) -> bool:
        """Whether the image path itself (not its parents) matches an exclude pattern."""
        if not path or not self.has_excludes:
            return False
        text = path.decode("utf-8", "surrogateescape")
        if self._name_re is not None and self._name_re.match(text.rpartition("/")[2]):
            return True
        return self._path_re is not None and self._path_re.match("/" + text) is not None

    def excluded_within(self, path: bytes) -> bool:
        """Whether the path or any of its parents is excluded (for sources that list
        paths in no tree order, like tar archives)."""
        if not path or not self.has_excludes:
            return False
        slash = path.rfind(b"/")
        if slash >= 0:
            parent = path[:slash]
            verdict = self._dir_verdicts.get(parent)
            if verdict is None:
                verdict = self.excluded_within(parent)
                self._dir_verdicts[parent] = verdict
            if verdict:
                return True
        return self.excluded(path)


def _compile(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# Spool members at least this big start on a 4 KiB boundary, so their holes can stay
# holes in the spool file; smaller ones are packed to keep the spool small.
_ALIGN_FROM = 64 * 1024
_CHUNK = 1 << 20


class Spool:
    """One temporary file (in `directory`, by default $TMPDIR; mode 0600) holding the
    data of members of compressed tar archives, which cannot be pointed into.
    Created on first use, closed by close().  It has no name in any directory: the
    tree's DataRefs reach it as /proc/self/fd/N (_unnamed_temp), so a build killed
    even by `kill -9` leaves nothing behind, and no source can read it.  collect()
    keeps it out of every directory source all the same (collect.spool_directory),
    for the last resort of a named file."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self.path: str | None = None  # what DataRefs name: /proc/self/fd/N, or the file's name
        self._name: str | None = None  # a name to remove on close (the last resort only)
        self._shown = ""  # what its errors name: its directory, or its name
        self._fd = -1
        self._end = 0

    def store(self, stream: Readable, size: int, where: str) -> DataRef:
        """Copy `size` bytes from `stream` into the spool; all-zero 1 MiB chunks are
        skipped (left as holes), so sparse members cost no disk."""
        fd, path = self._open()
        offset = self._end
        if size >= _ALIGN_FROM:
            offset = (offset + 4095) & ~4095
        pos = 0
        zeros = bytes(_CHUNK) if size >= _CHUNK else b""  # here, not at import: 1 MB
        while pos < size:
            chunk = stream.read(min(_CHUNK, size - pos))
            if not chunk:
                raise SourceError("unexpected end of data", where)
            if not (len(chunk) == _CHUNK and chunk == zeros):
                self._write(fd, chunk, offset + pos)
            pos += len(chunk)
        self._end = offset + size
        try:
            if os.fstat(fd).st_size < self._end:  # the member ended in a hole
                os.ftruncate(fd, self._end)
        except OSError as exc:
            raise OutputError(f"cannot extend the temporary spool file: {exc.strerror}", self._shown) from exc
        return DataRef.at(path, offset, size)

    def _open(self) -> tuple[int, str]:
        if self._fd < 0 or self.path is None:
            self._fd, self.path, self._name, self._shown = _spool_file(self.directory)
        return self._fd, self.path

    def _write(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise OutputError(f"cannot write the temporary spool file: {exc.strerror}", self._shown) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name)
            self._name = None
        self.path = None


def _temp_directories() -> list[str]:
    """Where tempfile looks, in its order ($TMPDIR, $TEMP, $TMP, /tmp, /var/tmp,
    /usr/tmp), without its probe: tempfile.gettempdir() creates and removes a file
    in the directory it picks, and a kill -9 at that moment left the file there."""
    found = [os.environ[var] for var in ("TMPDIR", "TEMP", "TMP") if os.environ.get(var)]
    return [*found, "/tmp", "/var/tmp", "/usr/tmp"]


def _spool_file(directory: str | None) -> tuple[int, str, str | None, str]:
    """A temp file in `directory` (else the first usable temp directory) that no
    directory lists: (fd, /proc/self/fd/N, None, the directory); the path reopens
    it in this process only.  With O_TMPFILE where the file system has it, else a
    named file unlinked at once.  Where /proc cannot reopen it, the last resort: a
    named file, (fd, name, name, name), removed by Spool.close()."""
    error: OSError | None = None
    for where in [directory] if directory is not None else _temp_directories():
        try:
            fd = os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            if _reopenable(fd):
                return fd, f"/proc/self/fd/{fd}", None, where
            os.close(fd)  # no /proc: a name is the only way back to it
        except AttributeError:  # no O_TMPFILE on this system
            pass
        except OSError as exc:
            error = exc  # EOPNOTSUPP on a file system without it, EISDIR on an old kernel...
        try:
            fd, name = _named_spool(where)
        except OSError as exc:
            error = exc
            continue  # not a usable directory (missing, read-only): the next one
        try:
            if not _reopenable(fd):
                return fd, name, name, name
            with contextlib.suppress(FileNotFoundError):  # gone: a clean-up took it, as we would
                os.unlink(name)
        except BaseException:  # an interrupt while the file has a name: none is left
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return fd, f"/proc/self/fd/{fd}", None, where
    reason = error.strerror if error is not None else "no temporary directory"
    raise OutputError(f"cannot create a temporary spool file: {reason}", directory)


_SPOOL_RE = re.compile(r"^pyimg-spool-[A-Za-z0-9_-]+-\d+-[0-9a-f]+\.tmp$")


def remove_stale_spools(directory: str) -> None:
    """Remove named spool files in `directory` whose builds are gone."""
    output.remove_stale_temps(directory, _SPOOL_RE)


def _named_spool(where: str) -> tuple[int, str]:
    """A new spool file with a name, locked: on a file system without O_TMPFILE.
    Its name lives for microseconds (it is unlinked at once), but a kill -9 in
    them leaves it: the next build that spools there removes the ones nobody holds."""
    remove_stale_spools(where)
    return output.create_named_temp(lambda: os.path.join(where, f"pyimg-spool-{output.temp_suffix()}"))


def _reopenable(fd: int) -> bool:
    """Whether /proc/self/fd/N opens this very file (no /proc: it does not)."""
    try:
        return os.path.samestat(os.stat(f"/proc/self/fd/{fd}"), os.fstat(fd))
    except OSError:
        return False
