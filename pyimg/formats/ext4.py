"""The ext4 format writer.

Pipeline (each stage a method of `_Build`):

1. hash & dedup -- every regular file's content is read once, hashed with BLAKE3
   and scanned for all-zero 4 KiB blocks, on `jobs` threads through `ordered_map`
   (results in fixed order): small files in batches by one C call each, which
   returns flat arrays (digests, block runs) that Python takes in bulk; big files
   through ContentReader (holes skipped with SEEK_DATA/SEEK_HOLE); started during
   collection when the tree comes from one directory source (Prescan).  With a
   build cache, a file whose identity the scan cache knows (cache.ScanCache) is not
   read here: its digest and block runs are the ones recorded.  Zero blocks
   become holes; identical contents are stored once and shared through the
   `shared_blocks` ro_compat feature (read-only images, as Android's e2fsdroid).
2. lay out -- inode numbers, the geometry (size, groups, inode tables) and every
   block are planned by the C core from the tree and the options only.
3. stream -- the C core writes a batch of small contents per call (from the bytes
   kept by the hash pass, else read again), big ones with copy_file_range.
4. finalize -- the C core writes superblocks, descriptors, bitmaps, inode tables,
   directories (htree when larger than a block), extent trees, xattr blocks and
   checksums.
"""

from __future__ import annotations

import itertools
import stat
import sys
import threading
import uuid as uuid_mod
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import blake3

from .. import hashpass
from .._ffi import check, check_handle, ffi, lib, new_err
from ..cache import SCAN_FIXED, BuildCache, ScanCache
from ..content import (
    C_HASH_MAX,
    BatchSources,
    ContentReader,
    check_batch,
    hash_the_rest,
    hash_zeros,
    ordered_map,
    read_error,
)
from ..errors import FormatError, LimitError, SpecError
from ..hashpass import GroupCutter, ScanStopped
from ..options import BuildOptions
from ..region import Region
from ..tree import IFMT_OF_KIND, DataRef, FrozenTree, Inode, Kind
from ..xattrs import ACL_NAMES, acl_to_ext4, suspect_names, xattr_problem
from .base import PackedDigests, Progress, WriteResult, epoch_source, image_epoch, open_cache
from .ext4_options import Ext4Options, parse_label

BLOCK = 4096
BLOCKS_PER_GROUP = 32768
CHUNK = 1 << 20  # read size while hashing (a multiple of BLOCK)
MAX_FILE_SIZE = (1 << 32) * BLOCK - BLOCK  # 2^32 logical blocks with extents
MAX_LINKS = 65000
MAX_MAJOR, MAX_MINOR = 1 << 12, 1 << 20  # Linux's dev_t: 12-bit major, 20-bit minor
ROOT_INO = 2
LOST_FOUND_INO = 11
FIRST_INO = 11
LOG_GROUPS_PER_FLEX = 4
MIN_BLOCKS = 256  # 1 MiB: the smallest image --size auto makes
MIN_JOURNAL_BLOCKS = 1024
SMALL_FILE = 256 << 10  # read in one piece, in batches; kept in memory for the stream (within CACHE_BUDGET)
CACHE_BUDGET = 8 << 20  # bytes of small-file batches kept between hashing and streaming
BATCH_BYTES = 4 << 20  # work items: small files grouped up to this size or BATCH_FILES files
BATCH_FILES = 128
NS = 1_000_000_000

_EMPTY_DIGEST = blake3.blake3(b"").digest()

# name -> (field, bit, can be removed)
FEATURES: dict[str, tuple[str, int, bool]] = {
    "ext_attr": ("compat", 0x0008, True),
    "dir_index": ("compat", 0x0020, True),
    "filetype": ("incompat", 0x0002, True),
    "extents": ("incompat", 0x0040, False),
    "64bit": ("incompat", 0x0080, True),
    "flex_bg": ("incompat", 0x0200, False),
    "sparse_super": ("ro_compat", 0x0001, False),
    "large_file": ("ro_compat", 0x0002, True),
    "huge_file": ("ro_compat", 0x0008, True),
    "dir_nlink": ("ro_compat", 0x0020, True),
    "extra_isize": ("ro_compat", 0x0040, True),
    "metadata_csum": ("ro_compat", 0x0400, True),
    "metadata_csum_seed": ("incompat", 0x2000, True),
    "shared_blocks": ("ro_compat", 0x4000, True),
}
DEFAULT_FEATURES = (
    "ext_attr", "dir_index", "filetype", "extents", "64bit", "flex_bg", "sparse_super",
    "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum", "metadata_csum_seed",
)  # fmt: skip
# Features pyimg knows but does not write; named in the error rather than "unknown".
UNSUPPORTED = {
    "has_journal": "use the journal option (--journal) instead",
    "resize_inode": "images are not meant to be resized online",
    "inline_data": "not supported", "casefold": "not supported", "encrypt": "not supported",
    "quota": "not supported", "project": "not supported", "bigalloc": "not supported",
    "meta_bg": "not supported", "mmp": "not supported", "uninit_bg": "metadata_csum replaces it",
    "gdt_csum": "metadata_csum replaces it", "sparse_super2": "not supported",
    "largedir": "not supported", "verity": "not supported", "stable_inodes": "not supported",
    "csum_seed": "it is called metadata_csum_seed", "journal_dev": "not supported",
    "ea_inode": "not supported", "orphan_file": "not supported",
}  # fmt: skip


def resolve_features(edits: tuple[str, ...]) -> set[str]:
    """The default feature set with the user's "+name"/"-name" edits applied."""
    chosen = set(DEFAULT_FEATURES)
    for edit in edits:
        for item in edit.split(","):
            item = item.strip()
            if not item:
                continue
            sign, name = (item[0], item[1:]) if item[0] in "+-^" else ("+", item)
            if name in UNSUPPORTED:
                raise SpecError(f"ext4 feature {name!r}: {UNSUPPORTED[name]}")
            if name not in FEATURES:
                raise SpecError(f"unknown ext4 feature {name!r} (known: {', '.join(sorted(FEATURES))})")
            if sign == "+":
                chosen.add(name)
            else:
                if not FEATURES[name][2]:
                    raise SpecError(f"ext4 feature {name!r} cannot be disabled: pyimg's layout needs it")
                chosen.discard(name)
    if "metadata_csum_seed" in chosen and "metadata_csum" not in chosen:
        if any("metadata_csum_seed" in edit and "-metadata_csum_seed" not in edit for edit in edits):
            raise SpecError("ext4 feature 'metadata_csum_seed' needs metadata_csum")
        chosen.discard("metadata_csum_seed")  # a default that only seeds metadata_csum's checksums
    return chosen


def default_journal_blocks(blocks: int) -> int:
    """mke2fs's default journal size for a file system of `blocks` 4 KiB blocks."""
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):  # fmt: skip
        if blocks < limit:
            return size
    return 262144


def _le(a: array[int]) -> bytes:
    """An array's bytes in little-endian order, whatever the machine's."""
    if sys.byteorder == "little":
        return a.tobytes()
    swapped = array(a.typecode, a)
    swapped.byteswap()
    return swapped.tobytes()


_NO_LIMIT = (1 << 64) - 1  # pyimg_out.limit for a region without one


def _u32(n: int) -> array[int]:
    return array("I", bytes(4 * n))


def _c(kind: str, buf: Any) -> Any:
    """A C pointer into an array or bytearray (writable for the outputs)."""
    return ffi.from_buffer(kind, buf, require_writable=not isinstance(buf, bytes))


@dataclass(slots=True)
class _Scanned:
    """What the hash pass learned about a batch of contents, as flat arrays."""

    digests: bytearray  # 32 bytes a file, back to back
    nruns: array[int]  # non-zero block runs of each file
    first: array[int]  # the files' runs back to back: first block ...
    count: array[int]  # ... and number of blocks
    stored: array[int]  # bytes of each file outside holes
    buffer: bytearray | None = None  # small files: their bytes back to back
    at: array[int] | None = None  # where each file's bytes are in buffer (-1: not there); None: all, in order
    idents: bytes | None = None  # each file's identity after its read (40 bytes; scan_small)


def block_runs(buf: bytes | bytearray | memoryview, first_block: int) -> tuple[array[int], array[int]]:
    """The runs (first blocks, counts) of the non-zero 4 KiB blocks of buf, which
    starts at block first_block."""
    cap = -(-len(buf) // BLOCK)
    first, count = _u32(cap), _u32(cap)
    got = lib.pyimg_block_runs(_c("uint8_t[]", buf), len(buf), BLOCK, first_block,
                               _c("uint32_t[]", first), _c("uint32_t[]", count), cap)  # fmt: skip
    check(got, "block runs: too little room")  # cap always suffices: a bug if not
    return first[:got], count[:got]


def scan_small(refs: list[DataRef], idents: bool = False) -> _Scanned:
    """Read, hash and scan many small files: one C call with the GIL released
    (files over C_HASH_MAX are hashed here by the blake3 package, faster per byte).
    idents: also each file's identity for the scan cache (cache.IDENT_KEY), from
    the fstat the reader makes after the read anyway."""
    n = len(refs)
    src = BatchSources.of(refs)
    buffer = bytearray(sum(src.sizes))
    cap = sum(-(-size // BLOCK) for size in src.sizes)
    status, errnos = array("i", bytes(4 * n)), array("i", bytes(4 * n))
    digests = bytearray(32 * n)
    nruns, first, count = _u32(n), _u32(cap), _u32(cap)
    stored = array("Q", bytes(8 * n))
    ident = array("q", bytes(40 * n)) if idents else None
    failed = lib.pyimg_scan_batch(
        n, *src.args(), _c("uint8_t[]", buffer), _c("int32_t[]", status), _c("int32_t[]", errnos),
        _c("uint8_t[]", digests), C_HASH_MAX, BLOCK, _c("uint32_t[]", nruns), _c("uint32_t[]", first),
        _c("uint32_t[]", count), cap, _c("uint64_t[]", stored),
        _c("int64_t[]", ident) if ident is not None else ffi.NULL,
    )  # fmt: skip
    check_batch(refs, failed, status, errnos)
    hash_the_rest(buffer, src.sizes, digests)
    runs = sum(nruns)
    scanned = _Scanned(digests, nruns, first[:runs], count[:runs], stored, buffer)
    if ident is not None:
        scanned.idents = _le(ident)
    return scanned


def scan_big(ref: DataRef, threads: int = 1, stop: threading.Event | None = None) -> _Scanned:
    """Read a big content once: its BLAKE3 digest and its non-zero 4 KiB blocks;
    holes of sparse files are not read.  `threads`: blake3's own, for a file
    scanned alone (by default the parallelism is across files: blake3's threads on
    top of `jobs` scans, fed 1 MiB at a time, made 1.2 GB of big files 0.24 ->
    0.38-0.59 s on 2 cores).  `stop`, when set, ends the scan at the next chunk."""
    size = ref.size
    first, count = array("I"), array("I")
    hasher = blake3.blake3(max_threads=threads)
    with ContentReader(ref) as reader:
        pos = 0
        for start, end in reader.data_ranges():
            start = max(pos, start - start % BLOCK)
            end = min(size, -(-end // BLOCK) * BLOCK)
            if start >= end:
                continue
            hash_zeros(start - pos, hasher.update)
            while start < end:
                if stop is not None and stop.is_set():
                    raise ScanStopped(ref.path)
                n = min(CHUNK, end - start)
                buf = reader.read(start, n)
                hasher.update(buf)
                more_first, more_count = block_runs(buf, start // BLOCK)
                if more_first and first and first[-1] + count[-1] == more_first[0]:
                    count[-1] += more_count[0]  # a run going on across two reads
                    more_first, more_count = more_first[1:], more_count[1:]
                first.extend(more_first)
                count.extend(more_count)
                start += n
            pos = end
        hash_zeros(size - pos, hasher.update)
        reader.check_unchanged()
    stored = _stored(size, first, count)
    return _Scanned(bytearray(hasher.digest()), array("I", [len(first)]), first, count, array("Q", [stored]))


def _cutter() -> GroupCutter:
    """ext4's groups: files up to SMALL_FILE batched up to BATCH_BYTES or BATCH_FILES."""
    return GroupCutter(SMALL_FILE, BATCH_BYTES, BATCH_FILES)


def spans(sizes: list[int]) -> list[tuple[int, int]]:
    """The scan groups of files of these sizes."""
    return _cutter().groups(sizes)


def _scan(
    refs: list[DataRef], threads: int = 1, stop: threading.Event | None = None, idents: bool = False
) -> _Scanned:
    """Scan one group: a big file alone (see scan_big), or small files in one C call
    (`idents`: see scan_small)."""
    if len(refs) == 1 and refs[0].size > SMALL_FILE:
        return scan_big(refs[0], threads, stop)
    return scan_small(refs, idents)


def _stored(size: int, first: array[int], count: array[int]) -> int:
    """Bytes of a content of `size` within its non-zero block runs."""
    return sum(min(size, (f + c) * BLOCK) - f * BLOCK for f, c in zip(first, count, strict=True))


def _cached_scan(
    refs: list[DataRef], scan_cache: ScanCache, threads: int = 1, stop: threading.Event | None = None
) -> _Scanned:
    """Scan one group with the scan cache: files whose identity it knows are not
    read (their record is used), the others are scanned as without it and learnt.
    The same _Scanned as _scan's, but for the bytes kept (`at` says whose)."""
    since = scan_cache.cache.clock()  # before the identities: see BuildCache.learn
    keys, records = scan_cache.lookup(refs)
    missed = [i for i, record in enumerate(records) if record is None]
    if not missed:
        return _from_records([r for r in records if r is not None])
    fresh = _scan([refs[i] for i in missed], threads, stop, idents=True)
    new = _records(fresh)
    read = fresh.idents
    learn_keys, learn_refs, learn_records, after = [], [], [], []
    for j, (i, record) in enumerate(zip(missed, new, strict=True)):
        key = keys[i]
        if key is not None:
            learn_keys.append(key)
            learn_refs.append(refs[i])
            learn_records.append(record)
            after.append(read[40 * j : 40 * j + 40] if read is not None else None)
    if learn_keys:
        scan_cache.learn(learn_keys, learn_refs, learn_records, since, after)
    at = array("q", [-1] * len(refs))
    offsets = itertools.accumulate([refs[i].size for i in missed], initial=0)
    for i, record, offset in zip(missed, new, offsets, strict=False):
        records[i], at[i] = record, offset
    scanned = _from_records([r for r in records if r is not None])
    if fresh.buffer is not None:  # the missed small files' bytes, for the stream
        scanned.buffer, scanned.at = fresh.buffer, at
    return scanned


def _records(scanned: _Scanned) -> list[bytes]:
    """The scan cache's record of each file of a scan (cache.ScanCache)."""
    out, run = [], 0
    for i, nruns in enumerate(scanned.nruns):
        fixed = SCAN_FIXED.pack(bytes(scanned.digests[32 * i : 32 * i + 32]), scanned.stored[i], nruns)
        out.append(fixed + _le(scanned.first[run : run + nruns]) + _le(scanned.count[run : run + nruns]))
        run += nruns
    return out


def _from_records(records: list[bytes]) -> _Scanned:
    """A group's _Scanned made of its files' scan-cache records (no bytes kept)."""
    n, fixed = len(records), SCAN_FIXED.size
    digests = bytearray(b"".join([record[:32] for record in records]))
    stored = array("Q", bytes(8 * n))
    nruns = _u32(n)
    first, count = array("I"), array("I")
    for i, record in enumerate(records):
        _, stored[i], runs = SCAN_FIXED.unpack_from(record)
        nruns[i] = runs
        first.frombytes(record[fixed : fixed + 4 * runs])
        count.frombytes(record[fixed + 4 * runs :])
    if sys.byteorder != "little":
        first.byteswap()
        count.byteswap()
    return _Scanned(digests, nruns, first, count, stored)


class Prescan(hashpass.Prescan[_Scanned]):
    """ext4's hash pass started while the tree is collected (hashpass.Prescan).

    Results keep no file bytes: the stream reads every file again, and checks
    again that it did not change since it was collected (bytes kept from this
    early would skip that check for the whole time the tree is frozen and laid out).
    One thread even for a big file: the hash pass's threads soon run beside this
    one (blake3's threads here made the large workload 1.26 -> 1.41 s).
    """

    def __init__(self, scan_cache: ScanCache | None = None) -> None:
        def prescanned(refs: list[DataRef], stop: threading.Event | None) -> _Scanned:
            if scan_cache is not None:
                scanned = _cached_scan(refs, scan_cache, 1, stop)
            else:
                scanned = _scan(refs, 1, stop)
            scanned.buffer = scanned.at = None  # see above
            return scanned

        super().__init__(prescanned, _cutter())


@dataclass(slots=True)
class _Writes:
    """A batch of contents for the stream: small ones written by one C call (from
    `buffer`, the hash pass's bytes, when kept, else read again), or one big one."""

    contents: array[int]
    refs: list[DataRef]
    cache_at: array[int]  # offset of each content in buffer, -1: read again
    buffer: bytearray | None


@dataclass(frozen=True, slots=True)
class Ext4Facts:
    """What an ext4 image is, beyond its bytes (the artifact's facts, the manifest's
    format_details): what a disk or a boot entry needs to name it."""

    features: tuple[str, ...]
    block_size: int
    blocks: int
    free_blocks: int
    inodes: int
    free_inodes: int
    groups: int
    journal_blocks: int
    uuid: str
    size: int
    shared_blocks: bool


class Ext4Writer:
    name: ClassVar[str] = "ext4"
    facts_type: ClassVar[type] = Ext4Facts

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.features = resolve_features(options.settings(Ext4Options).features)  # SpecError early
        self._prescan: Prescan | None = None
        self.warnings: list[str] = []
        self._cache: BuildCache | None = None
        self._scan_cache: ScanCache | None = None
        self._cache_opened = False

    def _open_cache(self) -> ScanCache | None:
        """The build cache's scan cache, the cache opened on first use: by the
        prescan, which runs while the tree is collected, else by write()."""
        if not self._cache_opened:
            self._cache_opened = True
            self._cache = open_cache(self.options, self.warnings)
            self._scan_cache = ScanCache(self._cache, BLOCK) if self._cache is not None else None
        return self._scan_cache

    def prescan(self) -> Prescan | None:
        """Start the hash pass while the tree is collected (see Prescan); not with
        --jobs 1, which means one thread."""
        self._prescan = Prescan(self._open_cache()) if self.options.jobs > 1 else None
        return self._prescan

    def reused(self) -> list[str]:
        """The image came whole from the cache (reuse.py): write() is not called.
        The prescan is stopped, then the cache it opened closed; its warnings."""
        if self._prescan is not None:
            self._prescan.close()
        if self._cache is not None:
            self._cache.close()
        return self.warnings + (list(self._cache.warnings) if self._cache is not None else [])

    def write(self, tree: FrozenTree, region: Region, progress: Progress) -> WriteResult:
        scan_cache = self._open_cache()
        try:
            result = _Build(
                self.options, self.features, tree, region, progress, self._prescan, scan_cache
            ).run()
        finally:
            if scan_cache is not None:
                scan_cache.save()
            if self._cache is not None:
                self._cache.close()
        cache = self._cache
        result.warnings = self.warnings + (list(cache.warnings) if cache is not None else [])
        result.cache = cache.stats if cache is not None else None
        return result


def _choose_dedup(opts: Ext4Options, plus_shared: bool, journal: bool) -> bool:
    """Whether identical contents share blocks (the shared_blocks feature): --dedup,
    else a +/-shared_blocks feature edit, else on unless the image has a journal.
    Settings that contradict each other are refused rather than one silently winning:
    shared blocks make an image read-only, a journal is for read-write ones."""
    minus_shared = "-shared_blocks" in opts.features
    by_feature = True if plus_shared else (False if minus_shared else None)
    if opts.dedup is not None and by_feature is not None and opts.dedup != by_feature:
        raise SpecError(
            f"dedup={opts.dedup} contradicts the feature edit {'+' if by_feature else '-'}shared_blocks"
        )
    dedup = opts.dedup if opts.dedup is not None else by_feature
    if dedup and journal:
        raise SpecError(
            "dedup (shared_blocks) makes an ext4 image read-only, and a journal is for read-write "
            "images: give one of --dedup / --journal (without --dedup, a journaled image is not deduplicated)"
        )
    return dedup if dedup is not None else not journal


class _Build:
    def __init__(self, options: BuildOptions, features: set[str], tree: FrozenTree, region: Region,
                 progress: Progress, prescan: Prescan | None = None,
                 scan_cache: ScanCache | None = None) -> None:  # fmt: skip
        self.options = options
        self.prescan = prescan
        self.scan_cache = scan_cache
        self.opts = options.settings(Ext4Options)
        self.features = set(features)
        self.tree = tree
        self.region = region
        # The C side of the region: C writes at region.offset + its own offsets, within the limit.
        self.out = ffi.new(
            "pyimg_out *", (region.fd, region.offset, _NO_LIMIT if region.limit is None else region.limit)
        )
        self.progress = progress
        self.journal = self.opts.journal is not None
        self.dedup = _choose_dedup(self.opts, "shared_blocks" in features, self.journal)
        self.features.discard("shared_blocks")  # set below only when blocks are really shared
        self._path_of: dict[int, bytes] | None = None  # see path_of()

    # ---- stage 0: checks and inode numbers --------------------------------------
    def check_tree(self) -> None:
        tree = self.tree
        for node in tree.nodes:
            if len(node.path) > 255 and len(node.name) > 255:  # only a long path holds a long name
                raise LimitError(f"file name of {len(node.name)} bytes (ext4 allows 255)", node.image_path)
        if not self.may_have_inode_problems():
            return
        for ino, inode in enumerate(tree.inodes, 1):
            problem = self.inode_problem(ino, inode)
            if problem is not None:
                raise LimitError(problem, self.path_of(ino))

    def may_have_inode_problems(self) -> bool:
        """False when no inode can fail inode_problem: a few passes over columns
        instead of one call per inode (0.07 s on 100k entries); True sends every
        inode through inode_problem, which finds the culprit and says why."""
        tree, inodes = self.tree, self.tree.inodes
        if not inodes:
            return False
        ids = [inode.uid for inode in inodes] + [inode.gid for inode in inodes]
        seconds = [inode.mtime_ns // NS for inode in inodes]
        symlink = Kind.SYMLINK
        return (
            max([inode.size for inode in inodes]) >= 1 << 31
            or any([inode.kind is symlink and not 0 < len(inode.target) < BLOCK for inode in inodes])
            or max(tree.nlink) > MAX_LINKS
            or min(ids) < 0
            or max(ids) >= 1 << 32
            or min(seconds) < -(1 << 31)
            or max(seconds) >= (1 << 34) - (1 << 31)
            or ("ext_attr" not in self.features and any([inode.xattrs for inode in inodes]))
            or suspect_names([inode.xattrs for inode in inodes])
            or any(
                [not (0 <= inode.rdev[0] < MAX_MAJOR and 0 <= inode.rdev[1] < MAX_MINOR) for inode in inodes]
            )
        )

    def inode_problem(self, ino: int, inode: Inode) -> str | None:
        """Why ext4 (with the chosen features) cannot hold this inode, if it cannot."""
        kind, nlink = inode.kind, self.tree.nlink[ino]
        if kind is Kind.FILE and inode.size > MAX_FILE_SIZE:
            return f"file of {inode.size} bytes is too big for ext4 (max {MAX_FILE_SIZE})"
        if kind is Kind.FILE and inode.size >= 1 << 31 and "large_file" not in self.features:
            return "files of 2 GiB or more need the large_file feature"
        if kind is Kind.SYMLINK and not 0 < len(inode.target) < BLOCK:
            return f"symlink target of {len(inode.target)} bytes (1..4095 allowed)"
        if kind is not Kind.DIR and nlink > MAX_LINKS:
            return f"{nlink} hard links (ext4 allows {MAX_LINKS})"
        if kind is Kind.DIR and nlink > MAX_LINKS and "dir_nlink" not in self.features:
            return "more than 64998 subdirectories need the dir_nlink feature"
        if kind in (Kind.CHAR, Kind.BLOCK) and not (
            0 <= inode.rdev[0] < MAX_MAJOR and 0 <= inode.rdev[1] < MAX_MINOR
        ):
            return (
                f"device number {inode.rdev} beyond Linux's dev_t (major < {MAX_MAJOR}, minor < {MAX_MINOR})"
            )
        if not (0 <= inode.uid < 1 << 32 and 0 <= inode.gid < 1 << 32):
            return "uid/gid beyond 32 bits"
        if not -(1 << 31) <= inode.mtime_ns // 1_000_000_000 < (1 << 34) - (1 << 31):
            return "mtime out of ext4's range (1901..2446)"
        if inode.xattrs and "ext_attr" not in self.features:
            return "xattrs need the ext_attr feature"
        for name, value in inode.xattrs.items():
            problem = xattr_problem(name, value, fmt="ext4", acls=True)
            if problem is not None:
                return problem
        return None

    def path_of(self, ino: int) -> bytes:
        """The image path of an inode (its first path), for error messages: the map is
        made on first use only, it costs ~100 bytes per entry."""
        if self._path_of is None:
            self._path_of = {}
            for node in self.tree.nodes:
                self._path_of.setdefault(node.ino, node.image_path)
        return self._path_of[ino]

    def number_inodes(self) -> None:
        """ext4 inode numbers: root 2, lost+found 11, then tree order from 12."""
        tree = self.tree
        lf_index = tree.find(b"lost+found")
        self.lf_tree_ino = tree.nodes[lf_index].ino if lf_index is not None else None
        if self.lf_tree_ino is not None:
            if tree.inodes[self.lf_tree_ino - 1].kind is not Kind.DIR:
                raise LimitError("ext4 needs /lost+found to be a directory", b"/lost+found")
            if sum(1 for n in tree.nodes if n.ino == self.lf_tree_ino) > 1:
                raise LimitError("ext4 needs /lost+found to be a plain directory", b"/lost+found")
        # Arrays, not lists: 100k int objects over 256 are 3.6 MB of a 150 MB budget.
        self.ext_ino = _u32(len(tree.inodes) + 1)
        next_ino = FIRST_INO + 1
        for ino in range(1, len(tree.inodes) + 1):
            if ino == tree.root.ino:
                self.ext_ino[ino] = ROOT_INO
            elif ino == self.lf_tree_ino:
                self.ext_ino[ino] = LOST_FOUND_INO
            else:
                self.ext_ino[ino] = next_ino
                next_ino += 1
        self.max_ino = next_ino - 1

    # ---- stage 1: hash & dedup ----------------------------------------------------
    def hash_contents(self) -> None:
        """Digests of every file, contents registered with the C core (one per
        distinct content), and the plan of the stream (self.writes)."""
        tree = self.tree
        self.new_handle()
        # Lists of ints and arrays, no tuple per file: every object the garbage
        # collector tracks costs on trees of 100k files (collections walk the tree).
        inodes, file_kind = tree.inodes, Kind.FILE
        files = array("I", [ino for ino, inode in enumerate(inodes, 1) if inode.kind is file_kind])
        self.bytes_in = sum([inodes[ino - 1].size for ino in files])
        has_data = [inodes[ino - 1].data is not None and inodes[ino - 1].size > 0 for ino in files]
        self.inos = array("I", itertools.compress(files, has_data))
        self.empty_inos = array("I", [ino for ino, has in zip(files, has_data, strict=True) if not has])
        self.refs: list[DataRef] = [inodes[ino - 1].data for ino in self.inos]  # type: ignore[misc]
        self.file_inos = array("I", [self.ext_ino[ino] for ino in self.inos])
        # Per file with data, in self.inos order: its digest (32 bytes) and content id,
        # given by the C core's dedup table (one call per batch, no object per file).
        self.packed = bytearray(32 * len(self.inos))
        self.file_contents = _u32(len(self.inos))
        self.dedup_table = hashpass.DedupTable()
        self.shared = False
        self.bytes_unique = self.bytes_stored = self.data_blocks = 0
        self.budget = CACHE_BUDGET
        self.writes: list[_Writes] = []

        for start, scanned in self.scanned_groups():
            self.take(start, scanned)
        if self.shared:
            self.features.add("shared_blocks")

    def scanned_groups(self) -> Iterator[tuple[int, _Scanned]]:
        """(first file, scan) of every group, in order (hashpass.scan_groups)."""
        scan_cache = self.scan_cache

        def scan(refs: list[DataRef], alone: bool) -> _Scanned:
            threads = blake3.blake3.AUTO if alone else 1
            return _cached_scan(refs, scan_cache, threads) if scan_cache is not None else _scan(refs, threads)

        return hashpass.scan_groups(
            self.refs, spans([ref.size for ref in self.refs]), scan, self.options.jobs, self.prescan
        )

    def new_handle(self) -> None:
        self.h = ffi.gc(check_handle(lib.pyimg_ext4_new(self.max_ino), "ext4 writer"), lib.pyimg_ext4_free)

    def take(self, start: int, scanned: _Scanned) -> None:
        """Dedup a scanned batch (in file order: the first file of a content owns
        it), register its new contents in one C call and plan their writes."""
        refs, stored = self.refs, scanned.stored
        n = len(stored)
        self.packed[32 * start : 32 * (start + n)] = scanned.digests
        is_new = bytearray(n)
        first_new = self.dedup_table.next_id
        ids, packed = _c("uint32_t[]", self.file_contents), _c("uint8_t[]", self.packed)
        self.dedup_table.assign(packed, start, n, ids, is_new, dedup=self.dedup)
        # A duplicate with blocks of its own would need them: it shares its original's.
        self.shared = self.shared or any(size and not new for size, new in zip(stored, is_new, strict=True))
        self.progress(sum(ref.size for ref in refs[start : start + n]))
        failed = ffi.new("size_t *")
        runs = [_c("uint32_t[]", a) for a in (scanned.nruns, scanned.first, scanned.count)]
        first_id = lib.pyimg_ext4_add_contents(self.h, n, _c("uint8_t[]", is_new), *runs, failed)
        if first_id < 0:
            check(first_id, self.err, refs[start + failed[0]].path)
        if first_id != first_new:  # a bug, reported as the C core's are
            raise FormatError(f"content ids out of step with the C core ({first_id} != {first_new})")
        self.plan_writes(start, scanned, [i for i in range(n) if is_new[i]])

    def plan_writes(self, start: int, scanned: _Scanned, kept: list[int]) -> None:
        """The stream's work for the kept contents of a batch (those with stored
        bytes); the batch's bytes stay in memory while within the cache budget."""
        stored, sizes = scanned.stored, [self.refs[start + i].size for i in kept]
        self.bytes_unique += sum(sizes)
        kept_stored = [stored[i] for i in kept]
        self.bytes_stored += sum(kept_stored)
        self.data_blocks += sum(-(-n // BLOCK) for n in kept_stored)
        written = [i for i in kept if stored[i]]
        if not written:
            return
        buffer = scanned.buffer
        if buffer is not None and len(buffer) <= self.budget:
            self.budget -= len(buffer)
            if scanned.at is not None:
                offsets = scanned.at
            else:
                batch = self.refs[start : start + len(scanned.stored)]
                offsets = array("q", itertools.accumulate([ref.size for ref in batch], initial=0))
            cache_at = array("q", [offsets[i] for i in written])
        else:
            buffer, cache_at = None, array("q", [-1] * len(written))
        contents = array("I", [self.file_contents[start + i] for i in written])
        self.writes.append(_Writes(contents, [self.refs[start + i] for i in written], cache_at, buffer))

    # ---- identity -----------------------------------------------------------------
    def identity(self) -> tuple[bytes, bytes, bytes]:
        """The UUID, the htree hash seed and the checksum seed's UUID.

        The UUID is derived from everything the image holds: the columns register()
        gave the C core (it fed them to self.material as it went: inodes, names,
        symlinks, xattrs), every file's digest and the options -- bulk updates over
        arrays, not a formatted record per entry (0.1 s on 100k).  Two trees, two UUIDs.

        The hash seed and (with metadata_csum_seed) the checksum seed come from the
        options alone (and the UUID when it is given): with a UUID that follows the
        content they would change every directory's hash order and every metadata
        checksum after any edit, so one changed file changed a tenth of the image
        (what a chunked push sends, docs/store.md).  Without metadata_csum_seed the
        checksums follow the UUID, as ext4 defines them."""
        material = self.material
        material.update(repr((self.opts, sorted(self.features), self.options.policy.epoch)).encode())
        material.update(self.packed)
        material.update(_le(self.inos))
        material.update(_le(self.empty_inos))
        key = material.digest()
        if self.opts.uuid is not None:
            try:
                fs_uuid = uuid_mod.UUID(self.opts.uuid).bytes
            except ValueError as exc:
                raise SpecError(f"invalid ext4 UUID {self.opts.uuid!r}") from exc
        else:
            raw = bytearray(
                blake3.blake3(key, derive_key_context="pyimg 2024 ext4 file system uuid").digest()[:16]
            )
            raw[6] = (raw[6] & 0x0F) | 0x40  # shaped like a random (version 4) UUID
            raw[8] = (raw[8] & 0x3F) | 0x80
            fs_uuid = bytes(raw)
        stable = blake3.blake3(repr((self.opts, sorted(self.features))).encode()).digest()
        seed = blake3.blake3(stable, derive_key_context="pyimg 2026 ext4 directory hash seed").digest()[:16]
        if self.opts.uuid is not None:
            csum_uuid = fs_uuid  # what mke2fs keeps as the original UUID
        else:
            derived = blake3.blake3(stable, derive_key_context="pyimg 2026 ext4 checksum seed")
            csum_uuid = derived.digest()[:16]
        return fs_uuid, seed, csum_uuid

    # ---- stage 2: register everything with the C core and lay out -----------------
    def register(self) -> Any:
        """Inodes, symlinks, xattrs, directory entries and which content each file
        holds (the contents themselves were registered by the hash pass); bulk
        calls with arrays, not one call per item."""
        h, material = self.h, blake3.blake3()
        self.material = material  # what identity() derives the UUID from
        self.set_inodes()
        for ino, inode in enumerate(self.tree.inodes, 1):
            if inode.kind is Kind.SYMLINK:
                e, path = self.ext_ino[ino], self.path_of(ino)
                material.update(b"%d %d %s" % (e, len(inode.target), inode.target))
                check(lib.pyimg_ext4_set_symlink(h, e, inode.target, len(inode.target)), self.err, path)
            for name in sorted(inode.xattrs):
                e, path = self.ext_ino[ino], self.path_of(ino)
                value = inode.xattrs[name]
                if name in ACL_NAMES:
                    value = acl_to_ext4(value)  # checked valid by check_tree
                material.update(b"%d %d %s %d %s" % (e, len(name), name, len(value), value))
                check(lib.pyimg_ext4_add_xattr(h, e, name, len(name), value, len(value)), self.err, path)
        if self.lf_tree_ino is None:
            mode, epoch = stat.S_IFDIR | 0o700, self.epoch
            rc = lib.pyimg_ext4_set_inode(h, LOST_FOUND_INO, mode, 0, 0, epoch, 0, 0, 2, 0, 0, ROOT_INO)
            check(rc, self.err)
            check(lib.pyimg_ext4_add_dirent(h, ROOT_INO, b"lost+found", 10, LOST_FOUND_INO), self.err)
        self.add_dirents()
        failed = ffi.new("size_t *")
        rc = lib.pyimg_ext4_set_contents(h, len(self.file_inos), _c("uint32_t[]", self.file_inos),
                                         _c("uint32_t[]", self.file_contents), failed)  # fmt: skip
        if rc < 0:
            check(rc, self.err, self.path_of(self.inos[failed[0]]))
        return h

    def err(self) -> Any:
        return lib.pyimg_ext4_error(self.h)

    def set_inodes(self) -> None:
        tree, inodes = self.tree, self.tree.inodes
        links = [tree.nlink[ino] for ino in range(1, len(inodes) + 1)]
        parents = [0] * len(inodes)
        for node in tree.nodes:
            if node.inode.kind is Kind.DIR:
                ino = node.ino
                parents[ino - 1] = self.ext_ino[tree.nodes[node.parent].ino]
                if ino == tree.root.ino and self.lf_tree_ino is None:
                    links[ino - 1] += 1  # the lost+found pyimg adds
                if links[ino - 1] > MAX_LINKS:
                    links[ino - 1] = 1  # dir_nlink: "many"
        mtimes = [inode.mtime_ns for inode in inodes]
        arrays = (
            self.ext_ino[1:],
            array("I", [IFMT_OF_KIND[inode.kind] | (inode.mode & 0o7777) for inode in inodes]),
            array("I", [inode.uid for inode in inodes]),
            array("I", [inode.gid for inode in inodes]),
            array("q", [ns // NS for ns in mtimes]),
            array("I", [ns % NS for ns in mtimes]),
            array("Q", [inode.size for inode in inodes]),
            array("I", links),
            array("I", [inode.rdev[0] for inode in inodes]),
            array("I", [inode.rdev[1] for inode in inodes]),
            array("I", parents),
        )
        kinds = ("uint32_t[]",) * 4 + ("int64_t[]", "uint32_t[]", "uint64_t[]") + ("uint32_t[]",) * 4
        failed = ffi.new("size_t *")
        for a in arrays:
            self.material.update(_le(a))
        pointers = [_c(kind, a) for kind, a in zip(kinds, arrays, strict=True)]
        rc = lib.pyimg_ext4_set_inodes(self.h, len(inodes), *pointers, failed)
        if rc < 0:
            check(rc, self.err, self.path_of(failed[0] + 1))

    def add_dirents(self) -> None:
        """Every entry but the root, in tree order (a directory's entries in name order)."""
        nodes, ext_ino = self.tree.nodes, self.ext_ino
        ext_of = array("I", [ext_ino[node.ino] for node in nodes])  # node index -> ext4 inode
        entries = nodes[1:]  # nodes[0] is the root, the only node without a name
        names = self.tree.names()[1:]
        failed = ffi.new("size_t *")
        dirs = array("I", [ext_of[node.parent] for node in entries])
        children = ext_of[1:]
        lens = array("I", map(len, names))
        blob = b"".join(names)
        for a in (dirs, lens, children):
            self.material.update(_le(a))
        self.material.update(blob)
        pointers = [_c("uint32_t[]", a) for a in (dirs, lens, children)]
        rc = lib.pyimg_ext4_add_dirents(self.h, len(entries), pointers[0], blob, *pointers[1:], failed)
        if rc < 0:
            check(rc, self.err, entries[failed[0]].path)

    def feature_masks(self) -> tuple[int, int, int]:
        masks = {"compat": 0, "incompat": 0, "ro_compat": 0}
        for name in self.features:
            field, bit, _ = FEATURES[name]
            masks[field] |= bit
        if self.journal:
            masks["compat"] |= 0x0004  # has_journal
        return masks["compat"], masks["incompat"], masks["ro_compat"]

    def geometry(self, blocks: int, inodes: int, journal_blocks: int, explicit: bool) -> Any:
        groups = -(-blocks // BLOCKS_PER_GROUP)
        ipg = -(-inodes // groups)
        ipg = max(16, -(-ipg // 16) * 16)
        if ipg > 32768:
            if explicit:
                raise LimitError(
                    f"{inodes} inodes do not fit {blocks * BLOCK} bytes (32768 per 128 MiB group)"
                )
            return None
        geom = ffi.new("pyimg_ext4_geom *")
        geom.blocks_count = blocks
        geom.blocks_per_group = BLOCKS_PER_GROUP
        geom.inodes_per_group = ipg
        geom.log_groups_per_flex = LOG_GROUPS_PER_FLEX
        geom.journal_blocks = journal_blocks
        geom.feature_compat, geom.feature_incompat, geom.feature_ro_compat = self.feature_masks()
        geom.epoch = self.epoch
        geom.uuid = self.uuid
        geom.csum_uuid = self.csum_uuid
        geom.hash_seed = self.seed
        geom.label = parse_label(self.opts.label, "label").encode().ljust(16, b"\0")
        return geom

    def layout_once(self, geom: Any) -> Any:
        h = self.h
        check(lib.pyimg_ext4_layout(h, geom), lambda: lib.pyimg_ext4_error(h))
        stats = ffi.new("pyimg_ext4_stats *")
        lib.pyimg_ext4_get_stats(h, stats)
        return stats

    def _fix_last_group(self, blocks: int, up: bool) -> int:
        """Avoid a last group too small to hold its superblock backup."""
        groups = -(-blocks // BLOCKS_PER_GROUP)
        rest = blocks % BLOCKS_PER_GROUP
        gdt = -(-groups * (64 if "64bit" in self.features else 32) // BLOCK)
        if rest and rest < gdt + 64:
            return blocks + (gdt + 64 - rest) if up else blocks - rest
        return blocks

    def lay_out(self) -> Any:
        headroom = max(0, self.opts.headroom)
        inodes = self.max_ino + -(-self.max_ino * headroom // 100) + 16
        if self.opts.size is not None:
            blocks = self._fix_last_group(self.opts.size // BLOCK, up=False)
            if blocks < 64:
                raise LimitError(f"ext4 size {self.opts.size} is too small (at least 256 KiB)")
            inodes = max(inodes, min(blocks * BLOCK // 16384, -(-blocks // BLOCKS_PER_GROUP) * 32768))
            jblocks = self._journal_blocks(blocks)
            geom = self.geometry(blocks, inodes, jblocks, explicit=True)
            stats = self.layout_once(geom)
            if stats.blocks_end > blocks:
                need = stats.blocks_end * BLOCK
                raise LimitError(f"the tree needs at least {need} bytes ({need / 2**20:.1f} MiB) "
                                 f"but the ext4 size is {self.opts.size}")  # fmt: skip
            return geom, stats
        # --size auto: start from an estimate, grow until the layout fits with headroom
        estimate = self.data_blocks + -(-inodes // 16) + len(self.tree) // 16 + 64
        jblocks = self._journal_blocks(estimate)
        blocks = max(MIN_BLOCKS, estimate + jblocks)
        blocks = max(blocks, (-(-inodes // 32768) - 1) * BLOCKS_PER_GROUP + 1)
        for _ in range(64):
            blocks = self._fix_last_group(blocks, up=True)
            geom = self.geometry(blocks, inodes, jblocks, explicit=False)
            if geom is None:
                blocks = (-(-blocks // BLOCKS_PER_GROUP)) * BLOCKS_PER_GROUP + 1
                continue
            stats = self.layout_once(geom)
            want = max(MIN_BLOCKS, stats.blocks_end + -(-stats.blocks_end * headroom // 100))
            if stats.blocks_end <= blocks and blocks >= want:
                return geom, stats
            blocks = max(want, blocks + 1)
        raise LimitError("ext4 sizing did not converge")  # pragma: no cover

    def _journal_blocks(self, blocks: int) -> int:
        if self.opts.journal is None:
            return 0
        if self.opts.journal == 0:
            return default_journal_blocks(blocks)
        jb = -(-self.opts.journal // BLOCK)
        if jb < MIN_JOURNAL_BLOCKS:
            raise SpecError(f"ext4 journal of {self.opts.journal} bytes: at least 4 MiB")
        if jb > 1 << 20:
            raise SpecError(f"ext4 journal of {self.opts.journal} bytes: at most 4 GiB")
        return jb

    # ---- stage 3: stream ----------------------------------------------------------
    def stream(self) -> None:
        """Every stored content to its blocks, batch by batch on `jobs` threads (the
        layout fixed every block first, so the order of completion does not matter)."""

        def write(batch: _Writes) -> None:
            err = new_err()  # one per call: calls on several threads share the handle
            if len(batch.refs) == 1 and batch.refs[0].size > SMALL_FILE:
                self.copy_big(batch.contents[0], batch.refs[0], err)
            else:
                self.write_small(batch, err)
            batch.buffer = None  # written: let the memory go

        for _ in ordered_map(write, self.writes, max(1, self.options.jobs)):
            pass

    def write_small(self, batch: _Writes, err: Any) -> None:
        src = BatchSources.of(batch.refs)
        failed, status, err_no = ffi.new("size_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
        cache = _c("uint8_t[]", batch.buffer) if batch.buffer is not None else ffi.NULL
        contents, cache_at = _c("uint32_t[]", batch.contents), _c("int64_t[]", batch.cache_at)
        rc = lib.pyimg_ext4_write_batch(self.h, len(batch.refs), contents, *src.args(), cache, cache_at,
                                        self.out, failed, status, err_no, err)  # fmt: skip
        if rc < 0:
            if status[0]:  # a source that could not be read: its status says how
                raise read_error(batch.refs[failed[0]], status[0], err_no[0])
            ref = batch.refs[failed[0]]
            check(rc, err, ref.path if rc == -lib.PYIMG_ESOURCE else None)

    def copy_big(self, cid: int, ref: DataRef, err: Any) -> None:
        with ContentReader(ref) as reader:
            rc = lib.pyimg_ext4_copy(self.h, cid, reader.fd, ref.offset, ref.size, self.out, err)
            check(rc, err, ref.path if rc == -lib.PYIMG_ESOURCE else None)
            reader.check_unchanged()

    # ---- the whole build ------------------------------------------------------------
    def run(self) -> WriteResult:
        self.epoch = image_epoch(self.options, self.tree)
        self.number_inodes()
        self.check_tree()  # first: an inode's own time out of range is named by its path
        if not -(1 << 31) <= self.epoch < (1 << 34) - (1 << 31):  # lost+found and the superblock get it
            raise LimitError(
                f"the image time (epoch) {self.epoch}, from {epoch_source(self.options)}, "
                "is out of ext4's range (1901..2446)"
            )
        self.hash_contents()
        self.register()
        self.uuid, self.seed, self.csum_uuid = self.identity()
        geom, stats = self.lay_out()
        size = int(geom.blocks_count) * BLOCK  # the image, its holes at the end included
        # Before any byte is written: what is not a hole is the data and the
        # metadata (bitmaps, used inode tables, directories); unused inode tables,
        # free space and a journal's unwritten blocks stay holes.
        metadata = int(stats.groups) * 2 * BLOCK + (int(stats.inodes_count) - int(stats.free_inodes)) * 256
        self.region.check_room(size, self.data_blocks * BLOCK + metadata)
        self.stream()
        h = self.h
        check(lib.pyimg_ext4_finalize(h, self.out), lambda: lib.pyimg_ext4_error(h))
        facts = Ext4Facts(
            features=tuple(sorted(self.features | ({"has_journal"} if self.journal else set()))),
            block_size=BLOCK,
            blocks=int(geom.blocks_count),
            free_blocks=int(stats.free_blocks),
            inodes=int(stats.inodes_count),
            free_inodes=int(stats.free_inodes),
            groups=int(stats.groups),
            journal_blocks=int(geom.journal_blocks),
            uuid=str(uuid_mod.UUID(bytes=self.uuid)),
            size=size,
            shared_blocks=self.shared,
        )
        return WriteResult(
            digests=PackedDigests(self.inos, self.packed, self.empty_inos, _EMPTY_DIGEST),
            bytes_in=self.bytes_in,
            bytes_unique=self.bytes_unique,
            bytes_stored=self.bytes_stored,
            image_size=size,
            facts=facts,
        )
