"""The ext4 format writer.

Pipeline (each stage a method of `_Build`):

1. hash & dedup -- every regular file's content is read once (ContentReader, holes
   skipped with SEEK_DATA/SEEK_HOLE), hashed with BLAKE3 and scanned for all-zero
   4 KiB blocks, on `jobs` threads through `ordered_map` (results in fixed order).
   Zero blocks become holes; identical contents are stored once and shared through
   the `shared_blocks` ro_compat feature (read-only images, as Android's e2fsdroid).
2. lay out -- inode numbers, the geometry (size, groups, inode tables) and every
   block are planned by the C core from the tree and the options only.
3. stream -- the C core copies each content to its blocks (copy_file_range).
4. finalize -- the C core writes superblocks, descriptors, bitmaps, inode tables,
   directories (htree when larger than a block), extent trees, xattr blocks and
   checksums.
"""

from __future__ import annotations

import os
import stat
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import blake3

from .._ffi import check, ffi, lib
from ..content import ContentReader, ordered_map, read_batch
from ..errors import LimitError, OutputError, SourceError, SpecError
from ..options import BuildOptions
from ..tree import IFMT_OF_KIND, DataRef, FrozenTree, Kind
from .base import Progress, WriteResult, image_epoch

BLOCK = 4096
BLOCKS_PER_GROUP = 32768
CHUNK = 1 << 20  # read size while hashing (a multiple of BLOCK)
_ZERO_BLOCK = bytes(BLOCK)
_BIG_ZERO = bytes(16 << 20)
MAX_FILE_SIZE = (1 << 32) * BLOCK - BLOCK  # 2^32 logical blocks with extents
MAX_LINKS = 65000
ROOT_INO = 2
LOST_FOUND_INO = 11
FIRST_INO = 11
LOG_GROUPS_PER_FLEX = 4
MIN_BLOCKS = 256  # 1 MiB: the smallest image --size auto makes
MIN_JOURNAL_BLOCKS = 1024
SMALL_FILE = 256 << 10  # read in one piece; kept in memory for the stream (within CACHE_BUDGET)
CACHE_BUDGET = 32 << 20  # bytes of small-file content kept between hashing and streaming
BATCH_BYTES = 4 << 20  # work items: files grouped up to this size or BATCH_FILES files
BATCH_FILES = 128

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
    "shared_blocks": ("ro_compat", 0x4000, True),
}
DEFAULT_FEATURES = (
    "ext_attr", "dir_index", "filetype", "extents", "64bit", "flex_bg", "sparse_super",
    "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum",
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
    "csum_seed": "not needed: the UUID is fixed", "journal_dev": "not supported",
    "ea_inode": "not supported", "orphan_file": "not supported", "metadata_csum_seed": "not needed",
}  # fmt: skip

XATTR_PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


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
    return chosen


def default_journal_blocks(blocks: int) -> int:
    """mke2fs's default journal size for a file system of `blocks` 4 KiB blocks."""
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):  # fmt: skip
        if blocks < limit:
            return size
    return 262144


def acl_to_disk(value: bytes, path: bytes) -> bytes:
    """A POSIX ACL from its xattr form (version 2, 8-byte entries) to ext4's on-disk
    form (version 1; user/group entries 8 bytes, the others 4)."""
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        raise SourceError("malformed POSIX ACL xattr", path)
    out = bytearray((1).to_bytes(4, "little"))
    for pos in range(4, len(value), 8):
        tag = int.from_bytes(value[pos : pos + 2], "little")
        out += value[pos : pos + 4]
        if tag in (0x02, 0x08):  # ACL_USER, ACL_GROUP carry an id
            out += value[pos + 4 : pos + 8]
    return bytes(out)


@dataclass(slots=True)
class _Scan:
    digest: bytes
    runs: list[tuple[int, int]]  # (first block, count) of non-zero blocks
    data: bytes | memoryview | None = None  # the whole content of a small file, kept for the stream


def _feed_zeros(hasher: Any, count: int) -> None:
    view = memoryview(_BIG_ZERO)
    while count > 0:
        n = min(count, len(_BIG_ZERO))
        hasher.update(view[:n])
        count -= n


def _add_runs(runs: list[tuple[int, int]], buf: bytes, first_block: int) -> None:
    """Append the non-zero 4 KiB blocks of buf (starting at first_block) to runs.

    bytes.startswith(zero_block, offset) is a memcmp without a copy."""
    size = len(buf)
    for i in range(0, size, BLOCK):
        if i + BLOCK <= size:
            if buf.startswith(_ZERO_BLOCK, i):
                continue
        elif buf.count(0, i) == size - i:
            continue
        block = first_block + i // BLOCK
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))


T = TypeVar("T")


def batches(items: list[T], size_of: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive groups of items (up to BATCH_BYTES or BATCH_FILES): one thread-pool
    task per group keeps the per-task overhead off small files."""
    batch: list[T] = []
    total = 0
    for item in items:
        batch.append(item)
        total += size_of(item)
        if total >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def scan_content(ref: DataRef) -> _Scan:
    """Read a content once: its BLAKE3 digest and its non-zero 4 KiB blocks."""
    size = ref.size
    runs: list[tuple[int, int]] = []
    if size <= SMALL_FILE:  # one read; no SEEK_DATA probing, it costs more than it saves
        with ContentReader(ref) as reader:
            buf = reader.read(0, size)
        _add_runs(runs, buf, 0)
        return _Scan(blake3.blake3(buf).digest(), runs, buf)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= (64 << 20) else 1)
    with ContentReader(ref) as reader:
        pos = 0
        for start, end in reader.data_ranges():
            start = max(pos, start - start % BLOCK)
            end = min(size, -(-end // BLOCK) * BLOCK)
            if start >= end:
                continue
            _feed_zeros(hasher, start - pos)
            while start < end:
                n = min(CHUNK, end - start)
                buf = reader.read(start, n)
                hasher.update(buf)
                _add_runs(runs, buf, start // BLOCK)
                start += n
            pos = end
        _feed_zeros(hasher, size - pos)
        reader.check_unchanged()
    return _Scan(hasher.digest(), runs)


class Ext4Writer:
    name: ClassVar[str] = "ext4"

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.features = resolve_features(options.ext4.features)  # SpecError early

    def write(self, tree: FrozenTree, fd: int, progress: Progress) -> WriteResult:
        return _Build(self.options, self.features, tree, fd, progress).run()


class _Build:
    def __init__(self, options: BuildOptions, features: set[str], tree: FrozenTree, fd: int,
                 progress: Progress) -> None:  # fmt: skip
        self.options = options
        self.opts = options.ext4
        self.features = set(features)
        self.tree = tree
        self.fd = fd
        self.progress = progress
        self.journal = self.opts.journal is not None
        if "shared_blocks" in features:
            self.dedup = True
        elif any(e.strip().lstrip("-^") == "shared_blocks" and e.strip()[:1] in "-^"
                 for edit in self.opts.features for e in edit.split(",")):  # fmt: skip
            self.dedup = False
        else:
            self.dedup = self.opts.dedup if self.opts.dedup is not None else not self.journal
        self.features.discard("shared_blocks")  # set below only when blocks are really shared

    # ---- stage 0: checks and inode numbers --------------------------------------
    def check_tree(self) -> None:
        tree = self.tree
        for node in tree.nodes:
            if len(node.name) > 255:
                raise LimitError(f"file name of {len(node.name)} bytes (ext4 allows 255)", node.image_path)
        for ino, inode in enumerate(tree.inodes, 1):
            path = self.path_of[ino]
            if inode.kind is Kind.FILE and inode.size > MAX_FILE_SIZE:
                raise LimitError(
                    f"file of {inode.size} bytes is too big for ext4 (max {MAX_FILE_SIZE})", path
                )
            if inode.kind is Kind.FILE and inode.size >= 1 << 31 and "large_file" not in self.features:
                raise LimitError("files of 2 GiB or more need the large_file feature", path)
            if inode.kind is Kind.SYMLINK and not 0 < len(inode.target) < BLOCK:
                raise LimitError(f"symlink target of {len(inode.target)} bytes (1..4095 allowed)", path)
            if inode.kind is not Kind.DIR and tree.nlink[ino] > MAX_LINKS:
                raise LimitError(f"{tree.nlink[ino]} hard links (ext4 allows {MAX_LINKS})", path)
            if not (0 <= inode.uid < 1 << 32 and 0 <= inode.gid < 1 << 32):
                raise LimitError("uid/gid beyond 32 bits", path)
            if not -(1 << 31) <= inode.mtime_ns // 1_000_000_000 < (1 << 34) - (1 << 31):
                raise LimitError("mtime out of ext4's range (1901..2446)", path)
            if inode.xattrs and "ext_attr" not in self.features:
                raise LimitError("xattrs need the ext_attr feature", path)
        if "dir_nlink" not in self.features:
            for ino, inode in enumerate(tree.inodes, 1):
                if inode.kind is Kind.DIR and tree.nlink[ino] > MAX_LINKS:
                    raise LimitError(
                        "more than 64998 subdirectories need the dir_nlink feature", self.path_of[ino]
                    )

    def number_inodes(self) -> None:
        """ext4 inode numbers: root 2, lost+found 11, then tree order from 12."""
        tree = self.tree
        self.path_of: dict[int, bytes] = {}
        for node in tree.nodes:
            self.path_of.setdefault(node.ino, node.image_path)
        lf_index = tree.index_of.get(b"lost+found")
        self.lf_tree_ino = tree.nodes[lf_index].ino if lf_index is not None else None
        if self.lf_tree_ino is not None:
            if tree.inodes[self.lf_tree_ino - 1].kind is not Kind.DIR:
                raise LimitError("ext4 needs /lost+found to be a directory", b"/lost+found")
            if sum(1 for n in tree.nodes if n.ino == self.lf_tree_ino) > 1:
                raise LimitError("ext4 needs /lost+found to be a plain directory", b"/lost+found")
        self.ext_ino: list[int] = [0] * (len(tree.inodes) + 1)
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
        tree = self.tree
        files = [(ino, inode) for ino, inode in enumerate(tree.inodes, 1) if inode.kind is Kind.FILE]
        refs = [inode.data for _, inode in files if inode.data is not None and inode.size > 0]

        def scan(batch: list[DataRef]) -> list[_Scan]:
            # Small files: read and hashed by the C core in one call per batch.
            small = [ref for ref in batch if ref.size <= SMALL_FILE]
            buffer, digests = read_batch(small) if small else (bytearray(), [])
            view = memoryview(buffer)
            scans: list[_Scan] = []
            at = 0
            small_digests = iter(digests)
            for ref in batch:
                if ref.size > SMALL_FILE:
                    scans.append(scan_content(ref))
                    continue
                data = bytes(view[at : at + ref.size])
                at += ref.size
                runs: list[tuple[int, int]] = []
                _add_runs(runs, data, 0)
                scans.append(_Scan(next(small_digests), runs, data))
            return scans

        work = batches(refs, lambda ref: ref.size)
        scans = (s for group in ordered_map(scan, work, max(1, self.options.jobs)) for s in group)
        budget = CACHE_BUDGET
        empty = blake3.blake3(b"").digest()
        self.digests: dict[int, bytes] = {}
        self.content_of: dict[int, int] = {}  # tree ino -> content index
        self.contents: list[tuple[DataRef, _Scan]] = []
        by_key: dict[tuple[bytes, int], int] = {}
        self.shared = False
        self.bytes_in = 0
        for ino, inode in files:
            self.bytes_in += inode.size
            if inode.data is None or inode.size == 0:
                self.digests[ino] = empty
                continue
            result = next(scans)
            self.progress(inode.size)
            self.digests[ino] = result.digest
            key = (result.digest, inode.size)
            if self.dedup and key in by_key:
                self.content_of[ino] = by_key[key]
                if result.runs:
                    self.shared = True
                continue
            if result.data is not None:
                if len(result.data) <= budget and result.runs:
                    budget -= len(result.data)
                else:
                    result.data = None
            by_key[key] = len(self.contents)
            self.content_of[ino] = len(self.contents)
            self.contents.append((inode.data, result))
        if self.shared:
            self.features.add("shared_blocks")

    # ---- identity -----------------------------------------------------------------
    def identity(self) -> tuple[bytes, bytes]:
        material = blake3.blake3()
        material.update(repr((self.opts, sorted(self.features), self.options.policy.epoch)).encode())
        for node in self.tree.nodes:
            inode = node.inode
            material.update(b"%d\0%s\0%d %o %d %d %d %d %d %d\0%s\0" % (
                len(node.path), node.path, inode.kind, inode.mode, inode.uid, inode.gid, inode.mtime_ns,
                inode.size, inode.rdev[0], inode.rdev[1], inode.target))  # fmt: skip
            for name in sorted(inode.xattrs):
                material.update(
                    b"%d %s %d %s" % (len(name), name, len(inode.xattrs[name]), inode.xattrs[name])
                )
            material.update(self.digests.get(node.ino, b""))
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
        seed = blake3.blake3(
            key + fs_uuid, derive_key_context="pyimg 2024 ext4 directory hash seed"
        ).digest()[:16]
        return fs_uuid, seed

    # ---- stage 2: register everything with the C core and lay out -----------------
    def register(self) -> Any:
        tree = self.tree
        h = ffi.gc(lib.pyimg_ext4_new(self.max_ino), lib.pyimg_ext4_free)
        if h == ffi.NULL:
            raise MemoryError("pyimg_ext4_new")
        self.h = h

        def err() -> Any:
            return lib.pyimg_ext4_error(h)

        parent_of: dict[int, int] = {}
        for node in tree.nodes:
            if node.inode.kind is Kind.DIR:
                parent_of[node.ino] = tree.nodes[node.parent].ino
        for ino, inode in enumerate(tree.inodes, 1):
            e = self.ext_ino[ino]
            path = self.path_of[ino]
            links = tree.nlink[ino]
            if inode.kind is Kind.DIR:
                if e == ROOT_INO and self.lf_tree_ino is None:
                    links += 1  # the lost+found pyimg adds
                if links > MAX_LINKS:
                    links = 1  # dir_nlink: "many"
            sec, nsec = divmod(inode.mtime_ns, 1_000_000_000)
            parent = self.ext_ino[parent_of[ino]] if inode.kind is Kind.DIR else 0
            check(lib.pyimg_ext4_set_inode(h, e, IFMT_OF_KIND[inode.kind] | (inode.mode & 0o7777), inode.uid,
                                           inode.gid, sec, nsec, inode.size, links, inode.rdev[0],
                                           inode.rdev[1], parent), err, path)  # fmt: skip
            if inode.kind is Kind.SYMLINK:
                check(lib.pyimg_ext4_set_symlink(h, e, inode.target, len(inode.target)), err, path)
            for name in sorted(inode.xattrs):
                value = inode.xattrs[name]
                if name in _ACL_NAMES:
                    value = acl_to_disk(value, path)
                check(lib.pyimg_ext4_add_xattr(h, e, name, len(name), value, len(value)), err, path)
        if self.lf_tree_ino is None:
            mode, epoch = stat.S_IFDIR | 0o700, self.epoch
            rc = lib.pyimg_ext4_set_inode(h, LOST_FOUND_INO, mode, 0, 0, epoch, 0, 0, 2, 0, 0, ROOT_INO)
            check(rc, err)
            check(lib.pyimg_ext4_add_dirent(h, ROOT_INO, b"lost+found", 10, LOST_FOUND_INO), err)
        for node in tree.nodes:
            if node.path:
                parent = self.ext_ino[tree.nodes[node.parent].ino]
                check(lib.pyimg_ext4_add_dirent(h, parent, node.name, len(node.name), self.ext_ino[node.ino]),
                      err, node.path)  # fmt: skip
        for ref, scanned in self.contents:
            cid = check(lib.pyimg_ext4_new_content(h), err)
            for first, count in scanned.runs:
                check(lib.pyimg_ext4_content_run(h, cid, first, count), err, ref.path)
        for ino, cid in self.content_of.items():
            check(lib.pyimg_ext4_set_content(h, self.ext_ino[ino], cid), err, self.path_of[ino])
        return h

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
        geom.hash_seed = self.seed
        label = self.opts.label.encode()
        if len(label) > 16:
            raise SpecError(f"ext4 label {self.opts.label!r} is longer than 16 bytes")
        geom.label = label.ljust(16, b"\0")
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
        data = sum(count for _, scanned in self.contents for _, count in scanned.runs)
        estimate = data + -(-inodes // 16) + len(self.tree) // 16 + 64
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
        h, out = self.h, self.fd

        def copy_one(cid: int, ref: DataRef, scanned: _Scan, errbuf: Any) -> None:
            if not scanned.runs:
                return
            if scanned.data is not None:
                data = ffi.from_buffer("uint8_t[]", scanned.data)
                rc = lib.pyimg_ext4_write_content(h, cid, data, len(data), out, errbuf, 512)
                if rc < 0:
                    raise OutputError(ffi.string(errbuf).decode("utf-8", "replace"))
                return
            with ContentReader(ref) as reader:
                rc = lib.pyimg_ext4_copy(h, cid, reader.fd, ref.offset, ref.size, out, errbuf, 512)
                if rc < 0:
                    text = ffi.string(errbuf).decode("utf-8", "replace")
                    if text.startswith("reading"):
                        raise SourceError(text, ref.path)
                    raise OutputError(text)
                reader.check_unchanged()

        def copy(batch: list[tuple[int, DataRef, _Scan]]) -> None:
            errbuf = ffi.new("char[]", 512)
            # Small files not kept from the hash pass: read again, all in one C call.
            reread = [
                item for item in batch if item[2].data is None and item[2].runs and item[1].size <= SMALL_FILE
            ]
            buffer, _ = read_batch([ref for _, ref, _ in reread], hash=False) if reread else (bytearray(), [])
            view = memoryview(buffer)
            at = 0
            for _, ref, scanned in reread:
                scanned.data = view[at : at + ref.size]
                at += ref.size
            for cid, ref, scanned in batch:
                copy_one(cid, ref, scanned, errbuf)
                if scanned.data is not None and ref.size <= SMALL_FILE:
                    scanned.data = None  # written: let the memory go

        items = [(cid, ref, scanned) for cid, (ref, scanned) in enumerate(self.contents)]
        for _ in ordered_map(copy, batches(items, lambda item: item[1].size), max(1, self.options.jobs)):
            pass

    # ---- the whole build ------------------------------------------------------------
    def run(self) -> WriteResult:
        self.epoch = image_epoch(self.options, self.tree)
        self.number_inodes()
        self.check_tree()
        self.hash_contents()
        self.uuid, self.seed = self.identity()
        self.register()
        geom, stats = self.lay_out()
        self.stream()
        h = self.h
        check(lib.pyimg_ext4_finalize(h, self.fd), lambda: lib.pyimg_ext4_error(h))
        size = os.fstat(self.fd).st_size
        stored = 0
        for ref, scanned in self.contents:
            for first, count in scanned.runs:
                stored += min(ref.size, (first + count) * BLOCK) - first * BLOCK
        unique = sum(ref.size for ref, _ in self.contents)
        details: dict[str, object] = {
            "features": sorted(self.features | ({"has_journal"} if self.journal else set())),
            "block_size": BLOCK,
            "blocks": int(geom.blocks_count),
            "free_blocks": int(stats.free_blocks),
            "inodes": int(stats.inodes_count),
            "free_inodes": int(stats.free_inodes),
            "groups": int(stats.groups),
            "journal_blocks": int(geom.journal_blocks),
            "uuid": str(uuid_mod.UUID(bytes=self.uuid)),
            "size": size,
            "shared_blocks": self.shared,
        }
        return WriteResult(
            digests=dict(self.digests),
            bytes_in=self.bytes_in,
            bytes_unique=unique,
            bytes_stored=stored,
            image_size=size,
            details=details,
        )
