"""The shared build cache (pyimg/cache_remote.py, docs/cache.md): entries kept in an OCI
store, the real loopback registry and a layout directory.  A fresh runner (an empty
local cache) builds warm from what another pushed, fetching only the entries it
needs; concurrent exports merge; a store that is down, lies about a blob, or holds
another version's cache never changes the image."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import pyimg
import pyimg.cache
from pyimg import cache_remote
from pyimg.api import build_with, options_for
from pyimg.cache_remote import index_tag, parse_index, remote_ref, spec_value
from pyimg.errors import SpecError
from pyimg.store import ops
from pyimg.store.artifact import Manifest

from ..oracles import run_cli
from ..test_cache import EDITS, NAMES, OPTIONS, apply_edits, scratch, small_chunks
from ..test_cache import FILES as FILE_SPECS
from ..test_cache import build as cache_build
from ..test_cache import make_tree as random_tree
from .conftest import Registry

EPOCH = 1_700_000_000
FILES = 3  # contents larger than one task (1 MiB): the cache's


@pytest.fixture(autouse=True)
def _quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_remote, "SETTLE_S", 0.1)


def make_tree(root: Path, seed: int = 1, count: int = FILES) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"big{i}").write_bytes(rng.randbytes(1 << 20) + (b"text %d " % seed * 150_000)[: 1 << 20])
    # Whole blocks, no tail: the entries are then exactly the FILES contents (fragment
    # blocks are entries too: test_fragment_blocks_are_shared_too).
    return root


def build(
    src: Path, out: Path, cache: str | None = None, local: Path | None = None, fragments: bool = True
) -> pyimg.BuildResult:
    """A build as a runner makes it: `local` its local cache (None: a temp directory)."""
    options = options_for([str(src)], str(out), epoch=EPOCH, jobs=2, cache=cache, fragments=fragments)
    if local is not None:
        options = dataclasses.replace(options, cache=dataclasses.replace(options.cache, local=str(local)))
    return build_with(options)


def index_of(addr: str) -> dict[bytes, Any]:
    store = ops.open_store(addr)
    try:
        return parse_index(store.get_manifest(index_tag(ops.parse_ref(addr))))
    finally:
        store.close()


def stats(result: pyimg.BuildResult) -> pyimg.cache.CacheStats:
    assert result.cache is not None
    return result.cache


# -- a fresh runner builds warm ------------------------------------------------------------


def test_a_fresh_runner_builds_warm_from_what_another_pushed(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    plain = build(src, tmp_path / "plain.sqfs")
    a = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a")
    assert stats(a).content_stored == FILES and stats(a).remote_pushed == FILES and not a.warnings
    assert len(index_of(store_addr)) == FILES

    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert stats(b).content_hits == FILES and stats(b).content_stored == 0
    assert stats(b).remote_fetched == FILES and stats(b).remote_pushed == 0 and not b.warnings
    assert stats(b).remote_packs == 1  # A's entries went up in one pack: one round trip
    assert plain.digest == a.digest == b.digest
    assert (tmp_path / "plain.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()

    # One edited file: only its entry is missing, and it is shared in turn.  Runner C
    # fetches A's pack, and counts as fetched the entries it used.
    (src / "big1").write_bytes((b"edited " * 300_000)[: 16 << 17])
    c = build(src, tmp_path / "c.sqfs", store_addr, tmp_path / "runner-c")
    assert stats(c).remote_fetched == FILES - 1 and stats(c).content_stored == 1
    assert stats(c).remote_pushed == 1 and len(index_of(store_addr)) == FILES + 1
    assert c.digest == build(src, tmp_path / "plain2.sqfs").digest

    # A runner whose local cache is warm fetches nothing.
    again = build(src, tmp_path / "d.sqfs", store_addr, tmp_path / "runner-c")
    assert stats(again).remote_fetched == 0 and stats(again).content_hits == FILES


def test_fragment_blocks_are_shared_too(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    for i in range(50):
        (src / f"s{i}").write_bytes(random.Random(i).randbytes(900 + 37 * i))
    a = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a", fragments=True)
    entries = stats(a).content_stored + stats(a).fragment_stored
    assert stats(a).fragment_stored >= 1 and stats(a).remote_pushed == entries
    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b", fragments=True)
    assert stats(b).fragment_hits == stats(a).fragment_stored and stats(b).remote_fetched == entries
    assert stats(b).remote_packs == 1  # the fragment blocks' entries and the files' in one
    assert stats(b).content_stored == stats(b).fragment_stored == 0 and not b.warnings
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()


def packs_of(addr: str) -> dict[str, list[tuple[int, int]]]:
    """The index's packs: digest -> its lines' (offset, length), and their sizes."""
    out: dict[str, list[tuple[int, int]]] = {}
    for line in index_of(addr).values():
        out.setdefault(line.pack.digest, []).append((line.offset, line.length))
    return out


@pytest.mark.parametrize("pack_max", [5 << 19, 1 << 20])
def test_packs_are_bounded_and_each_fetched_once(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pack_max: int
) -> None:
    """PACK_MAX 2.5 MiB: two entries (~1.1 MB each) share a pack, the third is alone;
    1 MiB: each entry is larger than a pack, and goes alone."""
    monkeypatch.setattr(cache_remote, "PACK_MAX", pack_max)
    src = make_tree(tmp_path / "src")
    a = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a")
    packs = packs_of(store_addr)
    sizes = {line.pack.digest: line.pack.size for line in index_of(store_addr).values()}
    assert sorted(len(lines) for lines in packs.values()) == ([1, 2] if pack_max > 1 << 20 else [1, 1, 1])
    for digest, lines in packs.items():
        assert sizes[digest] <= pack_max or lines == [(0, sizes[digest])]
        assert sum(length for _, length in lines) == sizes[digest]  # back to back, nothing else
    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert stats(b).remote_packs == len(packs) and stats(b).remote_fetched == FILES
    assert b.digest == a.digest and not b.warnings


def test_a_directory_without_hard_links_copies_a_pack_of_one(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack of one entry is linked into the local directory; where links are refused
    (EPERM, EMLINK, a file system without them) it is copied, and the tier stays on."""
    monkeypatch.setattr(cache_remote, "PACK_MAX", 1 << 20)  # each entry a pack alone
    src = make_tree(tmp_path / "src")
    want = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a").digest
    local, real = tmp_path / "runner-b", os.link

    def no_links(a: Any, b: Any, *args: Any, **kw: Any) -> None:
        if str(b).startswith(str(local)):
            raise PermissionError(1, "Operation not permitted", str(b))
        real(a, b, *args, **kw)

    monkeypatch.setattr(cache_remote.os, "link", no_links)
    b = build(src, tmp_path / "b.sqfs", store_addr, local)
    assert stats(b).remote_packs == FILES and stats(b).remote_fetched == FILES
    assert stats(b).content_stored == 0 and b.digest == want and not b.warnings


@pytest.mark.parametrize(
    ("pack_max", "draw_max", "fetched"),
    [(5 << 18, cache_remote.DRAW_MAX, FILES), (5 << 18, 0, 1), (1 << 20, cache_remote.DRAW_MAX, 1)],
)
def test_the_first_miss_in_an_export_fetches_its_packs(
    store_addr: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pack_max: int,
    draw_max: int,
    fetched: int,
) -> None:
    """A tree with one of runner A's three files: its one miss fetches all three of A's
    packs (one entry each here), unless DRAW_MAX forbids, or they are larger than
    PACK_MAX (a large entry alone: fetched only when missed); the entries it did not
    use are not counted as fetched, and the image is the clean one."""
    monkeypatch.setattr(cache_remote, "PACK_MAX", pack_max)
    monkeypatch.setattr(cache_remote, "DRAW_MAX", draw_max)
    src = make_tree(tmp_path / "src")
    build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a")
    one = tmp_path / "one"
    one.mkdir()
    (one / "big0").write_bytes((src / "big0").read_bytes())
    b = build(one, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert len(packs_of(store_addr)) == FILES
    assert stats(b).remote_packs == fetched and stats(b).remote_fetched == 1
    assert len([n for n in os.listdir(tmp_path / "runner-b") if n.startswith("c-")]) == stats(b).remote_packs
    assert b.digest == build(one, tmp_path / "plain.sqfs").digest and not b.warnings


def test_a_pack_larger_than_a_pack_can_be_is_not_fetched(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src")
    want = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a").digest
    monkeypatch.setattr(cache_remote, "PACK_MAX", 1 << 16)  # A's pack of three is now too large
    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert stats(b).remote_packs == 0 and stats(b).remote_fetched == 0
    assert stats(b).remote_refused == 1 and stats(b).content_stored == FILES  # one pack, once
    assert len(b.warnings) == 1 and "more than a pack can be" in b.warnings[0] and b.digest == want


def test_index_items_that_are_not_well_formed_are_left_out() -> None:
    from pyimg.store.artifact import Descriptor

    pack = Descriptor(cache_remote.PACK_MEDIA_TYPE, "sha256:" + "a" * 64, 1000)
    lines = {bytes([i]) * 32: cache_remote.Line(pack, 100 * i, 100) for i in range(1, 4)}
    manifest = cache_remote.index_manifest(lines)
    assert parse_index(manifest) == lines
    value = manifest.json
    [layer] = value["layers"]
    table = layer["annotations"][cache_remote.A_ENTRIES].split(",")
    good = table[0]
    table[1] = table[1].rsplit(":", 1)[0] + ":901"  # runs past the pack's end
    table[2] = "zz" + table[2][2:]  # not hex
    key = "ab" * 32
    odd = [f"{key}:\u00b2:100", f"{key}:{'9' * 40}:100", f"{key}:100:-5", f"{key}::100"]  # not counts
    layer["annotations"][cache_remote.A_ENTRIES] = ",".join([good, *table[1:], *odd, "x:1:2", ""])
    assert parse_index(Manifest.of(value)) == {bytes([1]) * 32: lines[bytes([1]) * 32]}
    layer["mediaType"] = "application/octet-stream"  # not a pack
    assert parse_index(Manifest.of(value)) == {}


def test_the_api_default_local_tier_is_a_temp_dir_removed_after(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    build(src, tmp_path / "a.sqfs", store_addr)
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    b = pyimg.build([str(src)], str(tmp_path / "b.sqfs"), epoch=EPOCH, cache=store_addr)
    assert stats(b).remote_fetched == FILES and not b.warnings
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not {name for name in after - before if name.startswith("pyimg-cache-")}


def test_a_runner_warm_locally_shares_what_the_store_lacks(store_addr: str, tmp_path: Path) -> None:
    """Entries used from the local tier are exported too: a new shared cache fills up
    from a runner that never stores anything."""
    src = make_tree(tmp_path / "src")
    local = tmp_path / "local"
    build(src, tmp_path / "a.sqfs", str(local))  # a local cache only
    a = build(src, tmp_path / "b.sqfs", store_addr, local)
    assert stats(a).content_stored == 0 and stats(a).remote_pushed == FILES
    b = build(src, tmp_path / "c.sqfs", store_addr, tmp_path / "fresh")
    assert stats(b).remote_fetched == FILES and b.digest == a.digest


def test_an_empty_layout_directory_is_an_empty_cache(tmp_path: Path) -> None:
    """A CI step may make the cache's directory before the first build: an empty cache,
    no warning; the export makes the layout in it."""
    layout = tmp_path / "layout"
    layout.mkdir()
    src = make_tree(tmp_path / "src")
    first = build(src, tmp_path / "a.sqfs", f"oci:{layout}", tmp_path / "r1")
    assert not first.warnings and stats(first).remote_pushed == FILES
    warm = build(src, tmp_path / "b.sqfs", f"oci:{layout}", tmp_path / "r2")
    assert not warm.warnings and stats(warm).remote_fetched == FILES and warm.digest == first.digest


def _until(condition: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _fresh_runner(store_addr: str, tmp_path: Path) -> tuple[cache_remote.RemoteCache, Any]:
    """A runner's export of make_tree to `store_addr`, and a fresh runner's tier on it
    with the index read."""
    build(make_tree(tmp_path / "src"), tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a")
    ref = remote_ref(store_addr)
    assert ref is not None
    remote = cache_remote.RemoteCache(pyimg.cache.BuildCache(str(tmp_path / "runner-b")), ref)
    return remote, remote.index()


def _fetch_in_a_thread(
    remote: cache_remote.RemoteCache, key: bytes
) -> tuple[threading.Thread, list[BaseException]]:
    """remote.fetch(key) as a build worker makes it, started; what it raised."""
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            remote.fetch(key, 4 << 20, 64)
        except BaseException as exc:  # (reported by the caller)
            errors.append(exc)

    fetcher = threading.Thread(target=fetch)
    fetcher.start()
    return fetcher, errors


def test_a_closed_tier_fetches_nothing(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that fails closes its cache while its workers may still fetch: a pack
    drawn but not started is cancelled, and the fetch waiting for it returns (a miss,
    not a CancelledError); a fetch after the close starts nothing."""
    monkeypatch.setattr(cache_remote, "PACK_MAX", 5 << 18)  # three packs, one export
    monkeypatch.setattr(cache_remote, "DRAW_THREADS", 1)  # the second draw waits in the queue
    remote, index = _fresh_runner(store_addr, tmp_path)
    assert index is not None and len(index) == FILES
    drawing, release = threading.Event(), threading.Event()
    real = cache_remote.RemoteCache._fetch

    def held(self: cache_remote.RemoteCache, *args: Any) -> None:
        if threading.current_thread().name.startswith("pyimg-cache-draw"):
            drawing.set()
            assert release.wait(30)
        real(self, *args)

    monkeypatch.setattr(cache_remote.RemoteCache, "_fetch", held)
    submitted: list[Any] = []
    submit = cache_remote.RemoteCache._submit

    def recording(self: cache_remote.RemoteCache, *args: Any) -> Any:
        future = submit(self, *args)
        submitted.append(future)
        return future

    monkeypatch.setattr(cache_remote.RemoteCache, "_submit", recording)
    fetcher, errors = _fetch_in_a_thread(remote, next(iter(index)))
    assert drawing.wait(30)
    _until(lambda: len(submitted) == 2)  # the other two packs: one drawing (held), one queued
    closer = threading.Thread(target=remote.close)
    closer.start()
    _until(lambda: submitted[1].cancelled())  # close cancelled the queued draw...
    release.set()  # ...before the held one goes on
    closer.join(30)
    fetcher.join(30)
    assert not errors and not closer.is_alive() and not fetcher.is_alive()
    packs = remote.cache.stats.remote_packs
    remote.fetch_many([(key, 4 << 20, 64) for key in index])  # after the close: nothing starts
    assert remote._fetchers is None and remote._drawers is None
    assert remote.cache.stats.remote_packs == packs


def test_close_waits_for_a_fetch_in_flight_and_then_nothing_starts(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch running on a build worker when the build closes its cache: close waits
    for it before it closes the store (the fetch ends whole, with its pack), and the
    index is not read after the close."""
    remote, index = _fresh_runner(store_addr, tmp_path)
    assert index is not None
    monkeypatch.setattr(cache_remote.RemoteCache, "_draw", lambda self, line: [])
    fetching, release = threading.Event(), threading.Event()
    real = cache_remote.RemoteCache._fetch_pack

    def held(self: cache_remote.RemoteCache, *args: Any) -> None:
        fetching.set()
        assert release.wait(30)
        real(self, *args)

    monkeypatch.setattr(cache_remote.RemoteCache, "_fetch_pack", held)
    fetcher, errors = _fetch_in_a_thread(remote, next(iter(index)))
    assert fetching.wait(30)
    closer = threading.Thread(target=remote.close)
    closer.start()
    _until(lambda: remote._closed)
    closer.join(0.3)  # (a close that does not wait is done by now)
    assert closer.is_alive() and remote._store is not None, "close did not wait for the fetch"
    release.set()
    closer.join(30)
    fetcher.join(30)
    assert not errors and not closer.is_alive() and not fetcher.is_alive()
    assert remote.cache.stats.remote_packs == 1 and remote._store is None

    late = cache_remote.RemoteCache(pyimg.cache.BuildCache(str(tmp_path / "runner-c")), remote.ref)
    late.close()
    assert late.index() is None and late._store is None  # (a store opened now would leak)


def test_a_close_while_a_fetch_draws_its_packs_is_a_miss(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() between a fetch's choice of the packs to draw and their submission:
    the pools are gone, and the fetch misses (it raised "cannot schedule new futures
    after shutdown" in a build worker)."""
    monkeypatch.setattr(cache_remote, "PACK_MAX", 5 << 18)  # three packs, one export
    remote, index = _fresh_runner(store_addr, tmp_path)
    assert index is not None
    remote.fetch_many([])  # (no pool yet)
    remote._submit(True, lambda: None)  # the drawing pool exists, as after an earlier fetch
    real = cache_remote.RemoteCache._draw

    def closed_meanwhile(self: cache_remote.RemoteCache, line: Any) -> list[Any]:
        others = real(self, line)
        closer = threading.Thread(target=self.close)
        closer.start()
        closer.join(30)
        assert others and not closer.is_alive()
        return others

    monkeypatch.setattr(cache_remote.RemoteCache, "_draw", closed_meanwhile)
    remote.fetch(next(iter(index)), 4 << 20, 64)
    assert remote.cache.stats.remote_packs == 0


# -- concurrent exports --------------------------------------------------------------------


def test_concurrent_exports_merge_the_index(
    store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both exports read the index at the same moment, both write: the one whose lines
    were lost sees it on reading back and merges again."""
    trees = [make_tree(tmp_path / f"src{i}", seed=10 + i) for i in range(2)]
    together = threading.Barrier(2, timeout=60)
    merge = cache_remote.RemoteCache._merge

    def racing(self: cache_remote.RemoteCache, *args: Any) -> None:
        together.wait()
        merge(self, *args)

    monkeypatch.setattr(cache_remote.RemoteCache, "_merge", racing)
    results: dict[int, pyimg.BuildResult] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = build(trees[i], tmp_path / f"{i}.sqfs", store_addr, tmp_path / f"runner{i}")
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(stats(r).remote_pushed == FILES and not r.warnings for r in results.values())
    assert len(index_of(store_addr)) == 2 * FILES
    monkeypatch.setattr(cache_remote.RemoteCache, "_merge", merge)
    for i in range(2):  # every entry is whole and right
        warm = build(trees[i], tmp_path / f"w{i}.sqfs", store_addr, tmp_path / f"fresh{i}")
        assert stats(warm).remote_fetched == FILES and stats(warm).content_hits == FILES
        assert warm.digest == results[i].digest == build(trees[i], tmp_path / "p.sqfs").digest


def test_concurrent_runner_processes_share_one_index(registry: Registry, tmp_path: Path) -> None:
    """Four `pyimg build` processes with different trees export to one cache at once."""
    import subprocess
    import sys

    addr = registry.repo()
    runners = []
    for i in range(4):
        src = make_tree(tmp_path / f"src{i}", seed=20 + i, count=2)
        env = dict(os.environ, PYIMG_BUILD_CACHE=str(tmp_path / f"local{i}"))
        args = ["build", str(src), "-o", str(tmp_path / f"{i}.sqfs"), "--epoch", str(EPOCH)]
        runners.append(
            subprocess.Popen(
                [sys.executable, "-m", "pyimg.cli", *args, "--cache", addr, "--json"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in runners:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "warning" not in err, err
        assert json.loads(out)["cache"]["remote_pushed"] == 2
    assert len(index_of(addr)) == 8


def test_the_index_is_bounded(store_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_remote, "INDEX_MAX", 4)
    build(make_tree(tmp_path / "one", seed=1), tmp_path / "1.sqfs", store_addr, tmp_path / "r1")
    second = make_tree(tmp_path / "two", seed=2)
    build(second, tmp_path / "2.sqfs", store_addr, tmp_path / "r2")
    assert len(index_of(store_addr)) == 4
    # The most recent export's lines are kept.
    warm = build(second, tmp_path / "3.sqfs", store_addr, tmp_path / "r3")
    assert stats(warm).remote_fetched == FILES


# -- bad stores ----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_registry_that_is_down_gives_one_warning_and_the_same_image(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    want = build(src, tmp_path / "plain.sqfs").digest
    result = build(src, tmp_path / "a.sqfs", f"127.0.0.1:{closed_port()}/cache", tmp_path / "local")
    assert result.digest == want
    assert len(result.warnings) == 1 and "shared build cache" in result.warnings[0]
    assert stats(result).content_stored == FILES  # the local tier still works
    assert stats(result).remote_fetched == stats(result).remote_pushed == 0


def test_a_layout_path_that_is_a_file_warns_and_builds(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    (tmp_path / "file").write_text("not a layout")
    result = build(src, tmp_path / "a.sqfs", f"oci:{tmp_path / 'file'}", tmp_path / "local")
    assert result.digest == build(src, tmp_path / "plain.sqfs").digest
    assert len(result.warnings) == 1 and "shared build cache" in result.warnings[0]


def _blob_file(addr: str, digest: str, registry: Registry | None) -> Path:
    if addr.startswith("oci:"):
        return Path(addr[4:]) / "blobs" / "sha256" / digest.split(":", 1)[1]
    assert registry is not None
    return registry.blob_path(digest)


def test_a_blob_with_wrong_bytes_is_refused(
    store_addr: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_remote, "PACK_MAX", 1)  # a pack per entry: one is damaged
    registry = request.getfixturevalue("registry") if not store_addr.startswith("oci:") else None
    # Contents of its own: the registry keeps one file per blob for all repositories,
    # and a blob already there is not written again by a later upload.
    src = make_tree(tmp_path / "src", seed=4242 if registry is None else 4243)
    want = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a").digest
    key, line = next(iter(index_of(store_addr).items()))
    desc = line.pack
    assert len({line.pack.digest for line in index_of(store_addr).values()}) == FILES
    blob = _blob_file(store_addr, desc.digest, registry)
    good = blob.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same length: only the digest can tell
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))

    local = tmp_path / "runner-b"
    try:
        b = build(src, tmp_path / "b.sqfs", store_addr, local)
    finally:
        blob.write_bytes(good)
    assert b.digest == want
    assert stats(b).remote_refused == 1 and stats(b).remote_fetched == FILES - 1
    assert len(b.warnings) == 1 and "refused" in b.warnings[0]
    # The entry in the local tier is the one this build made, not the registry's bytes.
    entry = (local / (pyimg.cache.ENTRY_PREFIX + key.hex())).read_bytes()
    assert entry != bytes(data) and "sha256:" + hashlib.sha256(entry).hexdigest() == desc.digest


def _rewrite_index(addr: str, edit: Any, tag: str | None = None) -> None:
    store = ops.open_store(addr)
    try:
        ref = ops.parse_ref(addr)
        value = store.get_manifest(index_tag(ref)).json
        edit(value)
        store.put_manifest(Manifest.of(value), tag or index_tag(ref))
    finally:
        store.close()


def test_an_index_line_naming_another_keys_entry_is_refused(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    want = build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a").digest

    def swap(value: dict[str, Any]) -> None:
        [layer] = value["layers"]
        items = [item.split(":") for item in layer["annotations"][cache_remote.A_ENTRIES].split(",")]
        items[0][0], items[1][0] = items[1][0], items[0][0]  # two keys, each at the other's entry
        layer["annotations"][cache_remote.A_ENTRIES] = ",".join(":".join(item) for item in items)

    _rewrite_index(store_addr, swap)
    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert b.digest == want
    assert stats(b).remote_refused == 2 and stats(b).remote_fetched == FILES - 2
    assert len(b.warnings) == 1 and "refused" in b.warnings[0]


def test_another_versions_cache_is_ignored(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    build(src, tmp_path / "a.sqfs", store_addr, tmp_path / "runner-a")
    foreign = f"buildcache-v{pyimg.cache.FORMAT_VERSION + 1}.{cache_remote.INDEX_FORMAT}"
    _rewrite_index(store_addr, lambda value: None, tag=foreign)  # the same lines under its tag

    def other_format(value: dict[str, Any]) -> None:
        value["annotations"][cache_remote.A_FORMAT] = f"{cache_remote.INDEX_FORMAT + 1}"

    _rewrite_index(store_addr, other_format)  # and our tag saying another format
    b = build(src, tmp_path / "b.sqfs", store_addr, tmp_path / "runner-b")
    assert stats(b).remote_fetched == 0 and stats(b).content_stored == FILES and not b.warnings
    assert len(index_of(store_addr)) == FILES  # replaced by this format's
    assert b.digest == build(src, tmp_path / "plain.sqfs").digest


def test_a_cache_tag_names_a_separate_cache(store_addr: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    build(src, tmp_path / "a.sqfs", f"{store_addr}:main", tmp_path / "runner-a")
    b = build(src, tmp_path / "b.sqfs", f"{store_addr}:other", tmp_path / "runner-b")
    assert stats(b).remote_fetched == 0
    c = build(src, tmp_path / "c.sqfs", f"{store_addr}:main", tmp_path / "runner-c")
    assert stats(c).remote_fetched == FILES


# -- naming the cache ----------------------------------------------------------------------


def test_what_a_cache_value_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert remote_ref("cache") is None and remote_ref("/var/cache/b") is None
    assert remote_ref("./a.b/c") is None and remote_ref("dir/sub") is None
    ref = remote_ref("127.0.0.1:5000/ci/cache")
    assert ref is not None and ref.kind == "registry" and index_tag(ref) == "buildcache-v1.2"
    ref = remote_ref("localhost/cache:main")
    assert ref is not None and index_tag(ref) == "main-buildcache-v1.2"
    ref = remote_ref("oci:layout")
    assert ref is not None and ref.kind == "layout" and ref.path == "layout"
    (tmp_path / "a.b" / "c").mkdir(parents=True)
    assert remote_ref("a.b/c") is None  # an existing directory stays one
    with pytest.raises(SpecError, match="tag, not a digest"):
        remote_ref("localhost/cache@sha256:" + "0" * 64)
    with pytest.raises(SpecError, match="cache"):
        options_for(["src"], "out", cache="oci:x@sha256:" + "0" * 64)
    assert spec_value("c", "/spec") == "/spec/c"
    assert spec_value("oci:c", "/spec") == "oci:/spec/c"
    assert spec_value("registry.example:5000/c", "/spec") == "registry.example:5000/c"


def test_a_spec_names_a_shared_cache(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'output = "out.sqfs"\ncache = "oci:layout"\n[[source]]\npath = "{src}"\n')
    result = pyimg.build([], spec=str(spec), epoch=EPOCH)
    assert stats(result).remote_pushed == FILES
    assert len(index_of(f"oci:{tmp_path / 'layout'}")) == FILES


def test_the_cli_with_a_layout_cache(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    layout = f"oci:{tmp_path / 'layout'}"
    out = []
    for runner in ("a", "b"):
        env = dict(os.environ, PYIMG_BUILD_CACHE=str(tmp_path / f"local-{runner}"))
        done = run_cli(
            "build", str(src), "-o", str(tmp_path / f"{runner}.sqfs"), "--epoch", str(EPOCH),
            "--cache", layout, "--json", env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "warning" not in done.stderr
        out.append(json.loads(done.stdout))
    assert out[0]["cache"]["remote_pushed"] == FILES
    assert out[1]["cache"]["remote_fetched"] == FILES and out[1]["cache"]["content_hits"] == FILES
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()
    assert os.listdir(tmp_path / "local-b")  # the local tier is the default directory
    text = run_cli("build", "--help", env=dict(os.environ, COLUMNS="200")).stdout
    assert "oci:DIR" in text and "HOST/REPO" in text


# -- random trees through the shared tier ----------------------------------------------------


@settings(max_examples=max(10, settings.default.max_examples // 4), deadline=None)
@given(
    options=OPTIONS,
    files=st.dictionaries(NAMES, FILE_SPECS, min_size=1, max_size=7),
    edits=EDITS,
    pack_max=st.sampled_from([1, 64 << 10, cache_remote.PACK_MAX]),
    draw=st.booleans(),
    jobs=st.sampled_from([1, 2, 4]),
)
def test_fresh_runners_from_packs_build_the_clean_image(
    options: dict[str, Any], files: dict[str, Any], edits: Any, pack_max: int, draw: bool, jobs: int
) -> None:
    """Runner A exports a random tree's entries in packs (one entry each, 64 KiB, or
    the default); fresh runner B builds it from them, runner C an edited tree (some
    entries from A's packs, the rest computed), runner D that tree from A's and C's
    packs: every image is the clean build's, at every jobs."""
    from unittest import mock

    note(f"{files} then {edits}")
    patches = [
        mock.patch.object(cache_remote, "PACK_MAX", pack_max),
        mock.patch.object(cache_remote, "DRAW_MAX", cache_remote.DRAW_MAX if draw else 0),
        mock.patch.object(cache_remote, "SETTLE_S", 0.0),
    ]
    with scratch() as work, small_chunks(), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        src, img, store = work / "src", work / "img", f"oci:{work / 'layout'}"

        def runner(name: str) -> pyimg.BuildResult:
            local = str(work / f"runner-{name}")
            opts = options_for(
                [str(src)], str(img), epoch=EPOCH, jobs=jobs, cache=store, block_size=4096, **options
            )
            opts = dataclasses.replace(opts, cache=dataclasses.replace(opts.cache, local=local))
            result = build_with(opts)
            assert not result.warnings, result.warnings
            return result

        random_tree(src, files)
        a = runner("a")
        b = runner("b")
        clean = cache_build(src, img, jobs=1, **options).digest
        assert a.digest == b.digest == clean
        assert stats(b).content_stored == stats(b).fragment_stored == 0  # all from A's packs
        event(f"packs fetched by B: {min(stats(b).remote_packs, 3)}")
        apply_edits(src, edits)
        c, d = runner("c"), runner("d")
        assert c.digest == d.digest == cache_build(src, img, jobs=2, **options).digest
        assert stats(d).content_stored == stats(d).fragment_stored == 0
