"""Whole-image reuse (pyimg/reuse.py, docs/cache.md "whole images"): a rebuild whose
inputs are all as they were copies the earlier image -- the same bytes as a clean
build, for every format -- and any change to an input, the options or pyimg's code
builds it again.  A damaged entry is detected by the image digest and rebuilt.

(The random-edit properties of test_cache.py and test_cache_ext4.py reuse images
too: their warm builds at jobs 2 and 4 copy what the warm build at jobs 1 kept.)
"""

from __future__ import annotations

import errno
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import pyimg
import pyimg.api
import pyimg.reuse
from pyimg.cache import IMAGE_PREFIX
from pyimg.reuse import ALIGN, ENTRY_HEADER, IMAGES_KEPT, SLOT_PREFIX

from .oracles import IN_CI
from .test_cache import EDITS as TREE_EDITS
from .test_cache import EPOCH, FILES, NAMES, FileSpec, apply_edits, racy_window, scratch
from .test_cache import make_tree as make_random_tree

OLD = -(10**12)  # a racy window that trusts every identity (as if every file were old)
FORMATS = ["squashfs", "ext4", "cpio"]


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "conf").write_bytes(b"setting = 1\n" * 300)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(300_000))
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "empty").write_bytes(b"")
    os.symlink("etc/conf", root / "link")
    os.link(root / "etc" / "conf", root / "hard")
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


def build(src: Path, out: Path, fmt: str, **kw: Any) -> pyimg.BuildResult:
    return pyimg.build([str(src)], str(out), format=fmt, epoch=EPOCH, **kw)


def images(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.name.startswith(IMAGE_PREFIX))


def hits(result: pyimg.BuildResult) -> tuple[int, int]:
    assert result.cache is not None
    return result.cache.image_hits, result.cache.image_stored


def assert_as_clean(
    again: pyimg.BuildResult, clean: pyimg.BuildResult, manifest: Path, clean_manifest: Path
) -> None:
    """A reused image's result and manifest are the clean build's (the output named
    "img", the clean one "clean")."""
    assert manifest.read_bytes().replace(b'"img"', b'"clean"') == clean_manifest.read_bytes()
    assert (again.bytes_in, again.bytes_stored, again.image_size) == (
        clean.bytes_in, clean.bytes_stored, clean.image_size,
    )  # fmt: skip
    assert again.artifact.facts == clean.artifact.facts


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_no_change_rebuild_copies_the_image_a_clean_build_makes(
    tree: Path, tmp_path: Path, fmt: str
) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    clean = build(tree, tmp_path / "clean", fmt, manifest=str(tmp_path / "clean.json"))
    with racy_window(OLD):
        first = build(tree, img, fmt, cache=str(cache))
        assert hits(first) == (0, 1) and len(images(cache)) == 1
        for jobs in (1, 2, 4):
            again = build(tree, img, fmt, cache=str(cache), jobs=jobs, manifest=str(tmp_path / "again.json"))
            assert hits(again) == (1, 0) and not again.warnings
            assert again.digest == clean.digest and img.read_bytes() == (tmp_path / "clean").read_bytes()
            assert_as_clean(again, clean, tmp_path / "again.json", tmp_path / "clean.json")


@settings(max_examples=settings.default.max_examples)
@given(
    fmt=st.sampled_from(FORMATS),
    files=st.dictionaries(NAMES, FILES, min_size=1, max_size=6),
    edits=st.one_of(st.just([]), TREE_EDITS),
)
def test_reused_or_rebuilt_the_image_is_the_clean_one(
    fmt: str, files: dict[str, FileSpec], edits: list[tuple[str, str, FileSpec, int]]
) -> None:
    """Random trees, then no edit or random ones (add, remove, change, rename, chmod,
    touch, truncate, make sparse): every rebuild with the cache, at jobs 1, 2 and 4,
    is the image of a build without one; with no edit, each is a reused image."""
    note(f"{fmt}: {files} then {edits}")
    with scratch() as work:
        src, cache, img = work / "src", str(work / "cache"), work / "img"
        make_random_tree(src, files)
        with racy_window(OLD):
            build(src, img, fmt, cache=cache)
            time.sleep(0.02)  # a few timestamp ticks: an edited file's ctime moves
            apply_edits(src, edits)
            warm = [build(src, img, fmt, cache=cache, jobs=jobs) for jobs in (1, 2, 4)]
        clean = build(src, work / "clean", fmt, jobs=2)
    assert {result.digest for result in warm} == {clean.digest}
    reused = [hits(result)[0] for result in warm]
    event(f"{fmt}, {'edited' if edits else 'no edit'}: reused {reused}")
    if not edits:
        assert reused == [1, 1, 1]
    else:
        assert reused[1:] == [1, 1]  # the first warm build kept its image


def _edit_content(src: Path) -> None:
    (src / "etc" / "conf").write_bytes(b"setting = 2\n" * 300)  # same size


def _edit_mode(src: Path) -> None:
    os.chmod(src / "bin" / "tool", 0o700)


def _edit_touch(src: Path) -> None:
    os.utime(src / "etc", ns=(0, 1_600_000_000 * 10**9))  # a directory's mtime, older than the epoch


def _edit_touch_same_time(src: Path) -> None:
    st = os.stat(src / "bin" / "tool")
    os.utime(src / "bin" / "tool", ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime moves


def _edit_xattr(src: Path) -> None:
    os.setxattr(src / "bin" / "tool", b"user.pyimg", b"v2")


def _edit_rename(src: Path) -> None:
    os.rename(src / "empty", src / "empty2")


def _edit_add(src: Path) -> None:
    (src / "new").write_bytes(b"new")


def _edit_symlink(src: Path) -> None:
    os.unlink(src / "link")
    os.symlink("etc/conF", src / "link")


def _edit_unlink_hard(src: Path) -> None:
    os.unlink(src / "hard")
    (src / "hard").write_bytes((src / "etc" / "conf").read_bytes())  # same bytes, no longer a link


EDITS: list[Callable[[Path], None]] = [
    _edit_content, _edit_mode, _edit_touch, _edit_touch_same_time, _edit_xattr, _edit_rename, _edit_add,
    _edit_symlink, _edit_unlink_hard,
]  # fmt: skip


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.__name__[len("_edit_") :])
@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_any_change_to_the_tree_builds_again(tree: Path, tmp_path: Path, fmt: str, edit: Any) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    os.setxattr(tree / "bin" / "tool", b"user.pyimg", b"v1")
    with racy_window(OLD):
        assert hits(build(tree, img, fmt, cache=str(cache))) == (0, 1)
        time.sleep(0.02)  # the edit's ctime is a few timestamp ticks later
        edit(tree)
        warm = build(tree, img, fmt, cache=str(cache))
    assert hits(warm) == (0, 1)
    assert warm.digest == build(tree, tmp_path / "clean", fmt).digest


@pytest.mark.parametrize(
    "change",
    [{"epoch": EPOCH + 1}, {"compression": "gzip"}, {"owner": "preserve"}, {"exclude": ["empty"]}],
    ids=["epoch", "compression", "owner", "exclude"],
)
def test_other_options_build_again(tree: Path, tmp_path: Path, change: dict[str, Any]) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    kw = {"epoch": EPOCH, **change}
    with racy_window(OLD):
        build(tree, img, "squashfs", cache=str(cache))
        warm = pyimg.build([str(tree)], str(img), format="squashfs", cache=str(cache), **kw)
    assert hits(warm) == (0, 1)
    assert warm.digest == pyimg.build([str(tree)], str(tmp_path / "clean"), format="squashfs", **kw).digest


def test_another_pyimg_code_builds_again(tree: Path, tmp_path: Path) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        build(tree, img, "squashfs", cache=str(cache))
        with mock.patch.object(pyimg.reuse, "code_fingerprint", lambda: b"another pyimg" * 2):
            assert hits(build(tree, tmp_path / "other", "squashfs", cache=str(cache))) == (0, 1)
        assert hits(build(tree, img, "squashfs", cache=str(cache))) == (1, 0)


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("damage", ["image", "record", "header", "truncate", "empty"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_image_entry_is_detected_and_rebuilt(
    tree: Path, tmp_path: Path, fmt: str, damage: str
) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, fmt, cache=str(cache)).digest
        (entry,) = images(cache)
        size = entry.stat().st_size
        if damage == "image":
            _flip(entry, size - 1 if fmt != "ext4" else ALIGN + 1024 + 56)  # (ext4: its superblock's magic)
        elif damage == "record":
            _flip(entry, ENTRY_HEADER.size + 2)
        elif damage == "header":
            _flip(entry, 8)  # the version
        elif damage == "truncate":
            os.truncate(entry, size // 2)
        else:
            os.truncate(entry, 0)
        img.unlink()  # (else the output, untouched, would stay as it is: the entry must serve)
        warm = build(tree, img, fmt, cache=str(cache))
        assert hits(warm) == (0, 1) and warm.digest == want
        again = build(tree, img, fmt, cache=str(cache))
    assert hits(again) == (1, 0) and again.digest == want


# -- the output left as it is ----------------------------------------------------------------


def left(result: pyimg.BuildResult) -> int:
    assert result.cache is not None
    return result.cache.image_left_in_place


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_mtime_ns, a.st_ctime_ns) == (b.st_ino, b.st_mtime_ns, b.st_ctime_ns)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_no_change_rebuild_leaves_the_output_as_it_is(tree: Path, tmp_path: Path, fmt: str) -> None:
    """As make does: the output the last build committed, untouched since, is what
    this build would write: it stays (no temp file, no copy, no rename), and the
    result and a manifest are the clean build's."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    clean = build(tree, tmp_path / "clean", fmt, manifest=str(tmp_path / "clean.json"))
    with racy_window(OLD):
        first = build(tree, img, fmt, cache=str(cache))
        before = os.stat(img)
        for jobs in (1, 2, 4):
            again = build(tree, img, fmt, cache=str(cache), jobs=jobs, manifest=str(tmp_path / "m.json"))
            assert left(again) == 1 and hits(again) == (1, 0) and not again.warnings
            assert same_file(os.stat(img), before)
            assert again.digest == first.digest == clean.digest and again.sha256 == clean.sha256
            assert_as_clean(again, clean, tmp_path / "m.json", tmp_path / "clean.json")
    assert img.read_bytes() == (tmp_path / "clean").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".pyimg-" in p.name]  # no temp left behind


def test_right_after_its_build_the_output_is_read_to_be_trusted(tree: Path, tmp_path: Path) -> None:
    """An output committed within the racy window of its record could have been
    written again in the same timestamp tick: the first rebuild reads it for its
    digest (and leaves it), the next ones trust its identity and read nothing."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, "squashfs", cache=str(cache)).digest
    read: list[Any] = []
    real = pyimg.api.digest_image

    def spy(path: Any, **kw: Any) -> Any:
        read.append(path)
        return real(path, **kw)

    with mock.patch.object(pyimg.api, "digest_image", spy):
        with racy_window(10**18):  # every record is racy
            again = build(tree, img, "squashfs", cache=str(cache))
        assert left(again) == 1 and again.digest == want and read == [str(img)]
        with racy_window(OLD):
            read.clear()
            trusted = build(tree, img, "squashfs", cache=str(cache))
        assert left(trusted) == 1 and trusted.digest == want and read == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_written_while_its_image_is_kept_is_not_recorded(
    tree: Path, tmp_path: Path, fmt: str
) -> None:
    """The output's identity is taken as it is committed, and recorded only if it
    still has it after its image was kept: bytes written meanwhile (times put back)
    are not trusted by the next build, which writes the clean image again."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    clean = build(tree, tmp_path / "clean", fmt)
    real = pyimg.api._keep_image

    def keep_then_write(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        st = os.stat(img)
        _flip(img, st.st_size // 2)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))

    with racy_window(OLD):
        with mock.patch.object(pyimg.api, "_keep_image", keep_then_write):
            build(tree, img, fmt, cache=str(cache))
        again = build(tree, img, fmt, cache=str(cache))
    assert left(again) == 0 and hits(again) == (1, 0) and again.digest == clean.digest
    assert img.read_bytes() == (tmp_path / "clean").read_bytes()


def test_an_output_replaced_as_it_is_committed_is_not_recorded(tree: Path, tmp_path: Path) -> None:
    """Another process puts its own file at the path right after our rename: its
    identity is not ours (the temp file's inode), so it is not recorded, and the next
    build, trusting every identity, still writes the clean image."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    clean = build(tree, tmp_path / "clean", "squashfs")
    real = pyimg.api.commit

    def commit_then_replace(outputs: Any) -> None:
        real(outputs)
        other = tmp_path / "other"
        other.write_bytes(img.read_bytes())
        _flip(other, other.stat().st_size // 2)
        os.chmod(other, os.stat(img).st_mode)
        os.rename(other, img)

    with racy_window(OLD):
        with mock.patch.object(pyimg.api, "commit", commit_then_replace):
            build(tree, img, "squashfs", cache=str(cache))
        again = build(tree, img, "squashfs", cache=str(cache))
    assert left(again) == 0 and again.digest == clean.digest
    assert img.read_bytes() == (tmp_path / "clean").read_bytes()


def test_an_output_gone_before_it_is_read_is_built(tree: Path, tmp_path: Path) -> None:
    """The output looked unchanged, but cannot be read for its digest (removed, or
    unreadable, in between): the build writes it, with no error."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, "squashfs", cache=str(cache)).digest
    real = pyimg.api.digest_image

    def gone(path: Any, **kw: Any) -> Any:
        if path == str(img):
            raise pyimg.OutputError("cannot read the image: No such file or directory", str(img))
        return real(path, **kw)

    with mock.patch.object(pyimg.api, "digest_image", gone), racy_window(10**18):  # (racy: read)
        again = build(tree, img, "squashfs", cache=str(cache))
    assert left(again) == 0 and hits(again)[0] == 1 and again.digest == want
    assert pyimg.digest(str(img)).blake3 == want


def test_an_interrupt_held_through_the_manifests_commit_reports_it_landed(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is left in place and the manifest committed: a Ctrl-C held through its
    rename is Interrupted(committed=True); one before its commit, committed=False."""
    from pyimg import output
    from pyimg.errors import Interrupted
    from tests.test_commit import signal_during_renames

    cache, img, manifest = tmp_path / "cache", tmp_path / "img", tmp_path / "m.json"
    with racy_window(OLD):
        build(tree, img, "squashfs", cache=str(cache))
        with monkeypatch.context() as renames:
            signal_during_renames(renames)
            with pytest.raises(Interrupted) as caught:
                build(tree, img, "squashfs", cache=str(cache), manifest=str(manifest))
        assert caught.value.committed and manifest.exists()
        manifest.unlink()

        def interrupted(self: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(output.AtomicOutput, "prepare", interrupted)
        with pytest.raises(Interrupted) as caught:
            build(tree, img, "squashfs", cache=str(cache), manifest=str(manifest))
        assert not caught.value.committed and not manifest.exists()


@pytest.mark.parametrize("change", ["bytes", "touch", "chmod", "replace", "symlink", "umask", "no entry"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_changed_since_is_written_again(tree: Path, tmp_path: Path, fmt: str, change: str) -> None:
    """Any change to the output after its build (its bytes with the times put back,
    its times, its mode, another file or a symlink in its place, a umask that gives
    another mode) or an entry that is gone: the image is copied or written again,
    and it is the clean one."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    clean = build(tree, tmp_path / "clean", fmt)
    mask = os.umask(0o022)
    try:
        with racy_window(OLD):
            build(tree, img, fmt, cache=str(cache))
            st = os.stat(img)
            if change == "bytes":
                _flip(img, st.st_size // 2)
                os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # (only the ctime tells)
            elif change == "touch":
                os.utime(img)
            elif change == "chmod":
                os.chmod(img, 0o600)
            elif change == "replace":
                (tmp_path / "copy").write_bytes(img.read_bytes())
                os.replace(tmp_path / "copy", img)
            elif change == "symlink":
                os.rename(img, tmp_path / "target")
                os.symlink(tmp_path / "target", img)
            elif change == "umask":
                os.umask(0o077)
            else:
                for entry in images(cache):
                    entry.unlink()
            again = build(tree, img, fmt, cache=str(cache))
    finally:
        os.umask(mask)
    assert left(again) == 0 and again.digest == clean.digest
    assert not img.is_symlink() and img.read_bytes() == (tmp_path / "clean").read_bytes()
    assert hits(again) == ((0, 1) if change == "no entry" else (1, 0))
    assert os.stat(img).st_mode & 0o777 == (0o600 if change == "umask" else 0o644)


def test_a_tree_that_could_be_racily_clean_is_not_kept(tree: Path, tmp_path: Path) -> None:
    """Files modified within the racy window of the walk: their identities could stay
    the same through a write, so no image is kept under them."""
    cache = tmp_path / "cache"
    assert hits(build(tree, tmp_path / "img", "squashfs", cache=str(cache))) == (0, 0)
    assert images(cache) == []


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_tar_source_is_never_reused(tree: Path, tmp_path: Path, suffix: str) -> None:
    """Tar members have no identity of their own: no key, the image is built.  (A
    compressed archive's members are spooled: each at its own offset of one file,
    the first at 0 like a whole file.)"""
    archive = tmp_path / f"src{suffix}"
    with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        tar.add(tree, arcname=".")
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        first = build(archive, img, "squashfs", cache=str(cache))
        second = build(archive, img, "squashfs", cache=str(cache))
    assert hits(second) == (0, 0) and images(cache) == [] and second.digest == first.digest


def test_one_output_keeps_one_image(tree: Path, tmp_path: Path) -> None:
    """A series of rebuilds of one output keeps its last image, not one each."""
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        for epoch in range(3):
            pyimg.build([str(tree)], str(img), format="cpio", epoch=epoch, cache=str(cache))
        assert len(images(cache)) == 1
        last = pyimg.build([str(tree)], str(img), format="cpio", epoch=2, cache=str(cache))
        first = pyimg.build([str(tree)], str(img), format="cpio", epoch=0, cache=str(cache))
    assert hits(last) == (1, 0) and hits(first) == (0, 1)


def test_at_most_a_few_images_are_kept(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with racy_window(OLD):
        for n in range(IMAGES_KEPT + 2):
            pyimg.build([str(tree)], str(tmp_path / f"img{n}"), format="cpio", epoch=n, cache=str(cache))
            time.sleep(0.01)  # (eviction is by mtime)
        assert len(images(cache)) == IMAGES_KEPT
        newest = pyimg.build([str(tree)], str(tmp_path / "again"), format="cpio", epoch=IMAGES_KEPT + 1,
                             cache=str(cache))  # fmt: skip
    assert hits(newest) == (1, 0)
    assert len([p for p in cache.iterdir() if p.name.startswith(SLOT_PREFIX)]) == IMAGES_KEPT


def test_an_image_entry_keeps_the_holes_of_the_image(tree: Path, tmp_path: Path) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        build(tree, img, "ext4", cache=str(cache), size="64M")
        (entry,) = images(cache)
        assert entry.stat().st_size > 64 << 20
        if entry.stat().st_blocks * 512 > 32 << 20:
            if IN_CI:  # (tmpfs, ext4 and xfs keep holes: CI's file systems must)
                pytest.fail("this file system does not keep holes")
            pytest.skip("this file system does not keep holes")
        again = build(tree, img, "ext4", cache=str(cache), size="64M")
    assert hits(again) == (1, 0) and img.stat().st_blocks * 512 < 32 << 20


def test_a_copy_across_file_systems_falls_back_to_read_and_write(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range refuses another file system (EXDEV on Linux >= 5.19): the
    entry is copied in pieces instead, the same bytes."""
    cache, img = tmp_path / "cache", tmp_path / "img"

    def refuse(*args: Any) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    with racy_window(OLD):
        want = build(tree, img, "squashfs", cache=str(cache)).digest
        monkeypatch.setattr(os, "copy_file_range", refuse)
        again = build(tree, img, "squashfs", cache=str(cache))
    assert hits(again) == (1, 0) and again.digest == want


def test_an_unwritable_cache_directory_builds_without_keeping(tree: Path, tmp_path: Path) -> None:
    cache, img = tmp_path / "cache", tmp_path / "img"
    with racy_window(OLD):
        want = build(tree, img, "squashfs", cache=str(cache)).digest
        for entry in images(cache):
            entry.unlink()

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with mock.patch("tempfile.mkstemp", refuse):
            warm = build(tree, img, "squashfs", cache=str(cache))
    assert warm.digest == want and hits(warm) == (0, 0)
    assert any("the image was not kept" in w for w in warm.warnings)


def test_identities_are_kept_only_with_a_cache(tree: Path) -> None:
    """DataRef.ident costs 40 bytes a file: only a build with a cache keeps it."""
    from pyimg.collect import collect
    from pyimg.options import BuildOptions, CacheOptions, SourceSpec

    def idents(cache: str | None) -> list[bytes]:
        options = BuildOptions(sources=(SourceSpec(str(tree)),), output="/nonexistent/img",
                               cache=CacheOptions(cache=cache))  # fmt: skip
        with collect(options) as collected:
            refs = [inode.data for inode in collected.tree.entries.values() if inode.data is not None]
            return [ref.ident for ref in refs]

    assert set(idents(None)) == {b""}
    kept = idents("/nonexistent/cache")
    assert len(kept) == 4 and all(len(ident) == 40 for ident in kept)  # conf (and hard), tool, sparse


def test_a_tree_with_one_spooled_member_is_not_reused(tmp_path: Path) -> None:
    """The review's case: a compressed archive whose only content is spooled at offset
    0, beside a directory source -- its member has no identity, so no key."""
    src = make_tree(tmp_path / "src")
    archive = tmp_path / "one.tar.gz"
    member = tmp_path / "member"
    member.write_bytes(b"version 1")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, arcname="opt/member")
    cache, img = tmp_path / "cache", tmp_path / "img"
    sources = [str(src), f"{archive}:/"]
    with racy_window(OLD):
        pyimg.build(sources, str(img), format="squashfs", epoch=EPOCH, cache=str(cache))
        assert images(cache) == []
        member.write_bytes(b"version 2")  # same size, same mtime after the epoch clamp
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(member, arcname="opt/member")
        warm = pyimg.build(sources, str(img), format="squashfs", epoch=EPOCH, cache=str(cache))
    assert hits(warm) == (0, 0)
    assert warm.digest == pyimg.build(sources, str(tmp_path / "clean"), format="squashfs", epoch=EPOCH).digest


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_image_too_large_to_keep_is_still_left_in_place(tmp_path: Path, fmt: str) -> None:
    """Over half of --cache-max, an image is kept as its record alone: a no-change
    rebuild leaves the output in place, and without the output the image is written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    cache, img = tmp_path / "cache", tmp_path / "img"
    small = {"cache": str(cache), "cache_max": 1 << 20}
    with racy_window(OLD):
        first = build(src, img, fmt, **small)
        assert hits(first) == (0, 0)  # (no image stored)
        (entry,) = images(cache)
        assert entry.stat().st_size < 64 << 10  # the record and the file digests alone
        before = os.stat(img)
        again = build(src, img, fmt, **small)
        assert left(again) == 1 and hits(again) == (1, 0) and again.digest == first.digest
        assert same_file(os.stat(img), before)
        img.unlink()
        rebuilt = build(src, img, fmt, **small)
    assert left(rebuilt) == 0 and hits(rebuilt) == (0, 0) and rebuilt.digest == first.digest
    assert images(cache) == [entry]  # (the record is still this key's)
