"""A real distribution through the oracles: the minimal Debian root the boot tests
boot (mmdebstrap --variant=minbase bookworm with systemd and udev; made and cached by
scripts/debian-root.sh, keyed by tests/boot/debian-packages.txt) built from its
tarball and from its extracted directory into ext4 and squashfs, each image compared
entry by entry with the source: content (SHA-256), type, mode, owner, mtime, symlink
targets, hard-link groups, device numbers, xattrs (security.* included) and ACLs.

- The reference is read straight from the archive with Python's tarfile
  (oracles.tar_snapshot), so it depends on no extracting tool; the extracted
  directory is checked against it first (GNU tar 1.34 does not restore the
  SCHILY.xattr.system.posix_acl_* records mmdebstrap writes: they are set here).
- The root has POSIX ACLs of its own (systemd-tmpfiles gives /var/log/journal an
  access and a default ACL: group adm r-x) but no other xattrs, so a few are added,
  to the archive (pax records spliced in before their members' headers, every other
  byte as mmdebstrap wrote it) and to the directory alike: security.capability on a
  binary (cap_net_raw, as ping has), a binary user.* value on a hard-linked file
  (perl), a 3000-byte user.* value and a trusted.* one on a directory, trusted.* on a
  device node, an access ACL with a named user and group on a file and a default ACL
  on a directory.
- ext4: e2fsck -fn, then the whole tree through debugfs (ext4_oracle: stat, rdump,
  ea_get; ACLs decoded from ext4's own encoding).  squashfs: unsquashfs -d as root
  (owners, devices and xattrs restored), then the same snapshot; squashfs cannot hold
  ACLs, so it is built with drop_acls and must hold the tree without them, the
  dropped paths being exactly those that had one.
- The archive and the directory hold the same metadata (the directory's mtimes are
  the archive's: GNU tar sets each directory's after its content), so the images of
  one format built from either must be the same bytes (`pyimg digest`).

Marked slow: ~70-80 s on this 2-core machine with the tarball cached (building the root
with mmdebstrap adds ~35 s once).  Never skipped in CI (oracles.debian_root_tarball).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import pyimg
import pyimg.cache
from pyimg.api import BuildResult

from .ext4_oracle import snapshot_image
from .oracles import (
    ACL_XATTRS,
    IN_CI,
    IS_ROOT,
    assert_same_snapshot,
    debian_root_tarball,
    require_tool,
    snapshot,
    tar_member_path,
    tar_snapshot,
    unsquashfs_extract,
    without_acls,
)

pytestmark = pytest.mark.slow

Snapshot = dict[str, tuple[object, ...]]

# ACL entry tags (include/uapi/linux/posix_acl.h), written here without pyimg.
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF
CAP_NET_RAW = 13


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """An ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def _capability(cap: int) -> bytes:
    """A security.capability value (VFS_CAP_REVISION_2, effective): `cap` permitted."""
    return struct.pack("<IIIII", 0x02000000 | 1, 1 << cap, 0, 0, 0)


def _extras(reference: Snapshot) -> dict[str, dict[str, bytes]]:
    """The xattrs added to the root, by path (see the module docstring)."""
    binary = next(p for p in ("usr/bin/ping", "bin/ping", "usr/bin/sleep") if p in reference)
    mode = int(reference["etc/debian_version"][1])  # type: ignore[call-overload]
    group = mode >> 3 & 7  # the mask: the mode's group bits stay what they are
    extras = {
        binary: {"security.capability": _capability(CAP_NET_RAW)},
        "usr/bin/perl": {"user.pyimg.binary": b"\x00\xff hard-linked \n\x01"},
        "etc": {"user.pyimg.long": bytes(range(256)) * 11 + b"end", "trusted.pyimg.dir": b"y"},
        "dev/null": {"trusted.pyimg.device": b"char 1:3"},
        "etc/debian_version": {
            "system.posix_acl_access": _acl(
                (USER_OBJ, mode >> 6 & 7, NO_ID),
                (USER, 6, 1000),
                (GROUP_OBJ, group, NO_ID),
                (GROUP, 4, 4),
                (MASK, group, NO_ID),
                (OTHER, mode & 7, NO_ID),
            )
        },
        "srv": {
            "system.posix_acl_default": _acl(
                (USER_OBJ, 7, NO_ID),
                (USER, 7, 1000),
                (GROUP_OBJ, 5, NO_ID),
                (MASK, 7, NO_ID),
                (OTHER, 5, NO_ID),
            )
        },
    }
    assert reference["usr/bin/perl"][6][0] == "group", "perl is expected to be hard-linked"  # type: ignore[index]
    for path in extras:
        assert path in reference and not reference[path][-1], f"{path}: missing, or has xattrs already"
    return extras


def _pax_header(records: dict[str, bytes]) -> bytes:
    """A pax extended header (typeflag 'x') holding these records, padded to blocks."""
    body = b""
    for key, value in records.items():
        record = b" " + key.encode() + b"=" + value + b"\n"
        length = previous = 0
        while True:  # the length counts its own digits
            length = len(record) + len(str(previous))
            if length == previous:
                break
            previous = length
        body += str(length).encode() + record
    info = tarfile.TarInfo("PaxHeaders/pyimg-test")
    info.type, info.size, info.mtime = tarfile.XHDTYPE, len(body), 0
    padding = -len(body) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(padding)


def _splice_xattrs(source: Path, out: Path, extras: dict[str, dict[str, bytes]]) -> None:
    """The archive `source` with a pax header of SCHILY.xattr records inserted before
    the header of each member named in extras; every other byte as it was."""
    at: dict[int, str] = {}
    with tarfile.open(source) as tar:
        for member in tar:
            tar.members.clear()
            name = tar_member_path(member.name)
            if name in extras:
                # A plain one-block header: no pax or GNU long-name header to merge with.
                assert member.offset_data - member.offset == tarfile.BLOCKSIZE and not member.pax_headers, (
                    name
                )
                at[member.offset] = name
    assert sorted(at.values()) == sorted(extras)
    with open(source, "rb") as src, open(out, "wb") as dst:
        done = 0
        for offset in [*sorted(at), os.fstat(src.fileno()).st_size]:
            while done < offset:
                done += os.copy_file_range(src.fileno(), dst.fileno(), offset - done, done)
            if offset in at:
                records = {f"SCHILY.xattr.{name}": value for name, value in extras[at[offset]].items()}
                dst.write(_pax_header(records))
                dst.flush()


def _extract(archive: Path, dest: Path) -> None:
    """The archive extracted as root, everything kept: GNU tar, then the SCHILY.xattr
    records it leaves out (1.34 restores no system.posix_acl_* record of that form,
    only its own SCHILY.acl.* text ones) set from Python."""
    dest.mkdir()
    proc = subprocess.run(
        [require_tool("tar"), "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--same-owner",
         "-xpf", str(archive), "-C", str(dest)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(archive) as tar:
        for member in tar:
            tar.members.clear()
            path = dest / tar_member_path(member.name)
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    name, raw = key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")
                    os.setxattr(path, name, raw, follow_symlinks=False)  # no mtime changes


@dataclass
class Root:
    work: Path
    tar: Path  # mmdebstrap's tarball with the extra xattrs spliced in
    directory: Path  # that tarball extracted
    reference: Snapshot  # read from the tarball: ACLs decoded, content by SHA-256
    acl_paths: list[str]  # image paths ("/var/log/journal") that have an ACL
    images: dict[tuple[str, str], tuple[Path, BuildResult]] = field(default_factory=dict)

    def image(self, fmt: str, source: str) -> tuple[Path, BuildResult]:
        """The image of `source` ("tar" or "dir") in `fmt`, built once."""
        if (fmt, source) not in self.images:
            path = self.work / f"{source}.{fmt}"
            src = self.tar if source == "tar" else self.directory
            # owner "preserve": a directory's owners are the tree's (auto would make them
            # root's); no epoch: every mtime kept, the image's own time the newest one.
            result = pyimg.build(
                [str(src)], str(path), format=fmt, owner="preserve", drop_acls=fmt == "squashfs"
            )
            self.images[fmt, source] = (path, result)
        return self.images[fmt, source]


@pytest.fixture(scope="module")
def root() -> Iterator[Root]:
    if not IS_ROOT:  # extracting a root file system keeps owners and makes devices
        message = "the Debian root is extracted as root (owners, devices, security.capability)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    original = debian_root_tarball()
    work = Path(tempfile.mkdtemp(prefix="pyimg-debian-"))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("SOURCE_DATE_EPOCH", raising=False)  # it would clamp the mtimes
            extras = _extras(tar_snapshot(original, hash_content=True))
            tar = work / "root.tar"
            _splice_xattrs(original, tar, extras)
            reference = tar_snapshot(tar, acls=True, hash_content=True)
            for path, xattrs in extras.items():  # the archive holds them, decoded as set
                assert set(xattrs) <= set(reference[path][-1]), path  # type: ignore[arg-type]
            directory = work / "root"
            _extract(tar, directory)
            assert_same_snapshot(
                reference, snapshot(directory, acls=True, hash_content=True), names=("archive", "directory")
            )
            acl_paths = sorted(
                "/" + path
                for path, item in reference.items()
                if isinstance(item[-1], dict) and set(item[-1]) & set(ACL_XATTRS)
            )
            assert {"/var/log/journal", "/etc/debian_version", "/srv"} <= set(acl_paths)
            yield Root(work, tar, directory, reference, acl_paths)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("source", ["tar", "dir"])
def test_ext4_image_is_the_root(root: Root, source: str) -> None:
    image, result = root.image("ext4", source)
    assert result.dropped_acls == []
    workdir = root.work / f"debugfs-{source}"
    workdir.mkdir()
    try:
        got = snapshot_image(image, workdir, acls=True, hash_content=True)  # e2fsck -fn first
    finally:
        shutil.rmtree(workdir)
    assert_same_snapshot(root.reference, got, names=("source", "ext4 image"))


@pytest.mark.parametrize("source", ["tar", "dir"])
def test_squashfs_image_is_the_root_without_acls(root: Root, source: str) -> None:
    image, result = root.image("squashfs", source)
    # Every name of a hard link is listed; the root has no ACL on a hard-linked file.
    assert sorted(result.dropped_acls) == root.acl_paths
    extracted = root.work / f"unsquashfs-{source}"
    try:
        unsquashfs_extract(image, extracted)
        got = snapshot(extracted, acls=True, hash_content=True)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
    assert_same_snapshot(without_acls(root.reference), got, names=("source", "squashfs image"))


@pytest.mark.parametrize("fmt", ["ext4", "squashfs"])
def test_tar_and_directory_give_one_image(root: Root, fmt: str) -> None:
    (tar_image, tar_result), (dir_image, dir_result) = root.image(fmt, "tar"), root.image(fmt, "dir")
    assert tar_result.entries == dir_result.entries == len(root.reference)
    assert pyimg.digest(str(tar_image)).blake3 == tar_result.digest
    assert pyimg.digest(str(dir_image)).blake3 == dir_result.digest
    assert tar_result.digest == dir_result.digest, f"{fmt}: the archive and its extraction differ"


# -- warm rebuilds of the real root ----------------------------------------------------

OLD = -(10**12)  # a racy window that trusts every identity (the riskiest cache)
EPOCH = 2_000_000_000  # the image's own time, fixed; no real mtime is clamped (2033)


def _first_file(tree: Path, size_range: tuple[int, int], *, nlink: int = 1) -> Path:
    """The first regular file (in sorted walk order) of a size in the range."""
    for top, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            st = path.lstat()
            regular = path.is_file() and not path.is_symlink() and st.st_nlink == nlink
            if regular and size_range[0] <= st.st_size <= size_range[1]:
                return path
    raise AssertionError(f"no file of {size_range} bytes with {nlink} links in {tree}")


def _rewrite_keeping_times(path: Path) -> None:
    """The same number of bytes, other ones, its times put back: only ctime tells."""
    st = path.lstat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _root_edits(tree: Path, fmt: str) -> list[tuple[str, Any]]:
    """Edits a rebuild of a real root meets, each applied to `tree` in turn (of ACLs
    and xattrs only where the image holds them)."""
    small = _first_file(tree / "etc", (1000, 8000))
    big = _first_file(tree / "usr", (300_000, 5_000_000))
    linked = tree / "usr/bin/perl"
    edits = [
        ("a 1-8 KB config file rewritten, times kept", lambda: _rewrite_keeping_times(small)),
        ("a large binary rewritten, times kept", lambda: _rewrite_keeping_times(big)),
        ("a hard-linked file rewritten (both names)", lambda: _rewrite_keeping_times(linked)),
        ("an xattr added, nothing else", lambda: os.setxattr(small, "user.pyimg.added", b"v")),
        ("a capability removed", lambda: os.removexattr(_capable(tree), "security.capability")),
        ("a default ACL removed", lambda: os.removexattr(tree / "srv", "system.posix_acl_default")),
        ("a mode changed", lambda: os.chmod(big, 0o700)),
        ("an owner changed", lambda: os.lchown(small, 1234, 5678)),
        ("a file touched", lambda: os.utime(tree / "etc/hostname", ns=(1, 2))),
        ("a file removed", lambda: os.unlink(tree / "etc/motd")),
        ("a file added", lambda: (tree / "etc/pyimg-added").write_bytes(b"new\n" * 2000)),
        ("a directory renamed", lambda: os.rename(tree / "usr/share/doc", tree / "usr/share/doc2")),
        ("a symlink retargeted", lambda: _retarget(tree / "etc/mtab")),
        ("a device node's number changed", lambda: _remake_device(tree / "dev/zero")),
    ]
    if fmt != "ext4":
        edits = [edit for edit in edits if "ACL" not in edit[0]]
    if fmt == "cpio":
        edits = [edit for edit in edits if "xattr" not in edit[0] and "capability" not in edit[0]]
    return edits


def _capable(tree: Path) -> Path:
    return next(tree / p for p in ("usr/bin/ping", "bin/ping", "usr/bin/sleep") if (tree / p).exists())


def _retarget(link: Path) -> None:
    link.unlink()
    link.symlink_to("/proc/self/mountinfo")


def _remake_device(node: Path) -> None:
    st = node.lstat()
    node.unlink()
    os.mknod(node, st.st_mode, os.makedev(1, 7))
    os.lchown(node, st.st_uid, st.st_gid)


@pytest.mark.parametrize("fmt", ["ext4", "squashfs", "cpio"])
def test_warm_rebuilds_of_the_root_are_the_clean_images(root: Root, fmt: str) -> None:
    """The build cache on a real root (xattrs, ACLs, capabilities, hard links,
    devices): after each of a series of edits, a rebuild with the cache warm from the
    build before (identities trusted at once: the riskiest cache) and a rebuild with
    nothing changed are the image a build without a cache makes of the same tree; a
    cold cache and a fresh runner through a shared cache (squashfs: an OCI layout)
    too."""
    work = Path(tempfile.mkdtemp(prefix=f"pyimg-warm-{fmt}-", dir=root.work))
    tree, cache, img = work / "tree", work / "cache", work / "img"
    # cp -a keeps what the root holds (owners, devices, xattrs, ACLs, hard links, times).
    subprocess.run(["cp", "-a", str(root.directory), str(tree)], check=True, stdin=subprocess.DEVNULL)
    kw: dict[str, Any] = {"format": fmt, "owner": "preserve", "drop_acls": fmt != "ext4", "epoch": EPOCH}
    if fmt == "cpio":
        kw["drop_xattrs"] = True

    def clean() -> str:
        return pyimg.build([str(tree)], str(work / "clean"), **kw).digest

    def warm(**more: Any) -> BuildResult:
        return pyimg.build([str(tree)], str(img), **({"cache": str(cache)} | kw | more))

    try:
        with mock.patch.object(pyimg.cache, "RACY_NS", OLD):
            want = clean()
            assert warm().digest == want, "cold cache"
            again = warm(jobs=4)
            assert again.digest == want and again.cache is not None and again.cache.image_hits == 1
            for name, edit in _root_edits(tree, fmt):
                before = want
                edit()
                want = clean()
                assert want != before, f"{name}: the edit changed nothing"
                got = warm(jobs=2)
                assert got.digest == want, f"{fmt}, warm after: {name}"
                assert warm(jobs=1).digest == want, f"{fmt}, no change after: {name}"
                # (a no-change rebuild leaves the output in place: the file itself is right)
                assert pyimg.digest(str(img)).blake3 == want, f"{fmt}, the output after: {name}"
            if fmt == "squashfs":
                shared = f"oci:{work / 'layout'}"
                assert warm(cache=shared).digest == want, "exporting runner"
                fresh = pyimg.build([str(tree)], str(work / "fresh"), cache=shared, **kw)
                assert fresh.digest == want and fresh.cache is not None and fresh.cache.remote_fetched > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
