"""Region: the byte range of an output file that one writer fills.

A writer never sees the whole file: it is handed a Region (a file descriptor, the
offset where the region starts, and the most bytes it may use), writes at offsets
relative to the region's start, and reports how many bytes it used.  It never sizes,
truncates or seeks the file: the region's owner (AtomicOutput for a plain image, a
container writer for its partitions) does.  So a container can place several images
in one file, each writer unaware of the others.  A region starts as zeros (a new
file's holes, or a container's unwritten space): writers leave zero ranges unwritten.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import OutputError

MAX_IOV = 512  # well under IOV_MAX (1024 on Linux)


@dataclass(frozen=True, slots=True)
class Region:
    fd: int
    offset: int = 0  # absolute file offset of the region's first byte
    limit: int | None = None  # the most bytes the writer may use; None: no limit

    def check_fits(self, end: int, start: int = 0) -> None:
        """Raise OutputError unless [start, end) (relative) is within the region."""
        if start < 0 or end < start:
            raise OutputError(f"a write at {start} is outside its region (writers write at offsets >= 0)")
        if self.limit is not None and end > self.limit:
            raise OutputError(f"the image needs {end} bytes, more than its region holds ({self.limit})")

    def check_room(self, end: int, written: int) -> None:
        """Before any byte is written: raise OutputError unless the region holds `end`
        bytes, the file may grow that large (EFBIG: the file system's or RLIMIT_FSIZE's
        limit) and its file system has room for the `written` bytes that are not holes
        (statvfs): a size that cannot land is refused up front, not after a full disk."""
        self.check_fits(end)
        try:
            current = os.fstat(self.fd).st_size
            if self.offset + end > current:  # probe: grow and shrink back (holes only)
                os.ftruncate(self.fd, self.offset + end)
                os.ftruncate(self.fd, current)
            vfs = os.fstatvfs(self.fd)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise OutputError(
                    f"the image needs a file of {self.offset + end} bytes, larger than this file system "
                    "(or the file size limit) allows"
                ) from exc
            raise write_error(exc) from exc
        free = vfs.f_bavail * vfs.f_frsize
        if written > free:
            raise OutputError(
                f"the image needs about {written} bytes of space, and its file system has {free} free"
            )

    def pwritev(self, pieces: Sequence[bytes | bytearray | memoryview], at: int) -> None:
        """Write the pieces back to back at relative offset `at`, or raise OutputError."""
        views = [memoryview(p) for p in pieces if len(p)]
        self.check_fits(at + sum(len(v) for v in views), at)
        offset = self.offset + at
        while views:
            try:
                n = os.pwritev(self.fd, views[:MAX_IOV], offset)
            except OSError as exc:
                raise write_error(exc) from exc
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def pwrite(self, data: bytes | bytearray | memoryview, at: int) -> None:
        self.pwritev([data], at)

    def sub(self, at: int, limit: int | None = None) -> Region:
        """The part of this region from relative offset `at`, at most `limit` bytes."""
        room = None if self.limit is None else self.limit - at
        if at < 0 or (limit is not None and limit < 0):
            raise OutputError(f"a sub-region at {at} (+{limit}) starts before its region")
        if room is not None and (room < 0 or (limit is not None and limit > room)):
            raise OutputError(f"a sub-region at {at} (+{limit}) does not fit a region of {self.limit} bytes")
        return Region(self.fd, self.offset + at, limit if limit is not None else room)


def write_error(exc: OSError) -> OutputError:
    """The OutputError for a failed write: a full disk names itself."""
    reason = "no space left on device" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
    return OutputError(reason)
