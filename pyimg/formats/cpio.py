"""cpio "newc" writer: the archive format of the Linux initramfs.

Layout (the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
  for every entry, in the tree's order (a directory before its children, as the
  kernel needs): a 110-byte header of 13 eight-digit hex fields after the magic
  "070701", the name and its NUL, zero padding to 4 bytes, the data, zero padding
  to 4 bytes; then the entry "TRAILER!!!", padded to 4 bytes.
Optionally the whole archive is one gzip member (mtime 0, no name) or one zstd
frame (no timestamps exist in zstd).  docs/cpio.md has the notes.

newc has no xattrs: a tree with any is refused, naming the first path, unless
drop_xattrs (then they are left out and counted in the facts).  Hard links are
written as GNU cpio writes them: every link carries the group's inode number and
link count, and only the last one carries the data (size 0 on the others); the
kernel and `cpio -i` both rebuild the group from that.
"""

from __future__ import annotations

import contextlib
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import blake3
import zstandard

from ..content import ContentReader, ordered_map, read_batch_packed
from ..errors import LimitError
from ..region import Region
from ..tree import IFMT_OF_KIND, NO_XATTRS, DataRef, FrozenTree, Inode, Kind, Node
from .base import PackedDigests, Progress, WriteResult
from .cpio_options import CompressionName, CpioOptions

if TYPE_CHECKING:
    from ..options import BuildOptions

MAGIC = b"070701"
TRAILER = b"TRAILER!!!"
FIELD_MAX = 0xFFFFFFFF  # every header field is 8 hex digits
# The kernel's unpacker (init/initramfs.c do_header) skips, without a word, an entry
# whose name with its NUL is longer than PATH_MAX, or a symlink whose target is; and
# creates nothing for a name component over NAME_MAX.  Refused here instead.
PATH_MAX = 4096
NAME_MAX = 255
CHUNK = 1 << 20  # bytes handed to the compressor / written at once
BATCH_BYTES = 1 << 20  # small files read by one C call, up to this many bytes
BIG_FILE = 256 << 10  # files above this are streamed in CHUNKs, not batched


@dataclass(frozen=True, slots=True)
class CpioFacts:
    """What a cpio archive is, beyond its bytes (the artifact's facts, the manifest's
    format_details)."""

    compression: str
    level: int | None  # the level used (the default made explicit); None uncompressed
    entries: int
    archive_size: int  # the uncompressed archive's bytes
    xattrs_dropped: int  # inodes whose xattrs were left out (only with drop_xattrs)


class CpioWriter:
    name: ClassVar[str] = "cpio"
    facts_type: ClassVar[type] = CpioFacts

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.cpio = options.settings(CpioOptions)
        self.level = self.cpio.resolved_level()
        self.jobs = options.jobs

    def prescan(self) -> None:
        """None: cpio reads each file once, in the frozen tree's order."""
        return None

    def reused(self) -> list[str]:
        """The image came whole from the cache (reuse.py): nothing to release."""
        return []

    def write(self, tree: FrozenTree, region: Region, progress: Progress) -> WriteResult:
        return write_archive(tree, region, progress, self.cpio, jobs=self.jobs)


def write_archive(
    tree: FrozenTree,
    region: Region,
    progress: Progress | None = None,
    options: CpioOptions | None = None,
    *,
    jobs: int = 1,
) -> WriteResult:
    """The newc archive of `tree` into `region` (what CpioWriter.write does, without
    BuildOptions: the boot code builds its archives through this)."""
    options = options if options is not None else CpioOptions()
    level = options.resolved_level()
    check_limits(tree, options.drop_xattrs)
    # Left out of the tree itself, so the manifest lists what the archive holds.
    xattrs_dropped = _drop_xattrs(tree) if options.drop_xattrs else 0
    sink = _Sink(region, options.compression.name, level)
    file_inos: list[int] = []
    digests = bytearray()
    empty_inos: list[int] = []
    carrier = _data_carriers(tree)
    headers = _headers(tree, carrier)
    # Closed here, not by the garbage collector: a Ctrl-C while its threads end must propagate.
    with contextlib.closing(ordered_map(_read, _tasks(tree, carrier), jobs)) as results:
        batch: _Batch | None = None
        for index, node in enumerate(tree.nodes):
            inode = node.inode
            sink.add(headers[index])
            if inode.kind is Kind.FILE:
                size = inode.size
                if carrier[node.ino] != index:  # an earlier link of a group: no data
                    continue
                if not size:
                    empty_inos.append(node.ino)
                    continue
                file_inos.append(node.ino)
                if size > BIG_FILE:  # its chunks, in order, hashed here
                    hasher = blake3.blake3(max_threads=1)
                    for _ in range(0, size, CHUNK):
                        chunk = next(results)
                        assert isinstance(chunk, bytes)
                        hasher.update(chunk)
                        sink.add(chunk)
                    digests += hasher.digest()
                else:
                    if batch is None or batch.next >= len(batch.sizes):
                        batch = next(results)  # type: ignore[assignment]
                        assert isinstance(batch, _Batch)
                    sink.add(batch.view[batch.at : batch.at + size])
                    digests += batch.digests[32 * batch.next : 32 * batch.next + 32]
                    batch.at += size
                    batch.next += 1
                sink.add(_ZEROS[-size % 4])
                if progress is not None:
                    progress(size)
            elif inode.kind is Kind.SYMLINK:
                sink.add(inode.target + _ZEROS[-len(inode.target) % 4])
    sink.add(_trailer())
    image_size = sink.finish()
    files = [inode for inode in tree.inodes if inode.kind is Kind.FILE]
    bytes_in = sum(inode.size for inode in files)
    return WriteResult(
        digests=PackedDigests(file_inos, digests, empty_inos, blake3.blake3(b"").digest()),
        bytes_in=bytes_in,
        bytes_unique=bytes_in,  # newc stores every content in full (hard links once)
        bytes_stored=bytes_in,
        image_size=image_size,
        facts=CpioFacts(
            compression=options.compression.name,
            level=level,
            entries=len(tree.nodes),
            archive_size=sink.raw,
            xattrs_dropped=xattrs_dropped,
        ),
    )


def _drop_xattrs(tree: FrozenTree) -> int:
    """Remove every inode's xattrs (drop_xattrs); how many inodes had some."""
    had = [inode for inode in tree.inodes if inode.xattrs]
    for inode in had:
        inode.xattrs = NO_XATTRS
    return len(had)


def _data_carriers(tree: FrozenTree) -> dict[int, int]:
    """ino -> index of the node that carries a regular file's data: the last link
    of a hard-link group (GNU cpio's way; the kernel takes the data anywhere)."""
    return {node.ino: index for index, node in enumerate(tree.nodes) if node.inode.kind is Kind.FILE}


def _headers(tree: FrozenTree, carrier: dict[int, int]) -> list[bytes]:
    """Every node's header, name and padding.  The 13 numbers of all headers are
    packed into one array and turned into hex by one call: per-entry formatting
    (`b"%08x" % ...` thirteen times) cost ~4 us an entry, this ~1 us."""
    numbers = array("I")
    names: list[bytes] = []
    nlink = tree.nlink
    devices = (Kind.CHAR, Kind.BLOCK)
    for index, node in enumerate(tree.nodes):
        inode = node.inode
        kind = inode.kind
        if kind is Kind.FILE:
            size = inode.size if carrier[node.ino] == index else 0
        elif kind is Kind.SYMLINK:
            size = len(inode.target)
        else:
            size = 0
        major, minor = inode.rdev if kind in devices else (0, 0)
        name = node.path if index else b"."
        names.append(name)
        # c_maj, c_min (0, 0): the device the file is on; c_chksum 0: only for "070702".
        numbers.extend(
            (node.ino, IFMT_OF_KIND[kind] | inode.mode, inode.uid, inode.gid, nlink[node.ino],
             inode.mtime_ns // 1_000_000_000, size, 0, 0, major, minor, len(name) + 1, 0)
        )  # fmt: skip
    if sys.byteorder == "little":
        numbers.byteswap()
    digits = numbers.tobytes().hex().encode()
    return [
        MAGIC + digits[104 * i : 104 * i + 104] + name + _PADS[(len(name) + 110) % 4]
        for i, name in enumerate(names)
    ]


_PADS = [b"\0" * (4 - r) for r in range(4)]  # the name's NUL, then zeros to a 4-byte boundary


def _trailer() -> bytes:
    head = b"%08x" * 13 % (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(TRAILER) + 1, 0)
    return MAGIC + head + TRAILER + _PADS[(len(TRAILER) + 110) % 4]


def check_limits(tree: FrozenTree, drop_xattrs: bool = False) -> None:
    """Refuse what newc cannot hold (every number is 32 bits; no xattrs, unless they
    are to be dropped) or the kernel would not unpack (names and symlink targets
    longer than Linux allows), before any data is read."""
    for node in tree.nodes:
        inode = node.inode
        path = node.path
        if len(path) >= PATH_MAX:
            raise LimitError(
                f"path of {len(path)} bytes: the kernel unpacks cpio names of at most {PATH_MAX - 1} "
                "(it skips longer ones silently)",
                node.image_path,
            )
        if len(path) > NAME_MAX and len(node.name) > NAME_MAX:  # only a long path holds a long name
            raise LimitError(f"name of {len(node.name)} bytes (Linux allows {NAME_MAX})", node.image_path)
        if inode.kind is Kind.SYMLINK and len(inode.target) >= PATH_MAX:
            raise LimitError(
                f"symlink target of {len(inode.target)} bytes (Linux allows {PATH_MAX - 1})", node.image_path
            )
        if inode.xattrs and not drop_xattrs:
            name = sorted(inode.xattrs)[0].decode("utf-8", "backslashreplace")
            raise LimitError(
                f"has xattrs ({name}…) and cpio (newc) cannot hold them: --drop-xattrs leaves them out",
                node.image_path,
            )
        if not 0 <= inode.mtime <= FIELD_MAX:
            raise LimitError(f"mtime {inode.mtime} outside cpio's range 0..2^32-1", node.image_path)
        if inode.size > FIELD_MAX:
            raise LimitError(
                f"{inode.size} bytes: a cpio (newc) member holds at most 4 GiB - 1", node.image_path
            )
        if inode.uid > FIELD_MAX or inode.gid > FIELD_MAX:
            raise LimitError(f"uid/gid {inode.uid}:{inode.gid} too large for cpio", node.image_path)
        if max(inode.rdev) > FIELD_MAX:
            raise LimitError(f"device number {inode.rdev} too large for cpio", node.image_path)


# -- reading file data ----------------------------------------------------------------

# A task is a batch of small files (read and hashed by one C call, files up to
# BIG_FILE, BATCH_BYTES at most) or one CHUNK of a large file: memory in flight
# stays bounded by ordered_map's window whatever the sizes.


@dataclass(slots=True)
class _Batch:
    view: memoryview  # the batch's files back to back
    digests: bytearray  # their BLAKE3 digests, 32 bytes each
    sizes: list[int]
    at: int = 0  # where the next file's bytes start in view
    next: int = 0  # the next file's position in the batch


_Task = tuple[list[DataRef], int]  # (the batch, -1) or ([one big file], the chunk's offset)


def _tasks(tree: FrozenTree, carrier: dict[int, int]) -> Iterator[_Task]:
    batch: list[DataRef] = []
    size = 0
    for index, node in enumerate(tree.nodes):
        inode = node.inode
        if inode.kind is not Kind.FILE or not inode.size or carrier[node.ino] != index:
            continue
        ref = _ref(inode, node)
        if inode.size > BIG_FILE:
            if batch:
                yield batch, -1
                batch, size = [], 0
            for offset in range(0, inode.size, CHUNK):
                yield [ref], offset
            continue
        batch.append(ref)
        size += inode.size
        if size >= BATCH_BYTES:
            yield batch, -1
            batch, size = [], 0
    if batch:
        yield batch, -1


def _ref(inode: Inode, node: Node) -> DataRef:
    if inode.data is None:
        raise LimitError("regular file without a data source", node.image_path)
    return inode.data


def _read(task: _Task) -> _Batch | bytes:
    refs, offset = task
    if offset < 0:
        data, digests = read_batch_packed(refs)
        return _Batch(memoryview(data), digests, [ref.size for ref in refs])
    ref = refs[0]
    with ContentReader(ref) as reader:  # checks the file's stamp on open, and below
        chunk = reader.read(offset, min(CHUNK, ref.size - offset))
        if offset + CHUNK >= ref.size:
            reader.check_unchanged()
    return chunk


_ZEROS = [b"", b"\0", b"\0\0", b"\0\0\0"]


# -- output ---------------------------------------------------------------------------


class _Sink:
    """The archive's bytes, gathered into CHUNKs, compressed (or not) and written
    at the region's next offset."""

    def __init__(self, region: Region, compression: CompressionName, level: int | None) -> None:
        self.region = region
        self.pos = 0  # bytes written to the region
        self.raw = 0  # archive bytes before compression
        self.pending: list[bytes | memoryview] = []
        self.pending_len = 0
        self._gzip: zlib._Compress | None = None
        self._zstd: zstandard.ZstdCompressionObj | None = None
        if compression == "gzip":
            # wbits 31: a gzip member whose header zlib writes with mtime 0 and no name.
            self._gzip = zlib.compressobj(level if level is not None else 6, zlib.DEFLATED, 31)
        elif compression == "zstd":
            # One frame, single-threaded (the bytes never depend on --jobs), with a checksum.
            self._zstd = zstandard.ZstdCompressor(level=level or 3, write_checksum=True).compressobj()

    def add(self, piece: bytes | memoryview) -> None:
        if not len(piece):
            return
        self.pending.append(piece)
        self.pending_len += len(piece)
        if self.pending_len >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.raw += self.pending_len
        block = b"".join(self.pending)  # one copy of <= 2 MiB; a write of 30k small pieces costs more
        self.pending, self.pending_len = [], 0
        if self._gzip is not None:
            block = self._gzip.compress(block)
        elif self._zstd is not None:
            block = self._zstd.compress(block)
        self._write([block])

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        length = sum(len(p) for p in pieces)
        if length:
            self.region.pwritev(pieces, self.pos)
            self.pos += length

    def finish(self) -> int:
        """Flush everything; the bytes used."""
        self._flush()
        if self._gzip is not None:
            self._write([self._gzip.flush()])
        elif self._zstd is not None:
            self._write([self._zstd.flush()])
        return self.pos
