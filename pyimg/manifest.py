"""The manifest: what is in an image, and what made it.

Every entry (path, type, mode, owner, mtime, size, BLAKE3 of content, link
target), the image digest (imagehash.py) and SHA-256, the options and the versions of pyimg and
its libraries.  It depends only on the image's inputs: no time, host or thread
count, so a manifest is as reproducible as the image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import zstandard

from . import settings
from .formats import format_spec
from .formats.base import WriteResult
from .imagehash import ImageDigest
from .options import BuildOptions
from .tree import FrozenTree, Kind

MANIFEST_VERSION = 2  # 2: image.blake3 is the segment digest (imagehash.py), not BLAKE3 of the bytes


def versions() -> dict[str, str]:
    return {
        "pyimg": _version("pyimg"),
        "zstd": zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION)),
        "zstandard": _version("zstandard"),
        "blake3": _version("blake3"),
    }


def _version(dist: str) -> str:
    from importlib import metadata  # on use: it costs every start ~20 ms

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _path(raw: bytes) -> str:
    return "/" + raw.decode("utf-8", "surrogateescape")


def entries(tree: FrozenTree, digests: Mapping[int, bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for node in tree.nodes:
        inode = node.inode
        entry: dict[str, Any] = {
            "path": _path(node.path) if node.path else "/",
            "type": inode.kind.name.lower(),
            "mode": f"{inode.mode:04o}",
            "uid": inode.uid,
            "gid": inode.gid,
            "mtime": inode.mtime,
            "ino": node.ino,
        }
        if inode.kind is Kind.FILE:
            entry["size"] = inode.size
            entry["blake3"] = digests[node.ino].hex()
        elif inode.kind is Kind.SYMLINK:
            entry["target"] = inode.target.decode("utf-8", "surrogateescape")
        elif inode.kind in (Kind.CHAR, Kind.BLOCK):
            entry["rdev"] = list(inode.rdev)
        if tree.nlink[node.ino] > 1 and inode.kind is not Kind.DIR:
            entry["links"] = tree.nlink[node.ino]
        if inode.xattrs:
            entry["xattrs"] = sorted(k.decode("utf-8", "surrogateescape") for k in inode.xattrs)
        out.append(entry)
    return out


def options_record(options: BuildOptions) -> dict[str, Any]:
    """The options that decide the image's bytes (not jobs, not paths)."""
    record: dict[str, Any] = {"format": options.format, **settings.record(options.policy)}
    record[options.format] = settings.record(options.settings(format_spec(options.format).options))
    return record


def build_manifest(
    options: BuildOptions,
    tree: FrozenTree,
    result: WriteResult,
    image: ImageDigest,
    *,
    dropped_acls: list[str] | None = None,
) -> dict[str, Any]:
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "image": {
            "file": os.path.basename(options.output),
            "format": options.format,
            "size": image.size,
            "blake3": image.blake3,
            "sha256": image.sha256,
        },
        "options": options_record(options),
        "format_details": settings.jsonable(result.facts),
        "versions": versions(),
        "entries": entries(tree, result.digests),
    }
    if options.policy.drop_acls:
        manifest["dropped_acls"] = list(dropped_acls or [])  # paths whose POSIX ACLs were left out
    return manifest


def dump(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()
