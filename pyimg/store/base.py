"""What every store (layout directory, registry) offers: the few operations push, pull,
records and promotion are made of.  Digests are verified here, on the way in and out."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

from ..errors import DigestMismatchError
from .artifact import Descriptor, Manifest

Sink = Callable[[bytes], None]
Progress = Callable[[int], None]  # called with the number of bytes just moved


class Store(Protocol):
    address: str  # oci:DIR or HOST/REPO, for messages

    def blob_exists(self, digest: str) -> bool: ...

    def put_blob_file(self, path: str, digest: str, size: int, progress: Progress | None = None) -> bool:
        """Upload a file as a blob unless it is there; True when bytes were sent."""
        ...

    def put_blob_bytes(self, data: bytes, digest: str) -> bool: ...

    def fetch_blob(self, desc: Descriptor, sink: Sink, progress: Progress | None = None) -> None:
        """Stream a blob into sink, verified: DigestMismatchError (after the last byte) when it
        is not what the descriptor says.  The caller writes the sink's bytes somewhere it can
        throw away."""
        ...

    def resolve(self, reference: str) -> str | None:
        """The manifest digest a tag (or digest) names, or None when there is none."""
        ...

    def get_manifest(self, reference: str) -> Manifest:
        """The manifest a tag or digest names, verified against its digest."""
        ...

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        """Store a manifest by digest, and under tag when given (moving the tag)."""
        ...

    def attach(self, manifest: Manifest, subject: str) -> None:
        """Store a manifest whose subject is `subject` so that referrers() finds it."""
        ...

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[Descriptor]: ...

    def tags(self) -> list[str]: ...

    def close(self) -> None: ...


class VerifyingSink:
    """Counts and hashes what passes through; check() raises on a wrong size or digest."""

    def __init__(self, desc: Descriptor, sink: Sink, where: str) -> None:
        self.desc = desc
        self.sink = sink
        self.where = where
        self.sha = hashlib.sha256()
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.count += len(data)
        if self.count > self.desc.size:
            raise DigestMismatchError(
                f"blob {self.desc.digest} is longer than its descriptor's {self.desc.size} bytes: refused",
                self.where,
            )
        self.sha.update(data)
        self.sink(data)

    def check(self) -> None:
        if self.count != self.desc.size:
            raise DigestMismatchError(
                f"blob {self.desc.digest} has {self.count} bytes, "
                f"its descriptor says {self.desc.size}: refused",
                self.where,
            )
        got = "sha256:" + self.sha.hexdigest()
        if got != self.desc.digest:
            raise DigestMismatchError(
                f"blob content has digest {got}, expected {self.desc.digest}: refused", self.where
            )
