"""Artifact: a built image, typed, as the stages after a build take it.

A build returns one (BuildResult.artifact); boot, the store and container formats
(a GPT disk holding an ESP and a root) take artifacts as their input: where the
image is (a file, and the byte range in it), what it is (format, media type), how
to prove it (its digests) and the format's own facts (an ext4 UUID, later a verity
root hash), as the frozen dataclass the format declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import jsonable


@dataclass(frozen=True, slots=True)
class Artifact:
    format: str
    media_type: str
    path: str  # the file that holds the image
    offset: int  # where the image starts in that file (0 for a plain image file)
    size: int  # bytes
    blake3: str  # hex, of the image's bytes (what `pyimg digest` prints)
    sha256: str | None  # hex, when computed (the store needs it; a plain build may not)
    facts: Any  # the format's facts dataclass (SquashfsFacts, Ext4Facts, …)
    children: tuple[Artifact, ...] = ()  # the images a container holds

    def record(self) -> dict[str, Any]:
        """JSON-able, for --json, manifests and stores."""
        return {
            "format": self.format,
            "media_type": self.media_type,
            "path": self.path,
            "offset": self.offset,
            "size": self.size,
            "blake3": self.blake3,
            "sha256": self.sha256,
            "facts": jsonable(self.facts),
            "children": [child.record() for child in self.children],
        }
