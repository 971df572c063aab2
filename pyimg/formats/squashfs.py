"""squashfs 4.0 writer: lay out → stream data → encode metadata → superblock.

Image layout (the order mksquashfs uses, which unsquashfs expects):
  superblock | data and fragment blocks | inode table | directory table |
  fragment table | export table | id table | xattr table | zero padding to 4 KiB
The C core encodes the metadata (csrc/sqfs/); this module decides what goes where.
"""

from __future__ import annotations

import itertools
import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from .._ffi import Callback, check, check_handle, ffi, lib
from ..compression import SQUASHFS_IDS, BlockCompressor, CompressionSpec
from ..errors import LimitError
from ..options import BuildOptions
from ..region import Region
from ..tree import FrozenTree, Inode, Kind, Node
from ..xattrs import suspect_names, xattr_problem
from .base import PackedDigests, Progress, WriteResult, epoch_source, image_epoch, open_cache
from .imagefile import ImageFile
from .squashfs_data import DataStream, Placement
from .squashfs_options import SquashfsOptions, parse_block_size

SUPERBLOCK_SIZE = 96
META_SIZE = 8192
NO_XATTR = 0xFFFFFFFF
NO_TABLE = 0xFFFFFFFFFFFFFFFF
MAX_NAME = 255  # the on-disk field allows 256, but Linux cannot look such a name up
MAX_IDS = 65536
MAX_SYMLINK = 4095  # Linux's squashfs refuses longer targets ("Corrupted symlink")
PAD_TO = 4096

# Superblock flags.
FLAG_NO_FRAGMENTS = 0x0010
FLAG_DUPLICATES = 0x0040
FLAG_EXPORTABLE = 0x0080
FLAG_NO_XATTRS = 0x0200

BASIC_TYPE = {
    Kind.DIR: 1,
    Kind.FILE: 2,
    Kind.SYMLINK: 3,
    Kind.BLOCK: 4,
    Kind.CHAR: 5,
    Kind.FIFO: 6,
    Kind.SOCKET: 7,
}
_TYPE_OF_KIND = [0] + [BASIC_TYPE[Kind(k)] for k in range(1, 8)]  # BASIC_TYPE as a list, indexed by Kind
_DEVICES = (Kind.CHAR, Kind.BLOCK)
XATTR_PREFIXES = ((b"user.", 0), (b"trusted.", 1), (b"security.", 2))


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pyimg_py_compress(ctx: Any, src: Any, length: int, dst: Any, cap: int) -> int:
    """Metadata block compression, called by the C core (csrc/sqfs/meta.c)."""
    callback: Callback = ffi.from_handle(ctx)
    try:
        compressor: BlockCompressor = callback.target
        packed = compressor.compress(ffi.buffer(src, length))
    except BaseException as exc:  # must not cross into C: kept, raised by check() after the call
        return callback.fail(exc)
    if len(packed) >= length or len(packed) > cap:
        return 0
    ffi.memmove(dst, packed, len(packed))
    return len(packed)


@dataclass(frozen=True, slots=True)
class SquashfsFacts:
    """What a squashfs image is, beyond its bytes (the artifact's facts, the manifest's
    format_details)."""

    compression: str
    level: int  # the level used (the default made explicit)
    block_size: int
    fragments: bool
    dedup: bool
    inodes: int
    fragment_blocks: int
    ids: int
    bytes_used: int  # the superblock's bytes_used: the image before its 4 KiB padding
    compressed_data: int  # bytes of data and fragment blocks


class SquashfsWriter:
    name: ClassVar[str] = "squashfs"
    facts_type: ClassVar[type] = SquashfsFacts

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.sq = sq = options.settings(SquashfsOptions)
        parse_block_size(sq.block_size, "block_size")  # options built in code skip the parsers
        self.spec = CompressionSpec.create(sq.compression.name, sq.compression.level, sq.block_size)
        self.warnings: list[str] = []

    def prescan(self) -> None:
        """None: squashfs reads each file once, to hash and compress it together,
        and packs small files in the tree's order, known only once it is frozen."""
        return None

    def reused(self) -> list[str]:
        """The image came whole from the cache (reuse.py): nothing to release."""
        return []

    def write(self, tree: FrozenTree, region: Region, progress: Progress) -> WriteResult:
        ids = _id_table(tree)
        _check_limits(tree)  # first: an inode's own time out of range is named by its path
        epoch = image_epoch(self.options, tree)
        if not 0 <= epoch <= 0xFFFFFFFF:
            raise LimitError(
                f"the image time (epoch) {epoch}, from {epoch_source(self.options)}, is outside "
                "squashfs's range 0..2^32-1 (2106)"
            )
        file_inos = [ino for ino, inode in enumerate(tree.inodes, 1) if inode.kind is Kind.FILE]
        files = [tree.inodes[ino - 1] for ino in file_inos]
        sq = self.sq
        image = ImageFile(region, start=SUPERBLOCK_SIZE)
        cache = open_cache(self.options, self.warnings)
        try:
            stream = DataStream(self.spec, self.options.jobs, sq.fragments, sq.dedup, cache)
            placement = stream.write(files, image, progress)
        finally:
            if cache is not None:
                cache.close()

        tables = _Tables(self.spec, tree, ids, placement, file_inos)
        super_fields = tables.write(image, stream.fragment_table)
        bytes_used = image.pos
        image.write(bytes(-bytes_used % PAD_TO))
        image_size = image.finish()

        flags = (FLAG_DUPLICATES if sq.dedup else 0) | FLAG_EXPORTABLE
        flags |= 0 if sq.fragments else FLAG_NO_FRAGMENTS
        flags |= FLAG_NO_XATTRS if super_fields["xattr_table"] == NO_TABLE else 0
        sb = ffi.new(
            "pyimg_sqfs_super *",
            dict(
                super_fields,
                inode_count=len(tree.inodes),
                mod_time=epoch,
                block_size=self.spec.block_size,
                fragment_count=len(stream.fragment_table),
                compressor=SQUASHFS_IDS[self.spec.name],
                flags=flags,
                id_count=len(ids),
                bytes_used=bytes_used,
            ),
        )
        raw = ffi.new("uint8_t[]", SUPERBLOCK_SIZE)
        lib.pyimg_sqfs_encode_super(sb, raw)
        region.pwrite(ffi.buffer(raw), 0)

        return WriteResult(
            digests=PackedDigests(file_inos, placement.digests),
            bytes_in=sum(inode.size for inode in files),
            bytes_unique=placement.bytes_unique,
            bytes_stored=placement.bytes_data,
            image_size=image_size,
            facts=SquashfsFacts(
                compression=self.spec.name,
                level=self.spec.level,
                block_size=self.spec.block_size,
                fragments=sq.fragments,
                dedup=sq.dedup,
                inodes=len(tree.inodes),
                fragment_blocks=len(stream.fragment_table),
                ids=len(ids),
                bytes_used=bytes_used,
                compressed_data=stream.bytes_stored,
            ),
            warnings=self.warnings + (list(cache.warnings) if cache is not None else []),
            cache=cache.stats if cache is not None else None,
        )


def _id_table(tree: FrozenTree) -> list[int]:
    ids = sorted({inode.uid for inode in tree.inodes} | {inode.gid for inode in tree.inodes})
    if ids[0] < 0 or ids[-1] >= 1 << 32:
        _raise_first(tree, _id_problem)
    if len(ids) > MAX_IDS:
        raise LimitError(f"{len(ids)} distinct uids/gids; squashfs holds at most {MAX_IDS}")
    return ids


def _check_limits(tree: FrozenTree) -> None:
    """Refuse what squashfs cannot hold before any data is read.  The common case
    (nothing wrong) is decided over whole columns; only then are the entries walked
    to name the first offender, in tree order."""
    if max(map(len, (node.path for node in tree.nodes))) > MAX_NAME:  # a long name needs a long path
        _raise_first(tree, _name_problem)
    mtimes = [inode.mtime_ns for inode in tree.inodes]
    unusual = min(mtimes) < 0 or max(mtimes) >= (0xFFFFFFFF + 1) * 1_000_000_000
    unusual = unusual or any(inode.kind in _DEVICES for inode in tree.inodes)
    unusual = unusual or max(len(inode.target) for inode in tree.inodes) > MAX_SYMLINK
    unusual = unusual or suspect_names(inode.xattrs for inode in tree.inodes)
    if unusual:
        _raise_first(tree, _inode_problem)


def _raise_first(tree: FrozenTree, problem: Callable[[Node], str | None]) -> None:
    for node in tree.nodes:
        reason = problem(node)
        if reason is not None:
            raise LimitError(reason, node.image_path)


def _id_problem(node: Node) -> str | None:
    inode = node.inode
    if not (0 <= inode.uid < 1 << 32 and 0 <= inode.gid < 1 << 32):
        return f"uid/gid {inode.uid}:{inode.gid} beyond squashfs's 32 bits"
    return None


def _name_problem(node: Node) -> str | None:
    if len(node.name) > MAX_NAME:
        return f"name of {len(node.name)} bytes; squashfs allows {MAX_NAME}"
    return None


def _inode_problem(node: Node) -> str | None:
    inode = node.inode
    if not 0 <= inode.mtime <= 0xFFFFFFFF:
        return f"mtime {inode.mtime} outside squashfs's range 0..2^32-1"
    if inode.kind in _DEVICES and not (0 <= inode.rdev[0] < 1 << 12 and 0 <= inode.rdev[1] < 1 << 20):
        return f"device number {inode.rdev} too large for squashfs"
    if inode.kind is Kind.SYMLINK and len(inode.target) > MAX_SYMLINK:
        return f"symlink target of {len(inode.target)} bytes (Linux's squashfs reads at most {MAX_SYMLINK})"
    for name, value in inode.xattrs.items():
        problem = xattr_problem(name, value, fmt="squashfs", acls=False)
        if problem is not None:
            return problem
    return None


def _encode_rdev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@dataclass(slots=True)
class _Lookup:
    """A lookup table's metadata blocks and their index, ready to be written."""

    blocks: bytes
    offsets: list[int]


class _Tables:
    """Encodes inodes, directories and the lookup tables through the C core."""

    def __init__(
        self,
        spec: CompressionSpec,
        tree: FrozenTree,
        ids: list[int],
        placement: Placement,
        file_inos: list[int],
    ):
        self.tree = tree
        self.placement = placement
        self.file_inos = file_inos  # the ino of each file, in placement order
        self.id_index = {value: index for index, value in enumerate(ids)}
        self.ids = ids
        self._compressor = BlockCompressor(spec)
        self._callback = Callback(self._compressor)  # kept alive as long as the handles below
        writer = check_handle(
            lib.pyimg_sqfs_new(lib.pyimg_py_compress, self._callback.handle), "squashfs writer"
        )
        self.writer = ffi.gc(writer, lib.pyimg_sqfs_free)
        self.xattr_sets: dict[tuple[tuple[bytes, bytes], ...], int] = {}

    def _new_meta(self) -> Any:
        meta = lib.pyimg_sqfs_meta_new(lib.pyimg_py_compress, self._callback.handle)
        return ffi.gc(check_handle(meta, "squashfs metadata stream"), lib.pyimg_sqfs_meta_free)

    def _err(self) -> Any:
        return lib.pyimg_sqfs_error(self.writer)

    def _check(self, rc: int, message: Any, path: str | bytes | None = None) -> int:
        """check(), raising what the compression callback kept, if it failed."""
        return check(rc, message, path, self._callback)

    # -- inodes and directories -----------------------------------------------------

    def _xattr_index(self, inode: Inode) -> int:
        if not inode.xattrs:
            return NO_XATTR
        key = tuple(sorted(inode.xattrs.items()))
        return self.xattr_sets.setdefault(key, len(self.xattr_sets))

    def _encode_inodes(self) -> array[int]:
        """All inodes and directory listings, encoded by the C core in one call from
        the tree's columns; returns each inode's reference, indexed by ino - 1."""
        tree, placed = self.tree, self.placement
        nodes, inodes = tree.nodes, tree.inodes
        keep: list[object] = []  # the columns must outlive the call

        def column(typecode: str, ctype: str, values: Iterable[int]) -> Any:
            values = array(typecode, values)
            keep.append(values)
            return ffi.from_buffer(f"{ctype}[]", values)

        def blob(parts: list[bytes]) -> tuple[Any, Any]:
            joined = b"".join(parts)
            keep.append(joined)
            return ffi.from_buffer(joined), column("Q", "uint64_t", itertools.accumulate(map(len, parts)))

        t = ffi.new("pyimg_sqfs_tree *")
        t.node_count = len(nodes)
        t.node_ino = column("I", "uint32_t", [node.ino for node in nodes])
        t.node_parent = column("I", "uint32_t", [node.parent for node in nodes])
        t.names, t.name_ends = blob(tree.names())
        id_index = self.id_index
        t.inode_count = len(inodes)
        t.type = column("H", "uint16_t", [_TYPE_OF_KIND[inode.kind] for inode in inodes])
        t.mode = column("H", "uint16_t", [inode.mode & 0o7777 for inode in inodes])
        t.uid_idx = column("H", "uint16_t", [id_index[inode.uid] for inode in inodes])
        t.gid_idx = column("H", "uint16_t", [id_index[inode.gid] for inode in inodes])
        t.mtime = column("I", "uint32_t", [inode.mtime_ns // 1_000_000_000 for inode in inodes])
        t.nlink = column("I", "uint32_t", [tree.nlink[ino] for ino in range(1, len(inodes) + 1)])
        xattr_index = self._xattr_index
        t.xattr = column("I", "uint32_t", [xattr_index(i) if i.xattrs else NO_XATTR for i in inodes])
        t.size = column("Q", "uint64_t", [inode.size for inode in inodes])
        t.rdev = column("I", "uint32_t", [_encode_rdev(*i.rdev) if i.kind in _DEVICES else 0 for i in inodes])
        t.targets, t.target_ends = blob([inode.target for inode in inodes])
        file_of = array("q", [-1]) * len(inodes)
        for index, ino in enumerate(self.file_inos):
            file_of[ino - 1] = index
        t.file_of = column("q", "int64_t", file_of)
        t.file_count = len(self.file_inos)
        t.blocks_start = column("Q", "uint64_t", placed.blocks_start)
        t.sparse = column("Q", "uint64_t", placed.sparse)
        t.frag_index = column("I", "uint32_t", placed.frag_index)
        t.frag_offset = column("I", "uint32_t", placed.frag_offset)
        counts = array("Q", bytes(8 * len(self.file_inos)))
        sizes = array("I")
        for index in sorted(placed.block_sizes):
            counts[index] = len(placed.block_sizes[index])
            sizes.extend(placed.block_sizes[index])
        t.block_ends = column("Q", "uint64_t", itertools.accumulate(counts))
        t.block_sizes = column("I", "uint32_t", sizes)

        refs = array("Q", bytes(8 * len(inodes)))
        failed = ffi.new("size_t *")
        rc = lib.pyimg_sqfs_encode_tree(
            self.writer, t, ffi.from_buffer("uint64_t[]", refs, require_writable=True), failed
        )
        self._check(rc, self._err, nodes[failed[0]].image_path)
        return refs

    # -- tables -------------------------------------------------------------------------

    def _finished(self, meta: Any) -> _Lookup:
        self._check(lib.pyimg_sqfs_meta_finish(meta), lambda: lib.pyimg_sqfs_meta_error(meta))
        blocks = bytes(ffi.buffer(lib.pyimg_sqfs_meta_data(meta), lib.pyimg_sqfs_meta_size(meta)))
        count = lib.pyimg_sqfs_meta_block_count(meta)
        return _Lookup(blocks, [lib.pyimg_sqfs_meta_block_offset(meta, i) for i in range(count)])

    def _lookup_table(self, entries: bytes) -> _Lookup:
        meta = self._new_meta()
        self._check(
            lib.pyimg_sqfs_meta_append(meta, entries, len(entries)), lambda: lib.pyimg_sqfs_meta_error(meta)
        )
        return self._finished(meta)

    @staticmethod
    def _write_lookup(image: ImageFile, table: _Lookup) -> int:
        """Blocks, then the array of their absolute offsets; returns the array's offset."""
        start = image.pos
        image.write(table.blocks)
        index_at = image.pos
        image.write(b"".join(struct.pack("<Q", start + off) for off in table.offsets))
        return index_at

    def _xattr_tables(self) -> tuple[_Lookup, _Lookup] | None:
        if not self.xattr_sets:
            return None
        kv = self._new_meta()
        ids = self._new_meta()
        for pairs in self.xattr_sets:  # dicts keep insertion order: the index order
            ref = lib.pyimg_sqfs_meta_ref(kv)
            size = 0
            for name, value in pairs:
                prefix, code = next((p, c) for p, c in XATTR_PREFIXES if name.startswith(p))
                key = name[len(prefix) :]
                rc = lib.pyimg_sqfs_xattr_pair(kv, code, key, len(key), value, len(value))
                self._check(rc, lambda: lib.pyimg_sqfs_meta_error(kv))
                size += 8 + len(key) + len(value)
            self._check(
                lib.pyimg_sqfs_xattr_id(ids, ref, len(pairs), size), lambda: lib.pyimg_sqfs_meta_error(ids)
            )
        return self._finished(kv), self._finished(ids)

    def write(self, image: ImageFile, fragments: list[tuple[int, int]]) -> dict[str, int]:
        """Write every table after the data; return the superblock's table fields."""
        refs = self._encode_inodes()
        inode_table = self._finished(lib.pyimg_sqfs_inodes(self.writer))
        dir_table = self._finished(lib.pyimg_sqfs_directories(self.writer))
        fields: dict[str, int] = {"root_ref": refs[self.tree.root.ino - 1]}

        fields["inode_table"] = image.pos
        image.write(inode_table.blocks)
        fields["directory_table"] = image.pos
        image.write(dir_table.blocks)

        fields["fragment_table"] = NO_TABLE
        if fragments:
            entries = b"".join(struct.pack("<QII", start, size, 0) for start, size in fragments)
            fields["fragment_table"] = self._write_lookup(image, self._lookup_table(entries))

        fields["export_table"] = self._write_lookup(image, self._lookup_table(_le(refs)))
        fields["id_table"] = self._write_lookup(image, self._lookup_table(_le(array("I", self.ids))))

        fields["xattr_table"] = NO_TABLE
        xattrs = self._xattr_tables()
        if xattrs is not None:
            kv, id_entries = xattrs
            kv_start = image.pos
            image.write(kv.blocks)
            ids_start = image.pos
            image.write(id_entries.blocks)
            fields["xattr_table"] = image.pos
            image.write(struct.pack("<QII", kv_start, len(self.xattr_sets), 0))
            image.write(b"".join(struct.pack("<Q", ids_start + off) for off in id_entries.offsets))
        return fields


def _le(values: array[int]) -> bytes:
    """An array's items as little-endian bytes, whatever the host's byte order."""
    if sys.byteorder != "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()
