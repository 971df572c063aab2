"""The local build cache (docs/cache.md): a warm build is the same image as a cold
one and as one without a cache, whatever --jobs, edits, or damage to the cache.

The property draws small trees whose files are "large" for the stream (more than
one task: CHUNK_TARGET is lowered to 16 KiB here, so a few tens of KiB take the
large-content path that the cache serves), builds them cold into a cache, edits the
tree at random (add, remove, change, rename, chmod, touch, truncate, make sparse),
then builds warm at every jobs and without a cache: one digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import pyimg
import pyimg.cache
from pyimg import hashpass
from pyimg.formats import squashfs_data

from .oracles import assert_same_tree, fix_mtimes, run_cli, unsquashfs_extract
from .test_properties import SCRATCH, remove

EPOCH = 1_700_000_000
BLOCK = 4096
SMALL_CHUNK = 16 * 1024
OPTIONS = st.fixed_dictionaries(
    {
        "fragments": st.sampled_from([True, True, False]),
        "dedup": st.sampled_from([True, True, False]),
        "compression": st.sampled_from(["zstd:3", "gzip:1"]),
    }
)


# Module constants patched for a test (unittest.mock: hypothesis's @given cannot take
# pytest's function-scoped monkeypatch).
def small_chunks(size: int = SMALL_CHUNK) -> Any:
    """Contents over `size` bytes take the large path (the cache's)."""
    return mock.patch.object(squashfs_data, "CHUNK_TARGET", size)


def racy_window(ns: int) -> Any:
    """Identities modified within `ns` of the cache's write are re-hashed."""
    return mock.patch.object(pyimg.cache, "RACY_NS", ns)


def body(kind: str, seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(size)
    if kind == "text":
        return (b"pyimg squash cache %d\n" % (seed % 7) * (size // 20 + 1))[:size]
    if kind == "mixed":  # random and zero blocks in turn: holes inside data
        out = bytearray()
        while len(out) < size:
            out += rng.randbytes(BLOCK) if len(out) // BLOCK % 2 == 0 else bytes(BLOCK)
        return bytes(out[:size])
    return rng.randbytes(size)


def sizes() -> st.SearchStrategy[int]:
    """Around the boundaries: blocks, the (lowered) task size, a tail or none; most
    over one task (the cached path), some small (their neighbours in plan order)."""

    def edge(low: int, high: int) -> st.SearchStrategy[int]:
        deltas = st.sampled_from([-1, 0, 1, 100, 2000])
        return st.builds(lambda n, d: max(0, n * BLOCK + d), st.integers(low, high), deltas)

    return st.one_of(edge(4, 24), edge(4, 24), edge(0, 4), st.integers(0, 100_000))


FileSpec = tuple[str, int, int]  # kind, seed, size
KINDS = st.sampled_from(["random", "text", "zeros", "mixed"])
FILES = st.tuples(KINDS, st.integers(0, 3), sizes())  # few seeds: duplicates happen
NAMES = st.sampled_from(["a", "b", "c", "d/e", "d/f", "d/g/h", "big", "Z"])


def write_file(path: Path, spec: FileSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body(*spec))


def write_data(path: Path, data: bytes) -> None:
    """The data with its zero blocks as holes."""
    with open(path, "wb") as f:
        for at in range(0, len(data), BLOCK):
            piece = data[at : at + BLOCK]
            if piece.count(0) != len(piece):
                f.seek(at)
                f.write(piece)
        f.truncate(len(data))


def make_tree(root: Path, files: dict[str, FileSpec]) -> None:
    root.mkdir()
    for name, spec in sorted(files.items()):
        write_file(root / name, spec)


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "change", "rename", "chmod", "touch", "truncate", "sparse"]),
        NAMES,
        FILES,
        st.integers(0, 2**31),
    ),
    max_size=5,
)


def apply_edits(root: Path, edits: list[tuple[str, str, FileSpec, int]]) -> None:
    present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    for op, name, spec, number in edits:
        target = root / (present[number % len(present)] if present and op != "add" else name)
        if op == "add" or not target.is_file():
            if not target.parent.is_file() and not target.is_dir():
                write_file(target, spec)
        elif op == "remove":
            target.unlink()
        elif op == "change":
            write_file(target, spec)
        elif op == "rename":
            new = root / (name + ".moved")
            if not new.exists() and not new.parent.is_file():
                new.parent.mkdir(parents=True, exist_ok=True)
                target.rename(new)
        elif op == "chmod":
            target.chmod(0o600 + number % 0o100)
        elif op == "touch":
            os.utime(target, (EPOCH - number % 1000, EPOCH - number % 1000))
        elif op == "truncate":
            with open(target, "r+b") as f:
                f.truncate(number % (target.stat().st_size + 1))
        elif op == "sparse":  # three blocks zeroed, written as a hole
            data = target.read_bytes()
            at = number % (-(-len(data) // BLOCK) or 1) * BLOCK
            write_data(target, data[:at] + bytes(len(data[at : at + 3 * BLOCK])) + data[at + 3 * BLOCK :])
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    import tempfile

    d = tempfile.mkdtemp(prefix="pyimg-cache-", dir=SCRATCH)
    try:
        yield Path(d)
    finally:
        remove(d)


def build(src: Path, out: Path, **kw: Any) -> pyimg.BuildResult:
    kw.setdefault("block_size", BLOCK)
    return pyimg.build([str(src)], str(out), epoch=EPOCH, **kw)


@settings(max_examples=max(20, settings.default.max_examples // 2))
@given(
    options=OPTIONS,
    files=st.dictionaries(NAMES, FILES, min_size=1, max_size=7),
    edits=EDITS,
    cold_jobs=st.sampled_from([1, 2, 4]),
    trust_stat=st.booleans(),
)
def test_warm_equals_cold_equals_uncached(
    options: dict[str, Any], files: dict[str, FileSpec], edits: Any, cold_jobs: int, trust_stat: bool
) -> None:
    note(f"{files} then {edits}")
    with scratch() as work, small_chunks():
        src, cache, img = work / "src", str(work / "cache"), work / "img"
        make_tree(src, files)
        # trust_stat: every identity is old enough for the stat cache (no racy window);
        # the edits then come a few timestamp ticks later, so an edited file's ctime moves.
        with racy_window(-(10**12) if trust_stat else pyimg.cache.RACY_NS):
            cold = build(src, img, cache=cache, jobs=cold_jobs, **options).digest
            assert cold == build(src, img, jobs=1, **options).digest
            if trust_stat:
                time.sleep(0.03)
            apply_edits(src, edits)
            digests = {}
            for jobs in (1, 2, 4):
                warm = build(src, img, cache=cache, jobs=jobs, **options)
                digests[f"warm, jobs {jobs}"] = warm.digest
                assert warm.cache is not None and not warm.warnings
                hits = warm.cache.content_hits, warm.cache.stat_hits
                event(f"content hits: {min(hits[0], 3)}, stat hits: {min(hits[1], 1)}")
        digests["no cache"] = build(src, img, jobs=2, **options).digest
    assert len(set(digests.values())) == 1, digests


# -- explicit cases ----------------------------------------------------------------------


def big_tree(root: Path, *, count: int = 4, size: int = 3 << 20) -> Path:
    """Files larger than one task at the real task size (1 MiB): the large path as it is."""
    root.mkdir()
    rng = random.Random(7)
    for i in range(count):
        (root / f"f{i}").write_bytes(rng.randbytes(size // 2) + b"text " * (size // 10) + b"end" * i)
    (root / "dup").write_bytes((root / "f0").read_bytes())
    (root / "small").write_bytes(b"small file")
    with open(root / "sparse", "wb") as f:
        f.seek(2 << 20)
        f.write(rng.randbytes(200_000))
        f.truncate(5 << 20)
    return root


ENTRIES = 8  # big_tree's: f0..f3 and sparse (dup is f0's), and its 3 fragment blocks


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.name.startswith(pyimg.cache.ENTRY_PREFIX))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return big_tree(tmp_path / "src")


def test_cold_warm_and_uncached_give_one_image_and_unsquashfs_reads_it(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = pyimg.build([str(tree)], str(tmp_path / "plain.sqfs"), epoch=EPOCH, jobs=2)
    cold = pyimg.build([str(tree)], str(tmp_path / "cold.sqfs"), epoch=EPOCH, jobs=2, cache=str(cache))
    assert cold.cache is not None and cold.cache.content_stored == 5  # f0..f3, sparse (dup is f0's)
    warm = pyimg.build([str(tree)], str(tmp_path / "warm.sqfs"), epoch=EPOCH, jobs=1, cache=str(cache))
    assert warm.cache is not None and warm.cache.content_hits >= 5 and warm.cache.content_stored == 0
    assert plain.digest == cold.digest == warm.digest
    assert plain.cache is None and not plain.warnings and not warm.warnings
    fix_mtimes(tree)  # older than the epoch: kept as they are
    image = tmp_path / "check.sqfs"
    pyimg.build([str(tree)], str(image), epoch=EPOCH, jobs=2, cache=str(cache))
    unsquashfs_extract(image, tmp_path / "out")
    assert_same_tree(tree, tmp_path / "out")


def test_a_cached_build_has_the_same_manifest(tree: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "img")
    manifests = []
    for kw in ({}, {"cache": cache}, {"cache": cache, "cache_max": "1G"}):
        result = pyimg.build([str(tree)], out, epoch=EPOCH, manifest=str(tmp_path / "m.json"), **kw)
        manifests.append((tmp_path / "m.json").read_bytes())
        assert "cache" not in result.manifest["options"]
    assert manifests[0] == manifests[1] == manifests[2]


def _damage_and_rebuild(tree: Path, tmp_path: Path, damage: Any) -> None:
    cache = tmp_path / "cache"
    out = str(tmp_path / "img")
    want = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(cache)).digest
    damaged = entries(cache)
    assert len(damaged) == ENTRIES
    for path in damaged:
        damage(path)
    again = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(cache))
    assert again.digest == want
    assert again.cache is not None and again.cache.bad_entries == ENTRIES
    assert again.cache.content_hits == again.cache.fragment_hits == 0
    assert again.cache.content_stored == 5 and again.cache.fragment_stored == 3  # rebuilt, stored anew
    third = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(cache))
    assert third.digest == want and third.cache is not None and third.cache.bad_entries == 0


def test_a_corrupted_entry_is_detected_and_rebuilt(tree: Path, tmp_path: Path) -> None:
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))

    _damage_and_rebuild(tree, tmp_path, flip)


def test_a_truncated_entry_is_detected_and_rebuilt(tree: Path, tmp_path: Path) -> None:
    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 3)

    _damage_and_rebuild(tree, tmp_path, truncate)


def test_an_entry_of_another_version_is_not_trusted(tree: Path, tmp_path: Path) -> None:
    def other_version(path: Path) -> None:
        data = bytearray(path.read_bytes())
        struct.pack_into("<I", data, 8, pyimg.cache.FORMAT_VERSION + 1)
        path.write_bytes(bytes(data))

    _damage_and_rebuild(tree, tmp_path, other_version)


def test_an_entry_under_another_key_is_not_trusted(tree: Path, tmp_path: Path) -> None:
    """A valid entry renamed to another content's key (its header names its own)."""

    def swap(path: Path) -> None:
        names = entries(path.parent)
        if path == names[0]:  # once: every entry gets the next one's bytes
            datas = [p.read_bytes() for p in names]
            for p, data in zip(names, datas[1:] + datas[:1], strict=True):
                p.write_bytes(data)

    _damage_and_rebuild(tree, tmp_path, swap)


def test_an_unusable_cache_dir_warns_and_builds_the_same(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    out = str(tmp_path / "img")
    want = pyimg.build([str(tree)], out, epoch=EPOCH).digest
    result = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(tmp_path / "file" / "cache"))
    assert result.digest == want
    assert len(result.warnings) == 1 and "building without it" in result.warnings[0]
    proc = run_cli("build", str(tree), "-o", out, "--epoch", str(EPOCH), "--cache", str(tmp_path / "file"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("pyimg: warning: build cache") == 1


def test_a_cache_that_fills_up_warns_and_builds_the_same(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "img")
    want = pyimg.build([str(tree)], out, epoch=EPOCH).digest

    def full(self: Any, data: bytes, hashed: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pyimg.cache.EntryWriter, "_write", full)
    result = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(tmp_path / "cache"))
    assert result.digest == want
    assert result.warnings == [
        f"build cache {tmp_path / 'cache'}: No space left on device; building without it"
    ]
    assert not entries(tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("tmp-")]


def _hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = hashpass.hash_big

    def counting(ref: Any, threads: int = 1, stop: Any = None) -> bytes:
        calls.append(ref.path)
        return real(ref, threads, stop)

    monkeypatch.setattr(hashpass, "hash_big", counting)
    return calls


def test_the_stat_cache_spares_reading_an_unchanged_file(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, out = str(tmp_path / "cache"), str(tmp_path / "img")
    calls = _hash_calls(monkeypatch)
    with racy_window(-(10**12)):  # as if every file were old
        want = pyimg.build([str(tree)], out, epoch=EPOCH, cache=cache).digest
        assert len(calls) == 6  # f0..f3, dup, sparse
        calls.clear()
        time.sleep(0.03)  # a few timestamp ticks: the edit moves the ctime
        f1 = tree / "f1"
        data = bytearray(f1.read_bytes())
        data[100] ^= 1
        f1.write_bytes(bytes(data))
        warm = pyimg.build([str(tree)], out, epoch=EPOCH, cache=cache)
    assert calls == [str(f1)]  # only the changed file is read
    # five large files (f1 is hashed again) and the tree's one small file, whose
    # batch is packed by its digest without being read
    assert warm.cache is not None and warm.cache.stat_hits == 6
    assert warm.digest == pyimg.build([str(tree)], out, epoch=EPOCH).digest != want


def test_a_file_within_the_racy_window_is_not_trusted(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files just written (this test's): their identities are not stored, so a change
    in the same timestamp tick (same size, mtime put back) is read and hashed."""
    cache, out = str(tmp_path / "cache"), str(tmp_path / "img")
    pyimg.build([str(tree)], out, epoch=EPOCH, cache=cache)
    assert not pyimg.cache.BuildCache(cache)._stat  # nothing was old enough
    f2 = tree / "f2"
    st = f2.stat()
    data = bytearray(f2.read_bytes())
    data[5] ^= 1
    f2.write_bytes(bytes(data))
    os.utime(f2, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    calls = _hash_calls(monkeypatch)
    warm = pyimg.build([str(tree)], out, epoch=EPOCH, cache=cache)
    assert str(f2) in calls and warm.cache is not None and warm.cache.stat_hits == 0
    assert warm.digest == pyimg.build([str(tree)], out, epoch=EPOCH).digest


@pytest.mark.usefixtures("no_image_reuse")
def test_a_damaged_stat_cache_is_ignored(tree: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", str(tmp_path / "img")
    with racy_window(-(10**12)):
        want = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(cache)).digest
        stat_file = cache / pyimg.cache.STAT_FILE
        raw = bytearray(stat_file.read_bytes())
        raw[20] ^= 1
        stat_file.write_bytes(bytes(raw))
        again = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(cache))
    assert again.digest == want and again.cache is not None
    assert again.cache.stat_hits == 0 and again.cache.bad_entries == 1


def test_concurrent_builds_into_one_cache(tree: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    want = pyimg.build([str(tree)], str(tmp_path / "plain"), epoch=EPOCH).digest
    for round_ in range(2):  # cold, then warm
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyimg.cli",
                    "build",
                    str(tree),
                    "-o",
                    str(tmp_path / f"img{i}"),
                    "--epoch",
                    str(EPOCH),
                    "--cache",
                    cache,
                    "--jobs",
                    str(1 + i),
                    "-q",
                ],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and not err, (round_, err)
        for i in range(2):
            assert pyimg.digest(str(tmp_path / f"img{i}"), sha256=False).blake3 == want
    assert len(entries(Path(cache))) == ENTRIES
    assert not [p for p in Path(cache).iterdir() if p.name.startswith("tmp-")]


def test_concurrent_builds_in_one_process(tree: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    want = pyimg.build([str(tree)], str(tmp_path / "plain"), epoch=EPOCH).digest
    got: list[str] = []

    def one(i: int) -> None:
        got.append(pyimg.build([str(tree)], str(tmp_path / f"t{i}"), epoch=EPOCH, cache=cache, jobs=2).digest)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 3


def test_eviction_keeps_the_cache_under_its_limit(tmp_path: Path) -> None:
    src = big_tree(tmp_path / "src", count=3, size=2 << 20)
    cache = tmp_path / "cache"
    out = str(tmp_path / "img")
    limit = 3 << 20
    first = pyimg.build([str(src)], out, epoch=EPOCH, cache=str(cache), cache_max=limit)
    assert first.cache is not None and first.cache.evicted > 0
    total = sum(p.stat().st_size for p in cache.iterdir())
    assert 0 < total <= limit
    # Least recently used first: entries just used survive a build of other files.
    kept = {p.name for p in entries(cache)}
    assert pyimg.build([str(src)], out, epoch=EPOCH, cache=str(cache), cache_max=limit).digest == first.digest
    assert sum(p.stat().st_size for p in cache.iterdir()) <= limit
    assert kept


def test_the_cli_uses_the_user_cache_by_default(tree: Path, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("PYIMG_BUILD_CACHE", None)  # (the suite's own, tests/conftest.py)
    out = str(tmp_path / "img")
    proc = run_cli("build", str(tree), "-o", out, "--epoch", str(EPOCH), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cache"]["content_stored"] == 5
    assert len(entries(tmp_path / "xdg" / "pyimg" / "build")) == ENTRIES
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg2")
    proc = run_cli("build", str(tree), "-o", out, "--epoch", str(EPOCH), "-q", "--no-cache", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "xdg2").exists()
    proc = run_cli("build", str(tree), "-o", out, "--cache", str(tmp_path / "c"), "--no-cache", env=env)
    assert proc.returncode != 0 and "--no-cache" in proc.stderr
    env["PYIMG_BUILD_CACHE"] = str(tmp_path / "named")  # before XDG_CACHE_HOME
    proc = run_cli("build", str(tree), "-o", out, "--epoch", str(EPOCH), "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(entries(tmp_path / "named")) == ENTRIES and not (tmp_path / "xdg2").exists()


def test_the_api_writes_no_cache_unasked(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = pyimg.build([str(tree)], str(tmp_path / "img"), epoch=EPOCH)
    assert result.cache is None
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_a_spec_names_its_cache_relative_to_itself(tree: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'output = "img"\ncache = "c"\ncache_max = "64M"\n'
        f'[[source]]\npath = "{tree}"\n[policy]\nepoch = {EPOCH}\n'
    )
    result = pyimg.build([], spec=str(spec))
    assert result.cache is not None and len(entries(tmp_path / "c")) == ENTRIES
    with pytest.raises(pyimg.errors.SpecError, match="cache_max"):
        pyimg.build([], spec=str(spec), cache_max="1K")


def test_a_cache_inside_a_source_is_not_used(tree: Path, tmp_path: Path) -> None:
    """It would be read into the image while being written: warned, left alone."""
    out = str(tmp_path / "img")
    want = pyimg.build([str(tree)], out, epoch=EPOCH).digest
    result = pyimg.build([str(tree)], out, epoch=EPOCH, cache=str(tree / "sub" / "cache"))
    assert result.digest == want and result.cache is None
    assert result.warnings == [
        f"build cache {tree / 'sub' / 'cache'}: inside the source {tree}; building without it"
    ]
    assert not (tree / "sub").exists()


def write_small_files(src: Path, rng: random.Random, count: int, random_bytes: int, words: int) -> None:
    """`count` small files s000, s001, ...: random bytes, then some text (compressible)."""
    src.mkdir()
    for i in range(count):
        text = b"text " * rng.randrange(0, words)
        (src / f"s{i:03d}").write_bytes(rng.randbytes(rng.randrange(1, random_bytes)) + text)


def test_fragment_blocks_are_compressed_once(tmp_path: Path) -> None:
    """Small files go into fragment blocks: a rebuild packs the same blocks and takes
    their compressed form from the cache; a same-size edit of one small file changes
    one block, which alone is compressed again."""
    src = tmp_path / "src"
    write_small_files(src, random.Random(3), 400, 3000, 400)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "img")
    cold = build(src, tmp_path / "img", cache=cache)
    assert cold.cache is not None and cold.cache.fragment_stored > 100 and cold.cache.fragment_hits == 0
    warm = build(src, tmp_path / "img", cache=cache, jobs=3)
    assert warm.cache is not None and warm.digest == cold.digest
    assert warm.cache.fragment_hits == cold.cache.fragment_stored and warm.cache.fragment_stored == 0
    with open(src / "s200", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    edited = build(src, tmp_path / "img", cache=cache, jobs=2)
    assert edited.cache is not None and edited.cache.fragment_stored == 1
    assert edited.digest == build(src, tmp_path / "plain", jobs=1).digest != cold.digest
    unsquashfs_extract(Path(out), tmp_path / "x")
    assert (tmp_path / "x" / "s200").read_bytes() == (src / "s200").read_bytes()


@pytest.mark.usefixtures("no_image_reuse")
def test_unchanged_small_files_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fragment blocks are keyed by their members (digests and lengths in order), so a
    batch of small files whose digests the stat cache knows is packed without being
    read, and only a block the content cache lacks has its files read.  A file whose
    bytes no longer match the digest it was packed with is refused, not stored."""
    from pyimg.cache import BuildCache
    from pyimg.errors import SourceError

    src = tmp_path / "src"
    rng = random.Random(4)
    write_small_files(src, rng, 600, 2500, 300)
    (src / "big").write_bytes(rng.randbytes(3 * BLOCK + 77))  # a tail of a larger file among them
    read: list[str] = []
    real = squashfs_data.read_batch_packed

    def counting(refs: Any, **kw: Any) -> Any:
        read.extend(ref.path for ref in refs)
        return real(refs, **kw)

    monkeypatch.setattr(squashfs_data, "read_batch_packed", counting)
    learning = BuildCache.read_learning

    def counting_learning(self: BuildCache, refs: Any) -> Any:
        read.extend(ref.path for ref in refs)
        return learning(self, refs)

    monkeypatch.setattr(BuildCache, "read_learning", counting_learning)
    cache, out = str(tmp_path / "cache"), tmp_path / "img"
    with racy_window(-(10**12)):
        cold = build(src, out, cache=cache, jobs=2, block_size=BLOCK)
        assert len(read) == 600 and cold.cache is not None and cold.cache.fragment_stored > 50
        read.clear()
        warm = build(src, out, cache=cache, jobs=2, block_size=BLOCK)
        assert warm.digest == cold.digest and read == []
        assert warm.cache is not None and warm.cache.fragment_hits == cold.cache.fragment_stored
        time.sleep(0.03)
        with open(src / "s300", "r+b") as f:  # same size: the packing does not move
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        edited = build(src, out, cache=cache, jobs=2, block_size=BLOCK)
        assert edited.cache is not None and edited.cache.fragment_stored == 1
        # s300's batch is read (it missed the stat cache), and the files of the one
        # block that changed; nothing else.
        assert str(src / "s300") in read and len(read) < 256 + 40
        assert edited.digest == build(src, tmp_path / "plain", jobs=1, block_size=BLOCK).digest != cold.digest
        unsquashfs_extract(out, tmp_path / "x")
        assert (tmp_path / "x" / "s300").read_bytes() == (src / "s300").read_bytes()

        # The stat cache wrong about one file, and its block not cached: refused.
        known = BuildCache.known_digests

        def lying(self: BuildCache, refs: Any) -> Any:
            digests = known(self, refs)
            if digests is not None and any(ref.path.endswith("s300") for ref in refs):
                at = 32 * next(j for j, ref in enumerate(refs) if ref.path.endswith("s300"))
                digests[at : at + 32] = bytes(32)
            return digests

        monkeypatch.setattr(BuildCache, "known_digests", lying)
        with pytest.raises(SourceError, match="changed while the image was built") as raised:
            build(src, tmp_path / "bad", cache=cache, jobs=2, block_size=BLOCK)
        assert raised.value.path is not None and raised.value.path.endswith("s300")
        assert not (tmp_path / "bad").exists()


def test_an_unchanged_file_that_fits_one_task_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contents with full blocks that fit one task are read and hashed with their
    batch; with their digest in the stat cache and their stored form in the content
    cache a rebuild does not read them at all (nor their tails: the entry has them)."""
    from pyimg import content

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(6):
        (src / f"m{i}").write_bytes(rng.randbytes(3 * BLOCK + 100 * i) + b"text " * 50)
    (src / "m5").write_bytes((src / "m0").read_bytes())  # a duplicate
    (src / "tiny").write_bytes(b"a tail")
    read: list[str] = []
    real = content.read_batch

    def counting(refs: Any) -> Any:
        read.extend(ref.path for ref in refs)
        return real(refs)

    monkeypatch.setattr(squashfs_data, "read_batch", counting)
    cache, out = str(tmp_path / "cache"), tmp_path / "img"
    with racy_window(-(10**12)):
        cold = build(src, out, cache=cache, jobs=2)
        assert len(read) == 6 and cold.cache is not None and cold.cache.content_stored == 5
        read.clear()
        time.sleep(0.03)
        with open(src / "m2", "r+b") as f:
            f.write(b"X")
        warm = build(src, out, cache=cache, jobs=2)
    assert read == [str(src / "m2")]
    # m0, m1, m3, m4, m5 and "tiny" (a small file: packed by its digest, not read)
    assert warm.cache is not None and warm.cache.stat_hits == 6
    assert warm.digest == build(src, tmp_path / "plain", jobs=1).digest != cold.digest
    unsquashfs_extract(out, tmp_path / "x")
    for i in range(6):
        assert (tmp_path / "x" / f"m{i}").read_bytes() == (src / f"m{i}").read_bytes()
