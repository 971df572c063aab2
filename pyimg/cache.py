"""The local build cache (docs/cache.md): what a warm rebuild need not redo.

Two parts, in one directory:

- the stat cache (one file, `stat-v1`): a source file's identity (st_dev, st_ino,
  size, mtime_ns, ctime_ns) -> its content's BLAKE3, so an unchanged big file is not
  read to be hashed.  Only files of directory sources; an identity that could be
  racily clean (mtime or ctime within RACY_NS of the moment it is recorded: a write
  in the same timestamp tick would not change it) is never stored (git's rule).
- the content cache (one file per entry, `c-<key hex>`): key = BLAKE3 over the cache
  format version, the content's BLAKE3 and every option that shapes its stored form
  -> that stored form (squashfs: each full block's bytes and size word, holes, and
  the tail that goes into a fragment).  A hit is used instead of reading and
  compressing the content: the same bytes, by construction of the key.

Entries are written to a temp file in the directory and renamed: readers see a
whole entry or none (a crash may tear one: its check fails), and concurrent builds
sharing a directory at worst write the same entry twice.  Every entry is checked
(magic, version, key, the BLAKE3 of its payload) before it is used; a bad one is
removed and the content computed as without a cache.  Any OSError of the cache (not
writable, full) turns the cache off for the rest of the build with one warning; the
build goes on.  Nothing here prints.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import struct
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from .tree import DataRef

if TYPE_CHECKING:
    from .cache_remote import RemoteCache

FORMAT_VERSION = 1  # bump when an entry's layout or the meaning of its key changes
MAGIC = b"PYIMGC\x00\x01"
HEADER = struct.Struct("<8sI32s")  # magic, version, key
FOOTER = struct.Struct("<QII")  # content size, block count, tail length (end of payload)
RACY_NS = 2_000_000_000  # identities this close to "now" are not trusted (git's racy rule)
STAT_FILE = "stat-v1"
STAT_MAGIC = b"PYIMGS\x00\x01"
STAT_RECORD = struct.Struct("<QQQqq32s")  # dev, ino, size, mtime_ns, ctime_ns, digest
IDENT_KEY = struct.Struct("<QQQqq")  # an identity as a key: st_dev, st_ino, size, mtime_ns, ctime_ns
IDENT_SIZE = IDENT_KEY.size  # (a stat record is the key and the digest: 40 + 32 bytes)
STAT_MAX = 1_000_000  # records kept (this build's first)
ENTRY_PREFIX = "c-"
IMAGE_PREFIX = "i-"  # a whole image (reuse.py)
TEMP_PREFIX = "tmp-"
TEMP_STALE_S = 3600  # a temp file older than this is a crashed build's: removed
DEFAULT_MAX = 2 << 30
READ = 1 << 20
WRITE_BUFFER = 1 << 20  # an entry is written in pieces of about this size

Identity = tuple[int, int, int, int, int]


def default_dir() -> str:
    """The CLI's default: $PYIMG_BUILD_CACHE, else $XDG_CACHE_HOME/pyimg/build, else
    ~/.cache/pyimg/build."""
    if os.environ.get("PYIMG_BUILD_CACHE"):
        return os.environ["PYIMG_BUILD_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyimg", "build")


def compressor_versions() -> bytes:
    """pyimg's version and the compression libraries': a new one may compress (or
    set its compressor up) differently.  A change to how a block is stored within
    one version must bump FORMAT_VERSION."""
    import zstandard

    from . import __version__

    libraries = f"zstd {zstandard.ZSTD_VERSION} zlib {zlib.ZLIB_RUNTIME_VERSION} xz {_liblzma_version()}"
    return f"pyimg {__version__} {libraries} py {sys.version}".encode()


@functools.cache
def _liblzma_version() -> str:
    """The liblzma the lzma module runs on (Python does not say it): asked of the
    library itself through the module's own link to it.  "?" where that fails: then
    only Python's version stands for it, as before."""
    import ctypes

    try:
        import _lzma

        function = ctypes.CDLL(_lzma.__file__).lzma_version_string
        function.restype = ctypes.c_char_p
        return str(function().decode())
    except (ImportError, OSError, AttributeError, UnicodeDecodeError):
        return "?"


@dataclass
class CacheStats:
    stat_hits: int = 0
    content_hits: int = 0
    content_stored: int = 0
    fragment_hits: int = 0  # fragment blocks (packed tails) taken from the cache, not compressed
    fragment_stored: int = 0
    bad_entries: int = 0  # found corrupt, truncated or foreign, removed
    evicted: int = 0
    remote_fetched: int = 0  # entries used that a pack fetched from the shared cache brought
    remote_packs: int = 0  # packs fetched from it (blobs of entries: cache_remote.py)
    remote_pushed: int = 0  # entries uploaded to it (in packs)
    remote_refused: int = 0  # its packs or entries that were not what its index said: not used
    image_hits: int = 0  # whole images reused (reuse.py): nothing else was done
    image_left_in_place: int = 0  # of those, outputs left as the last build committed them
    image_stored: int = 0


@dataclass
class Entry:
    """A checked content entry, open: its blocks are read with pread as needed."""

    fd: int
    size: int
    words: list[int]  # per full block: its squashfs size word (0: a hole)
    offsets: list[int]  # per block: where its bytes are in the file
    tail: bytes

    def read(self, first: int, count: int, flag: int) -> list[bytes | None]:
        """Blocks first..first+count (None for a hole)."""
        out: list[bytes | None] = []
        for i in range(first, first + count):
            length = self.words[i] & ~flag
            out.append(None if self.words[i] == 0 else _pread_all(self.fd, length, self.offsets[i]))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError("short read of a cache entry")
    return data


class EntryWriter:
    """One entry being written (temp file, then rename), block by block."""

    def __init__(self, cache: BuildCache, key: bytes, size: int) -> None:
        self.cache, self.key, self.size = cache, key, size
        self.fd, self.tmp = -1, ""  # the temp file, made by the first flush
        self.hasher = blake3.blake3()
        self.words: list[int] = []
        # Written in pieces of up to WRITE_BUFFER: a fragment block's entry is then one
        # write(2), not four -- each a GIL hand-off, thousands of them per build.
        self.pending = bytearray(HEADER.pack(MAGIC, FORMAT_VERSION, key))

    def _open(self) -> None:
        """The temp file, made on the cache's writer thread (add, finish and abort run
        there): creating thousands of files on the committer cost a cold build ~0.3 s
        of its critical path.  A name of our own: mkstemp's abspath is a getcwd each."""
        self.tmp = os.path.join(self.cache.directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _write(self, data: bytes, hashed: bool = True) -> None:
        self.pending += data
        if hashed:
            self.hasher.update(data)
        if len(self.pending) >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self.fd < 0:
            self._open()
        view = memoryview(self.pending)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        del view
        self.pending.clear()

    def add(self, blocks: list[bytes | None], words: list[int]) -> None:
        for block in blocks:
            if block is not None:
                self._write(block)
        self.words.extend(words)

    def finish(self, tail: bytes) -> None:
        index = struct.pack(f"<{len(self.words)}I", *self.words)
        self._write(index + tail + FOOTER.pack(self.size, len(self.words), len(tail)))
        self._write(self.hasher.digest(), hashed=False)
        self._flush()
        # Not fsynced: an entry torn by a crash fails its BLAKE3 check and is rebuilt,
        # and an fsync per entry (thousands per build) was most of a cold build's cost.
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.cache.entry_path(self.key))
        if self.cache.remote is not None:
            self.cache.remote.note(self.key)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            _unlink(self.tmp)


class BuildCache:
    """A build's view of one cache directory; thread-safe.  `close()` writes the stat
    cache and evicts down to `max_bytes`; `warnings` says what went wrong, once."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.warnings: list[str] = []
        self.stats = CacheStats()
        self.enabled = True
        self.clock: Callable[[], int] = time.time_ns
        self._lock = threading.Lock()
        # Identities as IDENT_KEY bytes: loaded, looked up and saved in bulk.
        self._stat: dict[bytes, bytes] = {}
        self._stat_new: dict[bytes, bytes] = {}  # used or learnt in this build
        self._stat_learnt = False  # a digest not in the stat file: it is written again
        self._stat_loaded = 0  # records read from the stat file
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="pyimg-cache")
        self._pending: list[Future[None]] = []
        self.remote: RemoteCache | None = None  # the shared tier under this one (cache_remote.py)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            self.fail(exc)
            return
        self._load_stat()

    def fail(self, exc: BaseException) -> None:
        """Turn the cache off for this build, with one warning."""
        with self._lock:
            if self.enabled:
                self.enabled = False
                reason = getattr(exc, "strerror", None) or str(exc)
                self.warnings.append(f"build cache {self.directory}: {reason}; building without it")

    # -- stat cache -------------------------------------------------------------------

    @staticmethod
    def eligible(ref: DataRef) -> bool:
        """A whole file of a directory source (tar members have no stable identity)."""
        return bool(ref.rel) and ref.offset == 0 and ref.stamp_size == ref.size

    def identity(self, ref: DataRef) -> Identity | None:
        """The file's identity now, if it is still as collected.  Opened, not only
        stat'ed: a file the build could not read is never served from the cache."""
        if not self.enabled or not self.eligible(ref):
            return None
        try:
            fd = os.open(ref.fs_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None  # (a path too long for open(2), too: the reader's way then)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_size != ref.stamp_size or st.st_mtime_ns != ref.stamp_mtime_ns:
            return None  # changed since it was collected: the reader will say so
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def digest_of(self, ident: Identity) -> bytes | None:
        key = IDENT_KEY.pack(*ident)
        with self._lock:
            digest = self._stat.get(key)
            if digest is not None:
                self._stat_new[key] = digest
                self.stats.stat_hits += 1
            return digest

    def learn(self, ident: Identity, ref: DataRef, digest: bytes, since: int) -> None:
        """Record a digest just computed from a file whose identity was taken at
        `since` (self.clock(), before it was read), unless that identity could be
        racily clean -- a write in the same timestamp tick, during or after the read,
        would not change it -- or the file changed while it was hashed."""
        if max(ident[3], ident[4]) >= since - RACY_NS:
            return
        if self.identity(ref) != ident:
            return
        self._keep([(IDENT_KEY.pack(*ident), digest)])

    def _keep(self, learnt: list[tuple[bytes, bytes]]) -> None:
        """Record (identity key, digest) pairs, under one lock for the batch."""
        with self._lock:
            for key, digest in learnt:
                if self._stat.get(key) != digest:
                    self._stat[key] = digest
                    self._stat_learnt = True
                self._stat_new[key] = digest

    def known_digests(self, refs: list[DataRef]) -> bytearray | None:
        """The stat cache's digests of a batch of (small) files, 32 bytes each, back to
        back, if it knows every one of them as walked (DataRef.ident; else identities
        taken now by the C core: open, fstat); else None, and the batch is read
        (read_learning)."""
        # Only with a stat file to look in: in a cold build the identities (an open
        # and fstat per file) would cost what the read costs, and never hit.
        if not self.enabled or not self._stat_loaded or not all(map(self.eligible, refs)):
            return None
        keys = walked_identities(refs)
        if keys is None:
            ident, ok = _c_identities(refs)
            if not all(ok):
                return None
            raw = _le(ident)
            keys = [raw[at : at + IDENT_SIZE] for at in range(0, len(raw), IDENT_SIZE)]
        with self._lock:
            found = [self._stat.get(key) for key in keys]
            if None in found:
                return None
            known: list[bytes] = found  # type: ignore[assignment]
            self._stat_new.update(zip(keys, known, strict=True))
            self.stats.stat_hits += len(known)
        return bytearray(b"".join(known))

    def read_learning(self, refs: list[DataRef]) -> tuple[bytearray, bytearray]:
        """Read and hash a batch of (small) files as content.read_batch_packed does,
        and learn their digests: keyed by each file's identity from the fstat after
        its read, unless it could be racily clean.  (One identity suffices here: a
        write during the read would stamp the file at or after `since`.)"""
        from .content import read_batch_identified  # (the C core: see _c_identities)

        since = self.clock()
        data, digests, ident = read_batch_identified(refs)
        if not self.enabled:
            return data, digests
        newer = since - RACY_NS
        raw = _le(ident)
        self._keep([
            (raw[IDENT_SIZE * j : IDENT_SIZE * (j + 1)], bytes(digests[32 * j : 32 * j + 32]))
            for j, ref in enumerate(refs)
            if self.eligible(ref) and max(ident[5 * j + 3], ident[5 * j + 4]) < newer
        ])  # fmt: skip
        return data, digests

    def read_checked(self, name: str, magic: bytes) -> bytes | None:
        """The body of the cache file `name` (its BLAKE3 trailer checked and cut off),
        or None: absent, unreadable (the cache turns off) or damaged (counted, removed)."""
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.fail(exc)
            return None
        body, check = raw[:-32], raw[-32:]
        if len(raw) < len(magic) + 32 or not body.startswith(magic) or blake3.blake3(body).digest() != check:
            self.drop_damaged(name)
            return None
        return body

    def drop_damaged(self, name: str) -> None:
        """A cache file found damaged: counted and removed, to be written again."""
        with self._lock:
            self.stats.bad_entries += 1
        _unlink(os.path.join(self.directory, name))

    def write_checked(self, name: str, body: bytes) -> None:
        """Replace the cache file `name` atomically, with body's BLAKE3 as its trailer."""
        _atomic_write(self.directory, name, body + blake3.blake3(body).digest())

    def _load_stat(self) -> None:
        body = self.read_checked(STAT_FILE, STAT_MAGIC)
        if body is None:
            return
        size = STAT_RECORD.size
        if (len(body) - len(STAT_MAGIC)) % size:
            self.drop_damaged(STAT_FILE)
            return
        starts = range(len(STAT_MAGIC), len(body), size)
        self._stat = {body[at : at + IDENT_SIZE]: body[at + IDENT_SIZE : at + size] for at in starts}
        self._stat_loaded = len(self._stat)

    def _save_stat(self) -> None:
        """Write the records used or learnt in this build, then older ones, up to
        STAT_MAX -- unless nothing was learnt: the file then holds them all already
        (a no-change rebuild of 50k files spares 0.25 s)."""
        if not self._stat_learnt and len(self._stat) <= STAT_MAX:
            return
        merged = dict(self._stat_new)
        for key, digest in self._stat.items():
            if len(merged) >= STAT_MAX:
                break
            merged.setdefault(key, digest)
        self.write_checked(STAT_FILE, STAT_MAGIC + b"".join(k + d for k, d in merged.items()))

    # -- content cache -----------------------------------------------------------------

    def entry_path(self, key: bytes) -> str:
        return os.path.join(self.directory, ENTRY_PREFIX + key.hex())

    @staticmethod
    def content_key(digest: bytes, shape: bytes) -> bytes:
        return blake3.blake3(b"pyimg content v%d\0" % FORMAT_VERSION + digest + shape).digest()

    def lookup(
        self, key: bytes, size: int, block_size: int, full_blocks: int, fragment: bool = False
    ) -> Entry | None:
        """The entry of `key`, checked whole, or None (absent, or bad: then removed)."""
        if not self.enabled:
            return None
        path = self.entry_path(key)
        if self.remote is not None and not os.path.exists(path):
            self.remote.fetch(key, size, full_blocks)  # a local miss: the shared cache's entry, if any
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            entry = self._check(fd, key, size, full_blocks, block_size)
        except OSError:
            entry = None
        if entry is None:
            os.close(fd)
            if _unlink(path):  # (two lookups of one key may both find it bad: counted once)
                with self._lock:
                    self.stats.bad_entries += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used: the mtime is the last use
        with self._lock:
            if fragment:
                self.stats.fragment_hits += 1
            else:
                self.stats.content_hits += 1
        if self.remote is not None:
            self.remote.note(key, hit=True)
        return entry

    def prefetch(self, wanted: list[tuple[bytes, int, int]]) -> None:
        """Bring the entries of these (key, content size, full blocks) that the local
        directory lacks from the shared cache, several at once (lookup() would fetch
        them one by one)."""
        if self.remote is None or not self.enabled:
            return
        self.remote.fetch_many([w for w in wanted if not os.path.exists(self.entry_path(w[0]))])

    @staticmethod
    def _check(fd: int, key: bytes, size: int, full_blocks: int, block_size: int) -> Entry | None:
        total = os.fstat(fd).st_size
        low = HEADER.size + FOOTER.size + 32
        if total < low:
            return None
        magic, version, stored_key = HEADER.unpack(_pread_all(fd, HEADER.size, 0))
        if magic != MAGIC or version != FORMAT_VERSION or stored_key != key:
            return None
        end = total - 32
        content_size, count, tail_len = FOOTER.unpack(_pread_all(fd, FOOTER.size, end - FOOTER.size))
        if content_size != size or count != full_blocks or tail_len >= block_size:
            return None
        index_at = end - FOOTER.size - tail_len - 4 * count
        if index_at < HEADER.size:
            return None
        hasher = blake3.blake3()
        pos = HEADER.size
        while pos < end:
            chunk = _pread_all(fd, min(READ, end - pos), pos)
            hasher.update(chunk)
            pos += len(chunk)
        if hasher.digest() != _pread_all(fd, 32, end):
            return None
        words = list(struct.unpack(f"<{count}I", _pread_all(fd, 4 * count, index_at)))
        offsets = []
        at = HEADER.size
        for word in words:
            offsets.append(at)
            at += word & ((1 << 24) - 1)
        if at != index_at:
            return None
        tail = _pread_all(fd, tail_len, index_at + 4 * count)
        return Entry(fd, size, words, offsets, tail)

    def writer(self, key: bytes, size: int) -> EntryWriter | None:
        if not self.enabled:
            return None
        try:
            return EntryWriter(self, key, size)
        except OSError as exc:
            self.fail(exc)
            return None

    def store_now(self, key: bytes, size: int, blocks: list[bytes | None], words: list[int], tail: bytes,
                  fragment: bool = False) -> None:  # fmt: skip
        """Write a small entry (a fragment block's) on the calling thread, at once: a
        hand-off to the writer thread per entry cost a cold build more (thousands of
        GIL hand-offs) than the write itself."""
        writer = self.writer(key, size)
        if writer is None:
            return
        try:
            writer.add(blocks, words)
            writer.finish(tail)
        except OSError as exc:
            writer.abort()
            self.fail(exc)
            return
        self.stored(fragment=fragment)

    def submit(self, work: Callable[[], None], writer: EntryWriter) -> None:
        """Run an entry's writing on the cache's own thread, in order."""

        def run() -> None:
            if not self.enabled:
                writer.abort()
                return
            try:
                work()
            except OSError as exc:
                writer.abort()
                self.fail(exc)

        self._pending.append(self._writer.submit(run))

    def stored(self, fragment: bool = False) -> None:
        with self._lock:
            if fragment:
                self.stats.fragment_stored += 1
            else:
                self.stats.content_stored += 1

    # -- the end of a build ------------------------------------------------------------

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        for future in self._pending:
            future.result()
        try:
            if self.remote is not None:
                self.remote.export()  # before the eviction, which could remove what it shares
            if not self.enabled:
                return
            try:
                self._save_stat()
                self.evict()
            except OSError as exc:
                self.fail(exc)
        finally:
            if self.remote is not None:
                self.remote.close()

    def evict(self) -> None:
        """Remove the least recently used entries until the total is under max_bytes;
        also a crashed build's stale temp files."""
        entries: list[tuple[int, int, str]] = []
        total = 0
        now = time.time()
        with os.scandir(self.directory) as it:
            for item in it:
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if item.name.startswith(TEMP_PREFIX):
                    if now - st.st_mtime > TEMP_STALE_S:
                        _unlink(item.path)
                    continue
                total += st.st_size
                if item.name.startswith((ENTRY_PREFIX, IMAGE_PREFIX)):
                    entries.append((st.st_mtime_ns, st.st_size, item.path))
        entries.sort()
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if _unlink(path):
                self.stats.evicted += 1
            total -= size


@dataclass
class CacheReport:
    """What a build's cache did (BuildResult.cache): not part of the image or manifest."""

    directory: str
    stats: CacheStats = field(default_factory=CacheStats)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _atomic_write(directory: str, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, os.path.join(directory, name))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink(tmp)
        raise


def _le(values: array[int]) -> bytes:
    """An int64 array's bytes, little-endian (IDENT_KEY's order) on any host."""
    if sys.byteorder != "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


NO_IDENT = bytes(IDENT_SIZE)  # the walk's "no identity" (a time beyond an int64 of ns)


def walked_identities(refs: list[DataRef]) -> list[bytes] | None:
    """The walk's identities of every file, or None if it lacks one.  As good as an
    fstat now for a lookup: what is built is the tree as walked, and a block built
    from files looked up is checked against their digests when they are read."""
    idents = [ref.ident for ref in refs]
    if any(len(ident) != IDENT_SIZE or ident == NO_IDENT for ident in idents):
        return None
    return idents


def _c_identities(refs: list[DataRef]) -> tuple[array[int], bytearray]:
    """The files' identities (5 ints each, as Identity) and whether each has one
    (opened, fstat'ed and still as collected): one call into the C core."""
    from ._ffi import ffi, lib  # (here, not at the top: the rest of this module needs no C core)
    from .content import BatchSources

    n = len(refs)
    src = BatchSources.of(refs)
    ident, ok = array("q", bytes(40 * n)), bytearray(n)
    stamps = src.args()[3:]  # stamp sizes and mtimes
    out_ident = ffi.from_buffer("int64_t[]", ident, require_writable=True)
    out_ok = ffi.from_buffer("uint8_t[]", ok, require_writable=True)
    lib.pyimg_identity_batch(n, src.paths, *stamps, out_ident, out_ok)
    return ident, ok


# -- ext4's scan cache ---------------------------------------------------------------------

SCAN_FILE = "scan-v1"
SCAN_MAGIC = b"PYIMGR\x00\x01"
SCAN_HEADER = struct.Struct("<8sII")  # magic, block size, number of records
SCAN_FIXED = struct.Struct("<32sQI")  # a record's start: digest, stored bytes, number of runs


class ScanCache:
    """ext4's scan cache (one file, `scan-v1`, of one block size): a file's identity
    -> what the hash pass learns of its content, so that pass does not read an
    unchanged file (the stream then reads it once, to write it).  Keyed and trusted
    as the stat cache is (the racy rule, the identity taken again after the read).

    An identity is its IDENT_KEY bytes; a record is bytes too: SCAN_FIXED (the
    content's BLAKE3, its bytes outside holes, its number of runs of non-zero
    blocks) then the runs' first blocks and their counts (u32 little-endian each).
    All of it depends only on the content and the block size.  Bytes, not objects:
    a tree's worth of them is loaded, looked up and saved in bulk.  The identities
    are taken now by the C core, a batch at a time (pyimg_identity_batch: open,
    fstat), not the walk's: they are taken again after a scan, to see that the file
    did not change while it was read, and the stream reads it once more.
    Thread-safe; `save()` before cache.close().
    """

    def __init__(self, cache: BuildCache, block_size: int) -> None:
        self.cache, self.block_size = cache, block_size
        self._lock = threading.Lock()
        self._old: dict[bytes, bytes] = {}
        self._new: dict[bytes, bytes] = {}  # used or learnt in this build
        if cache.enabled:
            self._load()

    def identities(self, refs: list[DataRef]) -> list[bytes | None]:
        """Each file's identity now, if it is eligible (BuildCache.eligible) and still
        as collected; else None."""
        out: list[bytes | None] = [None] * len(refs)
        if not self.cache.enabled:
            return out
        chosen = [i for i, ref in enumerate(refs) if self.cache.eligible(ref)]
        if not chosen:
            return out
        ident, ok = _c_identities([refs[i] for i in chosen])
        raw = _le(ident)
        for j, i in enumerate(chosen):
            if ok[j]:
                out[i] = raw[IDENT_SIZE * j : IDENT_SIZE * (j + 1)]
        return out

    def lookup(self, refs: list[DataRef]) -> tuple[list[bytes | None], list[bytes | None]]:
        """The files' identities (None: not cacheable) and their records if known."""
        keys = self.identities(refs)
        records: list[bytes | None] = [None] * len(refs)
        hits = 0
        with self._lock:
            for i, key in enumerate(keys):
                if key is not None:
                    record = self._new.get(key) or self._old.get(key)
                    if record is not None:
                        self._new[key] = record
                        records[i] = record
                        hits += 1
        if hits:
            with self.cache._lock:
                self.cache.stats.stat_hits += hits
        return keys, records

    def learn(
        self,
        keys: list[bytes],
        refs: list[DataRef],
        records: list[bytes],
        since: int,
        after: list[bytes | None] | None = None,
    ) -> None:
        """Keep records just computed from files whose identities were taken at
        `since` (before they were read), unless one could be racily clean or its
        file changed meanwhile (BuildCache.learn): its identity after the read must
        be the same, `after[i]` if the reader took it (from the descriptor it read),
        else taken again here."""
        fresh = [i for i, key in enumerate(keys) if max(IDENT_KEY.unpack(key)[3:]) < since - RACY_NS]
        if not fresh:
            return
        now: list[bytes | None] = [after[i] for i in fresh] if after is not None else [None] * len(fresh)
        unknown = [j for j, key in enumerate(now) if key is None]
        if unknown:
            for j, key in zip(unknown, self.identities([refs[fresh[j]] for j in unknown]), strict=True):
                now[j] = key
        with self._lock:
            for i, key in zip(fresh, now, strict=True):
                if key == keys[i]:
                    self._new[keys[i]] = records[i]

    def _load(self) -> None:
        body = self.cache.read_checked(SCAN_FILE, SCAN_MAGIC)
        if body is None:
            return
        records = self._parse(body)
        if records is None:
            self.cache.drop_damaged(SCAN_FILE)
            return
        self._old = records

    def _parse(self, body: bytes) -> dict[bytes, bytes] | None:
        """The records of a scan file's checked body, for this block size (another
        block size's: none, to be replaced), None if it is damaged.  Columns, so
        that 28k records take comprehensions rather than a loop (0.18 -> 0.03 s)."""
        import itertools

        if len(body) < SCAN_HEADER.size:
            return None
        _magic, block_size, count = SCAN_HEADER.unpack_from(body, 0)
        keys_at = SCAN_HEADER.size
        lengths_at = keys_at + IDENT_KEY.size * count
        blob_at = lengths_at + 4 * count
        if blob_at > len(body):
            return None
        lengths = array("I", body[lengths_at:blob_at])
        if sys.byteorder != "little":
            lengths.byteswap()
        if blob_at + sum(lengths) != len(body):
            return None
        keys = [body[at : at + IDENT_KEY.size] for at in range(keys_at, lengths_at, IDENT_KEY.size)]
        starts = itertools.accumulate(lengths, initial=blob_at)
        records = [body[at : at + n] for at, n in zip(starts, lengths, strict=False)]
        fixed = SCAN_FIXED.size
        if not all([len(r) == fixed + 8 * int.from_bytes(r[fixed - 4 : fixed], "little") for r in records]):
            return None
        return dict(zip(keys, records, strict=True)) if block_size == self.block_size else {}

    def save(self) -> None:
        """Write the records used or learnt in this build, then older ones, up to
        STAT_MAX; an OSError turns the cache off (BuildCache.fail)."""
        if not self.cache.enabled or (not self._new and not self._old):
            return
        merged = dict(self._new)
        for key, record in self._old.items():
            if len(merged) >= STAT_MAX:
                break
            merged.setdefault(key, record)
        records = list(merged.values())
        lengths = array("I", map(len, records))
        if sys.byteorder != "little":
            lengths.byteswap()
        head = SCAN_HEADER.pack(SCAN_MAGIC, self.block_size, len(records))
        body = b"".join([head, *merged, lengths.tobytes(), *records])
        try:
            self.cache.write_checked(SCAN_FILE, body)
        except OSError as exc:
            self.cache.fail(exc)
