"""OCI 1.1 artifacts: media types, descriptors, canonical JSON and the manifests pyimg writes.

Every manifest here is a pure function of its inputs: canonical JSON (sorted keys, no
whitespace), no clock.  The image manifest's only time annotation comes from the image's
epoch (the pyimg manifest's options.epoch), and is absent when the image has none.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from ..errors import DigestMismatchError, StoreError
from ..formats import FORMATS

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

IMAGE_ARTIFACT = "application/vnd.pyimg.image.v1+json"
CHECK_ARTIFACT = "application/vnd.pyimg.check.v1+json"
PROMOTION_ARTIFACT = "application/vnd.pyimg.promotion.v1+json"
PYIMG_MANIFEST = "application/vnd.pyimg.manifest.v1+json"
# One content-defined chunk of an image (pyimg/chunks.py): the layers of this type, in
# order, concatenated, are the image.
CHUNK = "application/vnd.pyimg.chunk.v1"
# A piece of the pyimg manifest, cut as the image is: in a chunked artifact the manifest
# (hundreds of bytes per file) is chunks too, or it would be most of what the next
# version pushes after a small change.
MANIFEST_CHUNK = "application/vnd.pyimg.manifest.chunk.v1"
# An image layer's media type per format: the format registry declares it (pyimg/formats/).
FORMAT_MEDIA_TYPES = {name: spec.media_type for name, spec in FORMATS.items()}
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX)

A_TITLE = "org.opencontainers.image.title"
A_CREATED = "org.opencontainers.image.created"
A_REF_NAME = "org.opencontainers.image.ref.name"
A_FORMAT = "vnd.pyimg.format"
A_VERSION = "vnd.pyimg.version"
A_BLAKE3 = "vnd.pyimg.blake3"
# A chunked image's whole-file facts, so a pull can check what it reassembled.
A_SHA256 = "vnd.pyimg.sha256"
A_SIZE = "vnd.pyimg.size"
A_CHUNKING = "vnd.pyimg.chunking"  # the cutter's parameters (chunks.ChunkParams.label)
A_IMAGE_TITLE = "vnd.pyimg.title"
A_MANIFEST_SHA256 = "vnd.pyimg.manifest.sha256"  # the whole pyimg manifest's, when it is chunks
A_MANIFEST_SIZE = "vnd.pyimg.manifest.size"
A_CHECK = "vnd.pyimg.check.kind"
A_PASSED = "vnd.pyimg.check.passed"
A_ENV = "vnd.pyimg.environment"

PYIMG_MANIFEST_TITLE = "pyimg-manifest.json"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(seconds: float) -> str:
    whole = int(seconds)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    frac = seconds - whole
    return f"{text}.{round(frac * 1e6):06d}Z" if frac else f"{text}Z"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, value: Any, where: str) -> Descriptor:
        if not isinstance(value, dict):
            raise StoreError("a descriptor is not a JSON object", where)
        try:
            media_type, digest, size = value["mediaType"], value["digest"], value["size"]
        except KeyError as exc:
            raise StoreError(f"a descriptor lacks {exc.args[0]!r}", where) from None
        if not isinstance(media_type, str) or not isinstance(digest, str) or not isinstance(size, int):
            raise StoreError("a descriptor has fields of the wrong type", where)
        annotations = value.get("annotations")
        artifact_type = value.get("artifactType")
        return cls(
            media_type,
            digest,
            size,
            artifact_type if isinstance(artifact_type, str) else None,
            {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else None,
        )


EMPTY_CONFIG = Descriptor(OCI_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest (or index) as stored: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: str

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        if not isinstance(value, dict):
            raise StoreError("the manifest is not a JSON object", self.digest)
        return value

    def descriptor(
        self, *, artifact_type: str | None = None, annotations: dict[str, str] | None = None
    ) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data), artifact_type, annotations)

    @classmethod
    def of(cls, value: dict[str, Any]) -> Manifest:
        data = canonical_json(value)
        return cls(data, str(value.get("mediaType", OCI_MANIFEST)), sha256_digest(data))


def verify_manifest_bytes(data: bytes, expected: str | None, where: str) -> str:
    """The digest of `data`; DigestMismatchError when it is not `expected`."""
    digest = sha256_digest(data)
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            f"manifest content has digest {digest}, expected {expected}: refused", where
        )
    return digest


def layers(manifest: dict[str, Any], where: str) -> list[Descriptor]:
    raw = manifest.get("layers")
    if not isinstance(raw, list):
        raise StoreError("the manifest has no layers list", where)
    return [Descriptor.from_json(d, where) for d in raw]


def _image_annotations(fmt: str, version: str, blake3: str, epoch: int | None) -> dict[str, str]:
    annotations = {A_FORMAT: fmt, A_VERSION: version, A_BLAKE3: blake3}
    if epoch is not None:
        annotations[A_CREATED] = rfc3339(epoch)
    return annotations


def _artifact(layer_list: list[dict[str, Any]], annotations: dict[str, str]) -> Manifest:
    return Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": IMAGE_ARTIFACT,
            "config": EMPTY_CONFIG.to_json(),
            "layers": layer_list,
            "annotations": annotations,
        }
    )


def image_manifest(
    image: Descriptor,
    pyimg_manifest: Descriptor,
    *,
    fmt: str,
    version: str,
    blake3: str,
    epoch: int | None,
) -> Manifest:
    """The single-blob artifact (`pyimg push --no-chunks`): a pure function of its arguments."""
    return _artifact(
        [image.to_json(), pyimg_manifest.to_json()], _image_annotations(fmt, version, blake3, epoch)
    )


@dataclass(frozen=True, slots=True)
class WholeImage:
    """What a chunked artifact says about the image its chunks make up."""

    format: str
    size: int
    sha256: str  # sha256:<hex>
    blake3: str  # the image digest (pyimg/imagehash.py)
    title: str
    chunking: str  # chunks.ChunkParams.label()


def chunked_image_manifest(
    chunks: list[tuple[str, int]],
    pyimg_manifest: Descriptor,
    whole: WholeImage,
    *,
    version: str,
    epoch: int | None,
    manifest_chunks: list[tuple[str, int]] | None = None,
) -> Manifest:
    """The chunked artifact: one layer per chunk (digest, size), in image order, then the
    pyimg manifest: as one layer, or (manifest_chunks) as its chunks, in order, with its
    digest and size annotated.  Chunk descriptors carry no annotations: they are most of
    the manifest's bytes (docs/store.md, "Chunked images")."""
    annotations = _image_annotations(whole.format, version, whole.blake3, epoch)
    annotations.update(
        {
            A_SHA256: whole.sha256,
            A_SIZE: str(whole.size),
            A_CHUNKING: whole.chunking,
            A_IMAGE_TITLE: whole.title,
        }
    )
    layer_list = [{"mediaType": CHUNK, "digest": d, "size": n} for d, n in chunks]
    if manifest_chunks is None:
        layer_list.append(pyimg_manifest.to_json())
    else:
        annotations[A_MANIFEST_SHA256] = pyimg_manifest.digest
        annotations[A_MANIFEST_SIZE] = str(pyimg_manifest.size)
        layer_list += [{"mediaType": MANIFEST_CHUNK, "digest": d, "size": n} for d, n in manifest_chunks]
    return _artifact(layer_list, annotations)


def referrer_manifest(
    subject: Descriptor, artifact_type: str, blob: Descriptor, annotations: dict[str, str]
) -> Manifest:
    """A manifest attached to `subject` (a record or a promotion)."""
    return Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [blob.to_json()],
            "subject": subject.to_json(),
            "annotations": annotations,
        }
    )


def index_manifest(manifests: list[Descriptor]) -> Manifest:
    return Manifest.of(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d.to_json() for d in manifests]}
    )


def referrer_descriptor(manifest: Manifest) -> Descriptor:
    """How a referrer is listed in a referrers index: artifactType and annotations copied up."""
    value = manifest.json
    annotations = value.get("annotations")
    return manifest.descriptor(
        artifact_type=str(value.get("artifactType") or value.get("config", {}).get("mediaType", "")),
        annotations={str(k): str(v) for k, v in annotations.items()}
        if isinstance(annotations, dict)
        else None,
    )
