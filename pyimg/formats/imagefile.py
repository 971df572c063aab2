"""Sequential, buffered writing into a Region, with rewind.

Writers append; pending pieces are written with one pwritev per few MiB (no copy
into a staging buffer, few system calls).  `rewind` moves the end back (squashfs
takes back the blocks of a duplicate found late); `finish` writes what is left and
returns the length used.  The region's owner sizes the file.
"""

from __future__ import annotations

from ..region import MAX_IOV, Region

FLUSH_AT = 4 << 20


class ImageFile:
    def __init__(self, region: Region, start: int = 0) -> None:
        self.region = region
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
            self.region.pwritev(self._pending, self._flushed)
            self._flushed += self._pending_bytes
            self._pending = []
            self._pending_bytes = 0

    def finish(self) -> int:
        """Write what is pending; the length of the image (the region's used bytes)."""
        self.flush()
        return self.pos
