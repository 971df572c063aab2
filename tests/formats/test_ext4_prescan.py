"""The ext4 hash pass started during collection (ext4.Prescan): it scans exactly
the groups the hash pass would, the image is byte-identical with and without it,
and a prescan that does not match the tree is dropped, never trusted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

import pyimg
from pyimg.formats import ext4
from pyimg.tree import DataRef

from ..ext4_oracle import e2fsck_clean
from ..oracles import make_varied_tree
from .test_ext4_trees import assert_image_is


def _tree(root: Path) -> Path:
    """Several scan groups (small files, big ones alone), files sorted after a
    subdirectory (the walk must still report them in the tree's order), hard links
    across directories, a sparse file and empty ones."""
    make_varied_tree(root)
    for d in range(3):
        sub = root / f"many{d}"
        (sub / "inner").mkdir(parents=True)
        for i in range(150):
            (sub / f"f{i:03d}").write_bytes(b"%d %d\n" % (d, i) * (1 + i % 40))
            (sub / "inner" / f"g{i:03d}").write_bytes(b"inner %d" % i)
        (sub / "zz-after-inner").write_bytes(b"after")
    (root / "big").write_bytes(os.urandom(ext4.SMALL_FILE + 12345))
    (root / "many0" / "big-dup").write_bytes((root / "big").read_bytes())
    with open(root / "sparse", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    os.link(root / "many1" / "f007", root / "many2" / "inner" / "link-to-f007")
    return root


def _build(tmp_path: Path, source: Path, name: str) -> pyimg.BuildResult:
    return pyimg.build([str(source)], str(tmp_path / name), format="ext4", owner="preserve")


def test_prescan_scans_every_group_and_changes_no_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _tree(tmp_path / "src")
    taken: list[bool] = []
    real_take = ext4.Prescan.take

    def take(self: ext4.Prescan, refs: list[DataRef]) -> Any:
        got = real_take(self, refs)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(ext4.Prescan, "take", take)
    monkeypatch.setattr(ext4.Prescan, "stop", lambda self: None)  # let it scan every group
    with_prescan = _build(tmp_path, source, "with.ext4")
    assert len(taken) > 5 and all(taken), taken  # one directory source: every group prescanned
    monkeypatch.setattr(ext4.Ext4Writer, "prescan", lambda self: None)
    without = _build(tmp_path, source, "without.ext4")
    assert with_prescan.digest == without.digest
    assert with_prescan.manifest["entries"] == without.manifest["entries"]
    e2fsck_clean(tmp_path / "with.ext4")
    assert_image_is(source, tmp_path / "with.ext4", tmp_path)


def test_prescan_is_not_fed_when_sources_layer(tmp_path: Path) -> None:
    """With two sources the walk's order is not the tree's: nothing is prescanned
    and the hash pass scans everything itself."""
    first = _tree(tmp_path / "first")
    second = tmp_path / "second"
    (second / "many0").mkdir(parents=True)
    (second / "many0" / "f001").write_bytes(b"replaced")
    out = tmp_path / "layered.ext4"
    result = pyimg.build([str(first), str(second)], str(out), format="ext4", owner="root", epoch=1)
    alone = pyimg.build([str(first), str(second)], str(tmp_path / "again.ext4"), format="ext4", owner="root",
                        epoch=1, jobs=1)  # fmt: skip
    assert result.digest == alone.digest
    e2fsck_clean(out)


def test_a_prescan_that_does_not_match_is_dropped(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * (i + 1))
        files.append(DataRef.at(str(path), 0, i + 1))
    prescan = ext4.Prescan()
    try:
        for ref in files:
            prescan.add(ref)
        prescan.finish()
        assert prescan.take(files[1:]) is None  # another group than the prescan's
        assert not prescan.groups  # dropped: nothing is taken from it any more
        assert prescan.take(files) is None
    finally:
        prescan.close()


def test_the_hash_pass_takes_over_the_groups_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = []
    for i in range(3):
        path = tmp_path / f"big{i}"
        path.write_bytes(bytes([i + 1]) * (ext4.SMALL_FILE + 1))  # a group each
        refs.append(DataRef.at(str(path), 0, ext4.SMALL_FILE + 1))
    release = threading.Event()
    real_run = ext4.Prescan._run

    def slow_run(self: ext4.Prescan, group: list[DataRef]) -> Any:
        release.wait(10)
        return real_run(self, group)

    monkeypatch.setattr(ext4.Prescan, "_run", slow_run)
    prescan = ext4.Prescan()
    try:
        for ref in refs:
            prescan.add(ref)
        prescan.finish()
        while not prescan.groups[0][1].running():
            time.sleep(0.001)
        prescan.stop()  # the first group is being scanned, the other two are not
        release.set()
        first = prescan.take(refs[:1])
        assert (
            first is not None
            and bytes(first.digests) == blake3.blake3(b"\x01" * (ext4.SMALL_FILE + 1)).digest()
        )
        assert prescan.take(refs[1:2]) is None  # cancelled: the hash pass scans it
    finally:
        release.set()
        prescan.close()


def test_closing_a_prescan_ends_a_big_scan_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error or Ctrl-C during collection does not wait for a whole big file."""
    path = tmp_path / "big"
    path.write_bytes(b"\x01" * (64 * ext4.CHUNK))
    ref = DataRef.at(str(path), 0, 64 * ext4.CHUNK)
    chunks = 0
    real_read = ext4.ContentReader.read

    def slow_read(self: ext4.ContentReader, offset: int, length: int) -> bytes:
        nonlocal chunks
        chunks += 1
        time.sleep(0.01)
        return real_read(self, offset, length)

    monkeypatch.setattr(ext4.ContentReader, "read", slow_read)
    prescan = ext4.Prescan()
    prescan.add(ref)
    prescan.finish()
    while chunks < 2:
        time.sleep(0.001)
    prescan.close()
    assert chunks < 32  # stopped at the next chunk, not after all 64
    assert not prescan.groups


def test_a_file_changed_after_the_prescan_read_it_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyimg.api as api

    source = tmp_path / "src"
    source.mkdir()
    for i in range(300):
        (source / f"f{i:03d}").write_bytes(b"content %d\n" % i)
    victim = source / "f000"
    real_collect = api.collect

    def collect_then_change(options: pyimg.BuildOptions, on_file: Any = None) -> Any:
        collected = real_collect(options, on_file)
        prescan = on_file.__self__  # type: ignore[union-attr]
        prescan.groups[0][1].result()  # the victim's group was read and hashed
        victim.write_bytes(b"CONTENT 0\n")  # same size, new mtime
        os.utime(victim, ns=(0, 123))
        return collected

    monkeypatch.setattr(api, "collect", collect_then_change)
    with pytest.raises(pyimg.SourceError) as err:
        pyimg.build([str(source)], str(tmp_path / "out.ext4"), format="ext4")
    assert str(victim) in str(err.value) and "changed while" in str(err.value)
    assert not (tmp_path / "out.ext4").exists()
