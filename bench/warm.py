#!/usr/bin/env python3
"""Warm rebuilds with the local build cache (docs/cache.md), squashfs or ext4.

    python3 bench/warm.py [--workloads real,large] [--scale 0.2] [--jobs N] [--format ext4]

For each workload tree of run.py (generated there, then copied, since it is edited
here): a clean build (--no-cache), a cold one (an empty cache), a rebuild with no
change, one after 4 KiB of the largest file changed, one after 1% of the files
changed.  Every warm image is checked to be the clean build of the same tree, byte
for byte.  Wall and CPU seconds as run.py measures them (its launcher).  With
--format ext4, the peer's clean build of the same tree (mkfs.ext4 -d, run.py's
command line) is measured too, and every row is given as a ratio of it.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def change_4k_of_largest(root: Path) -> None:
    largest = max(files_of(root), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.seek(largest.stat().st_size // 2)
        f.write(os.urandom(4096))


def change_one_percent(root: Path) -> None:
    for path in files_of(root)[::100]:
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([(first[0] ^ 1) if first else 1]))


REPO = Path(__file__).resolve().parents[1]


Row = tuple[str, str, float, float]


def build(rows: list[Row], name: str, src: Path, scratch: Path, jobs: int, fmt: str,
          label: str, *flags: str, check: bool = True) -> None:  # fmt: skip
    """One build of `src` with `flags`, measured; check: also a clean build, compared."""
    env = {"PYTHONPATH": str(REPO)}  # this checkout's pyimg
    out = scratch / "img"
    common = ["--format", fmt, "--epoch", "0", "--owner", "root", "--jobs", str(jobs), "-q"]
    argv = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(out), *common, *flags]
    sample = run.run_once(argv, env, out)
    if check:  # the warm image is the clean one
        clean = scratch / "clean"
        cmd = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(clean), *common, "--no-cache"]
        run.run_once(cmd, env, clean)
        assert filecmp.cmp(out, clean, shallow=False), f"{name}, {label}: not the clean image"
    rows.append((name, label, sample.wall_s, sample.cpu_s))
    print(f"  {name:<6} {label:<34} {sample.wall_s:6.2f} s wall {sample.cpu_s:6.2f} s CPU", flush=True)


def peer(rows: list[Row], name: str, src: Path, scratch: Path, jobs: int) -> None:
    """mkfs.ext4 -d's clean build of `src`, as run.py runs it."""
    tool = run.Tool("mkfs.ext4", "ext4", run.find_tool("mkfs.ext4"))
    if tool.binary is None:
        return
    out = scratch / "peer.img"
    argv, env = run.build_command(tool, src, out, run.tree_stats(src), argparse.Namespace(jobs=jobs, level=3))
    run.prepare_output(tool, out, argv)
    sample = run.run_once(argv, env, out)
    out.unlink()
    rows.append((name, "mkfs.ext4 -d (peer, clean)", sample.wall_s, sample.cpu_s))
    print(f"  {name:<6} {'mkfs.ext4 -d':<34} {sample.wall_s:6.2f} s wall {sample.cpu_s:6.2f} s CPU", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="real,large")
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--format", choices=("squashfs", "ext4"), default="squashfs")
    args = p.parse_args()
    workloads = args.workloads.split(",")
    workdir = args.workdir or run.default_workdir(workloads, args.scale)
    rows: list[Row] = []
    for name in workloads:
        tree = run.ensure_workload(name, args.scale, workdir)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            scratch = Path(tmp)
            src, cache = scratch / "src", str(scratch / "cache")
            shutil.copytree(tree, src, symlinks=True)
            time.sleep(2.5)  # older than the stat cache's racy window (docs/cache.md)
            run.warm_cache(src)
            at = (rows, name, src, scratch, args.jobs, args.format)
            if args.format == "ext4":
                peer(rows, name, src, scratch, args.jobs)
            build(*at, "clean (--no-cache)", "--no-cache", check=False)
            build(*at, "cold cache", "--cache", cache, check=False)
            build(*at, "warm, no change", "--cache", cache)
            build(*at, "warm, no change (again)", "--cache", cache, check=False)
            change_4k_of_largest(src)
            build(*at, "warm, 4 KiB of one file changed", "--cache", cache)
            change_one_percent(src)
            build(*at, "warm, 1% of the files changed", "--cache", cache)
    peers = {name: wall for name, label, wall, _ in rows if label.startswith("mkfs.ext4")}
    print(f"\n| workload | {args.format} build | wall s | CPU s | wall / mkfs.ext4 -d |\n|---|---|---|---|---|")
    for name, label, wall, cpu in rows:
        ratio = f"{wall / peers[name]:.2f}" if name in peers else ""
        print(f"| {name} | {label} | {wall:.2f} | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
