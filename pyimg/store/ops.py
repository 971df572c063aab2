"""push, pull and fetch_image: images in and out of a store."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from ..chunks import Chunk, chunk_bytes
from ..errors import DigestMismatchError, OutputError, SpecError, StoreError
from ..imagehash import ImageHasher, digest_image
from ..output import AtomicOutput, write_file_atomically
from .artifact import (
    A_BLAKE3,
    A_CHUNKING,
    A_FORMAT,
    A_MANIFEST_SHA256,
    A_MANIFEST_SIZE,
    A_SHA256,
    A_SIZE,
    A_TITLE,
    CHUNK,
    EMPTY_CONFIG,
    EMPTY_JSON,
    FORMAT_MEDIA_TYPES,
    IMAGE_ARTIFACT,
    MANIFEST_CHUNK,
    PYIMG_MANIFEST,
    PYIMG_MANIFEST_TITLE,
    Descriptor,
    Manifest,
    WholeImage,
    chunked_image_manifest,
    image_manifest,
    layers,
    sha256_digest,
)
from .base import Progress, Store
from .chunked import (
    ChunkedPlan,
    TransferCounts,
    plan_chunks,
    pull_chunked,
    upload_chunks,
)
from .layout import LayoutStore
from .refs import DIGEST_RE, Ref, parse_ref
from .registry import RegistryStore

RESERVED_TAG_RE = re.compile(r"^(pyimg-audit\.|pyimg-ref\.|sha256-[0-9a-f]{64}$)")


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a store: what the CLI's --insecure / --auth-file give."""

    insecure: bool = False
    auth_file: str | None = None
    retries: int = 4
    backoff: float = 0.25
    chunk_size: int | None = None
    timeout: float = 60.0


def open_store(ref: Ref | str, options: StoreOptions | None = None, *, create: bool = False) -> Store:
    """A store for an address; a layout directory is created when `create` (push)."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    options = options or StoreOptions()
    if ref.kind == "layout":
        return LayoutStore(ref.path, create=create)
    kwargs: dict[str, Any] = {}
    if options.chunk_size:
        kwargs["chunk_size"] = options.chunk_size
    return RegistryStore(
        ref,
        insecure=options.insecure,
        auth_file=options.auth_file,
        retries=options.retries,
        backoff=options.backoff,
        timeout=options.timeout,
        **kwargs,
    )


def is_store_ref(text: str) -> bool:
    """Whether `text` names a store (for `pyimg boot REF`): oci:… or HOST/REPO…, and not an
    existing file."""
    if os.path.exists(text):
        return False
    try:
        parse_ref(text)
    except SpecError:
        return False
    return True


# -- the image artifact -----------------------------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """An image file and its pyimg manifest, as push needs them."""

    path: str
    size: int
    sha256: str  # sha256:<hex>
    blake3: str
    format: str
    epoch: int | None
    version: str
    manifest_bytes: bytes
    image_title: str

    def descriptors(self) -> tuple[Descriptor, Descriptor]:
        image = Descriptor(
            FORMAT_MEDIA_TYPES[self.format],
            self.sha256,
            self.size,
            annotations={A_TITLE: self.image_title},
        )
        meta = Descriptor(
            PYIMG_MANIFEST,
            sha256_digest(self.manifest_bytes),
            len(self.manifest_bytes),
            annotations={A_TITLE: PYIMG_MANIFEST_TITLE},
        )
        return image, meta

    def artifact(self) -> Manifest:
        image, meta = self.descriptors()
        return image_manifest(
            image, meta, fmt=self.format, version=self.version, blake3=self.blake3, epoch=self.epoch
        )

    def manifest_chunks(self) -> list[Chunk]:
        """The pyimg manifest cut as the image is (a chunked artifact stores it so)."""
        return chunk_bytes(self.manifest_bytes)

    def chunked_artifact(self, chunks: list[tuple[str, int]], chunking: str) -> Manifest:
        whole = WholeImage(self.format, self.size, self.sha256, self.blake3, self.image_title, chunking)
        pieces = [(c.digest, c.size) for c in self.manifest_chunks()]
        return chunked_image_manifest(
            chunks,
            self.descriptors()[1],
            whole,
            version=self.version,
            epoch=self.epoch,
            manifest_chunks=pieces,
        )


def default_manifest_path(image: str) -> str | None:
    """IMAGE.json beside the image, else IMAGE without its extension + .json."""
    for candidate in (image + ".json", os.path.splitext(image)[0] + ".json"):
        if candidate != image and os.path.isfile(candidate):
            return candidate
    return None


_ENTRIES_KEY = b'\n "entries": '


def _manifest_head(data: bytes) -> Any:
    """The pyimg manifest without its entries list, which is last and can be 10+ MB for a
    big tree (0.1-0.6 s to parse, on every push).  pyimg writes it with indent=1, so a
    top-level key starts a line with one space (a newline cannot occur inside a JSON
    string); anything else is parsed whole."""
    pos = data.find(_ENTRIES_KEY)
    if pos > 0:
        try:
            head = json.loads(data[:pos].rstrip().rstrip(b",") + b"}")
        except ValueError:
            head = None
        if isinstance(head, dict) and "image" in head:
            return head
    return json.loads(data)


def load_local_image(image: str, manifest_path: str | None = None, *, verify: bool = False) -> LocalImage:
    """Read the pyimg manifest and check it describes the image (size; with verify, the
    hashes too).  Without verify the image's SHA-256 comes from the manifest, which keeps
    a repeated push to a few HEAD requests; the store checks the bytes it receives."""
    try:
        st = os.stat(image)
    except OSError as exc:
        raise OutputError(f"cannot read the image: {exc.strerror}", image) from exc
    if manifest_path is None:
        manifest_path = default_manifest_path(image)
        if manifest_path is None:
            raise SpecError(
                "no pyimg manifest beside the image (IMAGE.json or IMAGE's stem + .json): "
                "give --manifest FILE "
                "(written by `pyimg build --manifest`)",
                image,
            )
    try:
        with open(manifest_path, "rb") as f:
            data = f.read()
        value = _manifest_head(data)
    except OSError as exc:
        raise SpecError(f"cannot read the pyimg manifest: {exc.strerror}", manifest_path) from exc
    except ValueError as exc:
        raise SpecError(f"the pyimg manifest is not JSON: {exc}", manifest_path) from None
    info = value.get("image") if isinstance(value, dict) else None
    if not isinstance(info, dict):
        raise SpecError("not a pyimg manifest (no 'image' object)", manifest_path)
    fmt = info.get("format")
    if fmt not in FORMAT_MEDIA_TYPES:
        raise SpecError(f"the pyimg manifest names an unknown format {fmt!r}", manifest_path)
    if info.get("size") != st.st_size:
        raise SpecError(
            f"the pyimg manifest is for a {info.get('size')}-byte image, {image} has {st.st_size} bytes",
            manifest_path,
        )
    sha, b3 = info.get("sha256"), info.get("blake3")
    if verify or not isinstance(sha, str) or not isinstance(b3, str):
        got = digest_image(image)
        if (isinstance(sha, str) and sha != got.sha256) or (isinstance(b3, str) and b3 != got.blake3):
            raise DigestMismatchError("the image's hashes differ from its pyimg manifest's", image)
        sha, b3 = got.sha256, got.blake3
    options = value.get("options") if isinstance(value.get("options"), dict) else {}
    epoch = options.get("epoch")
    versions = value.get("versions") if isinstance(value.get("versions"), dict) else {}
    return LocalImage(
        path=image,
        size=st.st_size,
        sha256=f"sha256:{sha}",
        blake3=str(b3),
        format=str(fmt),
        epoch=epoch if isinstance(epoch, int) else None,
        version=str(versions.get("pyimg", "unknown")),
        manifest_bytes=data,
        image_title=str(info.get("file") or os.path.basename(image)),
    )


@dataclass(frozen=True)
class PushResult:
    ref: str
    digest: str
    blobs_uploaded: int
    blobs_present: int
    bytes_uploaded: int
    manifest_uploaded: bool
    seconds: float
    chunked: bool = False
    # A chunked push: the image's distinct chunks sent, and those the store had.
    chunks_uploaded: int = 0
    chunks_present: int = 0
    chunk_bytes_uploaded: int = 0
    chunk_bytes_present: int = 0

    def summary(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


def push(
    image: str,
    ref: Ref | str,
    *,
    manifest_path: str | None = None,
    options: StoreOptions | None = None,
    verify: bool = False,
    progress: Progress | None = None,
    chunked: bool = True,
) -> PushResult:
    """Store an image as an OCI 1.1 artifact; returns its manifest digest.  Blobs go up
    first (each checked with HEAD), the manifest last: an interrupted push leaves no tag
    pointing at a missing blob, and the next push sends only what is missing.

    chunked (the default): the image is stored as content-defined chunks (docs/store.md),
    so the next version of an image sends only the chunks that changed.  Otherwise it is
    one blob, the format pyimg wrote before."""
    started = time.monotonic()
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.digest:
        raise SpecError(f"{ref}: push to a tag, not a digest (the digest is the result)")
    if ref.tag and RESERVED_TAG_RE.match(ref.tag):
        raise SpecError(f"{ref}: tag {ref.tag!r} is reserved (audit entries, referrers fallback)")
    local = load_local_image(image, manifest_path, verify=verify)
    plan = plan_chunks(local.path, local.size, local.chunked_artifact) if chunked else None
    if plan is not None and plan.sha256 != local.sha256:
        # The SHA-256 goes into the manifest unchecked by the store (only chunks are blobs).
        raise DigestMismatchError(
            f"the image's SHA-256 is {plan.sha256}, its pyimg manifest says {local.sha256}: refused", image
        )
    artifact = plan.manifest if plan is not None else local.artifact()
    tag = ref.tag or "latest"
    store = open_store(ref, options, create=True)
    try:
        counts = TransferCounts()
        small = [(EMPTY_JSON, EMPTY_CONFIG.digest)]
        if plan is None:
            small.append((local.manifest_bytes, local.descriptors()[1].digest))
        else:  # the pyimg manifest as chunks: only those the store lacks go up
            small += [
                (local.manifest_bytes[c.offset : c.offset + c.size], c.digest)
                for c in local.manifest_chunks()
            ]
        for data, digest in small:
            counts.add(store.put_blob_bytes(data, digest), len(data))
        current = store.resolve(tag)
        if plan is not None:
            chunk_counts = _push_chunks(store, plan, artifact, current, local.path, progress)
            counts.merge(chunk_counts)
        else:
            chunk_counts = TransferCounts()
            counts.add(store.put_blob_file(local.path, local.sha256, local.size, progress), local.size)
        manifest_uploaded = current != artifact.digest
        if manifest_uploaded:
            store.put_manifest(artifact, tag)
    finally:
        store.close()
    return PushResult(
        str(ref.with_tag(tag)),
        artifact.digest,
        counts.sent,
        counts.present,
        counts.sent_bytes,
        manifest_uploaded,
        time.monotonic() - started,
        chunked=plan is not None,
        chunks_uploaded=chunk_counts.sent,
        chunks_present=chunk_counts.present,
        chunk_bytes_uploaded=chunk_counts.sent_bytes,
        chunk_bytes_present=chunk_counts.present_bytes,
    )


def _push_chunks(
    store: Store,
    plan: ChunkedPlan,
    artifact: Manifest,
    current: str | None,
    path: str,
    progress: Progress | None,
) -> TransferCounts:
    """Upload the chunks the store lacks.  Chunks the store is known to hold are not even
    asked about: all of them when this very manifest is there (a store keeps a manifest
    only with its layers: the registry checks them on PUT, the layout writes them first),
    and those of the manifest the tag names now (usually the previous version)."""
    if store.resolve(artifact.digest) == artifact.digest:
        return TransferCounts.all_present(plan.distinct())
    known: set[str] = set()
    if current is not None:
        try:
            known = {
                d.digest
                for d in layers(store.get_manifest(current).json, store.address)
                if d.media_type == CHUNK
            }
        except StoreError:
            known = set()  # not a manifest we understand: ask about every chunk
    return upload_chunks(store, path, plan.distinct(), known, progress)


# -- pull -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageArtifact:
    manifest: Manifest
    image: Descriptor | None  # the one image layer of a single-blob artifact
    chunks: list[Descriptor]  # the chunk layers of a chunked one, in order
    pyimg_manifest: Descriptor | None
    format: str
    blake3: str | None
    sha256: str  # the whole image's, sha256:<hex>
    size: int
    chunking: str | None  # chunks.ChunkParams.label() when chunked
    manifest_chunks: tuple[Descriptor, ...] = ()  # the pyimg manifest as chunks (then pyimg_manifest
    # is a descriptor of the whole, for its digest and size: no blob of its own)


def read_image_artifact(store: Store, reference: str) -> ImageArtifact:
    """The manifest a reference names, checked to be a pyimg image artifact: one image
    layer, or chunk layers with the whole image's size, SHA-256 and chunking annotated."""
    manifest = store.get_manifest(reference)
    value = manifest.json
    if value.get("artifactType") != IMAGE_ARTIFACT:
        raise StoreError(
            f"{reference} is not a pyimg image (artifactType {value.get('artifactType')!r}, "
            f"expected {IMAGE_ARTIFACT})",
            store.address,
        )
    by_type = {v: k for k, v in FORMAT_MEDIA_TYPES.items()}
    found = layers(value, store.address)
    images = [d for d in found if d.media_type in by_type]
    chunks = [d for d in found if d.media_type == CHUNK]
    metas = [d for d in found if d.media_type == PYIMG_MANIFEST]
    manifest_chunks = tuple(d for d in found if d.media_type == MANIFEST_CHUNK)
    raw = value.get("annotations")
    annotations: dict[str, Any] = raw if isinstance(raw, dict) else {}
    meta = metas[0] if metas else None
    if chunks or A_CHUNKING in annotations:
        if images:
            raise StoreError(f"{reference}: both an image layer and chunks", store.address)
        if manifest_chunks:
            if metas:
                raise StoreError(f"{reference}: both a pyimg manifest layer and its chunks", store.address)
            meta = _whole_manifest(store, reference, annotations)
        art = _chunked_artifact(store, reference, manifest, chunks, meta, annotations)
        return dataclasses.replace(art, manifest_chunks=manifest_chunks)
    if len(images) != 1:
        raise StoreError(f"{reference}: expected one image layer, found {len(images)}", store.address)
    return ImageArtifact(
        manifest,
        images[0],
        [],
        meta,
        annotations.get(A_FORMAT) or by_type[images[0].media_type],
        annotations.get(A_BLAKE3),
        images[0].digest,
        images[0].size,
        None,
    )


def _whole_manifest(store: Store, reference: str, annotations: dict[str, Any]) -> Descriptor:
    """What a chunked pyimg manifest must add up to: its annotated digest and size."""
    digest, size = annotations.get(A_MANIFEST_SHA256), annotations.get(A_MANIFEST_SIZE)
    if not (isinstance(digest, str) and DIGEST_RE.match(digest) and isinstance(size, str) and size.isdigit()):
        raise StoreError(
            f"{reference}: a chunked pyimg manifest needs the annotations {A_MANIFEST_SHA256} and "
            f"{A_MANIFEST_SIZE}",
            store.address,
        )
    return Descriptor(PYIMG_MANIFEST, digest, int(size), annotations={A_TITLE: PYIMG_MANIFEST_TITLE})


def fetch_pyimg_manifest(store: Store, art: ImageArtifact, old: str | None = None) -> bytes | None:
    """The pyimg manifest of an artifact: its one blob, or its chunks put together (those
    an older manifest file `old` also has are taken from it), checked whole."""
    if art.pyimg_manifest is None:
        return None
    if not art.manifest_chunks:
        return fetch_bytes(store, art.pyimg_manifest)
    have: dict[str, bytes] = {}
    if old is not None:
        with contextlib.suppress(OSError):
            with open(old, "rb") as f:
                data = f.read()
            have = {c.digest: data[c.offset : c.offset + c.size] for c in chunk_bytes(data)}
    pieces = [have.get(d.digest) or fetch_bytes(store, d) for d in art.manifest_chunks]
    whole = b"".join(pieces)
    if len(whole) != art.pyimg_manifest.size or sha256_digest(whole) != art.pyimg_manifest.digest:
        raise DigestMismatchError(
            f"the pyimg manifest's chunks make {sha256_digest(whole)}, the artifact says "
            f"{art.pyimg_manifest.digest}: refused",
            store.address,
        )
    return whole


def _chunked_artifact(
    store: Store,
    reference: str,
    manifest: Manifest,
    chunks: list[Descriptor],
    meta: Descriptor | None,
    annotations: dict[str, Any],
) -> ImageArtifact:
    fmt, sha, size, b3, chunking = (
        annotations.get(k) for k in (A_FORMAT, A_SHA256, A_SIZE, A_BLAKE3, A_CHUNKING)
    )
    if not (
        fmt in FORMAT_MEDIA_TYPES
        and isinstance(sha, str)
        and DIGEST_RE.match(sha)
        and isinstance(size, str)
        and size.isdigit()
        and isinstance(b3, str)
        and isinstance(chunking, str)
    ):
        raise StoreError(
            f"{reference}: a chunked image needs the annotations {A_FORMAT}, {A_SIZE}, "
            f"{A_SHA256}, {A_BLAKE3} and {A_CHUNKING}",
            store.address,
        )
    return ImageArtifact(manifest, None, chunks, meta, str(fmt), b3, sha, int(size), chunking)


def fetch_bytes(store: Store, desc: Descriptor, limit: int = 64 << 20) -> bytes:
    if desc.size > limit:
        raise StoreError(f"blob {desc.digest} is {desc.size} bytes, more than expected", store.address)
    parts: list[bytes] = []
    store.fetch_blob(desc, parts.append)
    return b"".join(parts)


@dataclass(frozen=True)
class PullResult:
    ref: str
    digest: str
    output: str
    format: str
    size: int
    blake3: str
    seconds: float
    chunked: bool = False
    # What came from the store and what from local files (a chunked image's distinct
    # chunks; a single-blob image is one download).
    chunks: int = 0
    chunks_downloaded: int = 0
    bytes_downloaded: int = 0
    chunks_reused: int = 0
    bytes_reused: int = 0
    reused_from: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3), "reused_from": list(self.reused_from)}


def _pull_from(
    store: Store,
    ref: Ref,
    output: str,
    manifest_output: str | None,
    progress: Progress | None,
    sources: list[str] | None = None,
) -> PullResult:
    started = time.monotonic()
    art = read_image_artifact(store, ref.reference)
    meta = fetch_pyimg_manifest(store, art, manifest_output) if manifest_output else None
    if art.image is not None:
        b3 = _pull_blob(store, art, art.image, output, progress)
        extra: dict[str, Any] = {"chunks": 1, "chunks_downloaded": 1, "bytes_downloaded": art.size}
    else:
        assert art.chunking is not None and art.blake3 is not None  # _chunked_artifact checked
        # The target itself, when it exists, is the likeliest older version.
        paths = [*(sources or []), output]
        counts = pull_chunked(
            store,
            output,
            art.chunks,
            chunking=art.chunking,
            size=art.size,
            sha256=art.sha256,
            blake3=art.blake3,
            sources=paths,
            progress=progress,
        )
        b3 = art.blake3
        extra = {
            "chunked": True,
            "chunks": counts.chunks,
            "chunks_downloaded": counts.downloaded,
            "bytes_downloaded": counts.bytes_downloaded,
            "chunks_reused": counts.reused,
            "bytes_reused": counts.bytes_reused,
            "reused_from": tuple(counts.reused_from),
        }
    if manifest_output and meta is not None:
        write_file_atomically(manifest_output, meta)
    return PullResult(
        str(ref.with_digest(art.manifest.digest)),
        art.manifest.digest,
        output,
        art.format,
        art.size,
        b3,
        time.monotonic() - started,
        **extra,
    )


def _pull_blob(
    store: Store, art: ImageArtifact, image: Descriptor, output: str, progress: Progress | None
) -> str:
    """A single-blob image streamed into output; its image digest."""
    b3 = ImageHasher()
    with AtomicOutput(output) as out:

        def sink(data: bytes) -> None:
            b3.update(data)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(out.fd, view) :]
                except OSError as exc:
                    raise OutputError(f"write failed: {exc.strerror}", output) from exc

        store.fetch_blob(image, sink, progress)
        got = b3.hexdigest()
        if art.blake3 is not None and got != art.blake3:
            raise DigestMismatchError(
                f"the image's digest is {got}, its manifest says {art.blake3}: refused",
                store.address,
            )
        out.commit()
    return got


def pull(
    ref: Ref | str,
    output: str,
    *,
    manifest_output: str | None = None,
    options: StoreOptions | None = None,
    progress: Progress | None = None,
    sources: list[str] | None = None,
) -> PullResult:
    """Fetch an image, verifying every digest; the output appears only when all is right.

    A chunked image takes the chunks it can from local files (`sources`: older versions
    of the image, and the existing output file) and downloads only the rest."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    store = open_store(ref, options)
    try:
        return _pull_from(store, ref, output, manifest_output, progress, sources)
    finally:
        store.close()


def fetch_image(ref: Ref | str, cache_dir: str, options: StoreOptions | None = None) -> str:
    """The path of the image a reference names, pulled into cache_dir once (by manifest
    digest: a tag that moves gets a new file).  For `pyimg boot REF`."""
    return fetch_pinned_image(ref, cache_dir, options)[0]


def fetch_pinned_image(
    ref: Ref | str, cache_dir: str, options: StoreOptions | None = None
) -> tuple[str, Ref]:
    """(the image's path, the reference pinned to the manifest digest it came from).

    The tag is resolved once: what is booted and what a record is attached to are the
    same manifest even if the tag moves meanwhile.  A file already in the cache is
    used only when its SHA-256 is the layer's digest (a damaged or edited cache file
    is pulled again, never booted)."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    store = open_store(ref, options)
    try:
        digest = ref.digest if ref.digest and DIGEST_RE.match(ref.digest) else store.resolve(ref.reference)
        if digest is None:
            from ..errors import StoreNotFoundError

            raise StoreNotFoundError(f"no manifest {ref.reference!r}", store.address)
        pinned = ref.with_digest(digest)
        art = read_image_artifact(store, digest)
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"{digest.split(':', 1)[1]}.{art.format}")
        if not (os.path.isfile(path) and _sha256_of(path) == art.sha256):
            _pull_from(store, pinned, path, None, None, _newest_in(cache_dir, art.format, path))
        return path, pinned
    finally:
        store.close()


def _newest_in(cache_dir: str, fmt: str, but: str) -> list[str]:
    """The cache's newest other image of the format: most likely the version before, whose
    chunks a chunked pull reuses."""
    try:
        names = [os.path.join(cache_dir, n) for n in os.listdir(cache_dir) if n.endswith(f".{fmt}")]
        candidates = [(os.stat(p).st_mtime_ns, p) for p in names if p != but and os.path.isfile(p)]
    except OSError:
        return []
    return [max(candidates)[1]] if candidates else []


def _sha256_of(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
