"""The one shape every format writer has.

A writer gets the frozen tree and a Region of an output file (pyimg/region.py: fd,
offset, limit), writes only inside it and reports the bytes it used; the region's
owner sizes the file, fsyncs and renames it.  It lays the tree out, streams the file
data into the image and finalizes the metadata.  It must produce the same
bytes for the same (tree, options), whatever `jobs` is.  It never prints: it reports
progress through the callback and returns a WriteResult.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..cache import BuildCache, CacheStats
from ..collect import source_holding
from ..options import BuildOptions
from ..region import Region
from ..tree import DataRef, FrozenTree

Progress = Callable[[int], None]
"""Called with the number of content bytes just processed (read, hashed, stored)."""


class PackedDigests(Mapping[int, bytes]):
    """ino -> 32-byte digest, over digests kept back to back in one buffer: a dict
    of 100k bytes objects costs ~13 MB, this the 32 bytes each.  Its index is made
    on first lookup (the manifest asks; a plain build never does).  `empty`: the
    inos of files without content, whose digest is `empty_digest`."""

    def __init__(
        self,
        inos: Sequence[int],
        packed: bytes | bytearray,
        empty: Sequence[int] = (),
        empty_digest: bytes = b"",
    ) -> None:
        self._inos = inos
        self._packed = packed
        self._empty = empty
        self._empty_digest = empty_digest
        self._index: dict[int, int] | None = None

    def _positions(self) -> dict[int, int]:
        """ino -> position in the packed buffer (-1: an empty file)."""
        if self._index is None:
            index = dict.fromkeys(self._empty, -1)
            index.update((ino, i) for i, ino in enumerate(self._inos))
            self._index = index
        return self._index

    def __getitem__(self, ino: int) -> bytes:
        i = self._positions()[ino]
        return self._empty_digest if i < 0 else bytes(self._packed[32 * i : 32 * i + 32])

    def __iter__(self) -> Iterator[int]:
        return iter(self._positions())

    def __len__(self) -> int:
        return len(self._positions())


@dataclass(slots=True)
class WriteResult:
    digests: Mapping[int, bytes]  # ino -> BLAKE3 (32 bytes) of each regular file's content
    bytes_in: int  # content bytes of all regular files (a hard-link group counted once)
    bytes_unique: int  # content bytes left once identical contents are stored once
    bytes_stored: int  # of those, the bytes that are not holes (zero blocks are not stored)
    image_size: int  # bytes of the region the image uses (the image file's size)
    facts: Any = None  # the format's facts: a frozen dataclass it declares (SquashfsFacts, Ext4Facts)
    warnings: list[str] = field(default_factory=list)  # what went wrong without failing (the build cache)
    cache: CacheStats | None = None  # what the build cache did, if one was used

    @property
    def dedup_saved(self) -> int:
        return max(0, self.bytes_in - self.bytes_unique)


class FileScan(Protocol):
    """Work a writer starts on files while the tree is still being collected: told
    of every regular file with data, in the tree's order (collect decides when it
    can promise that), then `finish`ed, and always `close`d."""

    def add(self, ref: DataRef) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class FormatWriter(Protocol):
    name: ClassVar[str]
    facts_type: ClassVar[type]  # the frozen dataclass of WriteResult.facts

    def __init__(self, options: BuildOptions) -> None: ...

    def prescan(self) -> FileScan | None:
        """A FileScan to feed during collection, or None."""
        ...

    def write(self, tree: FrozenTree, region: Region, progress: Progress) -> WriteResult: ...

    def reused(self) -> list[str]:
        """Called instead of write() when the image came whole from the cache
        (reuse.py): release what prescan() opened; returns the writer's warnings."""
        ...


def image_epoch(options: BuildOptions, tree: FrozenTree) -> int:
    """The image's own timestamp: the epoch if given, else the tree's newest mtime.

    Never the clock: an image is reproducible with no flags at all.
    """
    if options.policy.epoch is not None:
        return options.policy.epoch
    return tree.newest_mtime_ns() // 1_000_000_000


def epoch_source(options: BuildOptions) -> str:
    """Where the image's timestamp came from, for a message that refuses it."""
    if options.policy.epoch is None:
        return "the newest mtime in the tree"
    return options.policy.epoch_from or "the epoch option"


def open_cache(options: BuildOptions, warnings: list[str]) -> BuildCache | None:
    """The build cache (docs/cache.md), if one is asked for and usable.  One inside
    a directory source would be read into the image while it is written: then the
    build goes on without it (a warning in `warnings`; the CLI's default may be there)."""
    from ..cache_remote import local_paths
    from ..cache_remote import open_cache as open_tiers

    cache = options.cache
    if not cache.cache:
        return None
    for where in local_paths(cache):
        source = source_holding(where, options)
        if source is not None:
            warnings.append(f"build cache {where}: inside the source {source}; building without it")
            return None
    return open_tiers(cache)  # a directory, or a shared cache over one (cache_remote.py)
