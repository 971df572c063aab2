#!/usr/bin/env python3
"""Warm rebuilds with the local build cache (docs/cache.md), squashfs.

    python3 bench/warm.py [--workloads real,large] [--scale 0.2] [--jobs N]

For each workload tree of run.py (generated there, then copied, since it is edited
here): a clean build (--no-cache), a cold one (an empty cache), a rebuild with no
change, one after 4 KiB of the largest file changed, one after 1% of the files
changed.  Every warm image is checked to be the clean build of the same tree, byte
for byte.  Wall and CPU seconds as run.py measures them (its launcher).
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


def build(rows: list[tuple[str, str, float, float]], name: str, src: Path, scratch: Path, jobs: int,
          label: str, *flags: str, check: bool = True) -> None:  # fmt: skip
    """One build of `src` with `flags`, measured; check: also a clean build, compared."""
    env = {"PYTHONPATH": str(REPO)}  # this checkout's pyimg
    out = scratch / "img"
    common = ["--epoch", "0", "--owner", "root", "--jobs", str(jobs), "-q"]
    argv = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(out), *common, *flags]
    sample = run.run_once(argv, env, out)
    if check:  # the warm image is the clean one
        clean = scratch / "clean"
        cmd = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(clean), *common, "--no-cache"]
        run.run_once(cmd, env, clean)
        assert filecmp.cmp(out, clean, shallow=False), f"{name}, {label}: not the clean image"
    rows.append((name, label, sample.wall_s, sample.cpu_s))
    print(f"  {name:<6} {label:<34} {sample.wall_s:6.2f} s wall {sample.cpu_s:6.2f} s CPU", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="real,large")
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    workloads = args.workloads.split(",")
    workdir = args.workdir or run.default_workdir(workloads, args.scale)
    rows: list[tuple[str, str, float, float]] = []
    for name in workloads:
        tree = run.ensure_workload(name, args.scale, workdir)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            scratch = Path(tmp)
            src, cache = scratch / "src", str(scratch / "cache")
            shutil.copytree(tree, src, symlinks=True)
            time.sleep(2.5)  # older than the stat cache's racy window (docs/cache.md)
            run.warm_cache(src)
            at = (rows, name, src, scratch, args.jobs)
            build(*at, "clean (--no-cache)", "--no-cache", check=False)
            build(*at, "cold cache", "--cache", cache, check=False)
            build(*at, "warm, no change", "--cache", cache)
            build(*at, "warm, no change (again)", "--cache", cache, check=False)
            change_4k_of_largest(src)
            build(*at, "warm, 4 KiB of one file changed", "--cache", cache)
            change_one_percent(src)
            build(*at, "warm, 1% of the files changed", "--cache", cache)
    print("\n| workload | build | wall s | CPU s |\n|---|---|---|---|")
    for name, label, wall, cpu in rows:
        print(f"| {name} | {label} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
