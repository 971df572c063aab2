"""squashfs data stream: hash & dedup, compress, write blocks and fragments.

Work is cut into tasks of at most CHUNK bytes of one file's content.  Tasks run
on `jobs` threads (reading, BLAKE3 and compression release the GIL) and their
results are committed strictly in plan order (inode order) by one committer, which
alone decides where bytes go.  Hence the image is the same for every `jobs`.

Dedup: a content that fits in one task is hashed before it is compressed; if an
earlier task (in plan order) already claimed the same digest, compression is
skipped.  A content spread over several tasks is hashed by the committer as its
chunks arrive; if it turns out to be a duplicate its blocks are rewound.  Tails
(the last partial block, or whole small files) are packed into fragment blocks;
identical tails are stored once.  Full blocks of zeros are stored as holes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import blake3

from ..compression import BlockCompressor, CompressionSpec, PerThread
from ..content import ContentReader, ordered_map
from ..errors import OutputError
from ..tree import Inode
from .base import Progress
from .imagefile import ImageFile

UNCOMPRESSED = 1 << 24  # block size flag: stored as is
NO_FRAGMENT = 0xFFFFFFFF
CHUNK_TARGET = 1 << 20  # bytes of content per task, rounded to whole blocks
FRAGMENT_BATCH = 16  # full fragment blocks compressed together


@dataclass(slots=True)
class FileData:
    """Where one content ended up: what its squashfs file inode needs."""

    digest: bytes
    size: int
    blocks_start: int = 0
    block_sizes: list[int] = field(default_factory=list)
    sparse: int = 0
    frag_index: int = NO_FRAGMENT
    frag_offset: int = 0


@dataclass(slots=True)
class _Task:
    content: int  # index in plan order
    inode: Inode
    offset: int
    length: int
    first: bool
    last: bool
    reader: ContentReader | None  # shared by the tasks of a multi-chunk content


@dataclass(slots=True)
class _Result:
    task: _Task
    blocks: list[bytes | None]  # compressed (or raw) full blocks; None = hole; [] when skipped as duplicate
    raw_sizes: list[int]
    tail: bytes  # the content's last partial block (last task only)
    digest: bytes | None  # whole-content digest when known (single-task contents)
    raw: bytes | None  # multi-chunk contents: the chunk, for the committer's hasher
    duplicate: bool


class _Claims:
    """Digest -> lowest content index seen so far; decides who compresses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[bytes, int] = {}

    def claim(self, digest: bytes, content: int) -> bool:
        """True when no earlier content has this digest (this one must store it)."""
        with self._lock:
            owner = self._owner.get(digest)
            if owner is None or owner > content:
                self._owner[digest] = content
                return True
            return owner == content


class DataStream:
    def __init__(self, spec: CompressionSpec, jobs: int, fragments: bool, dedup: bool) -> None:
        self.spec = spec
        self.block_size = spec.block_size
        self.jobs = jobs
        self.fragments = fragments
        self.dedup = dedup
        self.chunk = max(self.block_size, CHUNK_TARGET // self.block_size * self.block_size)
        self.compressors = PerThread(spec)
        self.claims = _Claims()
        self.zero_block = bytes(self.block_size)
        self.bytes_stored = 0

    # -- tasks (run on worker threads) -------------------------------------------

    def _tasks(self, files: list[Inode]) -> Iterator[_Task]:
        for index, inode in enumerate(files):
            if inode.size <= self.chunk or inode.data is None:
                yield _Task(index, inode, 0, inode.size, True, True, None)
                continue
            assert inode.data is not None
            reader = ContentReader(inode.data)
            for offset in range(0, inode.size, self.chunk):
                length = min(self.chunk, inode.size - offset)
                yield _Task(index, inode, offset, length, offset == 0, offset + length == inode.size, reader)

    def _run(self, task: _Task) -> _Result:
        if task.reader is None:
            return self._run_whole(task)
        return self._run_chunk(task)

    def _run_whole(self, task: _Task) -> _Result:
        inode = task.inode
        if inode.data is None or inode.size == 0:
            return _Result(task, [], [], b"", blake3.blake3().digest(), None, False)
        with ContentReader(inode.data) as reader:
            data = self._read(reader, 0, inode.size)
            reader.check_unchanged()
        digest = blake3.blake3(data).digest()
        if self.dedup and not self.claims.claim(digest, task.content):
            return _Result(task, [], [], b"", digest, None, True)
        blocks, raw_sizes, tail = self._compress(data)
        return _Result(task, blocks, raw_sizes, tail, digest, None, False)

    def _run_chunk(self, task: _Task) -> _Result:
        assert task.reader is not None
        data = self._read(task.reader, task.offset, task.length)
        blocks, raw_sizes, tail = self._compress(data, keep_tail=task.last)
        if task.last:
            task.reader.check_unchanged()
        return _Result(task, blocks, raw_sizes, tail, None, data, False)

    def _read(self, reader: ContentReader, offset: int, length: int) -> bytes:
        """Read a range, skipping the holes of sparse files (they read as zeros).

        Holes smaller than a block cannot become squashfs holes: small files are
        read straight away, without asking for their holes.
        """
        if reader.ref.size <= self.block_size:
            return reader.read(offset, length)
        ranges = reader.data_ranges()
        end = offset + length
        pieces: list[bytes] = []
        pos = offset
        for start, stop in ranges:
            if stop <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                pieces.append(bytes(start - pos))
                pos = start
            upto = min(stop, end)
            pieces.append(reader.read(pos, upto - pos))
            pos = upto
        if pos < end:
            pieces.append(bytes(end - pos))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _compress(self, data: bytes, keep_tail: bool = True) -> tuple[list[bytes | None], list[int], bytes]:
        """Full blocks -> compressed blocks (None for a block of zeros); the rest is the tail."""
        bs = self.block_size
        full = len(data) // bs if (self.fragments and keep_tail) else -(-len(data) // bs)
        compressor = self.compressors.get()
        view = memoryview(data)
        blocks: list[bytes | None] = []
        raw_sizes: list[int] = []
        for i in range(full):
            block = view[i * bs : (i + 1) * bs]
            raw_sizes.append(len(block))
            if block == self.zero_block[: len(block)]:
                blocks.append(None)
                continue
            packed = compressor.compress(block)
            blocks.append(packed if len(packed) < len(block) else bytes(block))
        tail = bytes(view[full * bs :])
        return blocks, raw_sizes, tail

    # -- committer (the calling thread) -------------------------------------------

    def write(self, files: list[Inode], image: ImageFile, progress: Progress) -> list[FileData]:
        """Stream every content of `files` (plan order) into `image`; return their placements."""
        packer = _FragmentPacker(self, image)
        placed: list[FileData] = []
        by_digest: dict[bytes, FileData] = {}
        hasher: blake3.blake3 | None = None
        current: FileData | None = None
        for result in ordered_map(self._run, self._tasks(files), self.jobs):
            task = result.task
            if task.first:
                current = FileData(b"", task.inode.size, blocks_start=image.pos)
                hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if result.raw is not None else None
            assert current is not None
            if hasher is not None and result.raw is not None:
                hasher.update(result.raw)
            if result.duplicate:
                assert result.digest is not None
                placed.append(by_digest[result.digest])
                progress(task.length)
                continue
            self._write_blocks(current, result, image)
            progress(task.length)
            if not task.last:
                continue
            current.digest = result.digest if result.digest is not None else hasher.digest()  # type: ignore[union-attr]
            if task.reader is not None:
                task.reader.close()
            earlier = by_digest.get(current.digest) if self.dedup else None
            if earlier is not None:
                # A multi-chunk duplicate found only now: take its blocks back.
                image.rewind(current.blocks_start)
                self.bytes_stored -= sum(result_size for result_size in _stored_sizes(current))
                placed.append(earlier)
                continue
            if result.tail:
                current.frag_index, current.frag_offset = packer.add(result.tail)
            if not current.block_sizes:
                current.blocks_start = 0
            by_digest.setdefault(current.digest, current)
            placed.append(current)
        packer.flush_all()
        self.fragment_table = packer.table
        return placed

    def _write_blocks(self, current: FileData, result: _Result, image: ImageFile) -> None:
        for block, raw_size in zip(result.blocks, result.raw_sizes, strict=True):
            if block is None:
                current.block_sizes.append(0)
                current.sparse += raw_size
                continue
            image.write(block)
            self.bytes_stored += len(block)
            current.block_sizes.append(len(block) | (UNCOMPRESSED if len(block) == raw_size else 0))


def _stored_sizes(data: FileData) -> list[int]:
    return [size & ~UNCOMPRESSED for size in data.block_sizes]


class _FragmentPacker:
    """Packs tails into fragment blocks; identical tails are stored once."""

    def __init__(self, stream: DataStream, image: ImageFile) -> None:
        self.stream = stream
        self.image = image
        self.block = bytearray()
        self.pending: list[tuple[int, bytes]] = []  # (fragment index, raw block) awaiting compression
        self.table: list[tuple[int, int]] = []  # fragment index -> (image offset, size word)
        self.seen: dict[bytes, tuple[int, int]] = {}
        self.count = 0

    def add(self, tail: bytes) -> tuple[int, int]:
        key = blake3.blake3(tail).digest() if self.stream.dedup else None
        if key is not None and key in self.seen:
            return self.seen[key]
        if len(self.block) + len(tail) > self.stream.block_size:
            self._close_block()
        where = (self.count, len(self.block))
        self.block += tail
        if key is not None:
            self.seen[key] = where
        return where

    def _close_block(self) -> None:
        if not self.block:
            return
        self.pending.append((self.count, bytes(self.block)))
        self.table.append((0, 0))
        self.count += 1
        self.block = bytearray()
        if len(self.pending) >= FRAGMENT_BATCH:
            self._write_pending()

    def _write_pending(self) -> None:
        compressor: BlockCompressor = self.stream.compressors.get()
        raws = [raw for _, raw in self.pending]
        packed = compressor.compress_many(raws, self.stream.jobs)
        for (index, raw), out in zip(self.pending, packed, strict=True):
            data, flag = (out, 0) if len(out) < len(raw) else (raw, UNCOMPRESSED)
            self.table[index] = (self.image.pos, len(data) | flag)
            self.image.write(data)
            self.stream.bytes_stored += len(data)
        self.pending.clear()

    def flush_all(self) -> None:
        self._close_block()
        self._write_pending()


__all__ = ["NO_FRAGMENT", "UNCOMPRESSED", "DataStream", "FileData", "OutputError"]
