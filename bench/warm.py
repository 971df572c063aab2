#!/usr/bin/env python3
"""Warm rebuilds with the local build cache (docs/cache.md), squashfs or ext4.

    python3 bench/warm.py [--workloads real,large] [--scale 0.2] [--jobs N] [--format ext4]

For each workload tree of run.py (generated there, then copied, since it is edited
here): a clean build (--no-cache), a cold one (an empty cache), a rebuild with no
change, one after 4 KiB of the largest file changed, one after 1% of the files
changed (--repeat N: N builds a row, each after its change, the median shown).
Every warm image is checked to be the clean build of the same tree, byte for byte.
Wall and CPU seconds as run.py measures them (its launcher).  With --format ext4,
the peer's clean build of the same tree (mkfs.ext4 -d, run.py's command line) is
measured too, and every row is given as a ratio of it.
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
    """A new first byte in every 100th file (new each time: never back to an old content)."""
    for path in files_of(root)[::100]:
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([(first[0] + 1 + os.urandom(1)[0] % 255) % 256 if first else 1]))


REPO = Path(__file__).resolve().parents[1]


Row = tuple[str, str, float, float]


def median_sample(samples: list[run.Sample]) -> tuple[float, float]:
    return statistics.median(s.wall_s for s in samples), statistics.median(s.cpu_s for s in samples)


def build(rows: list[Row], name: str, src: Path, scratch: Path, jobs: int, fmt: str, repeat: int,
          label: str, *flags: str, check: bool = True,
          before: Callable[[], None] | None = None) -> None:  # fmt: skip
    """`repeat` builds of `src` with `flags`, each after `before()`, measured (the
    median); check: the last one is also compared with a clean build."""
    env = {"PYTHONPATH": str(REPO)}  # this checkout's pyimg
    out = scratch / "img"
    common = ["--format", fmt, "--epoch", "0", "--owner", "root", "--jobs", str(jobs), "-q"]
    argv = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(out), *common, *flags]
    samples = []
    for _ in range(repeat):
        if before is not None:
            before()
        samples.append(run.run_once(argv, env, out))
    if check:  # the warm image is the clean one
        clean = scratch / "clean"
        cmd = [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(clean), *common, "--no-cache"]
        run.run_once(cmd, env, clean)
        assert filecmp.cmp(out, clean, shallow=False), f"{name}, {label}: not the clean image"
    wall, cpu = median_sample(samples)
    rows.append((name, label, wall, cpu))
    print(f"  {name:<6} {label:<34} {wall:6.2f} s wall {cpu:6.2f} s CPU", flush=True)


def peer(rows: list[Row], name: str, src: Path, scratch: Path, jobs: int, repeat: int) -> None:
    """mkfs.ext4 -d's clean build of `src`, as run.py runs it."""
    tool = run.Tool("mkfs.ext4", "ext4", run.find_tool("mkfs.ext4"))
    if tool.binary is None:
        return
    out = scratch / "peer.img"
    argv, env = run.build_command(tool, src, out, run.tree_stats(src), argparse.Namespace(jobs=jobs, level=3))
    samples = []
    for _ in range(repeat):
        run.prepare_output(tool, out, argv)
        samples.append(run.run_once(argv, env, out))
        out.unlink()
    wall, cpu = median_sample(samples)
    rows.append((name, "mkfs.ext4 -d (peer, clean)", wall, cpu))
    print(f"  {name:<6} {'mkfs.ext4 -d':<34} {wall:6.2f} s wall {cpu:6.2f} s CPU", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="real,large")
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--format", choices=("squashfs", "ext4"), default="squashfs")
    p.add_argument("--repeat", type=int, default=1, help="builds per row (the median is shown)")
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
            at = (rows, name, src, scratch, args.jobs, args.format, args.repeat)
            if args.format == "ext4":
                peer(rows, name, src, scratch, args.jobs, args.repeat)
            build(*at, "clean (--no-cache)", "--no-cache", check=False)
            empty = functools.partial(shutil.rmtree, cache, ignore_errors=True)
            build(*at, "cold cache", "--cache", cache, check=False, before=empty)
            build(*at, "warm, no change", "--cache", cache)
            change_4k = functools.partial(change_4k_of_largest, src)
            build(*at, "warm, 4 KiB of one file changed", "--cache", cache, before=change_4k)
            change_1 = functools.partial(change_one_percent, src)
            build(*at, "warm, 1% of the files changed", "--cache", cache, before=change_1)
    peers = {name: wall for name, label, wall, _ in rows if label.startswith("mkfs.ext4")}
    print(f"\n| workload | {args.format} build | wall s | CPU s | wall / mkfs.ext4 -d |")
    print("|---|---|---|---|---|")
    for name, label, wall, cpu in rows:
        ratio = f"{wall / peers[name]:.2f}" if name in peers else ""
        print(f"| {name} | {label} | {wall:.2f} | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
