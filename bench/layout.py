#!/usr/bin/env python3
"""How much of an image one changed file changes, under content-defined chunks.

    python3 bench/layout.py [--workload real] [--scale 0.1] [--formats squashfs,ext4]

For the workload tree of run.py (generated there, then copied, since it is edited
here): build an image, overwrite one ~4 KiB file with new bytes of the same size,
build again.  Then print, per format:

  - the share of the new image's bytes that are in no chunk of the old one, both cut
    into content-defined chunks (pyimg/chunks.py, ~64 KiB average);
  - what `pyimg push` of the new version sends to an oci:DIR store that holds the old
    one (measured, not computed): chunk bytes, and the pyimg manifest blob;
  - where the changed chunks are in the image (squashfs: which table; ext4: which block
    group), to see whether the change stays local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # bench/run.py

import pyimg
from pyimg.chunks import chunk_file
from pyimg.store import ops


def change_one_4k_file(root: Path) -> Path:
    """The file whose size is nearest 4 KiB gets new bytes (same size)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
    target = min(files, key=lambda p: (abs(p.stat().st_size - 4096), str(p)))
    target.write_bytes(os.urandom(target.stat().st_size))
    return target


def squashfs_regions(path: str) -> list[tuple[int, str]]:
    """(start, name) of the regions of a squashfs image, from its superblock."""
    with open(path, "rb") as f:
        sb = f.read(96)
    id_t, xattr_t, inode_t, dir_t, frag_t, export_t = struct.unpack_from("<6Q", sb, 48)
    bytes_used = struct.unpack_from("<Q", sb, 40)[0]
    named = [(0, "superblock"), (96, "data blocks and fragments"), (inode_t, "inode table"),
             (dir_t, "directory table"), (frag_t, "fragment table"), (export_t, "export table"),
             (id_t, "id table"), (xattr_t, "xattr table"), (bytes_used, "padding")]  # fmt: skip
    return sorted(
        (start, name)
        for start, name in named
        if (start != 0xFFFFFFFFFFFFFFFF and start > 0) or name == "superblock"
    )


def ext4_region(path: str) -> tuple[int, int]:
    """(block size, bytes per block group) of an ext4 image."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(64)
    (log_block,) = struct.unpack_from("<I", sb, 24)
    (per_group,) = struct.unpack_from("<I", sb, 32)
    block = 1024 << log_block
    return block, block * per_group


def where(path: str, fmt: str, offset: int) -> str:
    if fmt == "squashfs":
        name = "?"
        for start, label in squashfs_regions(path):
            if offset >= start:
                name = label
        return name
    block, group = ext4_region(path)
    g = offset // group
    return f"block group {g} (+{(offset - g * group) // block} blocks)"


def measure(fmt: str, src: Path, scratch: Path, uuid: str | None) -> None:
    old, new = scratch / f"old.{fmt}", scratch / f"new.{fmt}"
    common: dict[str, object] = {"epoch": 0, "owner": "root", "format": fmt}
    if fmt == "ext4" and uuid:
        common["uuid"] = uuid  # else derived from the tree: every checksum changes
    pyimg.build([str(src)], str(old), manifest=str(old) + ".json", **common)
    changed = change_one_4k_file(src)
    pyimg.build([str(src)], str(new), manifest=str(new) + ".json", **common)
    size = new.stat().st_size
    old_digests = {c.digest for c in chunk_file(str(old))}
    new_chunks = chunk_file(str(new))
    fresh = [c for c in new_chunks if c.digest not in old_digests]
    fresh_bytes = sum(c.size for c in fresh)
    store = f"oci:{scratch / f'store-{fmt}'}"
    ops.push(str(old), f"{store}:old")
    pushed = ops.push(str(new), f"{store}:new")
    meta = len(Path(str(new) + ".json").read_bytes())
    print(f"\n{fmt}: {size} bytes, {len(new_chunks)} chunks; changed {changed.relative_to(src)}", flush=True)
    print(
        f"  new image bytes in no old chunk: {fresh_bytes} = {100 * fresh_bytes / size:.2f} %"
        f" ({len(fresh)} chunks)"
    )
    print(f"  push of the new version after the old: {pushed.chunk_bytes_uploaded} chunk bytes "
          f"({100 * pushed.chunk_bytes_uploaded / size:.2f} %, {pushed.chunks_uploaded} chunks) "
          f"+ the pyimg manifest {meta} bytes = {pushed.bytes_uploaded} bytes "
          f"({100 * pushed.bytes_uploaded / size:.2f} %)")  # fmt: skip
    for c in fresh:
        print(f"    chunk at {c.offset:>12} ({c.size:>6} bytes): {where(str(new), fmt, c.offset)}")
    for label in (old, new):
        for p in (label, Path(str(label) + ".json")):
            p.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="real")
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--formats", default="squashfs,ext4")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--ext4-uuid", default=None, help="a fixed ext4 UUID (default: derived from the tree)")
    args = p.parse_args()
    workdir = args.workdir or run.default_workdir([args.workload], args.scale)
    tree = run.ensure_workload(args.workload, args.scale, workdir)
    for fmt in args.formats.split(","):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            scratch = Path(tmp)
            src = scratch / "src"
            shutil.copytree(tree, src, symlinks=True)
            measure(fmt, src, scratch, args.ext4_uuid)


if __name__ == "__main__":
    main()
