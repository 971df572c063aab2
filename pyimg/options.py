"""Build options: frozen dataclasses, the one description of what a build does.

The TOML spec (spec.py) and the CLI (cli.py) both produce a BuildOptions; CLI
options override the spec.  Nothing here reads the environment or the clock except
`default_jobs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .formats.cpio import CpioOptions  # cpio: until the registry

SourceKind = Literal["auto", "dir", "tar", "file"]
OwnerPolicy = str  # "auto" | "preserve" | "root" | "UID:GID"


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One source.  `dest` is the image path it is placed at (b"" = the root).

    kind "auto" decides from the file system: a directory, a tar archive (by content
    or suffix), else a single file.  For a single file, `dest` is its full image
    path and mode/uid/gid override what the file has.
    """

    path: str
    kind: SourceKind = "auto"
    dest: bytes = b""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """Applied once, while the tree is collected.

    owner: "auto" keeps the owners a tar archive records and makes a directory's
    files root:root (the builder's uid never leaks into an image); "preserve" keeps
    every owner; "root" makes all 0:0; "UID:GID" makes all that pair.  uid_map and
    gid_map then rename individual ids (from, to).
    epoch: mtimes later than it are clamped to it (SOURCE_DATE_EPOCH, --epoch).
    excludes: glob patterns; one without "/" matches an entry's name anywhere, one
    with "/" matches its whole image path ("/usr/share/doc/*").  An excluded
    directory takes its subtree with it.
    """

    owner: OwnerPolicy = "auto"
    uid_map: tuple[tuple[int, int], ...] = ()
    gid_map: tuple[tuple[int, int], ...] = ()
    epoch: int | None = None
    excludes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SquashfsOptions:
    compression: Literal["zstd", "gzip", "xz"] = "zstd"
    level: int | None = None  # None: zstd 3, gzip 9, xz 6 (docs/squashfs.md says why)
    block_size: int = 128 * 1024
    fragments: bool = True
    dedup: bool = True


@dataclass(frozen=True, slots=True)
class Ext4Options:
    size: int | None = None  # None: "auto", the smallest image that holds the tree + headroom
    headroom: int = 10  # percent, for --size auto
    journal: int | None = None  # journal size in bytes, or None for no journal; 0 = default size
    features: tuple[str, ...] = ()  # "+feature" / "-feature" edits of the default set
    uuid: str | None = None  # None: derived from the content
    dedup: bool | None = None  # None: on unless the image gets a journal (read-write)
    label: str = ""


def _cpio_options() -> CpioOptions:  # cpio: until the registry
    from .formats.cpio import CpioOptions  # cpio: until the registry (imported late: no cycle)

    return CpioOptions()  # cpio: until the registry


@dataclass(frozen=True, slots=True)
class BuildOptions:
    sources: tuple[SourceSpec, ...]
    output: str
    format: Literal["squashfs", "ext4", "cpio"] = "squashfs"  # cpio: until the registry
    jobs: int = field(default_factory=default_jobs)
    policy: Policy = Policy()
    squashfs: SquashfsOptions = SquashfsOptions()
    ext4: Ext4Options = Ext4Options()
    cpio: CpioOptions = field(default_factory=_cpio_options)  # cpio: until the registry
    manifest: str | None = None
