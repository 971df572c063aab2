"""Block compressors for squashfs data and metadata.

Each compressor turns one block into its compressed bytes.  The underlying
libraries (zstandard, zlib, lzma) release the GIL while they work, so blocks
compressed on several threads really run in parallel.  Compressor objects are not
shared between threads: `for_thread()` hands each thread its own.
"""

from __future__ import annotations

import lzma
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from .errors import SpecError
from .formats.squashfs_options import DEFAULT_LEVELS, LEVEL_RANGES

# squashfs compressor ids (superblock field "compressor").
SQUASHFS_IDS = {"gzip": 1, "xz": 4, "zstd": 6}


@dataclass(frozen=True, slots=True)
class CompressionSpec:
    name: str
    level: int
    block_size: int

    @classmethod
    def create(cls, name: str, level: int | None, block_size: int) -> CompressionSpec:
        if name not in SQUASHFS_IDS:
            raise SpecError(f"unknown compression {name!r} (choose zstd, gzip or xz)")
        lo, hi = LEVEL_RANGES[name]
        chosen = DEFAULT_LEVELS[name] if level is None else level
        if not lo <= chosen <= hi:
            raise SpecError(f"{name} level {chosen} out of range {lo}..{hi}")
        return cls(name, chosen, block_size)


class BlockCompressor:
    """Compresses single blocks; one instance per thread."""

    def __init__(self, spec: CompressionSpec) -> None:
        self.spec = spec
        if spec.name == "zstd":
            # No checksum, no content size in the frame: what mksquashfs writes too.
            self._zstd = zstandard.ZstdCompressor(
                level=spec.level, write_checksum=False, write_content_size=False
            )
        elif spec.name == "xz":
            # The kernel's decoder is set up for a dictionary of block_size: never more.
            self._xz_filters = [
                {"id": lzma.FILTER_LZMA2, "preset": spec.level, "dict_size": max(spec.block_size, 8192)}
            ]

    def compress(self, block: bytes | memoryview) -> bytes:
        name = self.spec.name
        if name == "zstd":
            return self._zstd.compress(block)
        if name == "gzip":
            return zlib.compress(block, self.spec.level)  # zlib stream, as squashfs "gzip" means
        return lzma.compress(block, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=self._xz_filters)

    def compress_many(self, blocks: Sequence[bytes | memoryview], threads: int) -> list[bytes]:
        """Compress several blocks at once (zstd: one call, off the GIL, on `threads` C threads)."""
        if self.spec.name == "zstd" and len(blocks) > 1:
            batch = self._zstd.multi_compress_to_buffer(list(blocks), threads=threads)
            return [batch[i].tobytes() for i in range(len(batch))]
        return [self.compress(b) for b in blocks]


class PerThread:
    """One BlockCompressor per thread, created on first use."""

    def __init__(self, spec: CompressionSpec) -> None:
        self.spec = spec
        self._local = threading.local()

    def get(self) -> BlockCompressor:
        compressor: BlockCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = BlockCompressor(self.spec)
            self._local.compressor = compressor
        return compressor
