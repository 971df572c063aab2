"""Chunked images in a store: cutting an image for push, sending the chunks a store
lacks, and reassembling an image from a store's chunks and those of local files.

The format is in docs/store.md ("Chunked images").  The chunks are the layers of the
image manifest, so a registry's garbage collector and `skopeo copy` see every blob.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from ..chunks import DEFAULT_PARAMS, Chunk, ChunkParams, chunk_file
from ..errors import DigestMismatchError, OutputError, StoreError
from ..imagehash import digest_image
from ..output import AtomicOutput
from .artifact import Descriptor, Manifest
from .base import Progress, Store

# Registries refuse manifests over 4 MiB (distribution's default limit); keep clear of it.
MANIFEST_BUDGET = 3 << 20
# Transfers at once: each chunk is a round trip or two, so a few in flight hide the latency.
WORKERS = 4
# A chunk descriptor in the manifest is ~145 bytes; used to pick the first chunk size tried.
_DESCRIPTOR_BYTES = 150
_MAX_SHIFT = 10

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class TransferCounts:
    """Blobs (or chunks) sent and found present, and their bytes."""

    sent: int = 0
    present: int = 0
    sent_bytes: int = 0
    present_bytes: int = 0

    def add(self, was_sent: bool, size: int) -> None:
        if was_sent:
            self.sent += 1
            self.sent_bytes += size
        else:
            self.present += 1
            self.present_bytes += size

    def merge(self, other: TransferCounts) -> None:
        self.sent += other.sent
        self.present += other.present
        self.sent_bytes += other.sent_bytes
        self.present_bytes += other.present_bytes

    @classmethod
    def all_present(cls, chunks: Iterable[Chunk]) -> TransferCounts:
        counts = cls()
        for c in chunks:
            counts.add(False, c.size)
        return counts


@dataclass(frozen=True)
class ChunkedPlan:
    params: ChunkParams
    chunks: list[Chunk]
    manifest: Manifest
    sha256: str  # the whole image's, as read while cutting it

    def distinct(self) -> list[Chunk]:
        """Each digest once (an image repeats chunks: runs of zeros, duplicated files)."""
        return list({c.digest: c for c in reversed(self.chunks)}.values())[::-1]


def plan_chunks(
    path: str, size: int, make_manifest: Callable[[list[tuple[str, int]], str], Manifest]
) -> ChunkedPlan:
    """Cut the image and build its manifest.  The default 64 KiB average is kept unless
    the chunk list would make the manifest too big for a registry; then every size is
    doubled until it fits (only images of ~1.5 GiB and more: their chunks are bigger, and
    a version that crosses that line shares nothing with the one before)."""
    shift = 0
    while (
        shift < _MAX_SHIFT
        and size // (DEFAULT_PARAMS.avg_size << shift) * _DESCRIPTOR_BYTES > MANIFEST_BUDGET
    ):
        shift += 1
    while True:
        params = DEFAULT_PARAMS.scaled(shift)
        whole = hashlib.sha256()
        chunks = chunk_file(path, params, whole)
        manifest = make_manifest([(c.digest, c.size) for c in chunks], params.label())
        if len(manifest.data) <= MANIFEST_BUDGET or shift >= _MAX_SHIFT:
            return ChunkedPlan(params, chunks, manifest, "sha256:" + whole.hexdigest())
        shift += 1


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS) -> Iterator[R]:
    """fn over items on a few threads, results in order, at most 2 * workers queued; on
    an error (or Ctrl-C) the queued calls are dropped and the running ones finish."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyimg-chunk")
    pending: list[Future[R]] = []
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pread(fd: int, offset: int, size: int, path: str) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise OutputError(f"cannot read: {exc.strerror}", path) from exc
    if len(data) != size:
        raise OutputError(f"the file changed while it was read ({len(data)} of {size} bytes)", path)
    return data


def upload_chunks(
    store: Store, path: str, chunks: list[Chunk], known: set[str], progress: Progress | None
) -> TransferCounts:
    """Send each chunk the store lacks (it asks with HEAD first), a few at a time."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:

        def one(chunk: Chunk) -> bool:
            if chunk.digest in known:
                return False
            # The store checks the bytes against the digest (a file changed since it
            # was cut is refused with DigestMismatchError).
            return store.put_blob_bytes(_pread(fd, chunk.offset, chunk.size, path), chunk.digest)

        counts = TransferCounts()
        for chunk, sent in zip(chunks, parallel(one, chunks), strict=True):
            counts.add(sent, chunk.size)
            if progress is not None:
                progress(chunk.size)
        return counts
    finally:
        os.close(fd)


# -- pull -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalChunk:
    path: str
    offset: int
    size: int


@dataclass
class AssemblyCounts:
    chunks: int = 0  # distinct chunks in the image
    downloaded: int = 0  # distinct chunks fetched from the store
    bytes_downloaded: int = 0
    reused: int = 0  # distinct chunks copied from local files
    bytes_reused: int = 0  # bytes of the image written from local chunks
    reused_from: list[str] = field(default_factory=list)

    def add(self, was_reused: bool, size: int) -> None:
        if was_reused:
            self.reused += 1
            self.bytes_reused += size
        else:
            self.downloaded += 1
            self.bytes_downloaded += size


def reuse_sources(paths: Iterable[str], params: ChunkParams, wanted: set[str]) -> dict[str, LocalChunk]:
    """The wanted chunks found in local files (older versions of the image), cut with the
    artifact's parameters.  A file that cannot be read gives nothing: reuse is a saving,
    never a reason to fail."""
    found: dict[str, LocalChunk] = {}
    for path in dict.fromkeys(paths):
        if not os.path.isfile(path):
            continue
        try:
            for c in chunk_file(path, params):
                if c.digest in wanted and c.digest not in found:
                    found[c.digest] = LocalChunk(path, c.offset, c.size)
        except OutputError:
            continue
    return found


def _write_at(out: AtomicOutput, data: bytes, offsets: list[int]) -> None:
    if data.count(0) == len(data):
        return  # zeros: the file was sized with holes
    for offset in offsets:
        view = memoryview(data)
        pos = offset
        while view:
            try:
                n = os.pwrite(out.fd, view, pos)
            except OSError as exc:
                raise OutputError(f"write failed: {exc.strerror}", out.target) from exc
            view, pos = view[n:], pos + n


def _read_local(chunk: LocalChunk) -> bytes:
    fd = os.open(chunk.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread(fd, chunk.offset, chunk.size, chunk.path)
    finally:
        os.close(fd)


def assemble(
    store: Store,
    out: AtomicOutput,
    chunks: list[Descriptor],
    local: dict[str, LocalChunk],
    progress: Progress | None,
) -> AssemblyCounts:
    """Write the image into out: each distinct chunk once read (from a local file, else the
    store, verified by its digest) and written wherever the image has it."""
    where: dict[str, list[int]] = {}
    descs: dict[str, Descriptor] = {}
    offset = 0
    for d in chunks:
        where.setdefault(d.digest, []).append(offset)
        descs.setdefault(d.digest, d)
        offset += d.size
    out.size_to(offset)
    counts = AssemblyCounts(chunks=len(descs))

    def one(digest: str) -> tuple[bool, int]:
        source = local.get(digest)
        desc = descs[digest]
        if source is not None and source.size == desc.size:
            data = _read_local(source)  # checked with the whole image below
            reused = True
        else:
            parts: list[bytes] = []
            store.fetch_blob(desc, parts.append)  # verified against the digest
            data = b"".join(parts)
            reused = False
        _write_at(out, data, where[digest])
        return reused, desc.size

    for reused, size in parallel(one, list(descs)):
        counts.add(reused, size)
        if progress is not None:
            progress(size)
    return counts


def pull_chunked(
    store: Store,
    output: str,
    chunks: list[Descriptor],
    *,
    chunking: str,
    size: int,
    sha256: str,
    blake3: str,
    sources: Iterable[str],
    progress: Progress | None,
) -> AssemblyCounts:
    """Reassemble a chunked image into output (temp file, verified, fsync, rename).  The
    whole image is checked at the end, by size, SHA-256 and image digest, against the
    manifest's annotations: a reused local chunk is trusted only through that check."""
    try:
        params = ChunkParams.parse(chunking)
    except ValueError as exc:
        raise StoreError(f"the image's chunking is not one pyimg knows: {exc}", store.address) from None
    if sum(d.size for d in chunks) != size:
        raise StoreError(
            f"the image's chunks add up to {sum(d.size for d in chunks)} bytes, its manifest says {size}",
            store.address,
        )
    local = reuse_sources(sources, params, {d.digest for d in chunks})
    with AtomicOutput(output) as out:
        counts = assemble(store, out, chunks, local, progress)
        got = digest_image(out.fd, sha256=True)
        if f"sha256:{got.sha256}" != sha256 or got.blake3 != blake3:
            raise DigestMismatchError(
                f"the reassembled image has digest sha256:{got.sha256} (image digest {got.blake3}), "
                f"its manifest says {sha256} ({blake3}): refused",
                store.address,
            )
        out.commit()
    counts.reused_from = sorted({c.path for c in local.values()})
    return counts
