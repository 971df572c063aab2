"""Content-defined chunks of an image: where the cuts are, and each chunk's SHA-256.

The cutter is the C core's (csrc/common/cdc.h): a gear hash after FastCDC, whose cut
points depend only on the bytes of a chunk (about the last 64 before the cut, and the
distance from the chunk's start), never on where a piece of the file starts or on the
buffer size.  So the same bytes give the same chunks, and a change in the middle of a
file moves the cuts only until the hash falls back on a cut it had before (usually
the chunk changed and the one after it).

The parameters (DEFAULT_PARAMS): minimum 16 KiB, average 64 KiB, maximum 256 KiB.
64 KiB is the usual trade between finding shared data (smaller is better) and the
per-chunk cost of a registry (a HEAD and an upload each, a descriptor of ~140 bytes in
the manifest).  The gear table is made at init from BLAKE3 of a fixed string
(cdc.h), not copied from anywhere; `gear_table()` shows it for tests.

Chunks are named by SHA-256 because registries name blobs by it; hashlib releases the
GIL, so callers may hash on threads.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi, lib
from .errors import OutputError

_BUFFER = 4 << 20  # bytes read at a time
_LABEL_RE = re.compile(r"^gear64-v1:(\d+)/(\d+)/(\d+)$")


@dataclass(frozen=True, slots=True)
class ChunkParams:
    """A cutter's sizes in bytes (avg a power of two; cdc.h gives the rules)."""

    min_size: int
    avg_size: int
    max_size: int

    def label(self) -> str:
        """How a stored artifact names the chunking (so a pull can cut an old image the same way)."""
        return f"gear64-v1:{self.min_size}/{self.avg_size}/{self.max_size}"

    @classmethod
    def parse(cls, label: str) -> ChunkParams:
        m = _LABEL_RE.match(label)
        if not m:
            raise ValueError(f"unknown chunking {label!r}")
        params = cls(int(m[1]), int(m[2]), int(m[3]))
        Cutter(params)  # the C core checks the sizes
        return params

    def scaled(self, shift: int) -> ChunkParams:
        """Every size times 2**shift (for images whose chunk list would not fit a manifest)."""
        return ChunkParams(self.min_size << shift, self.avg_size << shift, self.max_size << shift)


DEFAULT_PARAMS = ChunkParams(16 << 10, 64 << 10, 256 << 10)


class Cutter:
    """The C cutter's state, carried across buffers: feed the file in order with scan()."""

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._c: Any = ffi.new("pyimg_cdc *")
        if lib.pyimg_cdc_init(self._c, params.min_size, params.avg_size, params.max_size) != 0:
            raise ValueError(f"invalid chunk sizes {params}")
        self._cap = 0
        self._lens: Any = None

    @property
    def open_length(self) -> int:
        """Bytes of the chunk not yet cut (the last chunk, once the input ends)."""
        return int(self._c.n)

    def scan(self, data: bytes | bytearray | memoryview) -> list[int]:
        """The lengths of the chunks that end inside data (the first one may have begun
        in an earlier buffer)."""
        cap = len(data) // self.params.min_size + 2
        if cap > self._cap:
            self._cap, self._lens = cap, ffi.new("uint64_t[]", cap)
        used = ffi.new("size_t *")
        src = ffi.from_buffer(data)
        out: list[int] = []
        pos = 0
        while pos < len(data):
            found = lib.pyimg_cdc_scan(self._c, src + pos, len(data) - pos, self._lens, self._cap, used)
            out.extend(self._lens[0:found])
            pos += used[0]
        return out


def gear_table() -> list[int]:
    """The cutter's 256 gear words, as pyimg_cdc_init makes them."""
    c = ffi.new("pyimg_cdc *")
    lib.pyimg_cdc_init(c, DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.avg_size, DEFAULT_PARAMS.max_size)
    return [int(x) for x in c.gear]


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    size: int
    digest: str  # sha256:<hex>


def _read_into(fd: int, buffer: bytearray, pos: int, path: str) -> int:
    try:
        return os.preadv(fd, [buffer], pos)
    except OSError as exc:
        raise OutputError(f"cannot read: {exc.strerror}", path) from exc


def cut_points(path: str, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of a file, in order; they tile the file."""
    for chunk in _chunks(path, params, hash_them=False):
        yield chunk.offset, chunk.size


def chunk_file(path: str, params: ChunkParams = DEFAULT_PARAMS, whole: Any = None) -> list[Chunk]:
    """The chunks of a file with their SHA-256, read once in 4 MiB buffers; `whole` (a
    hashlib object) is also fed every byte, for the whole file's digest."""
    return list(_chunks(path, params, hash_them=True, whole=whole))


def chunk_bytes(data: bytes, params: ChunkParams = DEFAULT_PARAMS) -> list[Chunk]:
    """The chunks of bytes in memory (a pyimg manifest), with their SHA-256."""
    out: list[Chunk] = []
    start = 0
    for length in [*Cutter(params).scan(data), None]:
        end = len(data) if length is None else start + length
        if end > start:
            out.append(Chunk(start, end - start, "sha256:" + hashlib.sha256(data[start:end]).hexdigest()))
        start = end
    return out


def _chunks(path: str, params: ChunkParams, *, hash_them: bool, whole: Any = None) -> Iterator[Chunk]:
    cutter = Cutter(params)
    buffer = bytearray(_BUFFER)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(f"cannot read: {exc.strerror}", path) from exc
    try:
        pos = start = 0  # bytes read; where the open chunk starts
        sha = hashlib.sha256()
        while n := _read_into(fd, buffer, pos, path):
            view = memoryview(buffer)[:n]
            if whole is not None:
                whole.update(view)
            at = 0  # the open chunk's first byte in this buffer
            for length in cutter.scan(view):
                end = start + length - pos  # just after the chunk, in this buffer
                if hash_them:
                    sha.update(view[at:end])
                yield Chunk(start, length, "sha256:" + sha.hexdigest() if hash_them else "")
                sha = hashlib.sha256()
                start += length
                at = end
            if hash_them:
                sha.update(view[at:])
            pos += n
        if pos > start:
            yield Chunk(start, pos - start, "sha256:" + sha.hexdigest() if hash_them else "")
    finally:
        os.close(fd)
