"""Fuzzing the inputs pyimg parses: tar archives, spec files, CLI values.

A finding is any exception that is not a PyImgError, and any image the oracle
rejects.  Each target (tar: half per format) runs for a time budget (PYIMG_FUZZ_SECONDS, default 20 s;
CI sets 60) over a seeded sequence of inputs, so a run is repeatable and a failure
prints the seed and the case to reproduce it:

    PYIMG_FUZZ_SECONDS=600 PYIMG_FUZZ_SEED=7 python3 -m pytest tests/test_fuzz.py

Mutations are byte-level (flips, truncations, runs of junk, copied blocks) of valid
archives written by Python's tarfile in every format and compression pyimg reads,
and structured (random keys, types and strings) for the spec and the CLI values.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

import pyimg
from pyimg.errors import PyImgError
from pyimg.options import SourceSpec
from pyimg.spec import merge_options, options_from_spec
from tests.oracles import require_tool

BUDGET = float(os.environ.get("PYIMG_FUZZ_SECONDS", "60" if os.environ.get("CI") == "true" else "20"))
SEED = int(os.environ.get("PYIMG_FUZZ_SEED", "20261201"))


def _cases(
    label: str, make: Callable[[random.Random], Any], budget: float = BUDGET
) -> Iterator[tuple[int, Any]]:
    """(case number, case) for `budget` seconds, each case from its own seeded RNG."""
    deadline = time.monotonic() + budget
    n = 0
    while time.monotonic() < deadline or n < 20:
        rng = random.Random(f"{SEED}:{label}:{n}")
        yield n, make(rng)
        n += 1


# ----------------------------------------------------------------------------- tar


def _valid_tar(rng: random.Random) -> bytes:
    fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        names: list[str] = []
        for i in range(rng.randint(1, 8)):
            kind = rng.choice("ffffdlhs")
            long = "x" * rng.randint(1, 120 if fmt != tarfile.USTAR_FORMAT else 90)
            name = rng.choice(["a", "b", "dir", long, "é", "d/e"]) + str(i)
            info = tarfile.TarInfo(name)
            info.mtime = rng.choice([0, 1_700_000_000] + ([2**33] if fmt != tarfile.USTAR_FORMAT else []))
            info.mode = rng.choice([0o644, 0o755, 0o4755, 0o000])
            info.uid, info.gid = rng.choice([(0, 0), (1000, 1000), (65534, 65534)])
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3:
                info.pax_headers = {"SCHILY.xattr.user.k": "v" * rng.randint(0, 50)}
            data = b""
            if kind == "f":
                data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000]))
                info.size = len(data)
            elif kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "l" and names:
                info.type, info.linkname = tarfile.LNKTYPE, rng.choice(names)
            else:
                info.type, info.linkname = tarfile.SYMTYPE, rng.choice(["target", "../up", "/abs"])
            tar.addfile(info, io.BytesIO(data) if kind == "f" else None)
            if kind == "f":
                names.append(name)
    return out.getvalue()


def _compress(data: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(data, mtime=0)
    if how == "xz":
        return lzma.compress(data)
    if how == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "truncate", "junk", "copy", "zero"])
        if not buf:
            break
        at = rng.randrange(len(buf))
        if op == "flip":
            buf[at] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            del buf[at:]
        elif op == "junk":
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == "copy":
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start : start + rng.randint(1, 1024)]
        else:
            buf[at : at + rng.randint(1, 600)] = bytes(min(600, len(buf) - at))
    return bytes(buf)


def _tar_case(rng: random.Random) -> tuple[str, bytes]:
    """(compression, bytes): a valid archive, its tar bytes mutated, then compressed;
    or its compressed stream mutated.  A few are left valid."""
    how = rng.choice(["", "", "gz", "xz", "zst"])
    tar = _valid_tar(rng)
    roll = rng.random()
    if roll < 0.1:
        return how, _compress(tar, how)
    if how and roll < 0.5:
        return how, _mutate(_compress(tar, how), rng)
    return how, _compress(_mutate(tar, rng), how)


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_fuzz_tar_source(tmp_path: Path, fmt: str) -> None:
    unsquashfs = require_tool("unsquashfs")
    e2fsck = require_tool("e2fsck")
    suffix = {"": ".tar", "gz": ".tar.gz", "xz": ".tar.xz", "zst": ".tar.zst"}
    checked = 0
    for n, (how, data) in _cases(f"tar-{fmt}", _tar_case, BUDGET / 2):
        archive = tmp_path / f"case{suffix[how]}"
        archive.write_bytes(data)
        out = tmp_path / "img"
        try:
            pyimg.build([str(archive)], str(out), format=fmt, epoch=0, jobs=1)
        except PyImgError:
            assert not out.exists(), f"case {n}: an error left an image"
            assert archive.read_bytes() == data, f"case {n}: the input changed"
            continue
        except Exception as exc:  # a finding
            keep = tmp_path.parent / f"finding-{fmt}-{n}{suffix[how]}"
            keep.write_bytes(data)
            raise AssertionError(f"case {n} (seed {SEED}, kept at {keep}): {exc!r}") from exc
        if fmt == "squashfs":
            proc = subprocess.run(
                [unsquashfs, "-lln", str(out)], capture_output=True, text=True, errors="replace"
            )
        else:
            proc = subprocess.run(
                [e2fsck, "-fn", str(out)], capture_output=True, text=True, errors="replace",
                env={"E2FSCK_CONFIG": "/dev/null"},
            )  # fmt: skip
        assert proc.returncode == 0, f"case {n}: the oracle rejects the image: {proc.stdout}{proc.stderr}"
        checked += 1
        out.unlink()
    assert checked > 0  # some mutations leave a valid archive: those images were checked


# ----------------------------------------------------------------------------- spec and CLI values

_SPEC_KEYS = ["output", "format", "jobs", "manifest", "source", "policy", "squashfs", "ext4", "bogus"]
_TABLE_KEYS = {
    "policy": ["owner", "uid_map", "gid_map", "epoch", "exclude", "x"],
    "squashfs": ["compression", "block_size", "fragments", "dedup", "x"],
    "ext4": ["size", "headroom", "journal", "features", "uuid", "dedup", "label", "x"],
    "source": ["path", "kind", "dest", "mode", "uid", "gid", "x"],
}


def _value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "bool", "float", "list", "table", "text"]
    kind = rng.choice(kinds if depth < 2 else [*kinds[:4], "text"])
    if kind == "str":
        return rng.choice(["", "auto", "zstd:3", "gzip:99", "128K", "-1", "1:2", "+x", "a\x00b", "é", "/"])
    if kind == "int":
        return rng.choice([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**64, 4096, 10**20])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.choice([0.5, float("inf"), float("nan"), -0.0])
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "table":
        return {rng.choice(["1000", "a", "", "0"]): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 20)))


def _spec_case(rng: random.Random) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": [{"path": "r"}]}
    for key in rng.sample(_SPEC_KEYS, rng.randint(0, 5)):
        if key in _TABLE_KEYS and rng.random() < 0.8:
            table = {k: _value(rng) for k in rng.sample(_TABLE_KEYS[key], rng.randint(0, 3))}
            spec[key] = [table] if key == "source" else table
        else:
            spec[key] = _value(rng)
    return spec


def test_fuzz_spec() -> None:
    for n, spec in _cases("spec", _spec_case):
        try:
            options = options_from_spec(spec, "/base")
            merge_options(options, output="/o")
        except PyImgError:
            continue
        except Exception as exc:
            raise AssertionError(f"case {n} (seed {SEED}): {spec!r}: {exc!r}") from exc


_CLI_NAMES = ["compression", "block_size", "size", "headroom", "journal", "features", "uuid", "label",
              "owner", "epoch", "exclude", "format", "jobs", "fragments", "dedup"]  # fmt: skip


def _cli_case(rng: random.Random) -> dict[str, Any]:
    return {name: _value(rng) for name in rng.sample(_CLI_NAMES, rng.randint(1, 4))}


def test_fuzz_cli_values() -> None:
    for n, given in _cases("cli", _cli_case):
        try:
            merge_options(None, sources=[SourceSpec("/r")], output="/o", **given)
        except PyImgError:
            continue
        except Exception as exc:
            raise AssertionError(f"case {n} (seed {SEED}): {given!r}: {exc!r}") from exc
