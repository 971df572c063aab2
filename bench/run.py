#!/usr/bin/env python3
"""Benchmark pyimg against its peers (mksquashfs, gensquashfs, mkfs.ext4 -d).

Standard library only.  Usage:

    python3 bench/run.py [--workloads real,small,large,dups] [--scale 1.0]
                         [--format squashfs|ext4|all] [--repeat 3]
                         [--workdir DIR] [--jobs N] [--level 3] [--tools a,b]
                         [--no-warm]

Workload trees are generated once (deterministically, from fixed seeds) under
--workdir and reused on later runs; a stamp file next to each tree records the
parameters it was made with.  Every image is written to a fresh path on the
same filesystem as the trees and deleted right after it has been measured.
On `real` and `small`, pyimg's rows are followed by its rebuilds with a build cache
(cold, then warm: no change, one changed 4 KiB file, 1 % of the files changed), each
checked to be the clean build's image and compared with the peers' clean builds;
--no-warm skips them.  See bench/README.md and docs/bench.md for the method.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import filecmp
import json
import os
import platform
import random
import shutil
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"  # gitignored (/bench/out/)

# Bump when a generator changes, so stale trees under --workdir are rebuilt.
GENERATOR_VERSION = 1

# Fixed identifiers so that mkfs.ext4 output is reproducible (like pyimg's).
FIXED_UUID = "5e1d0c0a-0000-4000-8000-000000000001"
FIXED_HASH_SEED = "5e1d0c0a-0000-4000-8000-000000000002"

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30

ALL_WORKLOADS = ("real", "small", "large", "dups")


# --------------------------------------------------------------------------
# Result records
# --------------------------------------------------------------------------


@dataclass
class Sample:
    """One measured run of one tool."""

    wall_s: float
    cpu_s: float  # user + sys of the child and the descendants it reaped
    peak_rss_kib: int  # ru_maxrss: the largest single process, not a sum
    image_bytes: int  # st_size of the output
    alloc_bytes: int  # st_blocks * 512 (matters for sparse ext4 images)


@dataclass
class Result:
    """All runs of one tool on one workload, plus their medians."""

    workload: str
    tool: str
    fmt: str
    status: str = "ok"  # ok | FAILED | not installed
    command: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    error_tail: str = ""

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


@dataclass
class TreeStats:
    entries: int = 0  # every inode to create: dirs, files, symlinks
    files: int = 0
    apparent_bytes: int = 0
    alloc_bytes: int = 0  # data blocks actually allocated (holes excluded)


# --------------------------------------------------------------------------
# Content helpers
# --------------------------------------------------------------------------


def make_text_pool(seed: int, size: int) -> bytes:
    """A block of text-like bytes (Zipf-ish words, numbers, punctuation).

    Generating text word by word in Python is slow, so files take slices of
    this pool at random offsets instead.  Offsets are not block aligned, so no
    two 128 KiB blocks are equal by accident (that would flatter tools that
    deduplicate blocks).  zstd -3 compresses it about 3:1.
    """
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    vocab += [str(rng.randint(0, 99999)) for _ in range(500)]
    vocab += ["=", "(", ")", "{", "}", ";", ":", "def", "return", "\n", "\n    "]
    cum, total = [], 0.0
    for rank in range(len(vocab)):
        total += 1.0 / (rank + 1)
        cum.append(total)
    words = rng.choices(vocab, cum_weights=cum, k=size // 5 + 1)
    return " ".join(words).encode()[:size]


def text_bytes(rng: random.Random, pool: bytes, size: int) -> bytes:
    """`size` compressible bytes: pool slices of at most 1 MiB each."""
    parts, left = [], size
    while left > 0:
        n = min(left, MiB, len(pool) // 2)
        off = rng.randrange(0, len(pool) - n)
        parts.append(pool[off : off + n])
        left -= n
    return b"".join(parts)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------
# Workload generators.  Each gets (root, scale) and fills root.
# --------------------------------------------------------------------------


def python_lib_dir() -> Path:
    """The Python installation's lib directory (parent of the stdlib)."""
    return Path(sysconfig.get_paths()["stdlib"]).parent


def gen_real(root: Path, scale: float) -> None:
    """A real tree: the Python lib directory, ~1 GB or more at scale 1.

    At scale 1 the whole directory is copied, plus replicas if it is smaller
    than 1 GB.  At smaller scales a stable, hash-chosen fraction of the files
    is copied, so the mix of file kinds and sizes stays representative.
    """
    src = python_lib_dir()
    total = tree_stats(src).apparent_bytes
    fraction = scale * max(1.0, 1e9 / max(total, 1))
    copy_no = 0
    while fraction > 0:
        dest = root if copy_no == 0 else root / f"replica-{copy_no}"
        copy_sample(src, dest, min(fraction, 1.0))
        fraction -= 1.0
        copy_no += 1


def copy_sample(src: Path, dest: Path, fraction: float) -> None:
    """Copy files of src whose crc32(relative path) falls under `fraction`."""
    limit = int(fraction * 2**32)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        for name in sorted(filenames):
            rel = rel_dir / name
            if fraction < 1.0 and zlib.crc32(str(rel).encode()) >= limit:
                continue
            s, d = src / rel, dest / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            elif s.is_file():  # skip sockets, fifos and the like
                shutil.copyfile(s, d)
                shutil.copymode(s, d)


def gen_small(root: Path, scale: float) -> None:
    """100k small files (512 B - 7.5 KiB, avg 4 KiB) in ~1000 dirs: ~409 MB."""
    rng = random.Random(1001)
    pool = make_text_pool(1002, 32 * MiB)
    n_files = max(1, int(100_000 * scale))
    n_dirs = max(1, int(1000 * scale))
    for i in range(n_files):
        size = rng.randint(512, 7680)
        # ~10 % binary-ish files: half random bytes, half text.
        if rng.random() < 0.1:
            data = rng.randbytes(size // 2) + text_bytes(rng, pool, size - size // 2)
        else:
            data = text_bytes(rng, pool, size)
        d = rng.randrange(n_dirs)
        write_file(root / f"d{d // 32:02d}" / f"d{d:04d}" / f"f{i:06d}.txt", data)


def gen_large(root: Path, scale: float) -> None:
    """~1.2 GB of large files, half compressible and half not, plus a 1 GiB
    sparse file holding only a few data blocks."""
    rng = random.Random(2001)
    pool = make_text_pool(2002, 32 * MiB)
    each = max(MiB, int(150 * MB * scale))
    for i in range(4):
        write_file(root / "text" / f"log{i}.txt", text_bytes(rng, pool, each))
    for i in range(4):
        write_file(root / "random" / f"blob{i}.bin", rng.randbytes(each))
    # The sparse file: mostly hole.  Tools that read the hole pay for it.
    sparse_size = max(16 * MiB, int(GiB * scale))
    path = root / "sparse" / "disk.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(sparse_size)
        for k in range(4):
            f.seek(k * (sparse_size // 4))
            f.write(rng.randbytes(64 * 1024))


def gen_dups(root: Path, scale: float) -> None:
    """Half the files duplicate the other half (other names, other dirs):
    2000 originals with log-normal sizes totalling ~264 MB, then copies."""
    rng = random.Random(3001)
    pool = make_text_pool(3002, 32 * MiB)
    n = max(2, int(2000 * scale))
    raw = [min(max(rng.lognormvariate(11, 1.5), 1024), 8 * MiB) for _ in range(n)]
    factor = (264 * MB * scale) / sum(raw)
    for i, r in enumerate(raw):
        size = max(1, int(r * factor))
        data = text_bytes(rng, pool, size) if rng.random() < 0.7 else rng.randbytes(size)
        write_file(root / "orig" / f"d{i % 50:02d}" / f"file{i:05d}.dat", data)
        write_file(root / "copy" / f"c{(i * 7) % 50:02d}" / f"dup{i:05d}.dat", data)


GENERATORS = {"real": gen_real, "small": gen_small, "large": gen_large, "dups": gen_dups}

# Rough source sizes at scale 1, to choose a workdir with room.
EST_BYTES = {"real": 1500 * MB, "small": 500 * MB, "large": 1300 * MB, "dups": 550 * MB}


def ensure_workload(name: str, scale: float, workdir: Path) -> Path:
    """Generate the tree unless a matching stamp says it is already there.

    The stamp lives next to the tree, not inside it, so it is not packed.
    """
    root = workdir / f"{name}-s{scale:g}"
    stamp = workdir / f"{name}-s{scale:g}.stamp"
    want = {"workload": name, "scale": scale, "version": GENERATOR_VERSION}
    if name == "real":
        want["source"] = str(python_lib_dir())
    if stamp.exists() and root.is_dir():
        try:
            if json.loads(stamp.read_text()) == want:
                return root
        except ValueError:
            pass
    stamp.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"[{name}] generating tree at scale {scale:g} in {root} ...", flush=True)
    t0 = time.perf_counter()
    root.mkdir(parents=True)
    GENERATORS[name](root, scale)
    stamp.write_text(json.dumps(want))
    print(f"[{name}] generated in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


# --------------------------------------------------------------------------
# Tree inspection and cache warming
# --------------------------------------------------------------------------


def tree_stats(root: Path) -> TreeStats:
    st = TreeStats(entries=1)  # the root directory itself
    for dirpath, dirnames, filenames in os.walk(root):
        st.entries += len(dirnames) + len(filenames)
        for name in filenames:
            s = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(s.st_mode):
                st.files += 1
                st.apparent_bytes += s.st_size
                st.alloc_bytes += s.st_blocks * 512
    return st


def warm_cache(root: Path) -> None:
    """Read every file once so that no tool pays for the first cold read.

    Holes are skipped with SEEK_DATA: reading a 1 GiB hole would only waste
    time (and tmpfs holes are memory-free anyway).
    """
    buf = bytearray(MiB)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb", buffering=0) as f:
                read_data(f, buf)


def read_data(f, buf: bytearray) -> None:
    fd, end = f.fileno(), os.fstat(f.fileno()).st_size
    pos = 0
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        while pos < hole:
            n = f.readinto(memoryview(buf)[: min(len(buf), hole - pos)])
            if not n:
                return
            pos += n


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    fmt: str  # squashfs | ext4
    binary: str | None  # resolved path, None if not installed


def find_pyimg() -> str | None:
    # Prefer the script next to this interpreter: the pyenv shim on PATH
    # would add ~100 ms of bash to every measurement.
    beside = Path(sys.executable).parent / "pyimg"
    if beside.exists():
        return str(beside)
    return shutil.which("pyimg")


def compile_pyimg() -> None:
    """Byte-compile the pyimg package that the runs import, as pip does when it
    installs one.  Where PYTHONDONTWRITEBYTECODE is set (as on some CI hosts) no
    .pyc is ever written, and every pyimg run compiled its ~60 modules again: ~0.4 s
    per row that no installed pyimg, and no peer (C programs), pays."""
    where = subprocess.run(
        [sys.executable, "-c", "import os, pyimg; print(os.path.dirname(pyimg.__file__))"],
        capture_output=True, text=True,
    )  # fmt: skip
    if where.returncode == 0 and where.stdout.strip():
        subprocess.run([sys.executable, "-m", "compileall", "-q", where.stdout.strip()], capture_output=True)


def find_tool(name: str) -> str | None:
    if name == "pyimg":
        return find_pyimg()
    # mkfs.ext4 lives in /sbin, which may be missing from PATH.
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")


def all_tools(fmt: str) -> list[Tool]:
    specs = []
    if fmt in ("squashfs", "all"):
        specs += [("pyimg", "squashfs"), ("mksquashfs", "squashfs"), ("gensquashfs", "squashfs")]
    if fmt in ("ext4", "all"):
        specs += [("pyimg", "ext4"), ("mkfs.ext4", "ext4")]
    return [Tool(n, f, find_tool(n)) for n, f in specs]


def ext4_size(stats: TreeStats) -> int:
    """A generous image size for mkfs.ext4 -d, which cannot size itself.

    Every file takes whole 4 KiB blocks, every directory at least one block,
    every inode 256 bytes; then 30 % + 16 MiB for metadata and slack.  Holes
    are not counted: mkfs.ext4 -d keeps them.  The file is sparse on tmpfs,
    so being generous costs nothing; compare allocated sizes, not st_size.
    """
    data = stats.alloc_bytes + stats.files * 4096 + (stats.entries - stats.files) * 4096
    size = int((data + stats.entries * 256) * 1.3) + 16 * MiB
    return (size + MiB - 1) // MiB * MiB


def build_command(
    tool: Tool, src: Path, out: Path, stats: TreeStats, args: argparse.Namespace
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one run.  Keep in sync with docs/bench.md."""
    n, lvl = str(args.jobs), str(args.level)
    if tool.name == "pyimg":
        argv = [tool.binary, "build", str(src), "-o", str(out), "--format", tool.fmt]
        if tool.fmt == "squashfs":
            argv += ["--compression", f"zstd:{lvl}", "--block-size", "128K"]
        # --no-cache: every row is a clean build (the CLI's build cache is on by default).
        return [*argv, "--jobs", n, "--epoch", "0", "--owner", "root", "--no-cache"], {}
    if tool.name == "mksquashfs":
        return [
            tool.binary,
            str(src),
            str(out),
            "-comp",
            "zstd",
            "-Xcompression-level",
            lvl,
            "-b",
            "131072",
            "-processors",
            n,
            "-all-root",
            "-noappend",
            "-no-progress",
            "-quiet",
        ], {}
    if tool.name == "gensquashfs":
        return [
            tool.binary,
            "--pack-dir",
            str(src),
            "--compressor",
            "zstd",
            "--comp-extra",
            f"level={lvl}",
            "--block-size",
            "131072",
            "--num-jobs",
            n,
            "--all-root",
            "--force",
            "--quiet",
            str(out),
        ], {}
    if tool.name == "mkfs.ext4":
        # -N: the default inode ratio runs out on 100k small files.
        # ^has_journal: pyimg writes no journal, compare like for like.
        inodes = int(stats.entries * 1.05) + 256
        size_kib = ext4_size(stats) // 1024
        return [
            tool.binary,
            "-q",
            "-F",
            "-d",
            str(src),
            "-U",
            FIXED_UUID,
            "-E",
            f"hash_seed={FIXED_HASH_SEED},root_owner=0:0",
            "-N",
            str(inodes),
            "-b",
            "4096",
            "-I",
            "256",
            "-O",
            "^has_journal",
            str(out),
            f"{size_kib}k",
        ], {"E2FSPROGS_FAKE_TIME": "0"}
    raise ValueError(tool.name)


def prepare_output(tool: Tool, out: Path, argv: list[str]) -> None:
    """A fresh output path; mkfs.ext4 needs the file to exist at its size."""
    if out.exists():
        out.unlink()
    if tool.name == "mkfs.ext4":
        with open(out, "wb") as f:
            f.truncate(int(argv[-1].rstrip("k")) * 1024)


# Peak RSS needs care: Linux carries the pre-exec hiwater RSS of a process
# into its ru_maxrss, and a child forked (or vforked) straight from this
# script would inherit this script's peak RSS (the generators make it large).
# So a tiny interpreter started with -I -S forks the tool itself, waits for it
# with os.wait4 and reports that child's rusage alone.  Its floor is ~5 MB
# (max, not sum: only a tool smaller than that is misreported).  Timing the
# wall clock in the launcher also keeps Python's start-up out of it.
LAUNCHER = r"""
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        os.write(2, f"exec {sys.argv[2]}: {e}\n".encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(repr((wall, os.waitstatus_to_exitcode(status),
                  ru.ru_utime + ru.ru_stime, ru.ru_maxrss)))
"""


class RunFailed(Exception):
    pass


def run_once(argv: list[str], env: dict[str, str], out: Path) -> Sample:
    """Run one build through LAUNCHER and measure the tool's process alone
    (its CPU time includes the descendants it reaped, e.g. worker processes).

    stdout/stderr go to a temporary file (not a pipe: nothing to drain, and
    the tail is there to show if the run fails).
    """
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r", suffix=".rusage") as report:
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, report.name]
        proc = subprocess.run(
            launcher + argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **env}
        )
        text = report.read()
        wall, code, cpu, maxrss = ast.literal_eval(text) if text else (0, -1, 0, 0)
        if proc.returncode != 0 or code != 0 or not out.exists():
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-15:]
            raise RunFailed(f"exit {code}\n" + "\n".join(tail))
    st = out.stat()
    return Sample(
        wall_s=wall, cpu_s=cpu, peak_rss_kib=maxrss, image_bytes=st.st_size, alloc_bytes=st.st_blocks * 512
    )


def measure(
    tool: Tool, workload: str, src: Path, stats: TreeStats, outdir: Path, args: argparse.Namespace
) -> Result:
    res = Result(workload=workload, tool=tool.name, fmt=tool.fmt)
    if tool.binary is None:
        res.status = "not installed"
        return res
    out = outdir / f"{workload}-{tool.name}-{tool.fmt}.img"
    argv, env = build_command(tool, src, out, stats, args)
    res.command = [f"{k}={v}" for k, v in env.items()] + argv
    for i in range(args.repeat):
        prepare_output(tool, out, argv)
        try:
            res.samples.append(run_once(argv, env, out))
        except (RunFailed, OSError) as e:
            res.status, res.error_tail = "FAILED", str(e)
            break  # a failing tool would only fail again: move on
        finally:
            out.unlink(missing_ok=True)
        s = res.samples[-1]
        print(
            f"  {tool.name:<12} {tool.fmt:<9} run {i + 1}: {s.wall_s:7.2f} s  {s.image_bytes / MB:9.1f} MB",
            flush=True,
        )
    if res.status == "FAILED":
        print(
            f"  {tool.name:<12} {tool.fmt:<9} FAILED:\n    " + res.error_tail.replace("\n", "\n    "),
            flush=True,
        )
    return res


# --------------------------------------------------------------------------
# Warm rebuilds (pyimg's build cache, docs/cache.md)
# --------------------------------------------------------------------------

WARM_WORKLOADS = ("real", "small")  # the issue's: trees of many files, where CI rebuilds happen


def regular_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def change_one_4k_file(root: Path, round_no: int) -> None:
    """Rewrite the file whose size is nearest 4 KiB (new bytes each round)."""
    target = min(regular_files(root), key=lambda p: (abs(p.stat().st_size - 4096), str(p)))
    target.write_bytes(random.Random(round_no).randbytes(target.stat().st_size))


def change_one_percent(root: Path, round_no: int) -> None:
    """Change the first byte of every 100th file (a different byte each round)."""
    for path in regular_files(root)[::100]:
        with open(path, "r+b") as f:
            if f.read(1):
                f.seek(0)
                f.write(bytes([round_no % 256]))


def measure_warm(tool: Tool, workload: str, src: Path, stats: TreeStats, outdir: Path,
                 args: argparse.Namespace) -> list[Result]:  # fmt: skip
    """pyimg's rebuilds with a build cache: cold (an empty cache), then warm with no
    change, after one changed 4 KiB file, after 1 % of the files changed.  Each
    warm image is checked against a clean build of the same tree, byte for byte."""
    scratch = outdir / f"warm-{workload}-{tool.fmt}"
    shutil.rmtree(scratch, ignore_errors=True)
    tree, cache = scratch / "src", scratch / "cache"
    shutil.copytree(src, tree, symlinks=True)
    time.sleep(2.5)  # older than the stat cache's racy window: as a CI checkout is
    out, clean = scratch / "img", scratch / "clean"
    argv, env = build_command(tool, tree, out, stats, args)
    argv = [a for a in argv if a != "--no-cache"] + ["--cache", str(cache)]
    clean_argv, _ = build_command(tool, tree, clean, stats, args)
    rows = [("cold cache", None, 1), ("warm, no change", None, args.repeat),
            ("warm, one 4 KiB file changed", change_one_4k_file, args.repeat),
            ("warm, 1% of files changed", change_one_percent, args.repeat)]  # fmt: skip
    results = []
    try:
        for label, change, runs in rows:
            res = Result(workload=workload, tool=f"pyimg ({label})", fmt=tool.fmt, command=argv)
            for i in range(runs):
                if change is not None:
                    change(tree, i + 1)
                try:
                    res.samples.append(run_once(argv, env, out))
                except (RunFailed, OSError) as e:
                    res.status, res.error_tail = "FAILED", str(e)
                    break
                wall = res.samples[-1].wall_s
                print(f"  {res.tool:<40} {tool.fmt:<9} run {i + 1}: {wall:7.2f} s", flush=True)
            if res.status == "ok":
                run_once(clean_argv, env, clean)
                if not filecmp.cmp(out, clean, shallow=False):
                    res.status = "FAILED"
                    res.error_tail = "the warm image is not the clean build's"
            results.append(res)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

HEADER = [
    "tool",
    "format",
    "wall s",
    "CPU s",
    "peak RSS MB",
    "image MB",
    "alloc MB",
    "wall / best peer",
    "size / best peer",
]


def table_rows(results: list[Result]) -> list[list[str]]:
    """One row per tool.  Ratios compare with the best *peer* of the same
    format (pyimg excluded), so pyimg's row reads "pyimg / best peer".
    Size ratios use allocated bytes: an ext4 image from mkfs.ext4 is only as
    large as we chose to make it, its allocated size is what it costs."""
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.tool, r.fmt, r.status] + [""] * (len(HEADER) - 3))
            continue
        peers = [p for p in results if p.fmt == r.fmt and not p.tool.startswith("pyimg") and p.status == "ok"]
        best_wall = min((p.median("wall_s") for p in peers), default=None)
        best_size = min((p.median("alloc_bytes") for p in peers), default=None)
        rows.append(
            [
                r.tool,
                r.fmt,
                f"{r.median('wall_s'):.2f}",
                f"{r.median('cpu_s'):.2f}",
                f"{r.median('peak_rss_kib') / 1024:.0f}",
                f"{r.median('image_bytes') / MB:.1f}",
                f"{r.median('alloc_bytes') / MB:.1f}",
                f"{r.median('wall_s') / best_wall:.2f}" if best_wall else "-",
                f"{r.median('alloc_bytes') / best_size:.2f}" if best_size else "-",
            ]
        )
    return rows


def print_table(title: str, results: list[Result]) -> None:
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    print(f"\n== {title}")
    for k, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


def markdown(titles: dict[str, str], results: list[Result]) -> str:
    lines = []
    for wl, title in titles.items():
        lines += [f"### {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for row in table_rows([r for r in results if r.workload == wl]):
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def tool_versions() -> dict[str, str]:
    probes = {
        "mksquashfs": ["mksquashfs", "-version"],
        "gensquashfs": ["gensquashfs", "--version"],
        "mkfs.ext4": ["mkfs.ext4", "-V"],
        "pyimg": ["pyimg", "--version"],
    }
    versions = {}
    for name, argv in probes.items():
        binary = find_tool(name)
        if binary is None:
            versions[name] = "not installed"
            continue
        try:
            p = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=30)
            text = (p.stdout or p.stderr).strip().splitlines()
            versions[name] = text[0] if p.returncode == 0 and text else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "unknown"
    return versions


def write_json(args, titles, results, versions) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "versions": versions,
        "workloads": titles,
        "results": [
            dataclasses.asdict(r)
            | {
                "median": {
                    a: r.median(a) for a in ("wall_s", "cpu_s", "peak_rss_kib", "image_bytes", "alloc_bytes")
                }
                if r.samples and r.status == "ok"
                else None
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def default_workdir(workloads: list[str], scale: float) -> Path:
    """/dev/shm (tmpfs: no disk noise) if the trees plus an image fit."""
    need = sum(EST_BYTES[w] for w in workloads) * scale * 1.5 + 256 * MiB
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need:
        return shm / "pyimg-bench"
    return Path(tempfile.gettempdir()) / "pyimg-bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help="comma-separated subset of " + ",".join(ALL_WORKLOADS),
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiplies sizes and file counts (0.1 for a quick run)"
    )
    p.add_argument("--format", choices=("squashfs", "ext4", "all"), default="all")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is reported")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where trees and images go (default /dev/shm/pyimg-bench if it has room, else /tmp/pyimg-bench)",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--level", type=int, default=3, help="zstd level for squashfs")
    p.add_argument("--tools", help="comma-separated subset: pyimg,mksquashfs,gensquashfs,mkfs.ext4")
    p.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help=f"skip pyimg's warm-rebuild rows (build cache) on {', '.join(WARM_WORKLOADS)}",
    )
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in GENERATORS]
    if bad:
        p.error(f"unknown workload(s): {', '.join(bad)}")
    if args.repeat < 1 or args.scale <= 0:
        p.error("--repeat must be >= 1 and --scale > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or default_workdir(args.workloads, args.scale)
    workdir.mkdir(parents=True, exist_ok=True)
    outdir = workdir / "out"  # same filesystem as the trees
    outdir.mkdir(exist_ok=True)
    tools = all_tools(args.format)
    if args.tools:
        wanted = set(args.tools.split(","))
        tools = [t for t in tools if t.name in wanted]
    versions = tool_versions()
    compile_pyimg()
    print(
        f"workdir {workdir}; jobs {args.jobs}; zstd level {args.level}; "
        f"repeat {args.repeat}; scale {args.scale:g}"
    )
    for name, v in versions.items():
        print(f"  {name}: {v}")

    results: list[Result] = []
    titles: dict[str, str] = {}
    for wl in args.workloads:
        src = ensure_workload(wl, args.scale, workdir)
        stats = tree_stats(src)
        titles[wl] = (
            f"{wl}: {stats.files} files, {stats.entries} entries, "
            f"{stats.apparent_bytes / MB:.0f} MB apparent, "
            f"{stats.alloc_bytes / MB:.0f} MB allocated"
        )
        print(f"\n[{titles[wl]}]", flush=True)
        warm_cache(src)
        wl_results = [measure(t, wl, src, stats, outdir, args) for t in tools]
        if args.warm and wl in WARM_WORKLOADS:
            for t in tools:
                if t.name == "pyimg" and t.binary is not None:
                    wl_results += measure_warm(t, wl, src, stats, outdir, args)
        results += wl_results
        print_table(titles[wl], wl_results)

    path = write_json(args, titles, results, versions)
    print("\n---- markdown (for docs/bench.md) ----\n")
    print(markdown(titles, results))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
