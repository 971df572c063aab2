"""An OCI image layout directory (image-spec 1.1 image-layout.md) as a store.

    DIR/oci-layout            {"imageLayoutVersion": "1.0.0"}
    DIR/index.json            an image index: every manifest we keep; tags are the
                              org.opencontainers.image.ref.name annotation
    DIR/blobs/sha256/<hex>    content-addressed blobs (manifests too)

Blobs are written to a temp file beside their place, hashed on the way, fsynced and
renamed: a blob file is either whole and right or absent.  index.json is rewritten the
same way under an flock on the directory, so concurrent writers serialise and none
loses an entry.  A new layout is made beside its place and renamed there, so that it
appears whole to a reader.  Referrers are found by scanning the index (records are kept in it,
untagged): the layout's stand-in for the referrers API.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

from ..errors import CorruptStoreError, DigestMismatchError, StoreError, StoreNotFoundError
from ..output import create_named_temp, remove_stale_temps, temp_suffix
from .artifact import (
    A_REF_NAME,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    canonical_json,
    referrer_descriptor,
    verify_manifest_bytes,
)
from .base import Progress, Sink, VerifyingSink
from .refs import DIGEST_RE

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
_BUF = 8 << 20
_MAX_MANIFEST = 4 << 20


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(directory: str, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _take_attributes(directory: str, model: str) -> None:
    """`model`'s mode (setgid, sticky), owner and extended attributes onto `directory`,
    as far as we may; nothing when `model` does not exist.  A directory a CI step made
    for the cache (group-shared, a default ACL) keeps what it was set up with when our
    layout replaces it."""
    try:
        st = os.lstat(model)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return  # (a symlink: the rename onto it fails, and the layout is made in place)
    os.chmod(directory, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        os.chown(directory, st.st_uid, st.st_gid)
    with contextlib.suppress(OSError):
        os.chown(directory, -1, st.st_gid)  # (not root: the group, if we are in it)
    with contextlib.suppress(OSError):
        for name in os.listxattr(model, follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.setxattr(directory, name, os.getxattr(model, name, follow_symlinks=False))


# A layout's temp directory beside it: .NAME.pyimg-layout-HOST-PID-RANDOM.tmp
_TEMP_DIR_RE = re.compile(r"^\.(?P<name>.+)\.pyimg-layout-[A-Za-z0-9_-]+-\d+-[0-9a-f]+\.tmp$")

# Where a layout cannot be made beside its place and renamed there, it is made in
# place: a parent we may not write (EACCES, EPERM, EROFS), a mount point (EBUSY,
# EXDEV), a symlink to a directory (ENOTDIR: the rename would replace the link), a
# file system that refuses the rename of a directory (EINVAL).
_IN_PLACE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EBUSY,
    errno.EXDEV,
    errno.ENOTDIR,
    errno.EINVAL,
}


def holds_anything(path: str) -> bool:
    """Whether the directory `path` holds anything: absent or empty (made by a CI step
    ahead of the first export), it is no layout yet, and is made whole."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False


def _populate(directory: str) -> None:
    """What a layout holds, where `directory` lacks it (an empty index), made durable."""
    os.makedirs(os.path.join(directory, "blobs", "sha256"), exist_ok=True)
    wrote = False
    contents = {
        LAYOUT_FILE: canonical_json({"imageLayoutVersion": LAYOUT_VERSION}),
        "index.json": _index_bytes([]),
    }
    for name, data in contents.items():
        if not os.path.exists(os.path.join(directory, name)):
            _write_atomically(directory, name, data)
            wrote = True
    if wrote:
        _fsync_dir(directory)


def _index_bytes(manifests: list[Descriptor]) -> bytes:
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in manifests],
    }
    return json.dumps(index, indent=1).encode() + b"\n"


class LayoutStore:
    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.address = f"oci:{path}"
        self.blobs = os.path.join(self.path, "blobs", "sha256")
        try:
            if create:
                self._create()
            self._check_layout()
        except OSError as exc:
            raise StoreError(f"cannot open the layout directory: {exc.strerror}", self.address) from exc

    # -- the directory -------------------------------------------------------------------

    def _create(self) -> None:
        """A new layout appears whole (_create_whole), so that a reader in another
        process never sees it half made; a directory that already holds something
        (or where a layout cannot be made beside it) is completed in place: what it
        lacks, under the lock."""
        if not holds_anything(self.path):
            try:
                self._create_whole()
            except OSError as exc:
                if exc.errno not in _IN_PLACE_ERRNOS:
                    raise
        os.makedirs(self.path, exist_ok=True)
        with self._locked():
            _populate(self.path)

    def _create_whole(self) -> None:
        """The layout made in a directory beside its place, then renamed there: onto
        nothing, or onto an empty directory (rename(2) replaces one), whose mode,
        owner and extended attributes (a default ACL) ours takes first.  When another
        process's layout got there first the rename fails and ours is dropped.  The
        temp directory is locked while it is made: one nobody holds is a dead
        creator's, removed by the next creator (output.remove_stale_temps)."""
        parent, name = os.path.split(self.path)
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent, _TEMP_DIR_RE, keep=lambda match: match["name"] != name)
        lock, tmp = create_named_temp(  # (the mode follows the umask)
            lambda: os.path.join(parent, f".{name}.pyimg-layout-{temp_suffix()}"), directory=True
        )
        try:
            _take_attributes(tmp, self.path)  # before its contents, which inherit them
            _populate(tmp)
            try:
                os.rename(tmp, self.path)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                return  # another layout is there now: it is the one we open
            _fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)

    def _check_layout(self) -> None:
        if not os.path.isdir(self.path):
            raise StoreNotFoundError("no such layout directory", self.address)
        layout_path = os.path.join(self.path, LAYOUT_FILE)
        try:
            with open(layout_path, "rb") as f:
                value = json.loads(f.read(4096))
        except FileNotFoundError:
            raise CorruptStoreError("not an OCI layout: no oci-layout file", self.address) from None
        except ValueError:
            raise CorruptStoreError("not an OCI layout: oci-layout is not JSON", self.address) from None
        if not isinstance(value, dict) or value.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise CorruptStoreError(f"unsupported oci-layout {value!r}", self.address)
        if not os.path.isdir(self.blobs):
            raise CorruptStoreError("not an OCI layout: no blobs/sha256 directory", self.address)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_index(self) -> list[Descriptor]:
        where = os.path.join(self.address, "index.json")
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                value = json.loads(f.read())
        except FileNotFoundError:
            raise CorruptStoreError("not an OCI layout: no index.json", self.address) from None
        except ValueError as exc:
            raise CorruptStoreError(f"index.json is not valid JSON: {exc}", self.address) from None
        if not isinstance(value, dict) or not isinstance(value.get("manifests"), list):
            raise CorruptStoreError("index.json is not an image index", self.address)
        out = []
        for raw in value["manifests"]:
            try:
                desc = Descriptor.from_json(raw, where)
            except StoreError as exc:
                raise CorruptStoreError(exc.reason, where) from None
            if not DIGEST_RE.match(desc.digest):
                raise CorruptStoreError(f"index.json names an invalid digest {desc.digest!r}", where)
            out.append(desc)
        return out

    def _write_index(self, manifests: list[Descriptor]) -> None:
        _write_atomically(self.path, "index.json", _index_bytes(manifests))
        _fsync_dir(self.path)

    def _blob_path(self, digest: str) -> str:
        if not DIGEST_RE.match(digest):
            raise StoreError(f"invalid digest {digest!r}", self.address)
        return os.path.join(self.blobs, digest.split(":", 1)[1])

    # -- blobs ---------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        return os.path.isfile(self._blob_path(digest))

    def _put_stream(self, chunks: Iterator[bytes], digest: str, size: int, progress: Progress | None) -> None:
        target = self._blob_path(digest)
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            sha = hashlib.sha256()
            count = 0
            with os.fdopen(fd, "wb", buffering=0) as f:
                for chunk in chunks:
                    sha.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[f.write(view) or 0 :]
                    count += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                got = "sha256:" + sha.hexdigest()
                if count != size or got != digest:
                    raise DigestMismatchError(
                        f"content has digest {got} ({count} bytes), "
                        f"expected {digest} ({size} bytes): refused",
                        self.address,
                    )
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except OSError as exc:
            raise StoreError(f"cannot write blob {digest}: {exc.strerror}", self.address) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_blob_file(self, path: str, digest: str, size: int, progress: Progress | None = None) -> bool:
        if self.blob_exists(digest):
            return False

        def chunks() -> Iterator[bytes]:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(_BUF):
                    yield chunk

        try:
            self._put_stream(chunks(), digest, size, progress)
        except FileNotFoundError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}", self.address) from exc
        return True

    def put_blob_bytes(self, data: bytes, digest: str) -> bool:
        if self.blob_exists(digest):
            return False
        self._put_stream(iter([data]), digest, len(data), None)
        return True

    def fetch_blob(self, desc: Descriptor, sink: Sink, progress: Progress | None = None) -> None:
        verify = VerifyingSink(desc, sink, self.address)
        try:
            with open(self._blob_path(desc.digest), "rb", buffering=0) as f:
                while chunk := f.read(_BUF):
                    verify(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except FileNotFoundError:
            raise CorruptStoreError(
                f"blob {desc.digest} is missing from blobs/sha256", self.address
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {desc.digest}: {exc.strerror}", self.address) from exc
        verify.check()

    # -- manifests -----------------------------------------------------------------------

    def _read_manifest_blob(self, desc: Descriptor) -> Manifest:
        if desc.size > _MAX_MANIFEST:
            raise CorruptStoreError(f"manifest {desc.digest} is {desc.size} bytes: too large", self.address)
        parts: list[bytes] = []
        self.fetch_blob(desc, parts.append)
        return Manifest(b"".join(parts), desc.media_type, desc.digest)

    def resolve(self, reference: str) -> str | None:
        if DIGEST_RE.match(reference):
            return reference if self.blob_exists(reference) else None
        for desc in self._read_index():
            if (desc.annotations or {}).get(A_REF_NAME) == reference:
                return desc.digest
        return None

    def get_manifest(self, reference: str) -> Manifest:
        index = self._read_index()
        if DIGEST_RE.match(reference):
            found = [d for d in index if d.digest == reference]
            if found:
                return self._read_manifest_blob(found[0])
            path = self._blob_path(reference)
            if not os.path.isfile(path):
                raise StoreNotFoundError(f"no manifest {reference}", self.address)
            with open(path, "rb") as f:
                data = f.read(_MAX_MANIFEST + 1)
            verify_manifest_bytes(data, reference, self.address)
            media_type = json.loads(data).get("mediaType", OCI_MANIFEST)
            return Manifest(data, str(media_type), reference)
        for desc in index:
            if (desc.annotations or {}).get(A_REF_NAME) == reference:
                return self._read_manifest_blob(desc)
        tags = sorted({t for d in index if (t := (d.annotations or {}).get(A_REF_NAME))})
        raise StoreNotFoundError(
            f"no tag {reference!r} (tags here: {', '.join(tags) if tags else 'none'})", self.address
        )

    def _store_manifest_blob(self, manifest: Manifest) -> None:
        self.put_blob_bytes(manifest.data, manifest.digest)

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        self._store_manifest_blob(manifest)
        with self._locked():
            index = self._read_index()
            if tag is None:
                if any(d.digest == manifest.digest for d in index):
                    return
                index.append(manifest.descriptor())
            else:
                index = [d for d in index if (d.annotations or {}).get(A_REF_NAME) != tag]
                index.append(manifest.descriptor(annotations={A_REF_NAME: tag}))
            self._write_index(index)

    def attach(self, manifest: Manifest, subject: str) -> None:
        self._store_manifest_blob(manifest)
        desc = referrer_descriptor(manifest)
        with self._locked():
            index = self._read_index()
            if any(d.digest == manifest.digest and not (d.annotations or {}).get(A_REF_NAME) for d in index):
                return
            index.append(desc)
            self._write_index(index)

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        out: list[Descriptor] = []
        seen: set[str] = set()
        for desc in self._read_index():
            if desc.media_type not in MANIFEST_TYPES or desc.digest in seen:
                continue
            if artifact_type is not None and desc.artifact_type not in (None, artifact_type):
                continue
            manifest = self._read_manifest_blob(desc)
            value = manifest.json
            subj = value.get("subject")
            if isinstance(subj, dict) and subj.get("digest") == subject:
                listed = referrer_descriptor(manifest)
                if artifact_type is None or listed.artifact_type == artifact_type:
                    seen.add(desc.digest)
                    out.append(listed)
        return out

    def tags(self) -> list[str]:
        return sorted({t for d in self._read_index() if (t := (d.annotations or {}).get(A_REF_NAME))})

    def close(self) -> None:
        pass
