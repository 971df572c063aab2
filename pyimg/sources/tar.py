"""A tar archive source: plain, gzip, zstd, xz (and bzip2) compressed.

Formats: ustar, GNU (long names and links, sparse) and pax (long names, fractional
mtimes, "SCHILY.xattr.*" and libarchive's "LIBARCHIVE.xattr.*" xattrs), all parsed
by Python's tarfile.  Members are read one after another and forgotten (tarfile's
member list is cleared), so memory stays one Inode per entry.

Data: in a plain archive a member's DataRef points into the archive itself (no
copy; its stamp is the archive's size and mtime, so a changed archive is caught).
Members of compressed archives, and sparse members, are copied into the one Spool.

Refused with SourceError naming the archive and the member: absolute names, names
with "..", a member below a symlink already in the tree (it would be written
through the link), a hard link whose target is neither earlier in the archive nor
in the tree, unsupported member types, and every corrupt or truncated archive (bad
headers, short data, broken compression).

Excludes: an excluded member that a hard link may name is still remembered (and,
in a compressed archive, its data spooled), so a link under a name that is not
excluded keeps the content.  A hard link may also name a file that an earlier
source put in the tree (layered archives).
"""

from __future__ import annotations

import base64
import binascii
import bz2
import decimal
import gzip
import lzma
import math
import os
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from typing import IO, BinaryIO, Protocol, TypedDict, cast

import zstandard

from ..errors import PyImgError, SourceError
from ..tree import DataRef, Inode, Kind, Tree, split_path
from ..xattrs import ACL_ACCESS, ACL_DEFAULT, AclError, acl_from_text, mode_acl
from . import Readable, Rules, Spool, join_image_path

BLOCK = tarfile.BLOCKSIZE

_MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bz2"),
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")

# Everything a broken archive or compressed stream can raise while being read.
_CORRUPT = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    OSError,  # gzip.BadGzipFile, bz2's "Invalid data stream", read errors
    ValueError,  # bad numbers in headers
    UnicodeError,
)


def compression_of(head: bytes) -> str:
    """Compression ("gz", "zst", "xz", "bz2" from a file's first bytes, "" when plain."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


def is_tar_archive(path: str) -> bool:
    """Whether the file's (decompressed) first block is a valid tar header.

    Compression magic alone is not enough (a gzipped man page is not an archive),
    and tarfile.is_tarfile accepts an all-zero file, so the header is checked.
    """
    try:
        with open(path, "rb") as raw:
            stream = _decompressed(raw, compression_of(raw.read(6)), rewind=True)
            block = _read_exactly(stream, BLOCK)
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (*_CORRUPT, _CorruptHeader):
        return False
    return True


def add_tar(tree: Tree, archive: str, dest: bytes, rules: Rules, spool: Spool) -> None:
    """Add every member of `archive` below image path `dest`."""
    try:
        st = os.stat(archive)
        raw = open(archive, "rb")  # noqa: SIM115 (closed below, after the member loop)
    except FileNotFoundError as exc:
        raise SourceError("no such file or directory", archive) from exc
    except OSError as exc:
        raise SourceError(f"cannot open: {exc.strerror}", archive) from exc
    reader: _ArchiveReader | None = None
    with raw:
        try:
            compression = compression_of(raw.read(6))
            stream = _decompressed(raw, compression, rewind=True)
            with _open_tar(stream, compression) as tf:
                reader = _ArchiveReader(tree, archive, dest, rules, spool, tf)
                if not compression:
                    reader.plain_stamp = (st.st_size, st.st_mtime_ns)
                reader.read_all()
            if compression:
                # Read past the end-of-archive blocks to the end of the compressed
                # stream: only there are its checksum (gzip CRC, xz check) and a cut
                # verified.
                while stream.read(1 << 20):
                    pass
        except PyImgError:
            raise
        except _MissingEnd:
            last = reader.last_name if reader is not None else None
            raise SourceError(
                f"truncated tar archive: it ends after member {last!r} without the end-of-archive "
                "blocks (whatever followed that member is lost)",
                archive,
            ) from None
        except (*_CORRUPT, _CorruptHeader) as exc:
            raise SourceError(f"corrupt or truncated tar archive: {_describe(exc)}", archive) from exc


class _Names(TypedDict):
    encoding: str
    errors: str


def _open_tar(stream: Readable, compression: str) -> tarfile.TarFile:
    """A plain archive is opened for random access (members are skipped by seeking,
    data offsets are real); a compressed one as a stream, decompressed by us."""
    if not compression:
        return tarfile.open(fileobj=cast(IO[bytes], stream), mode="r:", tarinfo=_StrictTarInfo, **_NAMES)
    return tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", tarinfo=_StrictTarInfo, **_NAMES)


# Names are bytes in the tree; surrogateescape makes tarfile's str names round-trip.
_NAMES = _Names(encoding="utf-8", errors="surrogateescape")

# Not in typeshed, but documented tarfile exceptions: a cut-short or garbage header.
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, _CorruptHeader):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _CorruptHeader(Exception):
    """A header after the first one is garbage or cut short.  tarfile takes either
    for the end of the archive and would silently drop the rest; we refuse."""


class _MissingEnd(Exception):
    """The archive stops right after a member, without the end-of-archive blocks:
    tarfile takes that for the end, but it is how a cut archive looks."""


class _StrictTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> _StrictTarInfo:
        try:
            info = super().fromtarfile(tf)
        except _BAD_HEADER as exc:
            raise _CorruptHeader(f"bad header at offset {tf.offset}: {exc}") from None
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]
            if tf.offset > 0:  # (an empty file is tarfile's own "empty file" error)
                raise _MissingEnd from None
            raise
        if info.size < 0:  # base-256 or pax numbers can be negative
            raise _CorruptHeader(f"member {info.name!r}: negative size {info.size}")
        return info


class _ArchiveReader:
    def __init__(
        self, tree: Tree, archive: str, dest: bytes, rules: Rules, spool: Spool, tf: tarfile.TarFile
    ) -> None:
        self.tree = tree
        self.archive = archive
        self.dest = dest
        self.rules = rules
        self.spool = spool
        self.tf = tf
        self.plain_stamp: tuple[int, int] | None = None  # set for uncompressed archives
        self.excluded_inodes: dict[bytes, Inode] = {}  # excluded names a hard link may name
        self.last_name: str | None = None  # the last member read, for errors

    def read_all(self) -> None:
        while True:
            member = self.tf.next()
            if member is None:
                return
            # We never look a member up by name again: keep tarfile from hoarding them.
            self.tf.members.clear()  # type: ignore[attr-defined]
            self.last_name = member.name
            self.add_member(member)

    def fail(self, member: tarfile.TarInfo, reason: str) -> SourceError:
        return SourceError(f"member {member.name!r}: {reason}", self.archive)

    def image_path(self, member: tarfile.TarInfo, name: str, what: str = "name") -> bytes:
        raw = name.encode("utf-8", "surrogateescape")
        if b"\0" in raw:  # a pax path record can hold one; no file system name can
            raise self.fail(member, f"{what} with a NUL byte refused")
        if raw.startswith(b"/"):
            raise self.fail(member, f"absolute {what} refused")
        parts = [p for p in split_path(raw) if p != b"."]
        if b".." in parts:
            raise self.fail(member, f"{what} with '..' refused (it would escape the image root)")
        return join_image_path(self.dest, b"/".join(parts)) if parts else self.dest

    def add_member(self, member: tarfile.TarInfo) -> None:
        path = self.image_path(member, member.name)
        if member.islnk():
            self.add_hard_link(member, path)
            return
        excluded = self.rules.excluded_within(path)
        if excluded and member.isdir():
            return  # nothing can link to a directory
        inode = self.rules.apply(self.member_inode(member), recorded_owner=True)
        if excluded:
            self.excluded_inodes[path] = inode
            return
        if path == self.dest and inode.kind is not Kind.DIR:
            raise self.fail(member, "a non-directory cannot be the archive's root")
        self.check_not_through_symlink(member, path)
        self.tree.add(path, inode, parent_template=self.rules.parent_template)

    def add_hard_link(self, member: tarfile.TarInfo, path: bytes) -> None:
        target = self.image_path(member, member.linkname, "hard link target")
        if self.rules.excluded_within(target):
            inode = self.excluded_inodes.get(target)
        else:
            inode = self.tree.get(target)
        if inode is None or inode.kind is Kind.DIR:
            reason = "is a directory" if inode is not None else "is missing"
            raise self.fail(member, f"hard link target {member.linkname!r} {reason}")
        if self.rules.excluded_within(path):
            self.excluded_inodes[path] = inode
            return
        self.check_not_through_symlink(member, path)
        self.tree.add(path, inode, parent_template=self.rules.parent_template)

    def check_not_through_symlink(self, member: tarfile.TarInfo, path: bytes) -> None:
        # The tree keeps every entry's parents directories, so the nearest existing
        # ancestor decides: a symlink would be written through, and a member below
        # a file has no directory to go in (GNU tar refuses both).
        parent = path
        while parent:
            parent = parent.rpartition(b"/")[0]
            existing = self.tree.get(parent)
            if existing is None:
                continue
            shown = parent.decode(errors="replace")
            if existing.kind is Kind.SYMLINK:
                raise self.fail(member, f"path goes through the symlink {shown!r}")
            if existing.kind is not Kind.DIR:
                raise self.fail(member, f"path goes below {shown!r}, which is not a directory")
            return

    def member_inode(self, member: tarfile.TarInfo) -> Inode:
        if member.uid < 0 or member.gid < 0:
            raise self.fail(member, f"negative uid/gid {member.uid}:{member.gid}")
        try:
            mtime_ns = _mtime_ns(member)
        except _BadRecord as exc:
            raise self.fail(member, str(exc)) from None
        inode = Inode(Kind.FILE, member.mode & 0o7777, member.uid, member.gid, mtime_ns)
        if member.isreg():
            inode.size = member.size
            if member.size:
                inode.data = self.member_data(member)
        elif member.isdir():
            inode.kind = Kind.DIR
        elif member.issym():
            inode.kind = Kind.SYMLINK
            inode.target = member.linkname.encode("utf-8", "surrogateescape")
            inode.size = len(inode.target)
            if not inode.target:
                raise self.fail(member, "symlink with an empty target")
            if b"\0" in inode.target:
                raise self.fail(member, "symlink target with a NUL byte refused")
        elif member.ischr() or member.isblk():
            inode.kind = Kind.CHAR if member.ischr() else Kind.BLOCK
            inode.rdev = (member.devmajor, member.devminor)
        elif member.isfifo():
            inode.kind = Kind.FIFO
        else:
            raise self.fail(member, f"unsupported member type {member.type!r}")
        try:
            inode.xattrs = _pax_xattrs(member, inode.mode)
        except _BadRecord as exc:
            raise self.fail(member, str(exc)) from None
        return inode

    def member_data(self, member: tarfile.TarInfo) -> DataRef:
        if self.plain_stamp is not None and not member.sparse:
            if member.offset_data + member.size > self.plain_stamp[0]:
                raise self.fail(member, "data cut short (truncated archive)")
            return DataRef.at(self.archive, member.offset_data, member.size, self.plain_stamp)
        stream = self.tf.extractfile(member)
        if stream is None:  # pragma: no cover - isreg() members always have a stream
            raise self.fail(member, "no data")
        return self.spool.store(stream, member.size, f"{self.archive}: member {member.name!r}")


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """pax records the exact (possibly fractional) mtime as a decimal string: use it
    rather than tarfile's float, which loses nanoseconds."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            exact = decimal.Decimal(text)
        except (decimal.InvalidOperation, ValueError):
            exact = None
        if exact is not None:
            if not exact.is_finite():
                raise _BadRecord(f"pax mtime {text!r} is not a time")
            if (
                exact.adjusted() >= 12
            ):  # 10^12 s, ~31,700 years: beyond every format (1e999999 would hang int())
                raise _BadRecord(f"pax mtime {text!r} is out of every image format's range")
            return int(exact.scaleb(9).to_integral_value(rounding=decimal.ROUND_FLOOR))
    if not math.isfinite(member.mtime):
        raise _BadRecord(f"mtime {member.mtime!r} is not a time")
    return int(member.mtime) * 1_000_000_000


_SCHILY = "SCHILY.xattr."
_LIBARCHIVE = "LIBARCHIVE.xattr."
# GNU tar --acls and star: POSIX ACLs in their long text form.
_TEXT_ACLS = {"SCHILY.acl.access": ACL_ACCESS, "SCHILY.acl.default": ACL_DEFAULT}


class _BadRecord(Exception):
    """A pax xattr record that cannot be decoded."""


def _pax_xattrs(member: tarfile.TarInfo, mode: int) -> dict[bytes, bytes]:
    """xattrs from pax records: GNU tar/star write "SCHILY.xattr.NAME" = raw value;
    libarchive also writes "LIBARCHIVE.xattr.URL-ENCODED-NAME" = base64 value.
    POSIX ACLs: the xattr form (SCHILY.xattr.system.posix_acl_*, written by
    `tar --acls --xattrs`) when present, else the text form (SCHILY.acl.access,
    SCHILY.acl.default: `tar --acls`).  Every name is kept; the formats refuse
    what they cannot hold.  GNU tar writes an access ACL for every file, often
    only the three entries the mode already says: that one is the mode (Linux
    never stores it as an xattr) and is left out."""
    found: dict[bytes, bytes] = {}
    texts: dict[bytes, str] = {}
    for key, value in member.pax_headers.items():
        if key in _TEXT_ACLS:
            if value.strip():  # GNU tar writes an empty default ACL for every directory
                texts[_TEXT_ACLS[key]] = value
        elif key.startswith(_SCHILY):
            name = key[len(_SCHILY) :].encode("utf-8", "surrogateescape")
            found[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE):
            name = urllib.parse.unquote_to_bytes(key[len(_LIBARCHIVE) :])
            try:
                padded = value + "=" * (-len(value) % 4)
                found.setdefault(name, base64.b64decode(padded, validate=True))
            except (binascii.Error, ValueError):
                raise _BadRecord(f"bad base64 in pax record {key!r}") from None
    for name, text in texts.items():
        if name not in found:
            try:
                acl = acl_from_text(text)
            except AclError as exc:
                raise _BadRecord(f"pax record for {name.decode()}: {exc}") from None
            if name != ACL_ACCESS or acl != mode_acl(mode):
                found[name] = acl
    return {name: found[name] for name in sorted(found)}


def _decompressed(raw: BinaryIO, compression: str, *, rewind: bool) -> Readable:
    if rewind:
        raw.seek(0)
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "xz":
        return _StreamsReader(raw, lzma.LZMADecompressor, b"\xfd7zXZ\x00", "xz", padding=True)
    if compression == "bz2":
        return _StreamsReader(raw, bz2.BZ2Decompressor, b"BZh", "bzip2")
    if compression == "zst":
        return _ZstdReader(raw)
    return raw


def _read_exactly(stream: Readable, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, /, max_length: int = -1) -> bytes: ...


class _BufferedOutput:
    """read() over the output a subclass's _fill() appends to _out: what both
    decompressing readers share.  _fill sets _eof once the input is done."""

    _out: bytes
    _pos: int
    _eof: bool

    def _fill(self) -> None:
        raise NotImplementedError

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = []
            while chunk := self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        while self._pos >= len(self._out) and not self._eof:
            self._fill()
        data = self._out[self._pos : self._pos + size]
        self._pos += len(data)
        return data


class _StreamsReader(_BufferedOutput):
    """xz and bzip2 streams, one after another (xz -T, pbzip2), like gzip: data after
    the last stream that is not another stream is an error.  (lzma.LZMAFile and
    bz2.BZ2File ignore it silently; gzip and zstd refuse it.)  xz's stream padding
    (NUL bytes, a multiple of 4) is allowed after a stream."""

    _IN = 1 << 17
    _OUT = 1 << 20  # at most this much output per call: no decompression bomb in memory

    def __init__(
        self,
        raw: BinaryIO,
        make: Callable[[], _Decompressor],
        magic: bytes,
        name: str,
        *,
        padding: bool = False,
    ) -> None:
        self._raw, self._make, self._magic, self._name, self._padding = raw, make, magic, name, padding
        self._dec = make()
        self._fed = False  # the current stream got input and has not ended
        self._pending = b""  # input after a stream's end, not yet known to be a stream
        self._out = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> None:
        if self._fed and not self._dec.eof and not self._dec.needs_input:  # output still pending
            self._decompress(b"")
            return
        chunk = self._raw.read(self._IN)
        if self._pending or (self._dec.eof and chunk):
            self._between(chunk)
            return
        if not chunk:
            if self._fed and not self._dec.eof:
                raise EOFError(f"{self._name} stream ended before its end marker (truncated)")
            self._eof = True
            return
        self._fed = True
        self._decompress(chunk)

    def _decompress(self, data: bytes) -> None:
        self._out, self._pos = self._dec.decompress(data, self._OUT), 0
        if self._dec.eof:
            self._pending = self._dec.unused_data

    def _between(self, chunk: bytes) -> None:
        """After a stream's end: padding, another stream, or garbage."""
        data = self._pending + chunk
        if self._padding:
            stripped = data.lstrip(b"\0")
            if not stripped and chunk:
                self._pending = data
                return
            if not stripped:  # the end: only padding followed
                if len(data) % 4:
                    raise OSError(
                        f"{self._name} stream padding of {len(data)} bytes (a multiple of 4 expected)"
                    )
                self._pending, self._eof = b"", True
                return
            if (len(data) - len(stripped)) % 4:
                raise OSError(f"{self._name} stream padding not a multiple of 4 bytes")
            data = stripped
        if len(data) < len(self._magic) and chunk:
            self._pending = data  # too short to tell yet
            return
        if not data.startswith(self._magic):
            raise OSError(f"trailing garbage after the {self._name} stream")
        self._pending = b""
        self._dec = self._make()
        self._decompress(data)


class _ZstdReader(_BufferedOutput):
    """A zstd stream reader that reports truncation.

    zstandard's stream_reader returns a quiet EOF when the input stops inside a
    frame; we need an error.  Consecutive frames (zstd -T, pzstd) are read on.
    """

    _IN = 1 << 17

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # input of the current frame was fed and it did not end
        self._out = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> None:
        chunk = self._raw.read(self._IN)
        if not chunk:
            if self._in_frame:
                raise EOFError("zstd stream ended inside a frame (truncated)")
            self._eof = True
            return
        out = [self._obj.decompress(chunk)]
        self._in_frame = True
        while self._obj.eof:
            rest = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
            self._in_frame = bool(rest)
            if not rest:
                break
            out.append(self._obj.decompress(rest))
        self._out = b"".join(out)
        self._pos = 0
