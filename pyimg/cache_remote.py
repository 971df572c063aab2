"""The shared build cache: a remote tier in an OCI store under the local BuildCache
(docs/cache.md, "The shared cache").

    --cache HOST[:PORT]/REPO[:TAG]   a registry (OCI distribution API)
    --cache oci:DIR[:TAG]            an OCI image layout directory

The store holds one manifest per cache, tagged `buildcache-v<CACHE_FORMAT>` (or
`TAG-buildcache-v<N>`): an OCI image manifest with artifactType CACHE_ARTIFACT whose
layers are packs: blobs of entries back to back, each entry byte for byte a local
`c-<key>` file, and the pack's table (key, offset, length per entry) in an annotation.
The format in the tag makes another pyimg format's cache invisible; each entry's own
header (magic, version, key) is checked again.

Why packs: a registry answers a blob request in ~5-7 ms even on loopback (distribution
looks up the repository's link files first), so a cache of one blob per entry spent
more time in round trips than a clean build takes (a fresh runner 3-4 x its clean build
on 50k files, an exporting one 6-7 x).  One build's new entries go into packs of up to
PACK_MAX bytes; a later build needing one of them fetches the whole pack: a tree that
shares one entry with that build shares most of them.

A build reads the index once, at its first lookup.  A local miss whose key the index
lists fetches that key's pack (its sha256 verified against the descriptor on the way)
into the local directory and splits it into entries (their headers checked here, their
BLAKE3 by the local lookup), each through a temp file and a rename.  At close(), the
entries this build used and the index lacks are packed and pushed (HEAD first) and the
index is merged: read again, ours added in front, written, read back after a moment to
see that ours stayed.  The blobs are content-addressed, so a lost race only loses index
lines (which the next build that uses them adds again), never an entry's bytes.

A store that is down or fails turns this tier off for the rest of the build with one
warning: the build goes on with the local tier.  A blob that is not what its
descriptor says is refused, never written into the local directory.  Nothing here
prints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cache import FOOTER, FORMAT_VERSION, HEADER, MAGIC, TEMP_PREFIX, BuildCache
from .errors import DigestMismatchError, PyImgError, SpecError, StoreError, StoreNotFoundError
from .options import CacheOptions
from .store.refs import DIGEST_RE, Ref, check_tag, parse_ref

if TYPE_CHECKING:
    from .store.artifact import Descriptor, Manifest
    from .store.base import Store

INDEX_FORMAT = 2  # 1: a blob per entry; 2: packs
CACHE_FORMAT = f"{FORMAT_VERSION}.{INDEX_FORMAT}"  # the entries' format, then the index's
CACHE_ARTIFACT = f"application/vnd.pyimg.buildcache.v{INDEX_FORMAT}+json"
PACK_MEDIA_TYPE = "application/vnd.pyimg.buildcache.pack.v1"
A_ENTRIES = "vnd.pyimg.cache.entries"  # a pack's table: KEYHEX:OFFSET:LENGTH, comma-separated
A_EXPORT = "vnd.pyimg.cache.export"  # which export wrote a pack (its packs are in its order)
A_FORMAT = "vnd.pyimg.cache.format"
TAG_SUFFIX = f"buildcache-v{CACHE_FORMAT}"
INDEX_MAX = 30_000  # lines kept (~80 bytes each: 2.4 MB, under registries' 4 MB manifests)
PACK_MAX = 16 << 20  # bytes of entries per pack (an entry larger than this is a pack alone)
MERGE_ATTEMPTS = 5
SETTLE_S = 0.3  # how long an export waits before it checks that its lines stayed
FETCH_THREADS = 8  # packs fetched at once by fetch_many (round trips, not CPU: more than cores)
DRAW_THREADS = 2  # an export's packs fetched at once (_draw)
DRAW_MAX = 512 << 20  # bytes of an export's packs fetched at its first miss
STORE_RETRIES = 3  # a cache is an optimisation: give up on a registry sooner than a push does
_READ = 1 << 20


class _LocalError(Exception):
    """An OSError of the local directory while a blob is fetched: the local tier's failure,
    not the store's (the layout store would otherwise report it as its own)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


# -- what --cache names --------------------------------------------------------------------


def remote_ref(value: str) -> Ref | None:
    """The store a cache value names, or None for a local directory.  `oci:DIR` is a
    layout; a value the store takes for a registry (docker's rule: the host has a '.'
    or ':' or is localhost) that is not an existing path is a registry; anything else
    is a directory, as before.  SpecError: a store address no cache can be (a digest,
    a bad tag)."""
    if not value.startswith("oci:"):
        if os.path.exists(value):
            return None
        try:
            ref = parse_ref(value)
        except SpecError:
            return None
    else:
        ref = parse_ref(value)
    if ref.digest:
        raise SpecError(f"cache {value!r}: a shared cache is named by a tag, not a digest")
    index_tag(ref)
    return ref


def index_tag(ref: Ref) -> str:
    return check_tag(f"{ref.tag}-{TAG_SUFFIX}" if ref.tag else TAG_SUFFIX)


def spec_value(value: str, base_dir: str) -> str:
    """A spec's `cache`: a directory (local, or oci:'s) relative to the spec file, a
    registry as it is."""
    if value.startswith("oci:"):
        return "oci:" + os.path.join(base_dir, value[4:])
    joined = os.path.join(base_dir, value)
    if os.path.exists(joined):
        return joined
    try:
        parse_ref(value)
    except SpecError:
        return joined
    return value


def local_paths(options: CacheOptions) -> list[str]:
    """The directories a cache writes to (checked against the sources)."""
    value = options.cache or ""
    ref = remote_ref(value)
    if ref is None:
        return [value]
    paths = [options.local] if options.local else []
    return paths + ([ref.path] if ref.kind == "layout" else [])


def open_cache(options: CacheOptions) -> BuildCache:
    """The build cache options.cache names: a local directory, or a store with a local
    tier under it (options.local: the CLI's default directory; None: a temp directory
    for this build, removed at close)."""
    value = options.cache or ""
    ref = remote_ref(value)
    if ref is None:
        return BuildCache(value, options.cache_max)
    temp = None if options.local else tempfile.mkdtemp(prefix="pyimg-cache-")
    cache = BuildCache(options.local or temp or "", options.cache_max)
    cache.remote = RemoteCache(cache, ref, temp)
    return cache


# -- the index ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """Where a key's entry is: `length` bytes at `offset` of the pack blob `pack`."""

    pack: Descriptor  # (without the table: lines of one pack share one descriptor)
    offset: int
    length: int
    export: str = ""  # the export that wrote the pack (a random id), for read-ahead


Lines = dict[bytes, Line]  # cache key -> its entry, most recent first

_MIN_ENTRY = HEADER.size + FOOTER.size + 32


def parse_index(manifest: Manifest) -> Lines:
    """The lines of a cache index; {} for a manifest that is not a cache of this format
    (then it is never misread: replaced at the next export).  Packs and table items
    that are not well formed are left out."""
    from .store.artifact import Descriptor

    value = manifest.json
    annotations = value.get("annotations")
    if value.get("artifactType") != CACHE_ARTIFACT or not isinstance(annotations, dict):
        return {}
    if annotations.get(A_FORMAT) != CACHE_FORMAT:
        return {}
    layers = value.get("layers")
    out: Lines = {}
    for raw in layers if isinstance(layers, list) else []:
        try:
            desc = Descriptor.from_json(raw, manifest.digest)
        except StoreError:
            continue
        table = (desc.annotations or {}).get(A_ENTRIES, "")
        if desc.media_type != PACK_MEDIA_TYPE or not DIGEST_RE.match(desc.digest) or desc.size <= 0:
            continue
        pack = Descriptor(PACK_MEDIA_TYPE, desc.digest, desc.size)
        export = (desc.annotations or {}).get(A_EXPORT, "")
        export = export if len(export) <= 32 and export.isalnum() else ""
        for item in table.split(","):
            line = _parse_item(item, pack, export)
            if line is not None:
                out.setdefault(line[0], line[1])
    return out


def _parse_item(item: str, pack: Descriptor, export: str) -> tuple[bytes, Line] | None:
    key, _, rest = item.partition(":")
    offset, _, length = rest.partition(":")
    if len(key) != 64 or key.strip("0123456789abcdef") or not _is_count(offset) or not _is_count(length):
        return None
    line = Line(pack, int(offset), int(length), export)
    if line.length < _MIN_ENTRY or line.offset + line.length > pack.size:
        return None
    return bytes.fromhex(key), line


def _is_count(text: str) -> bool:
    """ASCII digits of a byte count (str.isdigit also takes "²", which int() refuses,
    and a thousand digits would cost int() more than the whole index)."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


def index_manifest(lines: Lines) -> Manifest:
    """The manifest of these lines: one layer per pack, in the order of its first line."""
    from . import __version__
    from .store.artifact import EMPTY_CONFIG, OCI_MANIFEST, Descriptor, Manifest

    tables: dict[str, tuple[Line, list[str]]] = {}
    for key, line in lines.items():
        _, items = tables.setdefault(line.pack.digest, (line, []))
        items.append(f"{key.hex()}:{line.offset}:{line.length}")
    layers = []
    for first, items in tables.values():
        annotations = {A_ENTRIES: ",".join(items)} | ({A_EXPORT: first.export} if first.export else {})
        layers.append(
            Descriptor(PACK_MEDIA_TYPE, first.pack.digest, first.pack.size, annotations=annotations)
        )
    return Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": CACHE_ARTIFACT,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [d.to_json() for d in layers],
            "annotations": {A_FORMAT: CACHE_FORMAT, "vnd.pyimg.version": __version__},
        }
    )


def merge(ours: Lines, theirs: Lines, used: list[bytes]) -> Lines:
    """Our new lines first, then theirs that this build used, then the rest of theirs;
    at most INDEX_MAX: the least recently added go."""
    out: Lines = dict(ours)
    for key in used:
        if key in theirs:
            out.setdefault(key, theirs[key])
    for key, line in theirs.items():
        out.setdefault(key, line)
    return dict(list(out.items())[:INDEX_MAX])


def entry_bound(size: int, full_blocks: int) -> int:
    """The largest entry a content of `size` bytes can have: a block is never stored
    larger than it is (it is then stored uncompressed), the tail is as it is."""
    return HEADER.size + size + 4 * full_blocks + FOOTER.size + 32


# -- the tier -------------------------------------------------------------------------------


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store may raise besides StoreError: httpx's own errors (a protocol error is
    not wrapped), a JSON body that does not parse, an OSError of a layout."""
    import httpx

    return (StoreError, httpx.HTTPError, ValueError, OSError)


class RemoteCache:
    """A build's view of a shared cache; thread-safe (lookups come from several
    threads).  Off for the rest of the build at its first failure, with one warning."""

    def __init__(self, cache: BuildCache, ref: Ref, temp_dir: str | None = None) -> None:
        self.cache = cache
        self.ref = ref
        self.tag = index_tag(ref)
        self.address = ref.store
        self.enabled = True
        self._closed = False  # (close: no more fetches start)
        self.errors = _store_errors()
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # _in_flight fell to 0
        self._in_flight = 0  # _fetch calls running
        self._index_lock = threading.Lock()
        self._store: Store | None = None
        self._index: Lines | None = None
        self._fetching: dict[str, threading.Event] = {}  # packs tried in this build
        self._packs: dict[str, list[tuple[bytes, Line]]] | None = None  # the index by pack
        self._exports: dict[str, list[Line]] = {}  # export -> the first line of each of its packs
        self._drawn: set[str] = set()  # exports whose packs this build fetched together
        self._unpacked: dict[bytes, str] = {}  # keys a fetched pack brought, not yet used -> it
        self._export_id = secrets.token_hex(8)
        self._used: dict[bytes, None] = {}  # keys this build used or stored, in order
        self._refused = False
        self._fetchers: ThreadPoolExecutor | None = None  # for fetch_many, made on first use
        self._drawers: ThreadPoolExecutor | None = None  # for _draw

    # -- failures

    def disable(self, exc: BaseException) -> None:
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
        reason = exc.reason if isinstance(exc, PyImgError) else str(exc) or type(exc).__name__
        self.cache.warnings.append(f"shared build cache {self.address}: {reason}; building without it")

    def _refuse(self, desc: Descriptor, reason: str) -> None:
        """A blob that is not what the index says: not used; one warning per build."""
        with self._lock:
            self.cache.stats.remote_refused += 1
            first, self._refused = not self._refused, True
        if first:
            self.cache.warnings.append(
                f"shared build cache {self.address}: entry blob {desc.digest} refused: {reason}"
            )

    # -- the store and its index

    def _open(self, create: bool) -> Store | None:
        """The store (None: a layout directory that does not exist yet, an empty cache)."""
        from .store.layout import holds_anything
        from .store.ops import StoreOptions, open_store

        if self._store is not None and not (create and self.ref.kind == "layout"):
            return self._store
        if self.ref.kind == "layout" and not create and not holds_anything(self.ref.path):
            return None
        if self._store is not None:
            self._store.close()
        self._store = open_store(self.ref, StoreOptions(retries=STORE_RETRIES), create=create)
        return self._store

    def _read(self, store: Store | None) -> Lines:
        if store is None:
            return {}
        try:
            return parse_index(store.get_manifest(self.tag))
        except StoreNotFoundError:
            return {}  # no cache there yet (no tag, or no repository)

    def index(self) -> Lines | None:
        """The index, read at the first call; None when the tier is off (or closed
        before it was read: a failed build's workers may still look up entries)."""
        with self._index_lock:
            if self._index is None and self.enabled:
                with self._in_flight_unless_closed() as running:
                    if not running:
                        return None
                    try:
                        self._index = self._read(self._open(create=False))
                    except self.errors as exc:
                        self.disable(exc)
            return self._index if self.enabled else None

    # -- the build's side: fetch on a local miss, note what is used

    def note(self, key: bytes, hit: bool = False) -> None:
        """A key this build used (a hit) or stored: shared at close when the index lacks
        it.  A hit on an entry a fetched pack brought counts as fetched."""
        with self._lock:
            self._used[key] = None
            pack = self._unpacked.pop(key, None) if hit else None
            if pack is None:
                return
            self.cache.stats.remote_fetched += 1

    def fetch(self, key: bytes, size: int, full_blocks: int) -> None:
        """On a local miss: put the shared cache's entry of `key`, if it has one, into the
        local directory with the rest of its pack (the lookup then checks and uses it
        like any entry).  Each pack is fetched once per build; a concurrent lookup in
        it waits for the first.  The first miss in an export's packs fetches them all
        (_draw), at once."""
        index = self.index() if self.enabled and self.cache.enabled else None
        line = index.get(key) if index else None
        if line is None:
            return
        if line.length > entry_bound(size, full_blocks):
            self._refuse(line.pack, f"{line.length} bytes, more than an entry of its content can be")
            return
        others = [self._submit(True, self._fetch_once, o) for o in self._draw(line)]
        self._fetch_once(line)
        _wait(others)

    def _draw(self, line: Line) -> list[Line]:
        """The other packs to fetch with `line`'s: at the first miss in an export, the
        rest of its packs (up to DRAW_MAX bytes in all).  A build that needs one entry
        of an export nearly always needs the rest of it (a rebuild of the tree that
        export's build made), and fetching them now, while the build waits for its
        entry, is what makes them cheap: a fetch beside a busy build is starved of the
        GIL (~0.4 s a pack instead of 0.05 on loopback)."""
        self._members(line.pack)  # (makes _exports)
        with self._lock:
            if not line.export or line.export in self._drawn:
                return []
            self._drawn.add(line.export)
        out, total = [], line.pack.size
        for other in self._exports.get(line.export, []):
            # (a pack over PACK_MAX is one large entry alone: fetched when it is missed)
            if (
                other.pack.digest != line.pack.digest
                and other.pack.size <= PACK_MAX
                and total + other.pack.size <= DRAW_MAX
            ):
                out.append(other)
                total += other.pack.size
        return out

    def _fetch_once(self, line: Line) -> None:
        """Fetch `line`'s pack unless this build did or does: then wait for that fetch."""
        with self._lock:
            event = self._fetching.get(line.pack.digest)
            first = event is None
            if event is None:
                event = self._fetching[line.pack.digest] = threading.Event()
        if not first:
            event.wait()
            return
        try:
            self._fetch(line.pack, line)
        finally:
            event.set()

    def _submit(self, drawing: bool, fn: Callable[..., None], *args: Any) -> Future[None] | None:
        """`fn(*args)` on the threads of fetch_many, or (drawing) those of _draw's packs:
        two pools, so that a fetch on the first never waits for a free thread of its
        own pool.  None once closed (a build that failed closes its cache while its
        workers still look up entries: they then miss).  Submitted under the lock that
        close() takes to mark the tier closed, so a pool is never used after its
        shutdown (which raises RuntimeError)."""
        with self._lock:
            if self._closed:
                return None
            if drawing:
                if self._drawers is None:
                    self._drawers = ThreadPoolExecutor(DRAW_THREADS, thread_name_prefix="pyimg-cache-draw")
                return self._drawers.submit(fn, *args)
            if self._fetchers is None:
                self._fetchers = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="pyimg-cache-fetch")
            return self._fetchers.submit(fn, *args)

    def fetch_many(self, wanted: list[tuple[bytes, int, int]]) -> None:
        """fetch() of several (key, size, full blocks) at once, on FETCH_THREADS threads:
        a fragment batch's entries, whose packs then come in at once."""
        if len(wanted) < 2:
            for item in wanted:
                self.fetch(*item)
            return
        _wait([self._submit(False, self.fetch, *item) for item in wanted])

    def _members(self, pack: Descriptor) -> list[tuple[bytes, Line]]:
        """The lines of the index in `pack` (made once per build, at the first fetch)."""
        with self._index_lock:
            if self._packs is None:
                self._packs = {}
                for key, line in (self._index or {}).items():
                    members = self._packs.setdefault(line.pack.digest, [])
                    if not members and line.export:
                        self._exports.setdefault(line.export, []).append(line)
                    members.append((key, line))
            return self._packs.get(pack.digest, [])

    def _fetch(self, pack: Descriptor, line: Line) -> None:
        """_fetch_pack, unless closed."""
        with self._in_flight_unless_closed() as running:
            if running:
                self._fetch_pack(pack, line)

    @contextlib.contextmanager
    def _in_flight_unless_closed(self) -> Iterator[bool]:
        """Whether the tier is open; if so, what runs in here is counted as in flight,
        and close() waits for it before it closes the store (a failed build's
        workers may still be reading the index or fetching)."""
        with self._idle:
            running = not self._closed
            if running:
                self._in_flight += 1
        if not running:
            yield False
            return
        try:
            yield True
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _fetch_pack(self, pack: Descriptor, line: Line) -> None:
        """Fetch `pack`, `line`'s, and split it into entries.  Refused, not fetched, when
        larger than an export makes a pack: PACK_MAX, or one entry alone."""
        if not self.enabled or not self.cache.enabled:
            return  # (turned off by another thread's failure meanwhile)
        if pack.size > PACK_MAX and not (line.offset == 0 and line.length == pack.size):
            self._refuse(pack, f"{pack.size} bytes, more than a pack can be")
            return
        members = self._members(pack)
        try:
            with self._temp_entry() as (f, tmp):
                store = self._open(create=False)
                if store is None:
                    return

                def sink(data: bytes) -> None:
                    try:
                        f.write(data)
                    except OSError as exc:
                        raise _LocalError(exc) from exc

                store.fetch_blob(pack, sink)
                f.flush()
                with self._lock:
                    self.cache.stats.remote_packs += 1
                # Not fsynced, like every entry (pyimg/cache.py): a torn one fails its check.
                for key, line in members:
                    self._unpack(f.fileno(), tmp, pack, key, line)
        except DigestMismatchError as exc:
            self._refuse(pack, exc.reason)
        except _LocalError as exc:
            self.cache.fail(exc.error)
        except OSError as exc:  # the local directory's (the stores wrap their own)
            self.cache.fail(exc)
        except self.errors as exc:
            self.disable(exc)

    def _unpack(self, fd: int, tmp: str, pack: Descriptor, key: bytes, line: Line) -> None:
        """One entry of a fetched pack into the local directory, unless it has one."""
        path = self.cache.entry_path(key)
        if os.path.exists(path):
            return
        head = os.pread(fd, HEADER.size, line.offset)
        if len(head) != HEADER.size or HEADER.unpack(head) != (MAGIC, FORMAT_VERSION, key):
            self._refuse(
                pack, f"its entry at {line.offset} is not {key.hex()[:16]}'s (another pyimg version?)"
            )
            return
        if line.offset == 0 and line.length == pack.size:  # a pack of one entry: linked, not copied
            try:
                os.link(tmp, path)
            except FileExistsError:
                return  # another build sharing the directory brought it meanwhile
            except OSError:  # (no hard links here, or too many: copied like the others)
                self._write_entry(fd, line, path)
        else:
            self._write_entry(fd, line, path)
        with self._lock:
            self._unpacked[key] = pack.digest

    def _write_entry(self, fd: int, line: Line, path: str) -> None:
        """`line`'s bytes of the pack at fd as the entry `path`, through a temp file.  A
        name of our own and a bare descriptor: mkstemp and a file object cost as much as
        the copy (a pack holds hundreds of entries)."""
        tmp = os.path.join(self.cache.directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _copy_range(fd, line.offset, line.length, out)
            finally:
                os.close(out)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _temp_entry(self) -> Iterator[tuple[Any, str]]:
        """A temp file in the local directory, removed unless renamed."""
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.cache.directory)
        try:
            with os.fdopen(fd, "w+b", buffering=0) as f:
                yield f, tmp
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- the end of a build: export

    def export(self) -> None:
        """Pack and push the entries this build used that the index lacks, then merge
        the index.  Before the local eviction (which could remove them)."""
        with self._lock:
            used = list(self._used)
        if not used or not self.cache.enabled:
            return
        index = self.index()
        missing = [key for key in used if index is not None and key not in index]
        if not missing:
            return
        try:
            store = self._open(create=True)
            assert store is not None
            ours = self._push(store, missing)
            if ours:
                self._merge(store, ours, used)
        except self.errors as exc:
            self.disable(exc)

    def _push(self, store: Store, keys: list[bytes]) -> Lines:
        """The entries of `keys` in packs of up to PACK_MAX bytes, in the build's order
        (a later build that needs one entry of a pack needs its neighbours too)."""
        from .store.artifact import EMPTY_DIGEST, EMPTY_JSON

        store.put_blob_bytes(EMPTY_JSON, EMPTY_DIGEST)  # the index manifest's config
        lines: Lines = {}
        pack = _PackWriter(self.cache.directory)
        try:
            for key in keys:
                try:
                    fd = os.open(self.cache.entry_path(key), os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # gone (another build sharing the directory evicted it)
                try:
                    # An open entry is never written again (a replacement is a rename):
                    # what is packed is one whole entry even if another build replaces it.
                    size = os.fstat(fd).st_size
                    if pack.keys and pack.size + size > PACK_MAX:
                        lines.update(self._upload(store, pack))
                        pack = _PackWriter(self.cache.directory)
                    pack.add(key, fd, size)
                finally:
                    os.close(fd)
            if pack.keys:
                lines.update(self._upload(store, pack))
        finally:
            pack.discard()
        return lines

    def _upload(self, store: Store, pack: _PackWriter) -> Lines:
        from .store.artifact import Descriptor

        digest = pack.finish()
        try:
            if store.put_blob_file(pack.path, digest, pack.size):
                with self._lock:
                    self.cache.stats.remote_pushed += len(pack.keys)
        finally:
            pack.discard()
        desc = Descriptor(PACK_MEDIA_TYPE, digest, pack.size)
        return {key: Line(desc, offset, length, self._export_id) for key, offset, length in pack.keys}

    def _merge(self, store: Store, ours: Lines, used: list[bytes]) -> None:
        """Read, merge, write, read back: until our lines stay (a bounded number of times)."""
        for attempt in range(MERGE_ATTEMPTS):
            theirs = self._read(store)
            if any(key not in theirs for key in ours):
                store.put_manifest(index_manifest(merge(ours, theirs, used)), self.tag)
                # Another export that read before our write writes after it: let it land.
                time.sleep(SETTLE_S * random.uniform(0.5, 1.5))
            after = self._read(store)
            if all(key in after for key in ours):  # (another runner's pack with a key is as good)
                return
            time.sleep(SETTLE_S * random.uniform(0.1, 1.0) * (attempt + 1))
        self.cache.warnings.append(
            f"shared build cache {self.address}: concurrent exports kept replacing the index; "
            f"{len(ours)} entries of this build are stored but not listed"
        )

    def close(self) -> None:
        """No fetch starts from now on; those running end, then the store is closed.
        Called by the build's own thread, holding none of this tier's locks (from a
        fetch thread it would wait for itself)."""
        with self._lock:
            self._closed = True
            pools, self._fetchers, self._drawers = (self._fetchers, self._drawers), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)  # (fetches on the build's threads)
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


class _PackWriter:
    """A pack being written: entries appended to a temp file of the local directory,
    hashed (sha256, the blob's digest) on the way."""

    def __init__(self, directory: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=TEMP_PREFIX + "pack-", dir=directory)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.sha = hashlib.sha256()
        self.size = 0
        self.keys: list[tuple[bytes, int, int]] = []  # key, offset, length

    def add(self, key: bytes, fd: int, size: int) -> None:
        offset, done = self.size, 0
        while done < size:
            chunk = os.pread(fd, min(_READ, size - done), done)
            if not chunk:
                break
            self.file.write(chunk)
            self.sha.update(chunk)
            done += len(chunk)
        self.size += done
        self.keys.append((key, offset, done))

    def finish(self) -> str:
        self.file.close()
        return "sha256:" + self.sha.hexdigest()

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _wait(futures: list[Future[None] | None]) -> None:
    """Each fetch's end; one not submitted or cancelled by close (a build that
    failed) is a miss."""
    for future in futures:
        if future is not None:
            with contextlib.suppress(CancelledError):
                future.result()


def _copy_range(src: int, offset: int, length: int, dst: int) -> None:
    """`length` bytes of src from `offset` to the start of dst (an empty file):
    copy_file_range (both are in the local directory), else through a small buffer."""
    done = 0
    with contextlib.suppress(OSError):  # (any refusal: the buffer below does the rest)
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done, done)
            if n <= 0:
                break
            done += n
    while done < length:
        chunk = os.pread(src, min(_READ, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, "a fetched pack ended early")
        view = memoryview(chunk)
        while view:
            view = view[os.pwrite(dst, view, done + len(chunk) - len(view)) :]
        done += len(chunk)
