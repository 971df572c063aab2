"""Chunked push and pull: the next version of an image moves only the chunks that changed.

Both stores: the OCI layout directory and the real registry (conftest.py)."""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import pyimg
from pyimg.chunks import chunk_file
from pyimg.errors import DigestMismatchError
from pyimg.store import chunked, ops
from pyimg.store.artifact import CHUNK
from pyimg.store.layout import LayoutStore

from .conftest import leftovers


@dataclass(frozen=True)
class Versions:
    v1: str
    v2: str
    size: int


def _build(src: Path, out: Path, fmt: str) -> None:
    pyimg.build([str(src)], str(out), manifest=str(out) + ".json", epoch=1700000000, format=fmt)


@pytest.fixture(scope="module", params=["squashfs", "ext4"])
def versions(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """Two images of a ~7 MB tree of 120 files; v2 after 4 KiB of one file changed."""
    fmt = request.param
    d = tmp_path_factory.mktemp(f"versions-{fmt}")
    src = d / "src"
    src.mkdir()
    rng = random.Random(12)
    for i in range(120):
        (src / f"f{i:03}").write_bytes(rng.randbytes(rng.randint(1000, 120_000)))
    _build(src, d / f"v1.{fmt}", fmt)
    changed = src / "f050"
    with open(changed, "r+b") as f:
        f.seek(changed.stat().st_size // 2)
        f.write(rng.randbytes(4096))
    _build(src, d / f"v2.{fmt}", fmt)
    v2 = str(d / f"v2.{fmt}")
    return Versions(str(d / f"v1.{fmt}"), v2, os.path.getsize(v2))


def test_the_next_version_uploads_only_new_chunks(store_addr: str, versions: Versions) -> None:
    first = ops.push(versions.v1, f"{store_addr}:v1")
    assert first.chunk_bytes_uploaded > 0.9 * os.path.getsize(versions.v1)
    second = ops.push(versions.v2, f"{store_addr}:v2")
    assert second.chunked and second.manifest_uploaded
    # One 4 KiB change: the chunk(s) around it and what the writer's metadata moved.
    assert 0 < second.chunk_bytes_uploaded <= 0.05 * versions.size
    assert second.chunks_uploaded <= 4
    assert second.chunk_bytes_uploaded + second.chunk_bytes_present <= versions.size
    assert second.bytes_uploaded == second.chunk_bytes_uploaded + len(
        Path(versions.v2 + ".json").read_bytes()
    )


def test_pull_with_the_old_version_present_downloads_only_new_chunks(
    store_addr: str, versions: Versions, tmp_path: Path
) -> None:
    ops.push(versions.v1, f"{store_addr}:v1")
    pushed = ops.push(versions.v2, f"{store_addr}:v2")
    target = tmp_path / "img"
    shutil.copyfile(versions.v1, target)  # the machine has v1 where v2 goes
    pulled = ops.pull(f"{store_addr}:v2", str(target))
    assert filecmp.cmp(target, versions.v2, shallow=False)
    assert pulled.digest == pushed.digest and pulled.chunked
    assert pulled.bytes_downloaded == pushed.chunk_bytes_uploaded  # exactly the new chunks
    assert pulled.chunks_downloaded == pushed.chunks_uploaded
    assert pulled.chunks_reused == pulled.chunks - pulled.chunks_downloaded
    assert pulled.reused_from == (str(target),)
    assert leftovers(tmp_path, {"img", "layout"}) == set()
    # --from: the old version elsewhere, a new target
    other = ops.pull(f"{store_addr}:v2", str(tmp_path / "new"), sources=[versions.v1])
    assert filecmp.cmp(tmp_path / "new", versions.v2, shallow=False)
    assert other.bytes_downloaded == pushed.chunk_bytes_uploaded


def test_pull_with_no_old_version(store_addr: str, versions: Versions, tmp_path: Path) -> None:
    pushed = ops.push(versions.v2, f"{store_addr}:v2")
    pulled = ops.pull(f"{store_addr}:v2", str(tmp_path / "img"), sources=[str(tmp_path / "nothing-here")])
    assert filecmp.cmp(tmp_path / "img", versions.v2, shallow=False)
    assert pulled.chunks_reused == 0 and pulled.chunks_downloaded == pulled.chunks
    assert pulled.bytes_downloaded == pushed.chunk_bytes_uploaded


def test_a_corrupted_chunk_is_refused_and_nothing_written(versions: Versions, tmp_path: Path) -> None:
    layout = tmp_path / "l"
    ops.push(versions.v2, f"oci:{layout}:v2")
    value = json.loads(LayoutStore(str(layout)).get_manifest("v2").data)
    in_v1 = {c.digest for c in chunk_file(versions.v1)}
    # a chunk v1 lacks: with v1 present, it must come from the store
    chunk = next(d for d in value["layers"] if d["mediaType"] == CHUNK and d["digest"] not in in_v1)
    blob = layout / "blobs" / "sha256" / chunk["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DigestMismatchError, match=chunk["digest"]):
        ops.pull(f"oci:{layout}:v2", str(out / "img"))
    assert os.listdir(out) == []
    # An existing target is left as it was.
    shutil.copyfile(versions.v1, out / "img")
    with pytest.raises(DigestMismatchError):
        ops.pull(f"oci:{layout}:v2", str(out / "img"))
    assert os.listdir(out) == ["img"] and filecmp.cmp(out / "img", versions.v1, shallow=False)


def test_a_local_chunk_that_lies_is_caught_by_the_whole_image_check(
    versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local file changed between its scan and the copy: the reassembled image does
    not match the manifest, and nothing is written."""
    ops.push(versions.v2, f"oci:{tmp_path / 'l'}:v2")
    real = chunked._read_local

    def flipped(chunk: chunked.LocalChunk) -> bytes:
        data = bytearray(real(chunk))
        data[0] ^= 1
        return bytes(data)

    monkeypatch.setattr(chunked, "_read_local", flipped)
    with pytest.raises(DigestMismatchError, match="reassembled"):
        ops.pull(f"oci:{tmp_path / 'l'}:v2", str(tmp_path / "img"), sources=[versions.v1])
    assert not (tmp_path / "img").exists()


def test_single_blob_artifacts_still_pull(store_addr: str, versions: Versions, tmp_path: Path) -> None:
    pushed = ops.push(versions.v1, f"{store_addr}:old", chunked=False)
    assert not pushed.chunked and pushed.blobs_uploaded == 3
    pulled = ops.pull(f"{store_addr}:old", str(tmp_path / "img"), sources=[versions.v2])
    assert not pulled.chunked and pulled.bytes_downloaded == pulled.size
    assert filecmp.cmp(tmp_path / "img", versions.v1, shallow=False)


def test_a_repeated_push_asks_only_about_the_manifest(versions: Versions, tmp_path: Path) -> None:
    ref = f"oci:{tmp_path / 'l'}:v2"
    first = ops.push(versions.v2, ref)
    again = ops.push(versions.v2, ref)
    assert again.digest == first.digest and not again.manifest_uploaded
    assert again.chunks_uploaded == 0 and again.chunks_present == first.chunks_uploaded


def test_a_big_chunk_list_gets_bigger_chunks(
    versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the chunk list would not fit a registry's manifest limit, every chunk size is
    doubled until it does (here with a tiny limit)."""
    monkeypatch.setattr(chunked, "MANIFEST_BUDGET", 8 << 10)
    ops.push(versions.v2, f"oci:{tmp_path / 'l'}:v2")
    store = LayoutStore(str(tmp_path / "l"))
    manifest = store.get_manifest("v2")
    assert len(manifest.data) <= 8 << 10
    label = manifest.json["annotations"]["vnd.pyimg.chunking"]
    assert label != "gear64-v1:16384/65536/262144"
    ops.pull(f"oci:{tmp_path / 'l'}:v2", str(tmp_path / "img"), sources=[versions.v1])
    assert filecmp.cmp(tmp_path / "img", versions.v2, shallow=False)


def test_fetch_image_reuses_the_cached_older_version(
    store_addr: str, versions: Versions, tmp_path: Path
) -> None:
    ops.push(versions.v1, f"{store_addr}:boot")
    cache = tmp_path / "cache"
    first = ops.fetch_image(f"{store_addr}:boot", str(cache))
    ops.push(versions.v2, f"{store_addr}:boot")
    second = ops.fetch_image(f"{store_addr}:boot", str(cache))
    assert second != first and filecmp.cmp(second, versions.v2, shallow=False)


def test_cli_push_and_pull_from(versions: Versions, tmp_path: Path) -> None:
    from .test_interop_cli import run

    layout = f"oci:{tmp_path / 'l'}"
    assert run("push", versions.v1, f"{layout}:v1").returncode == 0
    pushed = run("push", versions.v2, f"{layout}:v2", "--json")
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    assert summary["chunked"] and summary["chunk_bytes_uploaded"] <= 0.05 * versions.size
    pulled = run("pull", f"{layout}:v2", "-o", str(tmp_path / "img"), "--from", versions.v1, "--json")
    assert pulled.returncode == 0, pulled.stderr
    result = json.loads(pulled.stdout)
    assert result["bytes_downloaded"] == summary["chunk_bytes_uploaded"]
    assert result["reused_from"] == [versions.v1]
    assert filecmp.cmp(tmp_path / "img", versions.v2, shallow=False)
    whole = run("push", versions.v2, f"{layout}:whole", "--no-chunks", "--json")
    assert whole.returncode == 0 and not json.loads(whole.stdout)["chunked"]


def test_the_pyimg_manifest_moves_as_chunks_too(tmp_path: Path) -> None:
    """A tree of many files has a big pyimg manifest (hundreds of bytes per file): it is
    stored as chunks, so after one changed file only the chunks around that file's line
    go up, and a pull beside the old manifest fetches only those."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(4)
    for i in range(4000):
        (src / f"d{i % 40:02}").mkdir(exist_ok=True)
        (src / f"d{i % 40:02}" / f"f{i:04}").write_bytes(rng.randbytes(rng.randint(10, 3000)))
    _build(src, tmp_path / "v1.sqfs", "squashfs")
    (src / "d10" / "f2010").write_bytes(rng.randbytes(4096))
    _build(src, tmp_path / "v2.sqfs", "squashfs")
    manifest_v2 = Path(str(tmp_path / "v2.sqfs") + ".json").read_bytes()
    assert len(manifest_v2) > 900_000
    store_addr = f"oci:{tmp_path / 'layout'}"
    ops.push(str(tmp_path / "v1.sqfs"), f"{store_addr}:v1")
    second = ops.push(str(tmp_path / "v2.sqfs"), f"{store_addr}:v2")
    manifest_sent = second.bytes_uploaded - second.chunk_bytes_uploaded
    # Two places change (the image's digests at the head, the file's entry): two chunks
    # of ~64 KiB, of the ~15 the manifest is cut into.
    assert 0 < manifest_sent <= 0.25 * len(manifest_v2)

    fetched: list[str] = []
    real = ops.fetch_bytes

    def counting(store: object, desc: object, limit: int = 64 << 20) -> bytes:
        fetched.append(desc.digest)  # type: ignore[attr-defined]
        return real(store, desc, limit)  # type: ignore[arg-type]

    target = tmp_path / "pulled"
    shutil.copyfile(tmp_path / "v1.sqfs", target)
    shutil.copyfile(str(tmp_path / "v1.sqfs") + ".json", str(target) + ".json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "fetch_bytes", counting)
        ops.pull(f"{store_addr}:v2", str(target), manifest_output=str(target) + ".json")
    assert Path(str(target) + ".json").read_bytes() == manifest_v2
    assert filecmp.cmp(target, tmp_path / "v2.sqfs", shallow=False)
    assert 0 < len(fetched) <= 3  # the changed manifest chunks, not all ~15
