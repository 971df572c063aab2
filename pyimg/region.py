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
