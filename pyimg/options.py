"""Build options: frozen dataclasses, the one description of what a build does.

The TOML spec (spec.py) and the CLI (cli.py) both produce a BuildOptions; CLI
options override the spec.  Each format's own options are declared with the format
(pyimg/formats/: the registry and one options module per format).  Nothing here
reads the environment or the clock except `default_jobs`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import SpecError
from .settings import setting
from .values import merge_id_maps, parse_epoch, parse_excludes, parse_id_map, parse_owner, parse_size

T = TypeVar("T")

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
    """Applied once, while the tree is collected.  Each field is an option declared
    once (pyimg/settings.py): a key of the spec's [policy] table, a `pyimg build` flag
    and a keyword of pyimg.build().

    owner: "auto" keeps the owners a tar archive records and makes a directory's
    files root:root (the builder's uid never leaks into an image); "preserve" keeps
    every owner; "root" makes all 0:0; "UID:GID" makes all that pair.  uid_map and
    gid_map then rename individual ids (from, to).
    epoch: mtimes later than it are clamped to it (SOURCE_DATE_EPOCH, --epoch).
    excludes: glob patterns; one without "/" matches an entry's name anywhere, one
    with "/" matches its whole image path ("/usr/share/doc/*").  An excluded
    directory takes its subtree with it.
    drop_acls: leave POSIX ACLs (system.posix_acl_access/default) out of the image,
    reporting the paths that had them (BuildResult.dropped_acls, the manifest);
    without it a format that cannot hold ACLs (squashfs) refuses them by path.
    """

    owner: OwnerPolicy = setting(
        "auto", "auto (default: dirs root-owned, tars as recorded), preserve, root, or UID:GID.",
        parse_owner, metavar="OWNER",
    )  # fmt: skip
    uid_map: tuple[tuple[int, int], ...] = setting(
        (), "Rename uids (spec: a table of FROM = TO).", parse_id_map, combine=merge_id_maps, cli=False
    )
    gid_map: tuple[tuple[int, int], ...] = setting(
        (), "Rename gids (spec: a table of FROM = TO).", parse_id_map, combine=merge_id_maps, cli=False
    )
    epoch: int | None = setting(
        None, "Clamp mtimes to this; the image's own time. Default: SOURCE_DATE_EPOCH.", parse_epoch,
        metavar="SECONDS",
    )  # fmt: skip
    excludes: tuple[str, ...] = setting(
        (), "Glob to leave out (repeatable); with '/' it matches the whole path.", parse_excludes,
        append=True, key="exclude", repeat=True, metavar="GLOB",
    )  # fmt: skip
    drop_acls: bool = setting(
        False, "Leave POSIX ACLs out (squashfs cannot hold them) and list the paths that had them.",
        flag=True,
    )  # fmt: skip
    # Where `epoch` came from, for messages only (not an option, not in the record):
    # "--epoch", "SOURCE_DATE_EPOCH", "the spec's policy.epoch".
    epoch_from: str = ""


def _parse_cache_dir(value: Any, key: str) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(f"{key}: expected a directory, oci:DIR or HOST/REPO, got {value!r}")
    from .cache_remote import remote_ref  # (not at the top: it imports this module)

    try:
        remote_ref(value)
    except SpecError as exc:
        raise SpecError(f"{key}: {exc.reason}") from None
    return value


def _parse_cache_max(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if size < 1 << 20:
        raise SpecError(f"{key}: at least 1M, got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """The local build cache (docs/cache.md).  Not in the manifest's options record
    nor the image's identity: a cache never changes the bytes, only the time taken.
    The API's default is no cache (library code writes nowhere it was not asked
    to); `pyimg build` uses the user's cache directory unless --no-cache."""

    cache: str | None = setting(
        None,
        "Build cache: a directory (default: $PYIMG_BUILD_CACHE, else $XDG_CACHE_HOME/pyimg/build; "
        "--no-cache: none), or a cache shared through a store, oci:DIR or HOST[:PORT]/REPO[:TAG] "
        "(a registry), over the local one.",
        _parse_cache_dir, metavar="DIR|oci:DIR|HOST/REPO",
    )  # fmt: skip
    cache_max: int = setting(
        2 << 30, "Build cache size limit; least recently used entries go first (default 2G).",
        _parse_cache_max, metavar="SIZE",
    )  # fmt: skip
    # The local tier under a shared cache (`cache` is oci:DIR or HOST/REPO): the CLI sets
    # its default directory; None, the API's default, is a temp directory for the build.
    # Not an option of its own, not in the record.
    local: str | None = None


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """What a build does.  `format_options` holds, by format name, the options
    dataclass of each format that was configured (the spec's [squashfs] table, CLI
    flags); a format not in it uses its defaults.  `settings(SquashfsOptions)` is how
    a writer reads its own."""

    sources: tuple[SourceSpec, ...]
    output: str
    format: str = "squashfs"
    jobs: int = field(default_factory=default_jobs)
    policy: Policy = Policy()
    format_options: Mapping[str, Any] = field(default_factory=dict)
    manifest: str | None = None
    cache: CacheOptions = CacheOptions()

    def settings(self, kind: type[T]) -> T:
        """This build's options of type `kind` (a format's options dataclass)."""
        for value in self.format_options.values():
            if isinstance(value, kind):
                return value
        return kind()
