"""Stage 1, hash & dedup: the contents' BLAKE3 digests, in plan order, on `jobs` threads.

Every format needs each content's digest: to store identical contents once, and
for the manifest.  What a format learns beside the digest differs (ext4 also finds
the all-zero 4 KiB blocks that become holes), so a format brings its own scan of a
group of contents; the pass itself is shared:

- `GroupCutter` cuts the contents, in plan order, into groups: small ones batched
  (one thread-pool task and one C call per batch keep the per-file cost down), a
  big one alone.  The same cuts whether the sizes come all at once or while the
  tree is still being collected, which is what lets a prescan's work be used.
- `Prescan` runs the pass while a directory source is still walked (ext4).
- `scan_groups` yields every group's scan in order: the prescan's while it scanned
  exactly the same groups, then its own on `jobs` threads (`ordered_map`), so the
  result never depends on timing or on whether a prescan ran.
- `hash_big` is the plain scan of one big content (its digest; holes are never
  read); `DedupTable` gives content ids in plan order, the first of equal digests
  owning the content (the C core's digest table, one call per batch).

squashfs takes the digests of its big contents from here before it compresses
them (a duplicate is then never read or compressed again, and no digest is
computed on its committer thread); ext4 scans all of its contents here (all but
those its scan cache knows: cache.ScanCache).  cpio stores every content in full
and reads each file once while it writes, digesting it on the way: a separate
pass would read everything twice for nothing.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import blake3

from ._ffi import check, check_handle, ffi, lib
from .cache import BuildCache
from .content import ContentReader, hash_zeros, ordered_map, shut_down
from .tree import DataRef

S = TypeVar("S")
Scan = Callable[[list[DataRef], "threading.Event | None"], S]


class ScanStopped(Exception):
    """A prescan was stopped in the middle of a big file (its result is not used)."""


class GroupCutter:
    """Cuts a sequence of content sizes, one at a time, into scan groups [start, end):
    contents up to `small` bytes batched up to `batch_bytes` or `batch_files`, a
    bigger one alone."""

    def __init__(self, small: int, batch_bytes: int, batch_files: int) -> None:
        self.small, self.batch_bytes, self.batch_files = small, batch_bytes, batch_files
        self.start = self.count = self.total = 0

    def push(self, size: int) -> list[tuple[int, int]]:
        """The groups that content number `self.count` (of `size` bytes) closes."""
        i, self.count = self.count, self.count + 1
        if size > self.small:
            done = [(self.start, i)] if self.start < i else []
            self.start, self.total = i + 1, 0
            return [*done, (i, i + 1)]
        self.total += size
        if self.total >= self.batch_bytes or i + 1 - self.start >= self.batch_files:
            done = [(self.start, i + 1)]
            self.start, self.total = i + 1, 0
            return done
        return []

    def end(self) -> list[tuple[int, int]]:
        return [(self.start, self.count)] if self.start < self.count else []

    def groups(self, sizes: list[int]) -> list[tuple[int, int]]:
        """All groups of contents of these sizes (a fresh cutter's work)."""
        cuts = [group for size in sizes for group in self.push(size)]
        return cuts + self.end()


class Prescan(Generic[S]):
    """The hash pass started while the tree is still being collected.

    A directory source's walk reports each regular file as it collects it, in the
    tree's order (sources/directory.py); this cuts them into the pass's own groups
    and scans them, in order, on one thread: the walk (then freeze) is Python and
    holds one core, scanning (C, GIL released) takes another.  More threads measured
    slower: they took the walk's core and the GIL from it.  When the pass starts it
    stops the prescan (`stop`: groups not started are left to it, on all `jobs`
    threads), takes the prescanned groups in order while they are exactly its own,
    and scans the rest itself: the image does not depend on whether a prescan ran.
    """

    def __init__(self, scan: Scan[S], cutter: GroupCutter) -> None:
        self.scan = scan
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pyimg-prescan")
        self.cutter = cutter
        self.refs: list[DataRef] = []  # files reported and not yet in a group
        self.groups: collections.deque[tuple[list[DataRef], Future[S]]] = collections.deque()
        self.stopping = threading.Event()  # ends a big file's scan early (close)

    def add(self, ref: DataRef) -> None:
        self.refs.append(ref)
        for start, end in self.cutter.push(ref.size):
            self._submit(start, end)

    def finish(self) -> None:
        """Every file was reported: the last group is complete."""
        for start, end in self.cutter.end():
            self._submit(start, end)

    def _submit(self, start: int, end: int) -> None:
        # Groups are consecutive: this one is the first end - start files waiting.
        refs = self.refs[: end - start]
        del self.refs[: end - start]
        self.groups.append((refs, self.pool.submit(self._run, refs)))

    def _run(self, refs: list[DataRef]) -> S:
        return self.scan(refs, self.stopping)

    def stop(self) -> None:
        """Scan no more: the groups not started yet are cancelled.  (The one
        running may finish after a later one was cancelled: take() uses neither a
        cancelled group nor any after it.)"""
        for _, future in self.groups:
            future.cancel()

    def take(self, refs: list[DataRef]) -> S | None:
        """The scan of exactly these files if the prescan's next group is them and
        was not cancelled (waiting for it), else None; after a miss the prescan is
        closed."""
        if self.groups:
            group, future = self.groups[0]
            same = len(group) == len(refs) and all(a is b for a, b in zip(group, refs, strict=True))
            if same and not future.cancelled():
                self.groups.popleft()
                return future.result()
        self.close()
        return None

    def close(self) -> None:
        """Stop: pending groups are cancelled, a running one ended at its next
        chunk (a big file) or batch and waited for; no thread is left behind."""
        self.stopping.set()
        self.stop()
        self.groups.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def scan_groups(
    refs: list[DataRef],
    groups: list[tuple[int, int]],
    scan: Callable[[list[DataRef], bool], S],
    jobs: int,
    prescan: Prescan[S] | None = None,
) -> Iterator[tuple[int, S]]:
    """(first content, scan) of every group, in order: from the prescan while it
    scanned the same groups, then scanned here on `jobs` threads.  scan(refs, alone):
    `alone` when that group is the only one left to scan here (with jobs > 1), so a
    big content may use blake3's own threads; several groups share the jobs."""
    taken = 0
    if prescan is not None:
        prescan.stop()
        for start, end in groups:
            scanned = prescan.take(refs[start:end])
            if scanned is None:
                break
            taken += 1
            yield start, scanned
        prescan.close()
    rest = groups[taken:]
    alone = len(rest) == 1 and jobs > 1
    work = ordered_map(lambda group: scan(refs[group[0] : group[1]], alone), rest, max(1, jobs))
    for (start, _), scanned in zip(rest, work, strict=True):
        yield start, scanned


class DigestsAhead:
    """The digests of big contents (hash_big), computed in plan order on `jobs`
    threads from the moment this is made, `window` contents ahead of the consumer:
    the stream that takes them finds each ready when it gets there.  close() cancels
    what is left and waits for the threads.

    With a build cache (pyimg/cache.py), an unchanged file's digest comes from its
    stat cache (the file is not read), and a digest computed is recorded there.
    `then(ref, digest)`, if given, runs on the same threads after each digest (the
    squashfs stream looks its content cache up there); next_with() returns its result."""

    def __init__(
        self,
        refs: list[DataRef],
        jobs: int,
        window: int | None = None,
        *,
        cache: BuildCache | None = None,
        then: Callable[[DataRef, bytes], Any] | None = None,
    ) -> None:
        self._refs = iter(refs)
        self._window = window or 4 * max(1, jobs)
        self._alone = len(refs) == 1 and jobs > 1  # then blake3's own threads
        self._cache = cache
        self._then = then
        self._pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="pyimg-hash")
        self._pending: collections.deque[Future[tuple[bytes, Any]]] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        threads = blake3.blake3.AUTO if self._alone else 1
        while len(self._pending) < self._window:
            ref = next(self._refs, None)
            if ref is None:
                return
            self._pending.append(self._pool.submit(self._one, ref, threads))

    def _one(self, ref: DataRef, threads: int) -> tuple[bytes, Any]:
        cache = self._cache
        since = cache.clock() if cache is not None else 0
        ident = cache.identity(ref) if cache is not None else None
        digest = cache.digest_of(ident) if cache is not None and ident is not None else None
        if digest is None:
            digest = hash_big(ref, threads)
            if cache is not None and ident is not None:
                cache.learn(ident, ref, digest, since)
        return digest, (self._then(ref, digest) if self._then is not None else None)

    def next(self) -> bytes:
        """The next content's digest (its SourceError, if it could not be read)."""
        return self.next_with()[0]

    def next_with(self) -> tuple[bytes, Any]:
        """The next content's digest and what `then` made of it."""
        result = self._pending.popleft().result()
        self._fill()
        return result

    def close(self) -> None:
        """Cancel what is queued and wait for what runs, through Ctrl-C (as
        ordered_map does: its tasks read buffers the caller frees next)."""
        pending, self._pending = list(self._pending), collections.deque()
        shut_down(self._pool, pending)


HASH_READ = 1 << 20  # bytes read at a time by hash_big (a reused buffer)


def hash_big(ref: DataRef, threads: int = 1, stop: threading.Event | None = None) -> bytes:
    """The BLAKE3 digest of one big content, read a buffer at a time (reused: a
    pread into a warm 1 MiB buffer cost less than mapping the file, whose page
    faults were +5 % CPU on the large workload); holes of a sparse file are hashed
    as the zeros they are, never read.  Refuses a file that changed since it was
    collected.  `threads`: blake3's own, for a content hashed alone."""
    hasher = blake3.blake3(max_threads=threads)
    buffer = bytearray(HASH_READ)
    view = memoryview(buffer)
    with ContentReader(ref) as reader:
        pos = 0
        for start, end in reader.data_ranges():
            hash_zeros(start - pos, hasher.update)
            while start < end:
                if stop is not None and stop.is_set():
                    raise ScanStopped(ref.path)
                n = reader.read_into(view[: min(HASH_READ, end - start)], start)
                hasher.update(view[:n])
                start += n
            pos = end
        hash_zeros(ref.size - pos, hasher.update)
        reader.check_unchanged()
    return hasher.digest()


class DedupTable:
    """Content ids for digests given in plan order, in batches: the first content of
    equal digests gets a new id (it is stored), later ones that id (not stored).
    The C core's table: one call per batch, no Python object per content."""

    def __init__(self) -> None:
        self._table = ffi.gc(check_handle(lib.pyimg_dedup_new(), "dedup table"), lib.pyimg_dedup_free)
        self.next_id = 0  # the id the next new content gets

    def assign(
        self, digests: Any, first: int, count: int, ids: Any, is_new: bytearray, *, dedup: bool = True
    ) -> None:
        """Ids for contents first..first+count, whose digests are at those places of
        `digests` (32 bytes each, a C pointer), written to `ids` (a uint32 C array
        indexed like the digests); is_new[i] says whether content first+i is new.
        With dedup=False every content is new."""
        next_id = ffi.new("uint32_t *", self.next_id)
        rc = lib.pyimg_dedup_assign(self._table, digests, first, count, int(dedup), next_id, ids,
                                    ffi.from_buffer("uint8_t[]", is_new, require_writable=True))  # fmt: skip
        check(rc, lambda: lib.pyimg_dedup_error(self._table))
        self.next_id = next_id[0]
