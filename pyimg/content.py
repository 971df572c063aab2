"""Reading file content, and running per-content work on threads in a fixed order.

Every format reads regular-file data through `ContentReader`, which refuses a file
that changed since it was collected (size or mtime), and runs its per-content work
through `ordered_map`: many items in flight on `jobs` threads, results handed back
strictly in submission order through a bounded window, so output never depends on
timing and memory stays bounded.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
from array import array
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import blake3

from ._ffi import ffi, lib
from .errors import SourceError
from .longpath import open_long
from .tree import DataRef

T = TypeVar("T")
R = TypeVar("R")


class ContentReader:
    """Reads a DataRef's bytes.  Opened once per content, closed by the caller."""

    def __init__(self, ref: DataRef) -> None:
        self.ref = ref
        self._ranges: list[tuple[int, int]] | None = None
        try:
            self.fd = open_long(ref.fs_path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            # O_NOATIME needs ownership; retry without it.
            try:
                self.fd = open_long(ref.fs_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SourceError(f"cannot open: {exc.strerror}", ref.path) from exc
        except OSError as exc:
            raise SourceError(f"cannot open: {exc.strerror}", ref.path) from exc
        self.check_unchanged()

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_unchanged(self) -> None:
        """Refuse a file whose size or mtime differ from what was collected."""
        ref = self.ref
        if ref.stamp_size < 0:
            return
        st = os.fstat(self.fd)
        if st.st_size != ref.stamp_size or st.st_mtime_ns != ref.stamp_mtime_ns:
            raise SourceError("file changed while the image was built (size or mtime differ)", self.ref.path)

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` within the content (short only at a changed file)."""
        try:
            data = os.pread(self.fd, length, self.ref.offset + offset)
        except OSError as exc:
            raise SourceError(f"read failed: {exc.strerror}", self.ref.path) from exc
        if len(data) != length:
            raise SourceError("file shrank while the image was built", self.ref.path)
        return data

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` with the content's bytes at `offset`; len(buffer)."""
        try:
            n = os.preadv(self.fd, [buffer], self.ref.offset + offset)
        except OSError as exc:
            raise SourceError(f"read failed: {exc.strerror}", self.ref.path) from exc
        if n != len(buffer):
            raise SourceError("file shrank while the image was built", self.ref.path)
        return n

    def data_ranges(self) -> list[tuple[int, int]]:
        """(start, end) byte ranges that may hold data, found with SEEK_DATA/SEEK_HOLE.

        Holes of a sparse file are never read.  Falls back to the whole range where
        the file system does not report holes (or the content is inside an archive).
        Computed once per reader.
        """
        if self._ranges is None:
            self._ranges = self._find_data_ranges()
        return self._ranges

    def _find_data_ranges(self) -> list[tuple[int, int]]:
        size = self.ref.size
        if self.ref.offset != 0 or size == 0:
            return [(0, size)] if size else []
        return data_ranges(self.fd, size)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the regions of the first `size` bytes of a file that may hold
    data (SEEK_DATA/SEEK_HOLE); the whole range where the file system does not tell."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            pos = end
    except (AttributeError, OSError):
        return [(0, size)]
    return ranges


ZEROS_SIZE = 4 << 20  # zeros fed to a hasher at a time for a hole
# Zeros to hash holes with, as pages that are never written: they all map the
# kernel's zero page and cost no memory (bytes(n) would be 4 MB of RSS once the CLI
# has malloc serve large blocks from its heap, see csrc/common/malloc_tune.c).
_ZEROS = mmap.mmap(-1, ZEROS_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)


def hash_zeros(count: int, feed: Callable[[memoryview], object]) -> None:
    """Feed `count` zero bytes (a hole) to `feed`, from one shared buffer."""
    zeros = memoryview(_ZEROS)
    while count > 0:
        n = min(count, len(_ZEROS))
        feed(zeros[:n])
        count -= n


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    jobs: int,
    window: int | None = None,
) -> Generator[R, None, None]:
    """Yield fn(item) for every item, in the order of `items`, computing up to
    `window` (default 4 x jobs) of them ahead on `jobs` threads.

    Exceptions surface in order too: the first failing item's exception is raised
    when its turn comes, and the pending work is cancelled.

    A consumer that may stop before the end closes it (contextlib.closing): left
    to the garbage collector, its close runs where an exception cannot propagate,
    and a Ctrl-C while it waits for the threads was printed as "Exception ignored"
    and lost (the build went on to exit 0).
    """
    if jobs <= 1:
        for item in items:
            yield fn(item)
        return
    limit = window or 4 * jobs
    pending: collections.deque[Future[R]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pyimg")
    try:
        iterator = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(fn, item))
            if not pending:
                return
            result = pending[0].result()  # still pending while waited for: a Ctrl-C here waits for it
            pending.popleft()
            yield result
    finally:
        shut_down(pool, pending)


def shut_down(pool: ThreadPoolExecutor, pending: Iterable[Future[Any]]) -> None:
    """Cancel the queued tasks, wait for the running ones, then for the threads, each
    step through a Ctrl-C (raised once all are done: the tasks may use buffers the
    caller frees next).  The tasks are waited for by their futures, not by joining
    the threads: in Python 3.11 a join that a Ctrl-C interrupts can take a running
    thread for ended (bpo-45274)."""
    futures = list(pending)

    def cancel() -> None:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)

    def finish() -> None:
        # Not concurrent.futures.wait: it waits for cancelled futures to be "notified",
        # which those cancelled in the queue never are (it hung).
        for future in futures:
            with contextlib.suppress(CancelledError):
                future.exception()  # returns once the task has ended (its error is its consumer's)

    interrupted: BaseException | None = None
    for step in (cancel, finish, lambda: pool.shutdown(wait=True)):
        try:
            uninterrupted(step)
        except KeyboardInterrupt as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def uninterrupted(wait: Callable[[], object]) -> None:
    """Call `wait` until it returns, through Ctrl-C: a KeyboardInterrupt that came
    meanwhile is raised once it has.  For waiting on work that uses buffers the
    caller frees next (a mapped window, a pool's tasks); `wait` must be safe to
    call again after an interruption (an Event's or a future's wait is)."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


_READ_REASONS = {
    1: "cannot open",
    2: "read failed",
}


def read_error(ref: DataRef, code: int, err: int) -> SourceError:
    """The error for a file the C core could not read (a PYIMG_READ_* code, errno)."""
    if code == lib.PYIMG_READ_CHANGED:
        return SourceError("file changed while the image was built (size or mtime differ)", ref.path)
    if code == lib.PYIMG_READ_SHORT:
        return SourceError("file shrank while the image was built", ref.path)
    return SourceError(f"{_READ_REASONS.get(code, 'read failed')}: {os.strerror(err)}", ref.path)


# Files up to this size are hashed by the C core inside the batch (no per-call cost);
# bigger ones by the blake3 package, whose SIMD code is ~10x faster per byte.
C_HASH_MAX = 16 << 10


def _stamp_mtimes(refs: list[DataRef]) -> array[int]:
    """The stamps' mtimes as int64 ns; one past 2262 does not fit and is wrapped
    modulo 2^64, as the C readers compare it (csrc/common/readfiles.c)."""
    try:
        return array("q", [ref.stamp_mtime_ns for ref in refs])
    except OverflowError:
        return array("q", [(ref.stamp_mtime_ns + (1 << 63)) % (1 << 64) - (1 << 63) for ref in refs])


@dataclass(slots=True)
class BatchSources:
    """A batch of DataRefs as the C readers take them (pyimg_read_batch,
    pyimg_scan_batch, pyimg_ext4_write_batch): columns, not objects."""

    paths: bytes  # NUL-terminated, back to back
    offsets: array[int]
    sizes: array[int]
    stamp_sizes: array[int]  # -1: not checked (a spool file cannot change)
    stamp_mtimes: array[int]

    @classmethod
    def of(cls, refs: list[DataRef]) -> BatchSources:
        return cls(
            b"".join([ref.base + ref.rel + b"\0" for ref in refs]),
            array("Q", [ref.offset for ref in refs]),
            array("Q", [ref.size for ref in refs]),
            array("q", [ref.stamp_size for ref in refs]),
            _stamp_mtimes(refs),
        )

    def args(self) -> tuple[Any, ...]:
        """paths, offsets, sizes, stamp_sizes, stamp_mtimes as C arguments."""
        return (
            self.paths,
            ffi.from_buffer("uint64_t[]", self.offsets),
            ffi.from_buffer("uint64_t[]", self.sizes),
            ffi.from_buffer("int64_t[]", self.stamp_sizes),
            ffi.from_buffer("int64_t[]", self.stamp_mtimes),
        )


def read_batch(refs: list[DataRef], *, hash: bool = True) -> tuple[bytearray, list[bytes]]:
    """The contents of many (small) DataRefs, back to back, and their BLAKE3
    digests (see read_batch_packed).  With hash=False only the bytes are read
    (digests: [])."""
    out, digests = read_batch_packed(refs, hash=hash)
    if not hash:
        return out, []
    return out, [bytes(digests[at : at + 32]) for at in range(0, len(digests), 32)]


def read_batch_packed(refs: list[DataRef], *, hash: bool = True) -> tuple[bytearray, bytearray]:
    """The contents of many (small) DataRefs, back to back, and their BLAKE3
    digests, 32 bytes each, back to back: read and hashed by the C core with the
    GIL released once for the whole batch (files over C_HASH_MAX are hashed here
    with the blake3 package).  Raises SourceError for the first file (in order)
    that cannot be read or changed since it was collected."""
    out, digests, _ = _read_batch(refs, hash, None)
    return out, digests


def read_batch_identified(refs: list[DataRef]) -> tuple[bytearray, bytearray, array[int]]:
    """read_batch_packed, and each file's identity for the build cache (5 ints per
    file, as cache.Identity), from the fstat after its read."""
    idents = array("q", bytes(40 * len(refs)))
    out, digests, _ = _read_batch(refs, True, idents)
    return out, digests, idents


def _read_batch(
    refs: list[DataRef], hash: bool, idents: array[int] | None
) -> tuple[bytearray, bytearray, array[int] | None]:
    n = len(refs)
    src = BatchSources.of(refs)
    out = bytearray(sum(src.sizes))
    status = array("i", bytes(4 * n))
    errnos = array("i", bytes(4 * n))
    digests = bytearray(32 * n)
    buffers = (
        ffi.from_buffer("uint8_t[]", out, require_writable=True),
        ffi.from_buffer("int32_t[]", status, require_writable=True),
        ffi.from_buffer("int32_t[]", errnos, require_writable=True),
        ffi.from_buffer("uint8_t[]", digests, require_writable=True),
        C_HASH_MAX if hash else 0,
    )
    if idents is None:
        failed = lib.pyimg_read_batch(n, *src.args(), *buffers)
    else:
        failed = lib.pyimg_read_batch_ident(
            n, *src.args(), *buffers, ffi.from_buffer("int64_t[]", idents, require_writable=True)
        )
    check_batch(refs, failed, status, errnos)
    if hash:
        hash_the_rest(out, src.sizes, digests)
    return out, digests, idents


def check_batch(refs: list[DataRef], failed: int, status: array[int], errnos: array[int]) -> None:
    """Raise the error of the first file (in order) a C batch reader failed on."""
    if failed:
        for ref, code, err in zip(refs, status, errnos, strict=True):
            if code:
                raise read_error(ref, code, err)


def hash_the_rest(buffer: bytearray, sizes: array[int], digests: bytearray) -> None:
    """The digests the C batch readers left to us: files over C_HASH_MAX (their bytes
    back to back in buffer), hashed with the blake3 package's SIMD code."""
    if max(sizes, default=0) <= C_HASH_MAX:
        return
    view = memoryview(buffer)
    at = 0
    for i, size in enumerate(sizes):
        if size > C_HASH_MAX:
            digests[32 * i : 32 * i + 32] = blake3.blake3(view[at : at + size]).digest()
        at += size
