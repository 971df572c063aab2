"""Whole-image reuse (docs/cache.md, "whole images"): a rebuild whose every input is
as it was when an earlier build made its image copies that image instead of writing
it again, so a no-change rebuild costs the walk, not the image.  Every format.

The key (`image_key`) is BLAKE3 over all that the image's bytes are a function of:
- pyimg's own code, byte for byte (its modules and its C core: an edited writer
  never reuses what the old one wrote) and the compression libraries' versions;
- the options record (manifest.options_record: every option but jobs and paths);
- the frozen tree: each node's path and inode number (which also says which names
  are hard links), each inode's kind, mode, owner, mtime, size, link target, device
  numbers and xattrs (names and values);
- for each regular file's content, its identity as the walk saw it (st_dev, st_ino,
  size, mtime and ctime in ns: DataRef.ident), as git's index does.  A file without
  one (a tar member, a time beyond an int64 of ns, a file system whose attributes
  may be stale: walk.c) means no key: the build runs as without reuse.

An image is stored only when no identity could be racily clean (mtime or ctime
within cache.RACY_NS of the moment the walk began): a write in the same timestamp
tick as the walk's stat would leave the identity as it was and the content not.
Any later write moves the file's ctime (which nothing can set back), so an identity
seen again names the content that was built.

An entry, `i-<key hex>` in the local cache directory: ENTRY_HEADER, a JSON record of
the write's result (sizes, the format's facts, the image digest), every regular
file's content BLAKE3 in inode order (the manifest lists them), then the image at
a 4 KiB boundary, its holes kept.  A hit is copied into the output's temp file and
its image digest taken as for any build; it must equal the recorded one, else the
entry is removed and the image written (api.py).  Each output (its real path and
format) keeps one image: the one its last build kept replaces the one before.  Its
slot also records the committed output's identity: a rebuild with the same key whose
output is still that file leaves it in place (output_unchanged; api.py).  At
most IMAGES_KEPT image entries stay in a directory (the least recently used go; the
cache's eviction counts them with the rest), and no image over half of the cache's
limit: of such an image the entry keeps its record alone, which is enough to leave
the output in place, and counts as one of the IMAGES_KEPT.
An entry is renamed into place, not fsynced: a torn one fails that check.

Nothing here prints; failures of the cache directory come back as warnings.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import blake3

from . import cache
from ._ffi import lib
from .cache import IMAGE_PREFIX, NO_IDENT, TEMP_PREFIX, CacheStats, compressor_versions, walked_identities
from .cache_remote import remote_ref
from .collect import source_holding
from .content import data_ranges
from .formats.base import PackedDigests, WriteResult
from .imagehash import ImageDigest
from .manifest import options_record
from .options import BuildOptions
from .output import output_mode
from .settings import jsonable
from .tree import FrozenTree, Kind

IMAGE_VERSION = 1  # bump when the key's meaning or the entry's layout changes
IMAGE_MAGIC = b"PYIMGI\x00\x01"
ENTRY_HEADER = struct.Struct("<8sI32sIQ32s")  # magic, version, key, record length, image size, BLAKE3
# of the record and digests
IMAGES_KEPT = 8  # whole images kept per cache directory (a few outputs, formats or branches)
SLOT_PREFIX = "o-"  # an output's slot: the key of the image its last build kept
IMAGE_SHARE = 2  # an image is kept only if its allocated bytes are at most 1/IMAGE_SHARE of the cache's limit
ALIGN = 4096  # where the image starts in an entry: its holes stay holes
COPY = 8 << 20  # bytes per copy_file_range call


def reuse_directory(options: BuildOptions) -> str | None:
    """The local cache directory whole images go to: the cache itself, or the local
    tier of a shared one (a temp tier lives for one build: no use).  None without a
    cache, or for one inside a source (the writer's open_cache warns of that)."""
    value = options.cache.cache
    if not value:
        return None
    directory = value if remote_ref(value) is None else options.cache.local
    if not directory or source_holding(directory, options) is not None:
        return None
    return directory


def code_fingerprint() -> bytes:
    """BLAKE3 over pyimg's modules and C core (names and bytes, in name order): ~1.3 MB
    read from the page cache, ~3 ms."""
    root = os.path.dirname(os.path.abspath(__file__))
    hasher = blake3.blake3()
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in sorted(names):
            if name.endswith((".py", ".so", ".sh")):
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    body = f.read()
                rel = os.path.relpath(path, root).encode()
                hasher.update(struct.pack("<IQ", len(rel), len(body)) + rel + body)
    return hasher.digest()


@dataclass
class ImageKey:
    """A build's image key, and the newest mtime or ctime among its files' identities
    (for the racy rule at store time)."""

    key: bytes
    newest_ns: int


def image_key(options: BuildOptions, tree: FrozenTree) -> ImageKey | None:
    """The key of the image `options` makes of `tree` (module docstring), or None when
    some file's content has no identity.  Column by column (each a comprehension and
    one buffer): ~30 ms for 50k entries, where a record per inode took 0.1 s."""
    inodes = tree.inodes
    # Every content needs its identity (a spooled tar member has none, and sits at
    # offset 0 of its spool file like a file of its own).
    if walked_identities([inode.data for inode in inodes if inode.data is not None]) is None:
        return None
    if any(d.offset != 0 or d.size != i.size for i in inodes if (d := i.data) is not None):
        return None
    joined = b"".join(NO_IDENT if inode.data is None else inode.data.ident for inode in inodes)
    times = array("q", joined)  # five int64 per file: st_dev, st_ino, size, mtime, ctime
    if sys.byteorder != "little":
        times.byteswap()
    newest = max(max(times[3::5], default=0), max(times[4::5], default=0))
    try:
        columns = _columns(tree)
    except (OverflowError, struct.error):
        return None  # an owner or time beyond the columns' widths: the writer refuses it by name
    head = b"pyimg image v%d\0" % IMAGE_VERSION + compressor_versions() + b"\0" + code_fingerprint()
    record = json.dumps(jsonable(options_record(options)), sort_keys=True).encode()
    hasher = blake3.blake3(head + struct.pack("<Q", len(record)) + record)
    hasher.update(struct.pack("<Q", len(joined)))
    hasher.update(joined)
    for column in columns:  # each framed by its length: no two trees give the same bytes
        hasher.update(struct.pack("<Q", len(column)))
        hasher.update(column)
    return ImageKey(hasher.digest(), newest)


def _columns(tree: FrozenTree) -> list[bytes]:
    """The tree's metadata as columns of bytes (the identities aside)."""
    inodes = tree.inodes
    return [
        bytes(inode.kind for inode in inodes),
        _column("H", [inode.mode for inode in inodes]),
        _column("I", [inode.uid for inode in inodes]),
        _column("I", [inode.gid for inode in inodes]),
        _column("q", [inode.mtime_ns for inode in inodes]),
        _column("Q", [inode.size for inode in inodes]),
        _column("I", [len(inode.target) for inode in inodes]),
        b"".join(inode.target for inode in inodes),
        _sparse(tree),
        _column("I", [node.ino for node in tree.nodes]),
        _column("I", [len(node.path) for node in tree.nodes]),
        b"".join(node.path for node in tree.nodes),
    ]


def _column(typecode: str, values: list[int]) -> bytes:
    """Ints as one little-endian buffer of struct's standard width for `typecode`."""
    column = array(typecode, values)
    if column.itemsize != struct.calcsize("<" + typecode):  # (not on Linux's ABIs)
        return struct.pack(f"<{len(values)}{typecode}", *values)
    if sys.byteorder != "little":
        column.byteswap()
    return column.tobytes()


def _sparse(tree: FrozenTree) -> bytes:
    """What few inodes have: device numbers and xattrs (names and values), each
    with its inode's index."""
    out: list[bytes] = []
    for index, inode in enumerate(tree.inodes):
        if inode.rdev != (0, 0):
            out.append(struct.pack("<BIII", 1, index, *inode.rdev))
        if inode.xattrs:
            out.append(struct.pack("<BII", 2, index, len(inode.xattrs)))
            for name, value in inode.xattrs.items():
                out.append(struct.pack("<II", len(name), len(value)) + name + value)
    return b"".join(out)


@dataclass
class Reuse:
    """Whole-image reuse for one build: its directory, key and output slot."""

    directory: str
    key: ImageKey
    slot: str  # this output's marker file (SLOT_PREFIX): the key of the image it last kept
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def for_build(cls, options: BuildOptions, tree: FrozenTree) -> Reuse | None:
        directory = reuse_directory(options)
        if directory is None:
            return None
        key = image_key(options, tree)
        if key is None:
            return None
        where = os.path.realpath(options.output).encode("utf-8", "surrogateescape")
        slot = blake3.blake3(b"pyimg output slot\0" + options.format.encode() + b"\0" + where)
        return cls(directory, key, os.path.join(directory, SLOT_PREFIX + slot.hexdigest()[:32]))

    @property
    def path(self) -> str:
        return os.path.join(self.directory, IMAGE_PREFIX + self.key.key.hex())

    # -- the output as the last build left it ----------------------------------------------

    def output_unchanged(
        self, output: str, tree: FrozenTree, facts_type: type
    ) -> tuple[WriteResult, str, OutputMark | None] | None:
        """The write's result and image digest of the entry this output's slot names,
        if that is this build's key and the output is the very file the last build
        committed (its identity and mode as recorded, a regular file); and, when that
        cannot be trusted without reading the output (its ctime is not older than the
        record by the racy window: a write after the record moves the ctime), the mark
        to record once the caller has read it.  None: no slot, another key, another
        file, or no entry to hold the result."""
        try:
            with open(self.slot, "rb") as f:
                key, _, rest = f.read(512).partition(b"\n")
            mark = mark_output(output)
        except OSError:
            return None
        recorded = rest.split()
        if key != self.key.key.hex().encode() or len(recorded) != len(_OUTPUT_FIELDS) + 1:
            return None
        try:
            *identity, recorded_at = (int(n) for n in recorded)
        except ValueError:
            return None
        if not stat.S_ISREG(mark.mode) or identity != mark.identity:
            return None
        if not lib.pyimg_local_fs(os.fsencode(output)):
            return None  # (NFS may answer from its attribute cache: walk.c)
        if stat.S_IMODE(mark.mode) != output_mode():
            return None  # (a build now would give it another mode)
        try:
            with self._entry(tree, facts_type) as (_, loaded):
                pass
        except OSError:
            return None
        if loaded is None:
            return None
        result, blake3_hex, _ = loaded
        result.cache = CacheStats(image_hits=1, image_left_in_place=1)
        trusted = mark.ctime_ns < recorded_at - cache.RACY_NS
        return result, blake3_hex, None if trusted else mark

    def record_output(self, output: str, mark: OutputMark) -> None:
        """Note in the slot the output's identity as `mark` took it, for
        output_unchanged, if it still has it: whatever wrote the output after the mark
        (while its image was kept or read) changed its ctime, and is not recorded."""
        try:
            with open(self.slot, "rb") as f:
                key = f.read(64)
            now = mark_output(output)
        except OSError:
            return
        if key != self.key.key.hex().encode() or now.identity != mark.identity:
            return  # (this build's image was not kept: the slot names another)
        line = " ".join(str(n) for n in (*mark.identity, mark.taken_at))
        with contextlib.suppress(OSError):  # (a read-only cache: the next build copies its image)
            self._write_slot(key + b"\n" + line.encode() + b"\n")

    # -- a hit -----------------------------------------------------------------------------

    def copy_into(self, out_fd: int, tree: FrozenTree, facts_type: type) -> tuple[WriteResult, str] | None:
        """The stored image copied into `out_fd` (an empty temp file), and the write's
        result and the image digest it was recorded with; None: no entry, or a bad one
        (removed).  The caller checks the image digest (see module docstring)."""
        try:
            with self._entry(tree, facts_type) as (fd, loaded):
                if loaded is None:
                    self.drop()
                    return None
                result, blake3_hex, start = loaded
                if start is None:
                    return None  # (a record alone: the output was not left as it was)
                _copy_data(fd, start, out_fd, 0, result.image_size)
                os.ftruncate(out_fd, result.image_size)
        except OSError:
            return None
        result.cache = CacheStats(image_hits=1)
        return result, blake3_hex

    @contextlib.contextmanager
    def _entry(
        self, tree: FrozenTree, facts_type: type
    ) -> Iterator[tuple[int, tuple[WriteResult, str, int | None] | None]]:
        """This key's entry, open, and what _load makes of it; a whole one is marked
        recently used (eviction is by mtime).  OSError: no entry, or unreadable."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            loaded = self._load(fd, tree, facts_type)
            if loaded is not None:
                with contextlib.suppress(OSError):  # (a read-only cache still serves)
                    os.utime(fd)
            yield fd, loaded
        finally:
            os.close(fd)

    def _load(
        self, fd: int, tree: FrozenTree, facts_type: type
    ) -> tuple[WriteResult, str, int | None] | None:
        """The entry's write result, image digest and where its image starts (None: a
        record alone, for an image too large to keep); None if it is not whole."""
        head = os.pread(fd, ENTRY_HEADER.size, 0)
        if len(head) != ENTRY_HEADER.size:
            return None
        magic, version, key, record_len, image_size, check = ENTRY_HEADER.unpack(head)
        file_inos = _file_inos(tree)
        body_len = record_len + 32 * len(file_inos)
        if (magic, version, key) != (IMAGE_MAGIC, IMAGE_VERSION, self.key.key):
            return None
        body = os.pread(fd, body_len, ENTRY_HEADER.size)
        if len(body) != body_len or blake3.blake3(body).digest() != check:
            return None
        try:
            record = json.loads(body[:record_len])
            facts = record["facts"]
            result = WriteResult(
                digests=PackedDigests(file_inos, body[record_len:]),
                bytes_in=int(record["bytes_in"]),
                bytes_unique=int(record["bytes_unique"]),
                bytes_stored=int(record["bytes_stored"]),
                image_size=int(record["image_size"]),
                facts=facts_type(**{f.name: _tuples(facts[f.name]) for f in fields(facts_type)}),
            )
            blake3_hex = str(record["blake3"])
            whole = record["image"] is True
        except (ValueError, KeyError, TypeError):
            return None
        start = _aligned(ENTRY_HEADER.size + body_len)
        end = start + image_size if whole else ENTRY_HEADER.size + body_len
        if result.image_size != image_size or os.fstat(fd).st_size != end:
            return None  # (a torn entry: its holes would otherwise read as the zeros they hold)
        return result, blake3_hex, start if whole else None

    def drop(self) -> None:
        """The entry was bad: removed, to be stored again."""
        _unlink(self.path)

    # -- a miss: store what was built -----------------------------------------------------

    def store(self, image_fd: int, tree: FrozenTree, result: WriteResult, image: ImageDigest,
              walk_started_ns: int, max_bytes: int) -> bool:  # fmt: skip
        """Keep the image just built (`image_fd`, committed) under the key, unless an
        identity could be racily clean.  An image that would take over half of the
        cache (its allocated bytes: an ext4 image is mostly holes) is kept as its
        record alone: enough to leave the output in place (output_unchanged), not
        to copy.  The image this output kept before goes.  True if the image was
        stored; a failing directory adds a warning."""
        if self.key.newest_ns >= walk_started_ns - cache.RACY_NS:
            return False
        whole = os.fstat(image_fd).st_blocks * 512 <= max_bytes // IMAGE_SHARE
        file_inos = _file_inos(tree)
        record = json.dumps({
            "image_size": result.image_size,
            "bytes_in": result.bytes_in,
            "bytes_unique": result.bytes_unique,
            "bytes_stored": result.bytes_stored,
            "facts": jsonable(result.facts),
            "blake3": image.blake3,
            "image": whole,
        }).encode()  # fmt: skip
        body = record + b"".join(result.digests[ino] for ino in file_inos)
        head = ENTRY_HEADER.pack(IMAGE_MAGIC, IMAGE_VERSION, self.key.key, len(record), result.image_size,
                                 blake3.blake3(body).digest())  # fmt: skip
        try:
            os.makedirs(self.directory, exist_ok=True)  # (cpio's writer opens no cache)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.directory)
        except OSError as exc:
            self.warnings.append(f"build cache {self.directory}: {exc.strerror}; the image was not kept")
            return False
        try:
            try:
                os.pwrite(fd, head + body, 0)
                if whole:
                    start = _aligned(len(head) + len(body))
                    _copy_data(image_fd, 0, fd, start, result.image_size)
                    os.ftruncate(fd, start + result.image_size)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            self._claim_slot()
        except OSError as exc:
            _unlink(tmp)
            self.warnings.append(f"build cache {self.directory}: {exc.strerror}; the image was not kept")
            return False
        self._prune()
        return whole

    def _claim_slot(self) -> None:
        """Point this output's slot at the new image and remove the image it named
        before: a series of rebuilds of one output keeps one image, not one each."""
        try:
            with open(self.slot, "rb") as f:
                before = f.read(64)
        except OSError:
            before = b""
        self._write_slot(self.key.key.hex().encode())
        if len(before) == 64 and before != self.key.key.hex().encode():
            _unlink(os.path.join(self.directory, IMAGE_PREFIX + before.decode("ascii", "replace")))

    def _write_slot(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.directory)
        try:
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, self.slot)
        except OSError:
            _unlink(tmp)
            raise

    def _prune(self) -> None:
        """Keep the IMAGES_KEPT most recently used whole images, and as many slots."""
        for prefix in (IMAGE_PREFIX, SLOT_PREFIX):
            found: list[tuple[int, str]] = []
            try:
                with os.scandir(self.directory) as it:
                    for item in it:
                        if item.name.startswith(prefix):
                            found.append((item.stat(follow_symlinks=False).st_mtime_ns, item.path))
            except OSError:
                return
            for _, path in sorted(found, reverse=True)[IMAGES_KEPT:]:
                _unlink(path)


_OUTPUT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns", "st_mode")


@dataclass(frozen=True)
class OutputMark:
    """An output's identity (_OUTPUT_FIELDS) and the time just before it was taken:
    a write after that time gives the output a ctime within the racy window of it."""

    identity: list[int]
    taken_at: int

    @property
    def mode(self) -> int:
        return self.identity[-1]

    @property
    def ctime_ns(self) -> int:
        return self.identity[-2]


def mark_output(output: str, taken_at: int | None = None) -> OutputMark:
    """The output's identity now (OSError: none there); `taken_at` an earlier time to
    reckon the racy window from (default: now, before the lstat)."""
    taken_at = time.time_ns() if taken_at is None else taken_at
    st = os.lstat(output)
    return OutputMark([int(getattr(st, name)) for name in _OUTPUT_FIELDS], taken_at)


def _file_inos(tree: FrozenTree) -> list[int]:
    """The regular files' inode numbers, in order: whose content digests an entry holds."""
    return [ino for ino, inode in enumerate(tree.inodes, 1) if inode.kind is Kind.FILE]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples a facts dataclass holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _copy_data(src: int, src_at: int, dst: int, dst_at: int, size: int) -> None:
    """`size` bytes of src from src_at to dst at dst_at, holes skipped (left holes in
    dst, which the caller sizes with ftruncate)."""
    if src_at == 0:
        ranges = data_ranges(src, size)
    else:  # the entry: its image's holes, found from its own start (4 KiB aligned)
        ranges = [(s - src_at, e - src_at) for s, e in data_ranges(src, src_at + size) if e > src_at]
        ranges = [(max(0, s), e) for s, e in ranges]
    for start, end in ranges:
        pos = start
        while pos < end:
            want = min(COPY, end - pos)
            try:
                n = os.copy_file_range(src, dst, want, src_at + pos, dst_at + pos)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                n = _copy_piece(src, src_at + pos, dst, dst_at + pos, want)
            if n <= 0:
                raise OSError(errno.EIO, "the cache entry ended early")
            pos += n


# copy_file_range refuses: across file systems (Linux >= 5.19 unless the same type),
# or where the file system or the kernel has none.
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _copy_piece(src: int, src_at: int, dst: int, dst_at: int, size: int) -> int:
    data = os.pread(src, size, src_at)
    view = memoryview(data)
    while view:
        view = view[os.pwrite(dst, view, dst_at + len(data) - len(view)) :]
    return len(data)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
