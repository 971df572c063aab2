"""The build cache for ext4 (docs/cache.md): its scan cache (scan-v1: a file's
identity -> its BLAKE3 and non-zero block runs) spares the hash pass reading an
unchanged file; a warm image is the same as a cold one and as one without a cache,
whatever --jobs, edits, or damage to the cache, and e2fsck passes on it.

The property reuses test_cache.py's trees and edits; ext4's small-file limit is
lowered so that files of a few tens of KiB take the big-file path (scan_big,
copy_file_range) beside the batched one.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any
from unittest import mock

import blake3
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import pyimg
import pyimg.cache
from pyimg.formats import ext4

from .ext4_oracle import e2fsck_clean
from .test_cache import EDITS, EPOCH, FILES, NAMES, FileSpec, apply_edits, make_tree, racy_window, scratch

OPTIONS = st.fixed_dictionaries({"dedup": st.sampled_from([True, True, False])})
SMALL = 24 * 1024
OLD = -(10**12)  # a racy window that trusts every identity (as if every file were old)


def small_files(size: int = SMALL) -> Any:
    """Contents over `size` bytes are scanned alone and copied (the big-file path)."""
    return mock.patch.object(ext4, "SMALL_FILE", size)


def build(src: Path, out: Path, **kw: Any) -> pyimg.BuildResult:
    return pyimg.build([str(src)], str(out), format="ext4", epoch=EPOCH, **kw)


@settings(max_examples=max(10, settings.default.max_examples // 6))
@given(
    options=OPTIONS,
    files=st.dictionaries(NAMES, FILES, min_size=1, max_size=7),
    edits=EDITS,
    cold_jobs=st.sampled_from([1, 2, 4]),
    trust_stat=st.sampled_from([True, True, False]),  # mostly: the scan cache's hits
)
def test_warm_equals_cold_equals_uncached(
    options: dict[str, Any], files: dict[str, FileSpec], edits: Any, cold_jobs: int, trust_stat: bool
) -> None:
    note(f"{files} then {edits}")
    with scratch() as work, small_files():
        src, cache, img = work / "src", str(work / "cache"), work / "img"
        make_tree(src, files)
        with racy_window(OLD if trust_stat else pyimg.cache.RACY_NS):
            cold = build(src, img, cache=cache, jobs=cold_jobs, **options).digest
            assert cold == build(src, img, jobs=1, **options).digest
            if trust_stat:
                time.sleep(0.03)  # a few timestamp ticks: an edited file's ctime moves
            apply_edits(src, edits)
            digests = {}
            for jobs in (1, 2, 4):
                warm = build(src, img, cache=cache, jobs=jobs, **options)
                digests[f"warm, jobs {jobs}"] = warm.digest
                assert warm.cache is not None and not warm.warnings
                event(f"stat hits: {min(warm.cache.stat_hits, 3)}")
            e2fsck_clean(img)
        digests["no cache"] = build(src, img, jobs=2, **options).digest
    assert len(set(digests.values())) == 1, digests


# -- explicit cases ----------------------------------------------------------------------


def ext4_tree(root: Path) -> Path:
    """Small files (batched), big ones (alone), a duplicate, zero blocks, a sparse file."""
    rng = random.Random(12)
    (root / "d" / "e").mkdir(parents=True)
    for i in range(40):
        (root / "d" / f"s{i}").write_bytes(rng.randbytes(rng.randint(1, 9000)) + bytes(4096 * (i % 3)))
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(rng.randbytes(300_000) + bytes(1 << 20) + b"end")
    (root / "d" / "e" / "dup").write_bytes((root / "big").read_bytes())
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(rng.randbytes(50_000))
        f.truncate(6 << 20)
    return root


DATA_FILES = 43  # ext4_tree's files with content (the empty one has none)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return ext4_tree(tmp_path / "src")


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the hash pass reads (scan_small's and scan_big's files)."""
    calls: list[str] = []
    real_small, real_big = ext4.scan_small, ext4.scan_big

    def small(refs: list[Any], idents: bool = False) -> Any:
        calls.extend(ref.path for ref in refs)
        return real_small(refs, idents)

    def big(ref: Any, threads: int = 1, stop: Any = None) -> Any:
        calls.append(ref.path)
        return real_big(ref, threads, stop)

    monkeypatch.setattr(ext4, "scan_small", small)
    monkeypatch.setattr(ext4, "scan_big", big)
    return calls


@pytest.mark.usefixtures("no_image_reuse")
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_no_change_rebuild_reads_no_file_to_hash(
    tree: Path, tmp_path: Path, scans: list[str], jobs: int
) -> None:
    cache, img = str(tmp_path / "cache"), tmp_path / "img"
    plain = build(tree, img, jobs=jobs).digest
    scans.clear()
    with racy_window(OLD):
        cold = build(tree, img, cache=cache, jobs=jobs)
        assert len(scans) == DATA_FILES and cold.cache is not None and cold.cache.stat_hits == 0
        scans.clear()
        warm = build(tree, img, cache=cache, jobs=jobs)
    assert scans == []
    assert warm.cache is not None and warm.cache.stat_hits == DATA_FILES and not warm.warnings
    assert plain == cold.digest == warm.digest
    e2fsck_clean(img)


def test_only_the_changed_file_is_read_to_hash(tree: Path, tmp_path: Path, scans: list[str]) -> None:
    cache, img = str(tmp_path / "cache"), tmp_path / "img"
    with racy_window(OLD):
        build(tree, img, cache=cache, jobs=2)
        time.sleep(0.03)  # a few timestamp ticks: the edit moves the ctime
        for name in ("big", "d/s7"):
            data = bytearray((tree / name).read_bytes())
            data[1000] ^= 1
            (tree / name).write_bytes(bytes(data))
        scans.clear()
        warm = build(tree, img, cache=cache, jobs=2)
    assert sorted(scans) == sorted([str(tree / "big"), str(tree / "d/s7")])
    assert warm.cache is not None and warm.cache.stat_hits == DATA_FILES - 2
    assert warm.digest == build(tree, img, jobs=1).digest
    e2fsck_clean(img)


def test_a_racily_clean_file_is_hashed_again(tree: Path, tmp_path: Path, scans: list[str]) -> None:
    """Files just written (this test's) are not recorded: a change in the same
    timestamp tick (same size, mtime put back) is read and found."""
    cache, img = str(tmp_path / "cache"), tmp_path / "img"
    build(tree, img, cache=cache)
    assert not pyimg.cache.ScanCache(pyimg.cache.BuildCache(cache), ext4.BLOCK)._old  # nothing old enough
    target = tree / "d" / "s3"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[5] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    scans.clear()
    warm = build(tree, img, cache=cache)
    assert str(target) in scans and warm.cache is not None and warm.cache.stat_hits == 0
    assert warm.digest == build(tree, img).digest


def test_a_file_changed_while_it_is_scanned_is_not_recorded(tree: Path, tmp_path: Path) -> None:
    """The identity is taken again after the read: a file whose ctime moved meanwhile
    keeps no record (learn() sees another identity)."""
    cache = pyimg.cache.BuildCache(str(tmp_path / "cache"))
    scan_cache = pyimg.cache.ScanCache(cache, ext4.BLOCK)
    target = tree / "d" / "s1"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    ref = pyimg.tree.DataRef(str(tree).encode() + b"/", b"d/s1", 0, size, size, mtime)
    with racy_window(OLD):
        keys, records = scan_cache.lookup([ref])
        assert keys[0] is not None and records == [None]
        time.sleep(0.03)
        os.chmod(target, 0o600)  # the ctime moves, size and mtime do not
        scan_cache.learn([keys[0]], [ref], [b"record"], cache.clock())
        assert not scan_cache._new
        keys, _ = scan_cache.lookup([ref])
        assert keys[0] is not None
        scan_cache.learn([keys[0]], [ref], [b"other"], cache.clock(), after=[b"another identity"])
        assert not scan_cache._new  # what the reader saw is not what was looked up
        scan_cache.learn([keys[0]], [ref], [b"record"], cache.clock())
        assert scan_cache._new == {keys[0]: b"record"}


def _scan_file(cache: Path) -> Path:
    return cache / pyimg.cache.SCAN_FILE


@pytest.mark.usefixtures("no_image_reuse")
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "inconsistent"])
def test_a_damaged_scan_cache_is_ignored_and_replaced(tree: Path, tmp_path: Path, damage: str) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, cache=str(cache)).digest
        raw = bytearray(_scan_file(cache).read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0x10
        elif damage == "truncate":
            raw = raw[: len(raw) // 2]
        elif damage == "inconsistent":  # checksummed, but a record's length is off
            body = bytearray(raw[:-32])
            count = int.from_bytes(body[12:16], "little")
            lengths_at = pyimg.cache.SCAN_HEADER.size + pyimg.cache.IDENT_KEY.size * count
            body[lengths_at] += 8
            body[lengths_at + 4] -= 8
            raw = body + blake3.blake3(bytes(body)).digest()
        else:
            raw = bytearray(b"not a scan cache")
        _scan_file(cache).write_bytes(bytes(raw))
        again = build(tree, img, cache=str(cache), jobs=2)
        assert again.digest == want and again.cache is not None
        assert again.cache.stat_hits == 0 and again.cache.bad_entries == 1 and not again.warnings
        third = build(tree, img, cache=str(cache))  # replaced by a whole one
    assert third.digest == want and third.cache is not None
    assert third.cache.stat_hits == DATA_FILES and third.cache.bad_entries == 0


@pytest.mark.usefixtures("no_image_reuse")
def test_a_scan_cache_of_another_block_size_is_not_used(tree: Path, tmp_path: Path) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, cache=str(cache)).digest
        other = pyimg.cache.ScanCache(pyimg.cache.BuildCache(str(cache)), 1024)
        assert other._old == {}  # whole, but not for 1 KiB blocks
        again = build(tree, img, cache=str(cache))
    assert again.digest == want and again.cache is not None and again.cache.stat_hits == DATA_FILES


def test_a_cached_ext4_build_has_the_same_manifest(tree: Path, tmp_path: Path) -> None:
    manifests = []
    with racy_window(OLD):
        for kw in ({}, {"cache": str(tmp_path / "cache")}, {"cache": str(tmp_path / "cache")}):
            build(tree, tmp_path / "img", manifest=str(tmp_path / "m.json"), **kw)
            manifests.append((tmp_path / "m.json").read_bytes())
    assert manifests[0] == manifests[1] == manifests[2]


def test_an_unusable_cache_dir_warns_and_builds_the_same(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    want = build(tree, tmp_path / "img").digest
    result = build(tree, tmp_path / "img", cache=str(tmp_path / "file" / "cache"), jobs=2)
    assert result.digest == want
    assert len(result.warnings) == 1 and "building without it" in result.warnings[0]


def test_a_cache_inside_the_source_is_not_used(tree: Path, tmp_path: Path) -> None:
    want = build(tree, tmp_path / "img").digest
    result = build(tree, tmp_path / "img", cache=str(tree / "sub" / "cache"), jobs=2)
    assert result.digest == want and result.cache is None
    assert result.warnings == [
        f"build cache {tree / 'sub' / 'cache'}: inside the source {tree}; building without it"
    ]
    assert not (tree / "sub").exists()


def test_identities_are_those_of_files_still_as_collected(tree: Path, tmp_path: Path) -> None:
    """pyimg_identity_batch: a file whose size or mtime moved since it was collected,
    a symlink put in its place (not followed) and a missing file have none; the
    others' are their fstat's."""
    scan_cache = pyimg.cache.ScanCache(pyimg.cache.BuildCache(str(tmp_path / "cache")), ext4.BLOCK)
    base = str(tree).encode() + b"/"
    names = [b"d/s1", b"d/s2", b"d/s3", b"d/s4", b"big"]
    refs = []
    for name in names:
        st = (tree / os.fsdecode(name)).stat()
        refs.append(pyimg.tree.DataRef(base, name, 0, st.st_size, st.st_size, st.st_mtime_ns))
    os.utime(tree / "d" / "s2", ns=(0, 0))
    (tree / "d" / "s3").unlink()
    (tree / "d" / "s4").rename(tree / "d" / "s4.real")
    (tree / "d" / "s4").symlink_to("s4.real")
    keys = scan_cache.identities(refs)
    assert keys[1:4] == [None, None, None]
    for i in (0, 4):
        st = (tree / os.fsdecode(names[i])).stat()
        key = pyimg.cache.IDENT_KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        assert keys[i] == key
    # The reader's own (the fstat after its read), which learn() compares with the one before.
    assert ext4.scan_small([refs[0], refs[4]], idents=True).idents == keys[0] + keys[4]  # type: ignore[operator]


def test_a_scan_cache_that_cannot_be_written_warns_and_builds_the_same(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = build(tree, tmp_path / "img").digest

    def full(directory: str, name: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pyimg.cache, "_atomic_write", full)
    with racy_window(OLD):
        result = build(tree, tmp_path / "img", cache=str(tmp_path / "cache"), jobs=2)
    assert result.digest == want
    reason = "No space left on device"
    assert result.warnings == [f"build cache {tmp_path / 'cache'}: {reason}; building without it"]
    assert not (tmp_path / "cache" / pyimg.cache.SCAN_FILE).exists()
