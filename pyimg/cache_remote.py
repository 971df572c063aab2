"""The shared build cache: a remote tier in an OCI store under the local BuildCache
(docs/cache.md, "The shared cache").

    --cache HOST[:PORT]/REPO[:TAG]   a registry (OCI distribution API)
    --cache oci:DIR[:TAG]            an OCI image layout directory

The store holds one manifest per cache, tagged `buildcache-v<FORMAT_VERSION>` (or
`TAG-buildcache-v<N>`): an OCI image manifest with artifactType CACHE_ARTIFACT whose
layers are the entries' blobs, byte for byte the local `c-<key>` files, each with the
cache key in an annotation.  The version in the tag makes another pyimg format's cache
invisible; each entry's own header (magic, version, key) is checked again.

A build reads the index once, at its first lookup.  A local miss whose key the index
maps to a blob fetches that blob alone (its sha256 verified against the descriptor on
the way, then its header here and its BLAKE3 by the local lookup) into the local
directory, through a temp file and a rename.  At close(), the entries this build used
and the index lacks are pushed (HEAD first) and the index is merged: read again, ours
added in front, written, read back after a moment to see that ours stayed.  The blobs
are content-addressed, so a lost race only loses index lines (which the next build
that uses them adds again), never an entry's bytes.

A store that is down or fails turns this tier off for the rest of the build with one
warning: the build goes on with the local tier.  A blob that is not what its
descriptor says is refused, never written into the local directory.  Nothing here
prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .cache import FOOTER, FORMAT_VERSION, HEADER, MAGIC, TEMP_PREFIX, BuildCache
from .errors import DigestMismatchError, PyImgError, SpecError, StoreError, StoreNotFoundError
from .options import CacheOptions
from .store.refs import DIGEST_RE, Ref, check_tag, parse_ref

if TYPE_CHECKING:
    from .store.artifact import Descriptor, Manifest
    from .store.base import Store

CACHE_ARTIFACT = "application/vnd.pyimg.buildcache.v1+json"
ENTRY_MEDIA_TYPE = "application/vnd.pyimg.buildcache.entry.v1"
A_KEY = "vnd.pyimg.cache.key"
A_FORMAT = "vnd.pyimg.cache.format"
TAG_SUFFIX = f"buildcache-v{FORMAT_VERSION}"
INDEX_MAX = 10_000  # lines kept (~270 bytes each: 2.7 MB, under registries' 4 MB manifests)
MERGE_ATTEMPTS = 5
SETTLE_S = 0.3  # how long an export waits before it checks that its lines stayed
FETCH_THREADS = 8  # entries fetched at once by fetch_many (round trips, not CPU: more than cores)
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

Lines = dict[bytes, "Descriptor"]  # cache key -> its entry's blob, most recent first


def parse_index(manifest: Manifest) -> Lines:
    """The lines of a cache index; {} for a manifest that is not a cache of this format
    (then it is never misread: replaced at the next export).  Lines that are not well
    formed are left out."""
    from .store.artifact import Descriptor

    value = manifest.json
    annotations = value.get("annotations")
    if value.get("artifactType") != CACHE_ARTIFACT or not isinstance(annotations, dict):
        return {}
    if annotations.get(A_FORMAT) != str(FORMAT_VERSION):
        return {}
    layers = value.get("layers")
    out: Lines = {}
    for raw in layers if isinstance(layers, list) else []:
        try:
            desc = Descriptor.from_json(raw, manifest.digest)
        except StoreError:
            continue
        key = (desc.annotations or {}).get(A_KEY, "")
        if desc.media_type != ENTRY_MEDIA_TYPE or not DIGEST_RE.match(desc.digest) or desc.size <= 0:
            continue
        if len(key) != 64 or key.strip("0123456789abcdef"):
            continue
        out.setdefault(bytes.fromhex(key), desc)
    return out


def index_manifest(lines: Lines) -> Manifest:
    from . import __version__
    from .store.artifact import EMPTY_CONFIG, OCI_MANIFEST, Manifest

    return Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": CACHE_ARTIFACT,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [d.to_json() for d in lines.values()],
            "annotations": {A_FORMAT: str(FORMAT_VERSION), "vnd.pyimg.version": __version__},
        }
    )


def merge(ours: Lines, theirs: Lines, used: list[bytes]) -> Lines:
    """Our new lines first, then theirs that this build used, then the rest of theirs;
    at most INDEX_MAX: the least recently added go."""
    out: Lines = dict(ours)
    for key in used:
        if key in theirs:
            out.setdefault(key, theirs[key])
    for key, desc in theirs.items():
        out.setdefault(key, desc)
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
        self.errors = _store_errors()
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._store: Store | None = None
        self._index: Lines | None = None
        self._fetching: dict[bytes, threading.Event] = {}  # keys tried in this build
        self._used: dict[bytes, None] = {}  # keys this build used or stored, in order
        self._refused = False
        self._fetchers: ThreadPoolExecutor | None = None  # for fetch_many, made on first use

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
        from .store.ops import StoreOptions, open_store

        if self._store is not None and not (create and self.ref.kind == "layout"):
            return self._store
        if self.ref.kind == "layout" and not create and not os.path.isdir(self.ref.path):
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
        """The index, read at the first call; None when the tier is off."""
        with self._index_lock:
            if self._index is None and self.enabled:
                try:
                    self._index = self._read(self._open(create=False))
                except self.errors as exc:
                    self.disable(exc)
            return self._index if self.enabled else None

    # -- the build's side: fetch on a local miss, note what is used

    def note(self, key: bytes) -> None:
        """A key this build used (a hit) or stored: shared at close when the index lacks it."""
        with self._lock:
            self._used[key] = None

    def fetch(self, key: bytes, size: int, full_blocks: int) -> None:
        """On a local miss: put the shared cache's entry of `key`, if it has one, into the
        local directory (the lookup then checks and uses it like any entry).  Each key
        is tried once per build; a concurrent lookup of it waits for the first."""
        index = self.index() if self.enabled and self.cache.enabled else None
        desc = index.get(key) if index else None
        if desc is None:
            return
        with self._lock:
            event = self._fetching.get(key)
            first = event is None
            if event is None:
                event = self._fetching[key] = threading.Event()
        if not first:
            event.wait()
            return
        try:
            self._fetch(key, desc, entry_bound(size, full_blocks))
        finally:
            event.set()

    def fetch_many(self, wanted: list[tuple[bytes, int, int]]) -> None:
        """fetch() of several (key, size, full blocks) at once, on FETCH_THREADS threads:
        a fragment batch's entries, whose round trips to a registry then overlap (one
        at a time, a fresh runner spent ~2 ms per entry waiting)."""
        if len(wanted) < 2:
            for item in wanted:
                self.fetch(*item)
            return
        with self._lock:
            if self._fetchers is None:
                self._fetchers = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="pyimg-cache-fetch")
            pool = self._fetchers
        for future in [pool.submit(self.fetch, *item) for item in wanted]:
            future.result()

    def _fetch(self, key: bytes, desc: Descriptor, bound: int) -> None:
        if desc.size > bound:
            self._refuse(desc, f"{desc.size} bytes, more than an entry of its content can be")
            return
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

                store.fetch_blob(desc, sink)
                f.flush()
                head = os.pread(f.fileno(), HEADER.size, 0)
                if len(head) != HEADER.size or HEADER.unpack(head) != (MAGIC, FORMAT_VERSION, key):
                    self._refuse(desc, "its header is not this key's (another pyimg version?)")
                    return
                # Not fsynced, like every entry (pyimg/cache.py): a torn one fails its check.
                os.rename(tmp, self.cache.entry_path(key))
        except DigestMismatchError as exc:
            self._refuse(desc, exc.reason)
        except _LocalError as exc:
            self.cache.fail(exc.error)
        except OSError as exc:  # the local directory's (the stores wrap their own)
            self.cache.fail(exc)
        except self.errors as exc:
            self.disable(exc)
        else:
            with self._lock:
                self.cache.stats.remote_fetched += 1

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
        """Push the entries this build used that the index lacks, then merge the index.
        Before the local eviction (which could remove them)."""
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
        from .store.artifact import EMPTY_DIGEST, EMPTY_JSON, Descriptor

        store.put_blob_bytes(EMPTY_JSON, EMPTY_DIGEST)  # the index manifest's config

        def push_one(key: bytes) -> Descriptor | None:
            pinned = self._pin(key)
            if pinned is None:
                return None  # gone (another build sharing the directory evicted it)
            try:
                digest, size = _sha256_file(pinned)
                if store.put_blob_file(pinned, digest, size):
                    with self._lock:
                        self.cache.stats.remote_pushed += 1
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(pinned)
            return Descriptor(ENTRY_MEDIA_TYPE, digest, size, annotations={A_KEY: key.hex()})

        # FETCH_THREADS at once: each entry is a HEAD and an upload, round trips that
        # overlap (one at a time, a cold runner's export took longer than its build).
        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="pyimg-cache-push") as pool:
            pushed = list(pool.map(push_one, keys))
        return {key: desc for key, desc in zip(keys, pushed, strict=True) if desc is not None}

    def _pin(self, key: bytes) -> str | None:
        """A hard link to the entry, so that what is hashed is what is uploaded even if
        another build replaces or evicts the entry meanwhile."""
        path = os.path.join(self.cache.directory, f"{TEMP_PREFIX}push-{key.hex()[:16]}-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.unlink(path)
        try:
            os.link(self.cache.entry_path(key), path)
        except OSError:
            return None
        return path

    def _merge(self, store: Store, ours: Lines, used: list[bytes]) -> None:
        """Read, merge, write, read back: until our lines stay (a bounded number of times)."""
        for attempt in range(MERGE_ATTEMPTS):
            theirs = self._read(store)
            if any(key not in theirs for key in ours):
                store.put_manifest(index_manifest(merge(ours, theirs, used)), self.tag)
                # Another export that read before our write writes after it: let it land.
                time.sleep(SETTLE_S * random.uniform(0.5, 1.5))
            after = self._read(store)
            if all(key in after for key in ours):  # (another runner's blob of a key is as good)
                return
            time.sleep(SETTLE_S * random.uniform(0.1, 1.0) * (attempt + 1))
        self.cache.warnings.append(
            f"shared build cache {self.address}: concurrent exports kept replacing the index; "
            f"{len(ours)} entries of this build are stored but not listed"
        )

    def close(self) -> None:
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=True)
            self._fetchers = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def _sha256_file(path: str) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size
