"""push and pull against both stores: the OCI layout directory and the real registry."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import pyimg
from pyimg.errors import DigestMismatchError, SpecError, StoreNotFoundError
from pyimg.store import ops
from pyimg.store.artifact import (
    CHUNK,
    EMPTY_DIGEST,
    IMAGE_ARTIFACT,
    MANIFEST_CHUNK,
    OCI_EMPTY,
    PYIMG_MANIFEST,
    canonical_json,
)
from pyimg.store.layout import LayoutStore
from pyimg.store.registry import RegistryStore

from ..oracles import require_tool
from .conftest import Image, Registry, leftovers, make_image


def test_push_pull_roundtrip(store_addr: str, image: Image, tmp_path: Path) -> None:
    pushed = ops.push(image.path, f"{store_addr}:v1")
    assert pushed.chunked and pushed.manifest_uploaded
    assert pushed.blobs_uploaded == 2 + pushed.chunks_uploaded  # the config, the pyimg manifest
    assert pushed.chunk_bytes_uploaded == image.size
    out = tmp_path / "out" / "img.sqfs"
    out.parent.mkdir()
    pulled = ops.pull(f"{store_addr}:v1", str(out), manifest_output=str(tmp_path / "out" / "img.json"))
    assert pulled.digest == pushed.digest
    assert filecmp.cmp(out, image.path, shallow=False)
    assert filecmp.cmp(tmp_path / "out" / "img.json", image.manifest, shallow=False)
    # and by digest
    out2 = tmp_path / "out" / "by-digest.sqfs"
    ops.pull(f"{store_addr}@{pushed.digest}", str(out2))
    assert filecmp.cmp(out2, image.path, shallow=False)


def _stored_manifest(store_addr: str, tag: str) -> tuple[str, dict[str, object], bytes]:
    store = ops.open_store(store_addr)
    try:
        m = store.get_manifest(tag)
    finally:
        store.close()
    return m.digest, json.loads(m.data), m.data


def test_manifest_format(store_addr: str, image: Image) -> None:
    pushed = ops.push(image.path, f"{store_addr}:fmt")
    digest, value, data = _stored_manifest(store_addr, "fmt")
    assert digest == pushed.digest
    assert data == canonical_json(value)  # canonical: sorted keys, no whitespace
    assert value["artifactType"] == IMAGE_ARTIFACT
    assert value["config"] == {"mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2}
    layers: list[dict[str, Any]] = value["layers"]  # type: ignore[assignment]
    chunks = [c for c in layers if c["mediaType"] == CHUNK]
    metas = layers[len(chunks) :]  # the pyimg manifest's chunks, after the image's
    assert chunks == layers[: len(chunks)] and {m["mediaType"] for m in metas} == {MANIFEST_CHUNK}
    assert [set(c) for c in layers] == [{"mediaType", "digest", "size"}] * len(layers)
    assert sum(c["size"] for c in chunks) == image.size
    raw = Path(image.manifest).read_bytes()
    assert sum(m["size"] for m in metas) == len(raw)
    manifest = json.loads(raw)
    assert value["annotations"] == {
        "vnd.pyimg.manifest.sha256": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "vnd.pyimg.manifest.size": str(len(raw)),
        "vnd.pyimg.format": "squashfs",
        "vnd.pyimg.version": manifest["versions"]["pyimg"],
        "vnd.pyimg.blake3": manifest["image"]["blake3"],
        "vnd.pyimg.sha256": "sha256:" + manifest["image"]["sha256"],
        "vnd.pyimg.size": str(image.size),
        "vnd.pyimg.chunking": "gear64-v1:16384/65536/262144",
        "vnd.pyimg.title": "img.sqfs",
        "org.opencontainers.image.created": "2023-11-14T22:13:20Z",  # the image's epoch, not the clock
    }


def test_single_blob_manifest_format(store_addr: str, image: Image) -> None:
    pushed = ops.push(image.path, f"{store_addr}:fmt", chunked=False)
    assert not pushed.chunked and pushed.blobs_uploaded == 3
    digest, value, _ = _stored_manifest(store_addr, "fmt")
    assert digest == pushed.digest
    img, meta = value["layers"]  # type: ignore[misc]
    assert img["mediaType"] == "application/vnd.pyimg.squashfs" and img["size"] == image.size
    assert meta["mediaType"] == PYIMG_MANIFEST
    manifest = json.loads(Path(image.manifest).read_bytes())
    assert value["annotations"] == {
        "vnd.pyimg.format": "squashfs",
        "vnd.pyimg.version": manifest["versions"]["pyimg"],
        "vnd.pyimg.blake3": manifest["image"]["blake3"],
        "org.opencontainers.image.created": "2023-11-14T22:13:20Z",
    }


def test_same_image_same_digest_everywhere(registry: Registry, image: Image, tmp_path: Path) -> None:
    a = ops.push(image.path, f"oci:{tmp_path / 'a'}:x")
    time.sleep(1.1)  # a clock in the manifest would show now
    b = ops.push(image.path, f"oci:{tmp_path / 'b'}:other-tag")
    c = ops.push(image.path, registry.repo() + ":y")
    assert a.digest == b.digest == c.digest


def test_no_epoch_no_time_annotation(tmp_path: Path) -> None:
    img = make_image(tmp_path, "noepoch", size=1000, epoch=0)
    manifest = json.loads(Path(img.manifest).read_text())
    manifest["options"]["epoch"] = None
    Path(img.manifest).write_text(json.dumps(manifest))
    ops.push(img.path, f"oci:{tmp_path / 'l'}:v")
    value = json.loads(LayoutStore(str(tmp_path / "l")).get_manifest("v").data)
    assert "org.opencontainers.image.created" not in value["annotations"]


def test_second_push_uploads_nothing(registry: Registry, image: Image) -> None:
    ref = registry.repo() + ":v1"
    first = ops.push(image.path, ref)
    store = ops.open_store(ref)
    assert isinstance(store, RegistryStore)
    try:
        started = time.monotonic()
        again = ops.push(image.path, ref)
        elapsed = time.monotonic() - started
    finally:
        store.close()
    assert again.digest == first.digest
    assert (again.blobs_uploaded, again.bytes_uploaded) == (0, 0)
    assert again.blobs_present == 2 + again.chunks_present
    assert again.chunks_present == first.chunks_uploaded
    assert not again.manifest_uploaded
    assert elapsed < 2.0  # the bench measures it properly; here: no upload happened


def test_second_push_requests_are_heads_only(
    registry: Registry, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = registry.repo() + ":v1"
    ops.push(image.path, ref)
    seen: list[RegistryStore] = []
    real_open = ops.open_store

    def spy(*args: object, **kwargs: object) -> object:
        store = real_open(*args, **kwargs)  # type: ignore[arg-type]
        assert isinstance(store, RegistryStore)
        seen.append(store)
        return store

    monkeypatch.setattr(ops, "open_store", spy)
    ops.push(image.path, ref)
    # the config, the pyimg manifest, the tag and the manifest by digest (which vouches
    # for its chunks: the registry checked them when it took the manifest)
    assert seen[0].requests == {"HEAD": 4}


def test_pull_missing_tag_and_digest(store_addr: str, image: Image, tmp_path: Path) -> None:
    ops.push(image.path, f"{store_addr}:v1")
    out = tmp_path / "o.sqfs"
    with pytest.raises(StoreNotFoundError, match="nope"):
        ops.pull(f"{store_addr}:nope", str(out))
    with pytest.raises(StoreNotFoundError):
        ops.pull(f"{store_addr}@sha256:{'0' * 64}", str(out))
    assert not out.exists()
    assert leftovers(tmp_path, {"layout"}) == set()


def test_push_to_digest_refused(image: Image, tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        ops.push(image.path, f"oci:{tmp_path}/l@sha256:{'0' * 64}")


def test_push_to_reserved_tags_refused(image: Image, tmp_path: Path) -> None:
    for tag in ("pyimg-audit.20260101T000000.000000Z.prod.abc", "sha256-" + "a" * 64, "pyimg-ref.a.b"):
        with pytest.raises(SpecError, match="reserved"):
            ops.push(image.path, f"oci:{tmp_path}/l:{tag}")


def test_push_needs_matching_manifest(image: Image, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    value = json.loads(Path(image.manifest).read_text())
    value["image"]["size"] += 1
    bogus.write_text(json.dumps(value))
    with pytest.raises(SpecError, match="byte image"):
        ops.push(image.path, f"oci:{tmp_path / 'l'}", manifest_path=str(bogus))
    lonely = tmp_path / "lonely.sqfs"
    lonely.write_bytes(Path(image.path).read_bytes())
    with pytest.raises(SpecError, match="--manifest"):
        ops.push(str(lonely), f"oci:{tmp_path / 'l'}")


def test_layout_rejects_lying_manifest(image: Image, tmp_path: Path) -> None:
    """The pyimg manifest claims a SHA-256 the bytes do not have: the layout refuses the blob."""
    value = json.loads(Path(image.manifest).read_text())
    value["image"]["sha256"] = "1" * 64
    liar = tmp_path / "liar.json"
    liar.write_text(json.dumps(value))
    # chunked: refused while cutting the image, before the store is touched
    with pytest.raises(DigestMismatchError, match="pyimg manifest says"):
        ops.push(image.path, f"oci:{tmp_path / 'l'}:v", manifest_path=str(liar))
    assert not (tmp_path / "l").exists()
    # one blob: the layout refuses the blob
    with pytest.raises(DigestMismatchError):
        ops.push(image.path, f"oci:{tmp_path / 'l'}:v", manifest_path=str(liar), chunked=False)
    layout = LayoutStore(str(tmp_path / "l"))
    assert layout.tags() == []
    assert not [n for n in os.listdir(layout.blobs) if n.startswith(".")]


def test_registry_rejects_lying_manifest(registry: Registry, image: Image, tmp_path: Path) -> None:
    value = json.loads(Path(image.manifest).read_text())
    value["image"]["sha256"] = "1" * 64
    liar = tmp_path / "liar.json"
    liar.write_text(json.dumps(value))
    ref = registry.repo() + ":v"
    with pytest.raises(DigestMismatchError):
        ops.push(image.path, ref, manifest_path=str(liar))
    with pytest.raises(StoreNotFoundError):
        ops.pull(ref, str(tmp_path / "x"))
    with pytest.raises(DigestMismatchError):
        ops.push(image.path, ref, manifest_path=str(liar), verify=True)


def test_fetch_image_caches_by_digest(store_addr: str, image: Image, tmp_path: Path) -> None:
    ops.push(image.path, f"{store_addr}:boot")
    cache = tmp_path / "cache"
    path = ops.fetch_image(f"{store_addr}:boot", str(cache))
    assert filecmp.cmp(path, image.path, shallow=False)
    assert path.endswith(".squashfs")
    mtime = os.stat(path).st_mtime_ns
    assert ops.fetch_image(f"{store_addr}:boot", str(cache)) == path
    assert os.stat(path).st_mtime_ns == mtime  # not fetched again
    assert ops.is_store_ref(f"{store_addr}:boot") and not ops.is_store_ref(image.path)
    with open(path, "r+b") as f:  # a damaged cache file is pulled again, never used
        f.seek(100)
        f.write(b"XXXXXXXX")
    assert ops.fetch_image(f"{store_addr}:boot", str(cache)) == path
    assert filecmp.cmp(path, image.path, shallow=False)


def test_a_pinned_fetch_keeps_the_digest_when_the_tag_moves(
    store_addr: str, image: Image, tmp_path: Path
) -> None:
    first = ops.push(image.path, f"{store_addr}:moving").digest
    path, pinned = ops.fetch_pinned_image(f"{store_addr}:moving", str(tmp_path / "cache"))
    assert pinned.digest == first and filecmp.cmp(path, image.path, shallow=False)
    other = tmp_path / "other.sqfs"
    pyimg.build([str(Path(image.path).parent)], str(other), epoch=1, manifest=str(tmp_path / "other.json"))
    assert ops.push(str(other), f"{store_addr}:moving").digest != first
    assert pinned.digest == first  # what boot --record attaches to: the digest it booted


def test_manifest_head_skips_only_the_entries(image: Image) -> None:
    data = Path(image.manifest).read_bytes()
    full = json.loads(data)
    head = ops._manifest_head(data)
    del full["entries"]
    assert head == full
    # a manifest written some other way is parsed whole
    compact = json.dumps(json.loads(data)).encode()
    assert ops._manifest_head(compact) == json.loads(compact)


# -- a new layout appears whole ------------------------------------------------------


def _layout_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


WHOLE_LAYOUT = {"oci-layout", "index.json", "blobs", "blobs/sha256"}


def test_a_new_layout_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of a new layout lands before its directory is there: a reader in
    another process (a second CI runner) sees no layout or the whole one, never a
    directory without its index (which it would take for a broken store)."""
    import pyimg.store.layout as layout_module

    target = tmp_path / "l"
    seen: list[bool] = []
    write = layout_module._write_atomically

    def watching(directory: str, name: str, data: bytes) -> None:
        seen.append(target.exists())
        write(directory, name, data)

    monkeypatch.setattr(layout_module, "_write_atomically", watching)
    LayoutStore(str(target), create=True)
    assert seen == [False, False]  # oci-layout, index.json: both before the rename
    assert _layout_files(target) == WHOLE_LAYOUT
    assert [p.name for p in tmp_path.iterdir()] == ["l"]  # no temp directory left


def test_a_layout_is_made_in_an_empty_directory_and_completed_in_a_full_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()  # e.g. a CI cache step made it
    assert LayoutStore(str(empty), create=True).tags() == []
    assert _layout_files(empty) == WHOLE_LAYOUT
    full = tmp_path / "full"
    full.mkdir()
    (full / "README").write_text("kept\n")
    assert LayoutStore(str(full), create=True).tags() == []
    assert _layout_files(full) == WHOLE_LAYOUT | {"README"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


def test_an_empty_directory_keeps_its_mode_owner_and_default_acl(tmp_path: Path) -> None:
    """A cache directory a CI step set up (group-shared, setgid, a default ACL): the
    layout that replaces it takes them, and its contents inherit them."""
    empty = tmp_path / "shared"
    empty.mkdir()
    os.chmod(empty, 0o2770)
    uid, gid = (4321, 1234) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(empty, uid, gid)
    acl = require_tool("setfacl")
    subprocess.run([acl, "-d", "-m", f"g::rwx,o::---,u:{uid}:rwx", str(empty)], check=True)
    before = os.getxattr(empty, "system.posix_acl_default")
    LayoutStore(str(empty), create=True)
    st = os.stat(empty)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2770, uid, gid)
    assert os.getxattr(empty, "system.posix_acl_default") == before
    blobs = empty / "blobs" / "sha256"
    assert os.stat(blobs).st_gid == gid and os.getxattr(blobs, "system.posix_acl_default") == before


def test_a_dead_creators_temp_directory_is_removed(tmp_path: Path) -> None:
    """A creator killed while it made the layout left `.NAME.<hex>` beside it: the next
    creator removes it, unless its creator still holds it (it is still making it)."""
    import fcntl

    stale = tmp_path / ".l.pyimg-layout-host-999999-00ff.tmp"
    held = tmp_path / ".l.pyimg-layout-elsewhere-1-00ff.tmp"
    other = tmp_path / ".m.pyimg-layout-host-999999-00ff.tmp"  # another layout's
    users = tmp_path / ".l.0123456789abcdef"  # not ours at all
    for d in (stale, held, other, users):
        (d / "blobs").mkdir(parents=True)
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        LayoutStore(str(tmp_path / "l"), create=True)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([held.name, other.name, users.name, "l"])


def test_a_temp_directory_swept_before_its_creator_locks_it_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another creator's clean-up can see our new temp directory before we lock it
    (nobody holds it) and remove it: we take a new one.  Before, the layout was then
    made in place, where a reader could see it half made."""
    import pyimg.store.layout as layout_module
    from pyimg import output

    real_open = os.open
    swept: list[str] = []

    def open_after_a_sweep(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not swept and ".pyimg-layout-" in str(path):
            swept.append(str(path))
            output.remove_stale_temps(str(tmp_path), layout_module._TEMP_DIR_RE)  # what it does then
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(output.os, "open", open_after_a_sweep)
    seen: list[bool] = []
    write = layout_module._write_atomically

    def watching(directory: str, name: str, data: bytes) -> None:
        seen.append((tmp_path / "l").exists())
        write(directory, name, data)

    monkeypatch.setattr(layout_module, "_write_atomically", watching)
    LayoutStore(str(tmp_path / "l"), create=True)
    assert swept and not os.path.exists(swept[0])
    assert seen == [False, False]  # made beside, not in place
    assert _layout_files(tmp_path / "l") == WHOLE_LAYOUT
    assert [p.name for p in tmp_path.iterdir()] == ["l"]


def test_a_layout_that_cannot_be_made_beside_its_place_is_made_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent we may not write (root ignores modes: refuse the temp directory)."""
    import pyimg.store.layout as layout_module

    target = tmp_path / "l"
    target.mkdir()
    mkdir = os.mkdir

    def refusing(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.dirname(str(path)) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(layout_module.os, "mkdir", refusing)
    assert LayoutStore(str(target), create=True).tags() == []
    assert _layout_files(target) == WHOLE_LAYOUT


def test_concurrent_creators_and_readers_of_one_layout(tmp_path: Path) -> None:
    """Creators race for each of many fresh paths while a reader opens them: the reader
    finds no layout or a whole one, and every creator opens the one that won."""
    import threading

    from pyimg.errors import CorruptStoreError

    paths = [tmp_path / f"l{i}" for i in range(40)]
    failures: list[BaseException] = []
    start = threading.Barrier(3, timeout=30)

    def create() -> None:
        start.wait()
        for path in paths:
            try:
                LayoutStore(str(path), create=True).tags()
            except BaseException as exc:  # (reported below)
                failures.append(exc)

    def read() -> None:
        start.wait()
        for path in paths:
            deadline = time.monotonic() + 30
            while True:
                try:
                    LayoutStore(str(path)).tags()
                    break
                except StoreNotFoundError:
                    if time.monotonic() > deadline:
                        failures.append(TimeoutError(f"{path} never appeared"))
                        break
                    time.sleep(0.0005)  # not there yet
                except CorruptStoreError as exc:
                    failures.append(exc)
                    break

    threads = [threading.Thread(target=f) for f in (create, create, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert all(_layout_files(p) == WHOLE_LAYOUT for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
