"""Paths of PATH_MAX (4096) bytes or more, in the few Python calls that take a
directory source's paths (the C core has its own: csrc/common/longpath.c).

The kernel refuses such a path in every call (ENAMETOOLONG), yet a valid tree may
hold files far deeper, as tar archives do.  The file's directory is opened a piece
at a time instead (each piece whole components, shorter than PATH_MAX, relative to
the directory the previous piece opened) and the file named within it: with
`dir_fd`, or for the xattr calls, which have no *at form, as
/proc/self/fd/FD/NAME (the name itself still not followed unless asked).  Paths
shorter than PATH_MAX never come here: their callers test the length first, so
the common case costs no extra call.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

PATH_MAX = 4096  # Linux: a path of this many bytes or more is refused whole

T = TypeVar("T")


def is_long(path: str | bytes) -> bool:
    """Whether the kernel would refuse `path` whole (ENAMETOOLONG).  A str is
    encoded only when it may be that long (a character is at most 4 bytes)."""
    if isinstance(path, bytes):
        return len(path) >= PATH_MAX
    return len(path) * 4 >= PATH_MAX and len(os.fsencode(path)) >= PATH_MAX


def open_directory(path: bytes) -> int:
    """A descriptor (O_PATH) of the directory `path`, of any length; symlinks on the
    way are followed, as by open().  Raises OSError."""
    dir_fd: int | None = None
    rest = path
    try:
        while True:
            if len(rest) < PATH_MAX:
                piece, rest = rest, b""
            else:
                cut = rest.rfind(b"/", 1, PATH_MAX)  # the piece before it: < PATH_MAX bytes
                if cut < 1:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fsdecode(path))
                piece, rest = rest[:cut], rest[cut:].lstrip(b"/")
            fd = os.open(piece, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            if dir_fd is not None:
                os.close(dir_fd)
            dir_fd = fd
            if not rest:
                return fd
    except BaseException:
        if dir_fd is not None:
            os.close(dir_fd)
        raise


def in_directory(path: str | bytes, call: Callable[[int, bytes], T]) -> T:
    """call(dir_fd, name): `name` (the last component of the long `path`) within
    its directory, open as dir_fd for the call's duration.  Raises OSError."""
    raw = os.fsencode(path).rstrip(b"/")
    parent, _, name = raw.rpartition(b"/")
    fd = open_directory(parent or b"/")
    try:
        return call(fd, name)
    finally:
        os.close(fd)


def via_fd(dir_fd: int, name: bytes) -> bytes:
    """A short path naming `name` within the open directory dir_fd (/proc/self/fd)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def open_long(path: str | bytes, flags: int) -> int:
    """os.open(path, flags) for a path of any length."""
    if not is_long(path):
        return os.open(path, flags)
    return in_directory(path, lambda fd, name: os.open(name, flags, dir_fd=fd))


def stat_long(path: str | bytes) -> os.stat_result:
    """os.stat(path) (symlinks followed) for a path of any length."""
    if not is_long(path):
        return os.stat(path)
    return in_directory(path, lambda fd, name: os.stat(name, dir_fd=fd))
