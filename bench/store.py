#!/usr/bin/env python3
"""Store benchmark: push and pull of one image to a loopback registry, side by side with
`skopeo copy` of the same OCI layout, and the cost of a second (no-op) push.

    python3 bench/store.py [--size-mb 1024] [--repeat 1] [--workdir DIR] [--chunk-mb 64]

Starts its own docker-registry on a free 127.0.0.1 port (storage under --workdir) and
stops it by pid at the end.  Each push goes to a fresh repository, so every upload
really sends the bytes -- except skopeo's with --repeat > 1: skopeo remembers where it
put a blob (its blob-info cache) and mounts it across repositories of the same registry.
See docs/store.md for the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyimg.store import ops  # noqa: E402
from pyimg.store.registry import RegistryStore  # noqa: E402
from tests.store.conftest import _start, _stop, make_image  # noqa: E402


def timed(fn: object, *args: object, **kwargs: object) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - started, result


def skopeo(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(["skopeo", *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pyimg-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building a {args.size_mb} MB image in {work} ...", file=sys.stderr)
    img_dir = work / f"img-{uuid.uuid4().hex[:6]}"
    img_dir.mkdir()
    image = make_image(img_dir, "bench", size=args.size_mb << 20)
    mb = image.size / 1e6
    reg = _start(work / f"reg-{uuid.uuid4().hex[:6]}")
    opts = ops.StoreOptions(chunk_size=args.chunk_mb << 20)
    rows: dict[str, list[float]] = {}
    try:
        layout = work / "layout"
        t, _ = timed(ops.push, image.path, f"oci:{layout}:v1")
        rows.setdefault("pyimg push → OCI layout", []).append(t)
        for _ in range(args.repeat):
            repo = reg.repo()
            t, _ = timed(ops.push, image.path, f"{repo}:v1", options=opts)
            rows.setdefault("pyimg push → registry", []).append(t)
            out = work / "pulled.sqfs"
            t, _ = timed(ops.pull, f"{repo}:v1", str(out), options=opts)
            rows.setdefault("pyimg pull ← registry", []).append(t)
            out.unlink()
            repo2 = reg.repo()
            rows.setdefault("skopeo copy oci: → registry", []).append(
                skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{repo2}:v1")
            )
            dest = work / f"skopeo-{uuid.uuid4().hex[:6]}"
            rows.setdefault("skopeo copy registry → oci:", []).append(
                skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{repo}:v1", f"oci:{dest}:v1")
            )
            shutil.rmtree(dest)
            # the second push of the same image: in process, and the whole command
            store = ops.open_store(f"{repo}:v1", opts)
            assert isinstance(store, RegistryStore)
            heads = []
            for _ in range(5):
                started = time.perf_counter()
                store.blob_exists(ops.load_local_image(image.path).sha256)
                heads.append(time.perf_counter() - started)
            store.close()
            rows.setdefault("one HEAD (median of 5)", []).append(statistics.median(heads))
            t, again = timed(ops.push, image.path, f"{repo}:v1", options=opts)
            assert again.bytes_uploaded == 0 and not again.manifest_uploaded  # type: ignore[attr-defined]
            rows.setdefault("second push, in process (4 HEADs)", []).append(t)
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "pyimg.cli", "push", image.path, f"{repo}:v1"],
                check=True,
                capture_output=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            rows.setdefault("second push, `pyimg push` command", []).append(time.perf_counter() - started)
    finally:
        _stop(reg.proc)
    print(f"\nimage: {image.size} bytes ({mb:.0f} MB), chunk {args.chunk_mb} MiB, repeat {args.repeat}\n")
    print("| operation | wall s (median) | MB/s |")
    print("|---|---|---|")
    for name, values in rows.items():
        t = statistics.median(values)
        rate = f"{mb / t:.0f}" if "HEAD" not in name and "second" not in name else "—"
        print(f"| {name} | {t:.3f} | {rate} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
