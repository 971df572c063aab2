"""squashfs data stream: hash & dedup, compress, write blocks and fragments.

Work is cut into tasks, run on `jobs` threads (reading, BLAKE3 and compression
release the GIL), whose results are committed strictly in plan order (inode
order) by one committer, which alone decides where bytes go.  Hence the image is
the same for every `jobs`.  Tasks are:
- a batch of small files (each smaller than a block: all of it is its tail), up to
  ~1 MiB or 256 files: read and hashed in one C call; the committer packs the whole
  batch into fragment blocks with one call to the C packer (csrc/sqfs/frag.c).
  No Python object per file: that is what made trees of small files slow;
- a batch of files with full blocks that fit in one task, or one 1 MiB chunk of a
  large file: their blocks are compressed on the worker.

Dedup: a content that fits in one task is hashed before it is compressed; if an
earlier content (in plan order) already claimed the same digest, compression is
skipped (a claim that loses the race in plan order is rewound by the committer).
A content spread over several tasks (a large one) is hashed first by the shared
hash pass (pyimg/hashpass.py), running ahead of the stream on its own threads: the
first large content of a digest (in plan order) stores it, later ones are never
read or compressed, and the committer computes no digest.  Tails
(the last partial block, or whole small files) are packed into fragment blocks;
identical tails are stored once.  Full blocks of zeros are stored as holes.

Where each file's content went is kept in a `Placement`: arrays indexed by file,
which the inode encoder reads.
"""

from __future__ import annotations

import collections
import struct
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import blake3

from .. import hashpass
from .._ffi import check, check_handle, ffi, lib
from ..cache import BuildCache, Entry, EntryWriter, Identity, compressor_versions
from ..compression import CompressionSpec, PerThread
from ..content import ContentReader, ordered_map, read_batch, read_batch_packed
from ..errors import SourceError
from ..tree import DataRef, Inode
from .base import Progress
from .imagefile import ImageFile

UNCOMPRESSED = 1 << 24  # block size flag: stored as is
NO_FRAGMENT = 0xFFFFFFFF
CHUNK_TARGET = 1 << 20  # bytes of content per task, rounded to whole blocks
BATCH_FILES = 256  # small files per task, at most
FRAGMENT_BATCH = 8  # full fragment blocks compressed together
FRAGMENT_IN_FLIGHT = 4  # batches in flight before the oldest is written: a constant, never
# scaled by `jobs` (where fragment blocks land among data blocks must not follow the thread count)


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
class _Piece:
    """One content, or one chunk of a large content."""

    content: int  # index in plan order
    inode: Inode
    offset: int
    length: int
    first: bool
    last: bool
    reader: ContentReader | None  # shared by the chunks of a large content
    digest: bytes | None = None  # a large content's, from the hash pass
    duplicate: bool = False  # a large content an earlier one stores: nothing to read
    cached: Entry | None = None  # a large content's stored form, from the build cache
    cache_key: bytes | None = None  # a large content to store in the build cache


@dataclass(slots=True)
class _Done:
    piece: _Piece
    blocks: list[bytes | None]  # compressed (or raw) full blocks; None = hole
    raw_sizes: list[int]
    tail: bytes | memoryview  # the content's last partial block (last piece only)
    tail_key: bytes | None  # BLAKE3 of the tail, for tail dedup
    digest: bytes | None  # the whole content's digest (on its last piece)
    duplicate: bool  # an earlier content has the same digest: nothing compressed
    cache_key: bytes | None = None  # a whole content to store in the build cache (a miss)


@dataclass(slots=True)
class _SmallBatch:
    """Consecutive files (plan order from `first`), each smaller than a block."""

    first: int
    inodes: list[Inode]


@dataclass(slots=True)
class _SmallDone:
    batch: _SmallBatch
    sizes: array[int]  # per file; 0 for empty files
    data: bytearray  # the non-empty files' bytes, back to back
    digests: bytearray  # their BLAKE3 digests, 32 bytes each, back to back
    length: int  # bytes of content in the batch
    blind: bool = False  # data not read: the digests are the stat cache's


class Placement:
    """Where each file's content went, indexed by file (plan order): what the file
    inodes need.  Arrays, not an object per file: trees have 100k+ files."""

    def __init__(self, count: int) -> None:
        self.digests = bytearray(32 * count)
        self.blocks_start = array("Q", bytes(8 * count))
        self.sparse = array("Q", bytes(8 * count))
        self.frag_index = array("I", [NO_FRAGMENT]) * count
        self.frag_offset = array("I", bytes(4 * count))
        self.block_sizes: dict[int, list[int]] = {}  # only files with data blocks
        self.bytes_unique = 0  # content bytes, each distinct content once
        self.bytes_data = 0  # the same without holes
        # The C packer writes fragment places of small files straight into the arrays.
        self.frag_index_ptr = ffi.from_buffer("uint32_t[]", self.frag_index, require_writable=True)
        self.frag_offset_ptr = ffi.from_buffer("uint32_t[]", self.frag_offset, require_writable=True)
        self.digests_ptr = ffi.from_buffer("uint8_t[]", self.digests)  # the packer's dedup keys

    def place(self, index: int, data: FileData) -> None:
        self.digests[32 * index : 32 * index + 32] = data.digest
        self.blocks_start[index] = data.blocks_start
        self.sparse[index] = data.sparse
        self.frag_index[index] = data.frag_index
        self.frag_offset[index] = data.frag_offset if data.frag_index != NO_FRAGMENT else 0
        if data.block_sizes:
            self.block_sizes[index] = data.block_sizes

    def count_unique(self, data: FileData) -> None:
        self.bytes_unique += data.size
        self.bytes_data += data.size - data.sparse


class _Claims:
    """Digest -> lowest content index seen so far; decides who compresses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[bytes, int] = {}

    def claim_all(self, claims: list[tuple[bytes, int]]) -> dict[bytes, bool]:
        """For each (digest, content): may this content store it?  False when an
        earlier content (in plan order) has the same digest: it is a duplicate."""
        result: dict[bytes, bool] = {}
        with self._lock:
            for digest, content in claims:
                owner = self._owner.get(digest)
                if owner is None or owner > content:
                    self._owner[digest] = content
                    owner = content
                result[digest] = result.get(digest, False) or owner == content
        return result


_EMPTY_DIGEST = blake3.blake3(b"").digest()


class DataStream:
    def __init__(
        self, spec: CompressionSpec, jobs: int, fragments: bool, dedup: bool, cache: BuildCache | None = None
    ) -> None:
        self.spec = spec
        self.cache = cache if cache is not None and cache.enabled else None
        self.block_size = spec.block_size
        self.jobs = jobs
        self.fragments = fragments
        self.dedup = dedup
        # A tail's digest: its dedup key, and with a cache its fragment block's member.
        self.key_tails = dedup or self.cache is not None
        self.chunk = max(self.block_size, CHUNK_TARGET // self.block_size * self.block_size)
        self.compressors = PerThread(spec)
        self.claims = _Claims()
        self._entries: list[Entry] = []  # open build-cache entries, closed at the end of write()
        self.zero_block = bytes(self.block_size)
        # A full block of zeros compresses to exactly this many bytes (the compressor is
        # deterministic), so only a block that compresses as small needs comparing with
        # zeros.  It is not a constant: zstd makes ~20 bytes of 128 KiB of zeros, gzip
        # and xz ~150, and a zero block must become a hole whichever compressor is used
        # -- as it does when it lies in a hole of the source and is never compressed.
        self.zero_packed_size = len(self.compressors.get().compress(self.zero_block))
        self.bytes_stored = 0
        self.fragment_table: list[tuple[int, int]] = []
        # Everything that shapes a content's stored form (docs/cache.md): the content
        # cache's key holds it with the content's digest.  Not dedup: it decides
        # whether a content is stored, never how.
        self.shape = (
            f"squashfs {spec.name} level={spec.level} block={spec.block_size} fragments={int(fragments)} "
            f"zero-blocks=holes-v1 "
        ).encode() + compressor_versions()
        # A packed block of tails, not a content; keyed by its members (frag.c).
        self.fragment_shape = self.shape + b" fragment-block members-v1"

    # -- tasks (run on worker threads) -------------------------------------------

    def _all_tail(self, inode: Inode) -> bool:
        return self.fragments and inode.size < self.block_size

    def _tasks(
        self, files: list[Inode], large: hashpass.DigestsAhead
    ) -> Iterator[_SmallBatch | list[_Piece]]:
        """The tasks, in plan order.  `large`: the digests of the contents spread over
        several tasks, from the shared hash pass running ahead of the stream on its
        own threads: known before their blocks are compressed, a duplicate is never
        read or compressed, and no digest is computed on the committer."""
        large_owner: dict[bytes, int] = {}  # digest -> the first large content with it
        small: list[Inode] = []
        small_first = small_bytes = 0
        batch: list[_Piece] = []
        batch_bytes = 0
        for index, inode in enumerate(files):
            if self._all_tail(inode):
                if batch:
                    yield batch
                    batch, batch_bytes = [], 0
                if not small:
                    small_first = index
                small.append(inode)
                small_bytes += inode.size
                if small_bytes >= self.chunk or len(small) >= BATCH_FILES:
                    yield _SmallBatch(small_first, small)
                    small, small_bytes = [], 0
                continue
            if small:
                yield _SmallBatch(small_first, small)
                small, small_bytes = [], 0
            if inode.size <= self.chunk or inode.data is None:
                batch.append(_Piece(index, inode, 0, inode.size, True, True, None))
                batch_bytes += inode.size
                if batch_bytes >= self.chunk or len(batch) >= BATCH_FILES:
                    yield batch
                    batch, batch_bytes = [], 0
                continue
            if batch:
                yield batch
                batch, batch_bytes = [], 0
            digest, probe = large.next_with()
            key, entry = probe if probe is not None else (None, None)
            if self.dedup and large_owner.setdefault(digest, index) != index:
                if entry is not None:
                    entry.close()
                yield [_Piece(index, inode, 0, inode.size, True, True, None, digest, duplicate=True)]
                continue
            if entry is not None:
                self._entries.append(entry)
            reader = ContentReader(inode.data) if entry is None else None
            for offset in range(0, inode.size, self.chunk):
                length = min(self.chunk, inode.size - offset)
                last = offset + length == inode.size
                digest_if_last = digest if last else None
                piece = _Piece(index, inode, offset, length, offset == 0, last, reader, digest_if_last)
                piece.cached, piece.cache_key = entry, key if entry is None else None
                yield [piece]
        if small:
            yield _SmallBatch(small_first, small)
        if batch:
            yield batch

    def _run_task(self, task: _SmallBatch | list[_Piece]) -> _SmallDone | list[_Done]:
        if isinstance(task, _SmallBatch):
            return self._run_small(task)
        return self._run(task)

    def _run_small(self, batch: _SmallBatch) -> _SmallDone:
        """Read and hash a batch of small files: one C call, no object per file.
        With a build cache, a batch whose digests the stat cache all knows is not
        read ("blind"): its fragment blocks are keyed by their members' digests, so
        only a block the content cache lacks has its files read (stored_fragments)."""
        with_data = [inode.data for inode in batch.inodes if inode.data is not None and inode.size]
        sizes = array("Q", [inode.size if inode.data is not None else 0 for inode in batch.inodes])
        if self.cache is None:
            data, digests = read_batch_packed(with_data)
            return _SmallDone(batch, sizes, data, digests, len(data))
        known = self.cache.known_digests(with_data)
        if known is not None:
            return _SmallDone(batch, sizes, bytearray(), known, sum(sizes), blind=True)
        data, digests = self.cache.read_learning(with_data)
        return _SmallDone(batch, sizes, data, digests, len(data))

    def _run(self, task: list[_Piece]) -> list[_Done]:
        if len(task) == 1 and task[0].duplicate:
            return [_Done(task[0], [], [], b"", None, task[0].digest, True)]
        if len(task) == 1 and task[0].cached is not None:
            return [self._run_cached(task[0])]
        if len(task) == 1 and task[0].reader is not None:
            return [self._run_chunk(task[0])]
        # A batch of whole contents: read and hash them all in one C call, claim
        # their digests under one lock, then compress each from the shared buffer.
        # With a build cache, those whose digest (stat cache) and stored form
        # (content cache) are known are not read at all.
        known = self._known_wholes(task) if self.cache is not None else {}
        try:
            return self._run_batch(task, known)
        finally:
            for _, entry in known.values():
                entry.close()  # (closed already, unless the batch failed)

    def _run_batch(self, task: list[_Piece], known: dict[int, tuple[bytes, Entry]]) -> list[_Done]:
        with_data = [p for p in task if p.inode.data is not None and p.inode.size and id(p) not in known]
        since = self.cache.clock() if self.cache is not None else 0
        idents = {id(p): self._identity(p) for p in with_data} if self.cache is not None else {}
        buffer, digests = read_batch([p.inode.data for p in with_data])  # type: ignore[misc]
        digest_of = {id(p): d for p, d in zip(with_data, digests, strict=True)}
        self._learn(with_data, idents, digest_of, since)
        digest_of.update((key, digest) for key, (digest, _) in known.items())
        # Only contents with full blocks are compressed here, so only they need to
        # know whether an earlier content already stores the same bytes.  Contents
        # that are all tail are deduplicated by the committer (memory: no claim each).
        blocky = [
            (digest_of[id(p)], p.content) for p in task if id(p) in digest_of and p.length >= self.block_size
        ]
        owners = self.claims.claim_all(blocky) if self.dedup and blocky else {}
        view = memoryview(buffer)
        done: list[_Done] = []
        at = 0
        for piece in task:
            digest = digest_of.get(id(piece))
            if digest is None:
                done.append(_Done(piece, [], [], b"", None, _EMPTY_DIGEST, False))
                continue
            if id(piece) in known:
                done.append(
                    self._from_entry(piece, digest, known[id(piece)][1], not owners.get(digest, True))
                )
                continue
            data = view[at : at + piece.length]
            at += piece.length
            duplicate = not owners.get(digest, True)
            done.append(self._whole(piece, data, digest, duplicate))
        return done

    def _identity(self, piece: _Piece) -> Identity | None:
        """A content's file identity, for the stat cache (only contents with full
        blocks: a small file's open and fstat would cost what reading it costs)."""
        assert self.cache is not None
        if piece.inode.data is None or piece.length < self.block_size:
            return None
        return self.cache.identity(piece.inode.data)

    def _learn(
        self, pieces: list[_Piece], idents: dict[int, Identity | None], digests: dict[int, bytes], since: int
    ) -> None:
        """Record the digests just read in the stat cache (its racy rule applies)."""
        if self.cache is None:
            return
        for piece in pieces:
            ident = idents.get(id(piece))
            if ident is not None and piece.inode.data is not None:
                self.cache.learn(ident, piece.inode.data, digests[id(piece)], since)

    def _known_wholes(self, task: list[_Piece]) -> dict[int, tuple[bytes, Entry]]:
        """The contents of a batch whose digest the stat cache knows and whose stored
        form the content cache holds: id(piece) -> (digest, its open entry)."""
        assert self.cache is not None
        known: dict[int, tuple[bytes, Entry]] = {}
        for piece in task:
            ident = self._identity(piece)
            digest = self.cache.digest_of(ident) if ident is not None else None
            if digest is None:
                continue
            key = BuildCache.content_key(digest, self.shape)
            size = piece.length
            entry = self.cache.lookup(key, size, self.block_size, self._full_blocks(size, True))
            if entry is not None:
                known[id(piece)] = (digest, entry)
        return known

    def _from_entry(self, piece: _Piece, digest: bytes, entry: Entry, duplicate: bool) -> _Done:
        """A whole content from its cache entry, the source not read."""
        try:
            if duplicate:
                return _Done(piece, [], [], b"", None, digest, True)
            bs, size = self.block_size, piece.length
            full = self._full_blocks(size, True)
            blocks = entry.read(0, full, UNCOMPRESSED)
            tail = entry.tail
        finally:
            entry.close()
        raw_sizes = [min(bs, size - i * bs) for i in range(full)]
        tail_key = None
        if tail and self.key_tails:
            tail_key = digest if len(tail) == size else blake3.blake3(tail).digest()
        return _Done(piece, blocks, raw_sizes, tail, tail_key, digest, False)

    def _whole(self, piece: _Piece, data: memoryview, digest: bytes, duplicate: bool) -> _Done:
        if duplicate:
            return _Done(piece, [], [], b"", None, digest, True)
        cached, key = self._cached_whole(data, digest)
        if cached is not None:
            blocks, raw_sizes, tail = cached
        else:
            blocks, raw_sizes, tail = self._compress(data, keep_tail=True)
        tail_key = None
        if tail and self.key_tails:
            tail_key = digest if len(tail) == len(data) else blake3.blake3(tail).digest()
        return _Done(piece, blocks, raw_sizes, tail, tail_key, digest, False, key)

    def _cached_whole(
        self, data: memoryview, digest: bytes
    ) -> tuple[tuple[list[bytes | None], list[int], memoryview] | None, bytes | None]:
        """A content with full blocks that fits one task: its stored blocks from the
        build cache (the data is read anyway: it was hashed with its batch), or None
        and the key to store it under."""
        if self.cache is None or len(data) < self.block_size:
            return None, None
        bs, size = self.block_size, len(data)
        full = self._full_blocks(size, True)
        key = BuildCache.content_key(digest, self.shape)
        entry = self.cache.lookup(key, size, bs, full)
        if entry is None:
            return None, key
        try:
            blocks = entry.read(0, full, UNCOMPRESSED)
        finally:
            entry.close()
        raw_sizes = [min(bs, size - i * bs) for i in range(full)]
        return (blocks, raw_sizes, data[full * bs :]), None

    def _run_chunk(self, piece: _Piece) -> _Done:
        assert piece.reader is not None
        data, has_data = self._read_range(piece.reader, piece.offset, piece.length)
        if has_data:
            blocks, raw_sizes, tail = self._compress(data, keep_tail=piece.last)
        else:  # entirely inside a hole: nothing to compress
            full = self._full_blocks(len(data), piece.last)
            blocks, raw_sizes = [None] * full, [self.block_size] * full
            if full * self.block_size > len(data):  # a short last block (no fragments): its own size
                raw_sizes[-1] = len(data) - (full - 1) * self.block_size
            tail = memoryview(data)[full * self.block_size :]
        tail_key = blake3.blake3(tail).digest() if tail and self.key_tails else None
        if piece.last:
            piece.reader.check_unchanged()
        return _Done(piece, blocks, raw_sizes, tail, tail_key, piece.digest, False)

    def _run_cached(self, piece: _Piece) -> _Done:
        """A chunk of a large content whose stored form the build cache holds: its
        blocks as they were stored, the source not read."""
        assert piece.cached is not None
        bs, size = self.block_size, piece.inode.size
        first = piece.offset // bs
        count = self._full_blocks(piece.length, piece.last)
        blocks = piece.cached.read(first, count, UNCOMPRESSED)
        raw_sizes = [min(bs, size - i * bs) for i in range(first, first + count)]
        tail = piece.cached.tail if piece.last else b""
        tail_key = blake3.blake3(tail).digest() if tail and self.key_tails else None
        return _Done(piece, blocks, raw_sizes, tail, tail_key, piece.digest, False)

    def _probe(self, ref: DataRef, digest: bytes) -> tuple[bytes, Entry | None]:
        """On a hash thread: a large content's cache key, and its entry if cached."""
        assert self.cache is not None
        key = BuildCache.content_key(digest, self.shape)
        return key, self.cache.lookup(key, ref.size, self.block_size, self._full_blocks(ref.size, True))

    def stored_fragments(self, blocks: list[_Fragment]) -> list[bytes]:
        """Full fragment blocks -> their stored form (compressed, or the raw bytes when
        that is not smaller), on a helper thread.  With a build cache, a block an
        earlier build stored is taken from its entry, keyed by its members (their
        digests and lengths in order, which determine its bytes): a rebuild after no
        or a same-size change packs the same blocks and need neither read their small
        files nor compress them.  Misses are filled in (their blind members read) and
        go through the same call as without a cache: the same bytes."""
        compressor = self.compressors.get()
        if self.cache is None:
            raws = [b.raw for b in blocks]
            return self._stored_forms(raws, compressor.compress_many(raws, threads=1))
        self.cache.prefetch([(b.key, len(b.raw), 1) for b in blocks if b.key is not None])
        found: list[bytes | None] = []
        for b in blocks:
            entry = self.cache.lookup(b.key, len(b.raw), self.block_size, 1, fragment=True) if b.key else None
            if entry is None:
                found.append(None)
                continue
            try:
                found.append(entry.read(0, 1, UNCOMPRESSED)[0])
            finally:
                entry.close()
        misses = [i for i, block in enumerate(found) if block is None]
        for i in misses:
            blocks[i].fill()
        raws = [blocks[i].raw for i in misses]
        stored = self._stored_forms(raws, compressor.compress_many(raws, threads=1)) if misses else []
        for i, block in zip(misses, stored, strict=True):
            found[i] = block
            key = blocks[i].key
            if key is not None:
                self._store_fragment(key, blocks[i].raw, block)
        return [block for block in found if block is not None]

    @staticmethod
    def _stored_forms(raws: list[memoryview], packed: list[bytes]) -> list[bytes]:
        """Each block as the image stores it: compressed if that is smaller, else raw."""
        return [p if len(p) < len(raw) else bytes(raw) for raw, p in zip(raws, packed, strict=True)]

    def _store_fragment(self, key: bytes, raw: memoryview, stored: bytes) -> None:
        """One fragment block's entry: its one block as stored, no tail."""
        assert self.cache is not None
        word = len(stored) | (UNCOMPRESSED if len(stored) == len(raw) else 0)
        self.cache.store_now(key, len(raw), [stored], [word], b"", fragment=True)  # on this fragment thread

    def _read_range(self, reader: ContentReader, offset: int, length: int) -> tuple[bytes, bool]:
        """Read a range, skipping the holes of sparse files (they read as zeros).
        Returns the bytes and whether any of them came from data (not a hole).

        Holes smaller than a block cannot become squashfs holes: small files are
        read straight away, without asking for their holes.
        """
        if reader.ref.size <= self.block_size:
            return reader.read(offset, length), True
        end = offset + length
        pieces: list[bytes] = []
        pos = offset
        has_data = False
        for start, stop in reader.data_ranges():
            if stop <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                pieces.append(bytes(start - pos))
                pos = start
            upto = min(stop, end)
            pieces.append(reader.read(pos, upto - pos))
            has_data = True
            pos = upto
        if pos < end:
            pieces.append(bytes(end - pos))
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), has_data

    def _full_blocks(self, length: int, last: bool) -> int:
        """Blocks stored as data blocks; with fragments the last partial one is a tail."""
        bs = self.block_size
        return length // bs if (self.fragments and last) else -(-length // bs)

    def _compress(
        self, data: bytes | memoryview, keep_tail: bool
    ) -> tuple[list[bytes | None], list[int], memoryview]:
        """Full blocks -> compressed blocks (None for a block of zeros); the rest is the tail."""
        bs = self.block_size
        view = memoryview(data)
        if keep_tail and self.fragments and len(data) < bs:
            return [], [], view  # most files: all tail, nothing to compress here
        full = self._full_blocks(len(data), keep_tail)
        compressor = self.compressors.get()
        blocks: list[bytes | None] = []
        raw_sizes: list[int] = []
        for i in range(full):
            block = view[i * bs : (i + 1) * bs]
            raw_sizes.append(len(block))
            packed = compressor.compress(block)
            # A short last block (no fragments) is compared whatever its size.
            small = len(packed) <= self.zero_packed_size or len(block) < bs
            if small and block == self.zero_block[: len(block)]:
                blocks.append(None)  # all zeros: a hole
            elif len(packed) < len(block):
                blocks.append(packed)
            else:
                blocks.append(bytes(block))
        return blocks, raw_sizes, view[full * bs :]  # no copy: the packer copies it

    # -- committer (the calling thread) -------------------------------------------

    def write(self, files: list[Inode], image: ImageFile, progress: Progress) -> Placement:
        """Stream every content of `files` (plan order) into `image`; return where each went."""
        placement = Placement(len(files))
        packer = _FragmentPacker(self, image, files, placement.digests)
        by_digest: dict[bytes, FileData] = {}
        current = FileData(b"", 0)
        large = [inode.data for inode in files if inode.data is not None and inode.size > self.chunk]
        cache = self.cache
        then = self._probe if cache is not None else None
        ahead = hashpass.DigestsAhead(large, self.jobs, cache=cache, then=then)
        self._entries.clear()
        writer: EntryWriter | None = None  # the content being stored in the cache
        try:
            for results in ordered_map(self._run_task, self._tasks(files, ahead), self.jobs):
                if isinstance(results, _SmallDone):
                    progress(results.length)
                    self._place_small_batch(results, packer, placement)
                    continue
                progress(sum(done.piece.length for done in results))
                for done in results:
                    piece = done.piece
                    if done.duplicate:
                        assert done.digest is not None
                        placement.place(piece.content, by_digest[done.digest])
                        continue
                    if not done.blocks and piece.first and piece.last:
                        placement.place(piece.content, self._place_empty(done, placement, by_digest))
                        continue
                    if done.cache_key is not None:  # a whole content, compressed: stored when placed
                        writer = cache.writer(done.cache_key, piece.inode.size) if cache else None
                    if piece.first:
                        current = FileData(b"", piece.inode.size, blocks_start=image.pos)
                        if cache is not None and piece.cache_key is not None:
                            writer = cache.writer(piece.cache_key, piece.inode.size)
                    self._write_blocks(current, done, image)
                    if writer is not None:
                        self._store_blocks(cache, writer, done)
                    if piece.last:
                        assert done.digest is not None  # the last piece carries it
                        current.digest = done.digest
                        data = self._finish_content(current, done, image, packer, by_digest)
                        if data is current:
                            placement.count_unique(data)
                        placement.place(piece.content, data)
                        if writer is not None:
                            self._store_end(cache, writer, done.tail if data is current else None)
                            writer = None
                        if piece.cached is not None:
                            piece.cached.close()
            packer.flush_all()
        finally:
            if writer is not None and cache is not None:
                cache.submit(writer.abort, writer)
            for entry in self._entries:
                entry.close()
            ahead.close()
            packer.close()
        self.fragment_table = packer.table
        return placement

    def _place_small_batch(self, done: _SmallDone, packer: _FragmentPacker, placement: Placement) -> None:
        first, count = done.batch.first, len(done.batch.inodes)
        # Digests first: the packer's dedup table refers to them in placement.digests.
        if len(done.digests) == 32 * count:  # no empty file in the batch: one copy
            placement.digests[32 * first : 32 * (first + count)] = done.digests
        else:
            at = 0
            for index, size in enumerate(done.sizes, first):
                if size:
                    placement.digests[32 * index : 32 * index + 32] = done.digests[at : at + 32]
                    at += 32
                else:
                    placement.digests[32 * index : 32 * index + 32] = _EMPTY_DIGEST
        unique = packer.add_small(done, placement)
        placement.bytes_unique += unique
        placement.bytes_data += unique

    def _place_empty(self, done: _Done, placement: Placement, by_digest: dict[bytes, FileData]) -> FileData:
        """A content without data blocks outside a small batch: an empty file when
        fragments are off (with fragments, small files go through _place_small_batch)."""
        assert done.digest is not None and not done.tail
        earlier = by_digest.get(done.digest) if self.dedup else None
        if earlier is not None:
            return earlier
        data = FileData(done.digest, done.piece.length)
        placement.count_unique(data)
        by_digest[done.digest] = data
        return data

    def _finish_content(
        self,
        current: FileData,
        done: _Done,
        image: ImageFile,
        packer: _FragmentPacker,
        by_digest: dict[bytes, FileData],
    ) -> FileData:
        if done.piece.reader is not None:
            done.piece.reader.close()
        earlier = by_digest.get(current.digest) if self.dedup else None
        if earlier is not None:
            # A duplicate found only now (large content, or an earlier claim lost the
            # race in plan order): take its blocks back.
            image.rewind(current.blocks_start)
            self.bytes_stored -= sum(size & ~UNCOMPRESSED for size in current.block_sizes)
            return earlier
        if done.tail:
            current.frag_index, current.frag_offset = packer.add(done.tail, done.tail_key)
        if not current.block_sizes:
            current.blocks_start = 0
        by_digest[current.digest] = current
        return current

    @staticmethod
    def _store_blocks(cache: BuildCache | None, writer: EntryWriter, done: _Done) -> None:
        """Hand a chunk's stored blocks to the cache's writer thread."""
        assert cache is not None
        blocks = done.blocks
        words = [0 if b is None else len(b) | (UNCOMPRESSED if len(b) == raw else 0)
                 for b, raw in zip(blocks, done.raw_sizes, strict=True)]  # fmt: skip
        cache.submit(lambda: writer.add(blocks, words), writer)

    @staticmethod
    def _store_end(cache: BuildCache | None, writer: EntryWriter, tail: bytes | memoryview | None) -> None:
        """Finish the entry (tail None: the content was not stored after all)."""
        assert cache is not None
        if tail is None:
            cache.submit(writer.abort, writer)
            return
        kept = bytes(tail)

        def finish() -> None:
            writer.finish(kept)
            cache.stored()

        cache.submit(finish, writer)

    def _write_blocks(self, current: FileData, done: _Done, image: ImageFile) -> None:
        for block, raw_size in zip(done.blocks, done.raw_sizes, strict=True):
            if block is None:
                current.block_sizes.append(0)
                current.sparse += raw_size
                continue
            image.write(block)
            self.bytes_stored += len(block)
            current.block_sizes.append(len(block) | (UNCOMPRESSED if len(block) == raw_size else 0))


@dataclass(slots=True)
class _Fragment:
    """A full fragment block on its way to compression: its raw bytes, its key in the
    build cache (None without one) and its blind members, whose bytes are read only
    if the block is not found there."""

    raw: memoryview  # writable: the blind members' ranges are zeros until filled
    key: bytes | None = None
    blind: bytes = b""  # the packer's blind ranges (file number, offset, length), read only on a miss
    files: list[Inode] | None = None  # (with blind ranges: the build's files, and their digests
    digests: bytearray | None = None  # by file number, as the packer saw them)

    def fill(self) -> None:
        """Read the blind members into the block, each checked against the digest it
        was packed with (the stat cache's): a file that differs changed during the build."""
        if not self.blind:
            return
        assert self.files is not None and self.digests is not None
        ranges = list(struct.iter_unpack("<QII", self.blind))
        refs = [self.files[file].data for file, _, _ in ranges]
        data, digests = read_batch_packed(refs)
        at = 0
        for j, (file, offset, length) in enumerate(ranges):
            if digests[32 * j : 32 * j + 32] != self.digests[32 * file : 32 * file + 32]:
                path = refs[j].path
                raise SourceError("file changed while the image was built (its content differs)", path)
            self.raw[offset : offset + length] = data[at : at + length]
            at += length
        self.blind = b""


_FragmentBatch = tuple[list[tuple[int, _Fragment]], "Future[list[bytes]]"]  # blocks, their stored forms


class _FragmentPacker:
    """Packs tails into fragment blocks (the C packer, csrc/sqfs/frag.c); identical
    tails are stored once.

    Full fragment blocks are compressed in batches on `jobs` helper threads while the
    committer goes on.  Batches are written oldest first at fixed points (when more
    than FRAGMENT_IN_FLIGHT batches are in flight, and at the end), never
    "when one happens to be done": the image does not depend on timing.
    """

    def __init__(self, stream: DataStream, image: ImageFile, files: list[Inode], digests: bytearray) -> None:
        self.stream = stream
        self.image = image
        self.files, self.digests = files, digests  # (blind members: their sources and digests)
        packer = check_handle(lib.pyimg_sqfs_packer_new(stream.block_size), "squashfs fragment packer")
        self.packer = ffi.gc(packer, lib.pyimg_sqfs_packer_free)
        self.batch: list[tuple[int, _Fragment]] = []  # (fragment index, block)
        self.in_flight: collections.deque[_FragmentBatch] = collections.deque()
        self.max_in_flight = FRAGMENT_IN_FLIGHT
        self.pool = ThreadPoolExecutor(max_workers=stream.jobs, thread_name_prefix="pyimg-frag")
        self.table: list[tuple[int, int]] = []  # fragment index -> (image offset, size word)
        self._where = ffi.new("uint32_t[2]")
        self._members, self._blind = ffi.new("uint8_t *[1]"), ffi.new("uint8_t *[1]")
        self._lens = ffi.new("size_t[2]")
        self._unique = ffi.new("uint64_t *")

    def add(self, tail: bytes | memoryview, key: bytes | None) -> tuple[int, int]:
        """Place the tail of a larger file; with a key, an identical earlier tail is reused."""
        dedup = int(self.stream.dedup and key is not None)
        rc = lib.pyimg_sqfs_packer_add_tail(
            self.packer, ffi.from_buffer(tail), len(tail), key if key is not None else ffi.NULL, dedup,
            self._where, self._where + 1,
        )  # fmt: skip
        check(rc, self._err)
        self._take_closed()
        return int(self._where[0]), int(self._where[1])

    def add_small(self, done: _SmallDone, placement: Placement) -> int:
        """Place a batch of small files (their places go straight into `placement`);
        returns the bytes of those that are not duplicates."""
        self._unique[0] = 0
        data = ffi.from_buffer(done.data) if not done.blind else ffi.NULL  # blind: only their digests
        rc = lib.pyimg_sqfs_packer_add_small(
            self.packer, done.batch.first, len(done.sizes), ffi.from_buffer("uint64_t[]", done.sizes),
            data, placement.digests_ptr, int(self.stream.dedup),
            placement.frag_index_ptr, placement.frag_offset_ptr, self._unique,
        )  # fmt: skip
        check(rc, self._err)
        self._take_closed()
        return int(self._unique[0])

    def _err(self) -> Any:
        return lib.pyimg_sqfs_packer_error(self.packer)

    def _take_closed(self) -> None:
        """Hand the blocks the packer closed to compression, oldest first."""
        count = lib.pyimg_sqfs_packer_pending(self.packer)
        if not count:
            return
        size = ffi.new("size_t *")
        for i in range(count):
            fragment = self._fragment(i)
            # Handed over without a copy; the memoryview keeps it alive until written.
            block = ffi.gc(lib.pyimg_sqfs_packer_take(self.packer, i, size), lib.pyimg_free)
            fragment.raw = memoryview(ffi.buffer(block, size[0]))
            self.batch.append((len(self.table), fragment))
            self.table.append((0, 0))
            if len(self.batch) >= FRAGMENT_BATCH:
                self._hand_over()
        lib.pyimg_sqfs_packer_clear_pending(self.packer)

    def _fragment(self, i: int) -> _Fragment:
        """Pending block i's key and blind members (before it is taken)."""
        fragment = _Fragment(memoryview(b""))
        if self.stream.cache is None:
            return fragment
        lens = self._lens
        keyed = lib.pyimg_sqfs_packer_members(self.packer, i, self._members, lens, self._blind, lens + 1)
        members = bytes(ffi.buffer(self._members[0], lens[0])) if lens[0] else b""
        if keyed:
            digest = blake3.blake3(members).digest()
            fragment.key = BuildCache.content_key(digest, self.stream.fragment_shape)
        if lens[1]:
            assert keyed  # blind members always come with their digests
            fragment.blind = bytes(ffi.buffer(self._blind[0], lens[1]))
            fragment.files, fragment.digests = self.files, self.digests
        return fragment

    def _hand_over(self) -> None:
        """Start compressing the current batch; write the oldest ones past the limit."""
        if self.batch:
            batch, self.batch = self.batch, []
            stream = self.stream

            def compress() -> list[bytes]:
                return stream.stored_fragments([fragment for _, fragment in batch])

            self.in_flight.append((batch, self.pool.submit(compress)))
        while len(self.in_flight) > self.max_in_flight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        batch, future = self.in_flight.popleft()
        for (index, fragment), data in zip(batch, future.result(), strict=True):
            flag = UNCOMPRESSED if len(data) == len(fragment.raw) else 0  # (stored_fragments)
            self.table[index] = (self.image.pos, len(data) | flag)
            self.image.write(data)
            self.stream.bytes_stored += len(data)

    def flush_all(self) -> None:
        check(lib.pyimg_sqfs_packer_close_block(self.packer), self._err)
        self._take_closed()
        self._hand_over()
        while self.in_flight:
            self._write_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["NO_FRAGMENT", "UNCOMPRESSED", "DataStream", "FileData", "Placement"]
