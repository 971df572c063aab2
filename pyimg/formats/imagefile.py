"""Sequential, buffered writing of an image file, with rewind.

Writers append; pending pieces are written with one pwritev per few MiB (no copy
into a staging buffer, few system calls).  `rewind` moves the end back (squashfs
takes back the blocks of a duplicate found late); `finish` writes what is left and
cuts the file at the end.
"""

from __future__ import annotations

import errno
import os

from ..errors import OutputError

FLUSH_AT = 4 << 20
MAX_IOV = 512  # well under IOV_MAX (1024 on Linux)


class ImageFile:
    def __init__(self, fd: int, start: int = 0) -> None:
        self.fd = fd
        self.pos = start  # logical end of the image
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_bytes = 0
        self._flushed = start  # everything before this offset is on its way to disk

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.pos += len(data)
        if self._pending_bytes >= FLUSH_AT or len(self._pending) >= MAX_IOV:
            self.flush()

    def rewind(self, pos: int) -> None:
        """Drop everything after `pos` (bytes already flushed get overwritten later)."""
        keep = pos - self._flushed
        if keep <= 0:
            self._pending.clear()
            self._pending_bytes = 0
            self._flushed = pos
        else:
            kept: list[bytes | bytearray | memoryview] = []
            total = 0
            for piece in self._pending:
                if total >= keep:
                    break
                piece = piece if total + len(piece) <= keep else memoryview(piece)[: keep - total]
                kept.append(piece)
                total += len(piece)
            self._pending, self._pending_bytes = kept, total
        self.pos = pos

    def flush(self) -> None:
        if self._pending:
            pwritev_all(self.fd, self._pending, self._flushed)
            self._flushed += self._pending_bytes
            self._pending = []
            self._pending_bytes = 0

    def finish(self) -> None:
        self.flush()
        try:
            os.ftruncate(self.fd, self.pos)
        except OSError as exc:
            raise OutputError(f"cannot size the image: {exc.strerror}") from exc


def _output_error(exc: OSError) -> OutputError:
    reason = "no space left on device" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
    return OutputError(reason)


def pwritev_all(fd: int, pieces: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write the pieces back to back at `offset`, or raise OutputError."""
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        try:
            n = os.pwritev(fd, views, offset)
        except OSError as exc:
            raise _output_error(exc) from exc
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite every byte, or raise OutputError (a full disk names itself)."""
    pwritev_all(fd, [data], offset)
