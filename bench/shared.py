#!/usr/bin/env python3
"""A fresh CI runner warm from the shared build cache (docs/cache.md, "The shared cache").

    python3 bench/shared.py [--workloads real,small] [--scale 0.5] [--jobs N] [--format squashfs]

For each workload tree of run.py: a clean build (--no-cache); runner A with an empty
local cache and `--cache 127.0.0.1:PORT/cache` (a real docker-registry started on
loopback for the run, stopped after): a cold build that exports its entries; then
runner B with another empty local cache, which builds warm from what A pushed; then
runner B again (its local cache now warm).  Each image is compared with the clean
one, byte for byte.  Wall and CPU seconds as run.py measures them.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py

REPO = Path(__file__).resolve().parents[1]


def start_registry(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        sys.exit("docker-registry is not installed (apt install docker-registry)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    quiet = subprocess.DEVNULL
    argv = [binary, "serve", str(config)]
    proc = subprocess.Popen(argv, stdout=quiet, stderr=quiet, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    sys.exit("docker-registry did not start")


def build(rows: list[tuple[str, str, float, float]], name: str, tree: Path, common: list[str], clean: Path,
          label: str, out: Path, local: Path | None, *flags: str) -> None:  # fmt: skip
    """One build, measured; every image but the clean one is compared with it."""
    env = {"PYTHONPATH": str(REPO)}
    if local is not None:
        env["PYIMG_BUILD_CACHE"] = str(local)
    argv = [sys.executable, "-m", "pyimg.cli", "build", str(tree), "-o", str(out), *common, *flags]
    sample = run.run_once(argv, env, out)
    if out != clean:
        assert filecmp.cmp(out, clean, shallow=False), f"{name}, {label}: not the clean image"
    rows.append((name, label, sample.wall_s, sample.cpu_s))
    print(f"  {name:<6} {label:<36} {sample.wall_s:6.2f} s wall {sample.cpu_s:6.2f} s CPU", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="real,small")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--format", default="squashfs", choices=("squashfs", "ext4"))
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    workloads = args.workloads.split(",")
    workdir = args.workdir or run.default_workdir(workloads, args.scale)
    run.compile_pyimg()
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        scratch = Path(tmp)
        proc, host = start_registry(scratch)
        try:
            for name in workloads:
                tree = run.ensure_workload(name, args.scale, workdir)
                run.warm_cache(tree)
                remote = ["--cache", f"{host}/cache-{name}"]
                common = ["--format", args.format, "--epoch", "0", "--owner", "root", "-q"]
                common += ["--jobs", str(args.jobs)]
                clean = scratch / f"{name}-clean"
                a, b = scratch / f"{name}-local-a", scratch / f"{name}-local-b"
                at = (rows, name, tree, common, clean)
                build(*at, "clean (--no-cache)", clean, None, "--no-cache")
                build(*at, "runner A: cold, exports", scratch / "a", a, *remote)
                build(*at, "runner B: fresh, from the registry", scratch / "b", b, *remote)
                build(*at, "runner B again: local cache warm", scratch / "b", b, *remote)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
    print("\n| workload | build | wall s | CPU s | / clean |\n|---|---|---|---|---|")
    clean_wall = {name: wall for name, label, wall, _ in rows if label.startswith("clean")}
    for name, label, wall, cpu in rows:
        print(f"| {name} | {label} | {wall:.2f} | {cpu:.2f} | {wall / clean_wall[name]:.2f} |")


if __name__ == "__main__":
    main()
