"""Sequential, buffered writing of an image file, with rewind.

Writers append; the buffer is written out with pwrite in large pieces (fewer
system calls than one per block).  `rewind` moves the end back (squashfs takes back
the blocks of a duplicate found late); `finish` writes what is left and cuts the
file at the end.
"""

from __future__ import annotations

import errno
import os

from ..errors import OutputError

FLUSH_AT = 4 << 20


class ImageFile:
    def __init__(self, fd: int, start: int = 0) -> None:
        self.fd = fd
        self.pos = start  # logical end of the image
        self._buf = bytearray()
        self._buf_start = start

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        self.pos += len(data)
        if len(self._buf) >= FLUSH_AT:
            self.flush()

    def rewind(self, pos: int) -> None:
        if pos >= self._buf_start:
            del self._buf[pos - self._buf_start :]
        else:
            self._buf.clear()
            self._buf_start = pos
        self.pos = pos

    def flush(self) -> None:
        if self._buf:
            pwrite_all(self.fd, self._buf, self._buf_start)
            self._buf_start += len(self._buf)
            self._buf.clear()

    def finish(self) -> None:
        self.flush()
        try:
            os.ftruncate(self.fd, self.pos)
        except OSError as exc:
            raise OutputError(f"cannot size the image: {exc.strerror}") from exc


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite every byte, or raise OutputError (a full disk names itself)."""
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            reason = "no space left on device" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
            raise OutputError(reason) from exc
        view = view[n:]
        offset += n
