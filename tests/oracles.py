"""Shared test helpers: varied source trees, and comparing a tree with what a real
tool extracted from an image (content, mode, owner, mtime, links, xattrs, devices)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
IS_ROOT = os.geteuid() == 0


def run_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`pyimg ARGS...` as CI runs it: a fresh interpreter, no stdin."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "pyimg.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def require_tool(name: str) -> str:
    """The tool's path; in CI a missing oracle is a failure, never a skip."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (the oracle must run)")
        pytest.skip(f"{name} not installed")
    return path


REPO = Path(__file__).resolve().parents[1]


def debian_root_tarball() -> Path:
    """The minimal Debian root tarball (mmdebstrap --variant=minbase, systemd and udev),
    made by scripts/debian-root.sh or taken from its cache (keyed by
    tests/boot/debian-packages.txt).  Without mmdebstrap: a skip here, a failure in
    CI; in CI a root that cannot be made is a failure, never a skip."""
    require_tool("mmdebstrap")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "debian-root.sh")],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        message = f"cannot make the Debian root: {proc.stderr.strip()[-2000:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return Path(proc.stdout.strip())


def run_unprivileged(code: str, *args: str) -> Any:
    """Run `python -c code args...` in a child that cannot override file permissions,
    so that chmod means what it says, and return the JSON value it prints.  As root:
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (uid 0 still owns the files),
    through setpriv; in CI a missing setpriv, or one that cannot drop them, fails."""
    command = [sys.executable, "-c", code, *args]
    if IS_ROOT:
        command = [require_tool("setpriv"), "--bounding-set", "-dac_override,-dac_read_search", *command]
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        message = f"cannot drop root's permission override here: {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


_COLLECT = """
import json, sys
from pyimg.collect import collect
from pyimg.errors import SourceError
from pyimg.options import BuildOptions, Policy, SourceSpec
options = BuildOptions(sources=(SourceSpec(sys.argv[1]),), output="/nonexistent/x",
                       policy=Policy(excludes=tuple(sys.argv[2:])))
try:
    with collect(options) as c:
        print(json.dumps({"entries": len(c.tree)}))
except SourceError as exc:
    print(json.dumps({"path": exc.path, "reason": exc.reason}))
"""


def collect_unprivileged(root: Path, *excludes: str) -> dict[str, Any]:
    """Collect the directory `root` (default policy, these excludes) without the
    permission override (run_unprivileged): {"entries": count} or the SourceError's
    {"path", "reason"}."""
    result: dict[str, Any] = run_unprivileged(_COLLECT, str(root), *excludes)
    return result


def can_xattr(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


FIXED_MTIME = 1_600_000_000


def make_varied_tree(root: Path, *, devices: bool = IS_ROOT) -> Path:
    """Every file type and the awkward cases: hard links across directories,
    dangling/absolute/looping symlinks, setuid/sticky modes, empty and sparse files,
    duplicates, xattrs, a directory big enough to need a directory index."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_bytes(b"pyimg\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 1000)
    os.chmod(root / "bin/tool", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "srv").mkdir()
    os.chmod(root / "srv", 0o2750)
    data = (b"the quick brown fox jumps over the lazy dog\n" * 7000)[:300_000]
    (root / "srv/a.dat").write_bytes(data)
    (root / "srv/dup.dat").write_bytes(data)  # identical content: stored once
    (root / "srv/random.bin").write_bytes(os.urandom(200_000))
    (root / "srv/one-block.bin").write_bytes(b"x" * 131072)
    with open(root / "srv/sparse", "wb") as f:
        f.truncate(3 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"data in the middle")
    (root / "links").mkdir()
    os.link(root / "etc/hostname", root / "links/hostname-hard")
    os.link(root / "etc/hostname", root / "links/hostname-hard2")
    os.symlink("../etc/hostname", root / "links/relative")
    os.symlink("/etc/passwd", root / "links/absolute")
    os.symlink("nowhere/at/all", root / "links/dangling")
    os.symlink("loop", root / "links/loop")
    os.mkfifo(root / "links/fifo")
    make_socket(root / "links/socket")
    if devices:
        os.mknod(root / "links/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "links/disk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    big = root / "big-dir"
    big.mkdir()
    for i in range(1500):  # ~60 KiB of listing: several metadata blocks, a directory index
        (big / f"entry-with-a-longish-name-{i:05d}").write_bytes(b"%d\n" % (i % 7))
    if can_xattr(root):
        os.setxattr(root / "etc/hostname", "user.comment", b"hello")
        os.setxattr(root / "srv/a.dat", "user.a", b"1")
        os.setxattr(root / "srv/a.dat", "user.b", b"\x00binary\xff")
        os.setxattr(root / "srv", "user.dir", b"on a directory")
        os.setxattr(root / "srv/dup.dat", "user.a", b"1")
        os.setxattr(root / "srv/dup.dat", "user.b", b"\x00binary\xff")
    os.chown(root / "srv/a.dat", 1000, 1000) if IS_ROOT else None
    os.chown(root / "srv", 123, 456) if IS_ROOT else None
    fix_mtimes(root)
    return root


def make_socket(path: Path) -> None:
    """A Unix socket node at path (left behind once the socket is closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    finally:
        sock.close()


def fix_mtimes(root: Path) -> None:
    """Set every mtime to a fixed value (children first, so directories keep theirs)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(
                os.path.join(dirpath, name),
                (FIXED_MTIME, FIXED_MTIME + zlib.crc32(name.encode()) % 1000),
                follow_symlinks=False,
            )
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def decode_xattr_acl(raw: bytes) -> list[tuple[int, int, int]]:
    """A POSIX ACL in the kernel's xattr form (what getxattr and tar's SCHILY.xattr
    records hold), decoded here without pyimg: a u32 version 2, then (u16 tag, u16
    perm, u32 id) entries, the id 0xFFFFFFFF for the entries without one."""
    assert len(raw) >= 4 and (len(raw) - 4) % 8 == 0, raw
    assert struct.unpack_from("<I", raw)[0] == 2, raw
    return [struct.unpack_from("<HHI", raw, pos) for pos in range(4, len(raw), 8)]


AclDecoder = Callable[[bytes], list[tuple[int, int, int]]]


def xattr_item(name: str, value: bytes, *, decode_acl: AclDecoder) -> object:
    """What a snapshot keeps of one xattr: its value, or an ACL's entries (decoded
    from whichever form the reader has: the xattr form, or ext4's own)."""
    return ("acl", tuple(decode_acl(value))) if name in ACL_XATTRS else value


def _xattrs(path: str | int, *, acls: bool = False) -> dict[str, object]:
    """The xattrs of `path` (not followed), or of the open file `path`."""
    follow = {} if isinstance(path, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(path, **follow)
    except OSError:
        return {}
    return {
        n: xattr_item(n, os.getxattr(path, n, **follow), decode_acl=decode_xattr_acl)
        for n in sorted(names)
        if not n.startswith("system.") or (acls and n in ACL_XATTRS)
    }


def content_item(data: bytes, *, hash_content: bool) -> object:
    """A regular file's content as a snapshot keeps it: the bytes, or (for trees too
    big to hold twice in memory) their SHA-256."""
    return ("sha256", hashlib.sha256(data).hexdigest()) if hash_content else data


def snapshot(
    root: Path,
    *,
    owners: bool = True,
    skip_parts: set[str] = frozenset(),
    acls: bool = False,
    hash_content: bool = False,
) -> dict[str, tuple[object, ...]]:
    """Everything the image must keep, per path; hard links as groups.  Directories
    named in skip_parts are left out with their subtrees (what --exclude removed).
    system.* xattrs are left out, but with acls=True the POSIX ACLs are kept (their
    entries decoded); hash_content: content by SHA-256 (content_item).  Every entry
    is read relative to its directory's descriptor (os.fwalk; xattrs through
    /proc/self/fd), so paths longer than PATH_MAX (4096 bytes) are read too."""
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    top = os.path.realpath(root) if os.path.islink(root) else os.fspath(root)
    for dirpath, dirnames, filenames, dirfd in os.fwalk(top):
        dirnames[:] = [d for d in dirnames if d not in skip_parts]
        for name in [".", *dirnames, *filenames] if dirpath == top else [*dirnames, *filenames]:
            rel = os.path.relpath(os.path.join(dirpath, name), top) if name != "." else "."
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False) if name != "." else os.fstat(dirfd)
            kind = stat.S_IFMT(st.st_mode)
            item: list[object] = [kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)]
            if owners:
                item += [st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                with open(os.open(name, os.O_RDONLY, dir_fd=dirfd), "rb") as f:
                    item.append(content_item(f.read(), hash_content=hash_content))
                if st.st_nlink > 1:
                    groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
                    item.append(("group", (st.st_dev, st.st_ino)))
            elif stat.S_ISLNK(st.st_mode):
                item.append(os.readlink(name, dir_fd=dirfd))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
            if not stat.S_ISLNK(st.st_mode):
                item.append(_xattrs(dirfd if name == "." else f"/proc/self/fd/{dirfd}/{name}", acls=acls))
            out[rel] = tuple(item)
    return {rel: _name_group(item, groups) for rel, item in out.items()}


_TAR_KINDS = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}
_SCHILY_XATTR = "SCHILY.xattr."


def tar_snapshot(
    archive: Path, *, owners: bool = True, acls: bool = False, hash_content: bool = False
) -> dict[str, tuple[object, ...]]:
    """What snapshot() says of a faithful extraction of the archive, read straight
    from it with Python's tarfile (nothing is extracted, so the reference does not
    depend on an extracting tool): "./usr/bin" is "usr/bin", the root is "."; a hard
    link is its target's item, in a group; xattrs from the SCHILY.xattr.* records
    (the binary values GNU tar and mmdebstrap write), system.* left out but for the
    POSIX ACLs with acls=True.  Only what this oracle understands is accepted: other
    member types, text ACL records (SCHILY.acl.*), a member whose parent directory
    the archive does not hold fail the assertion rather than being guessed."""
    items: dict[str, list[object]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            tar.members.clear()  # one item per member in memory, not a TarInfo too
            name = tar_member_path(member.name)
            assert not any(k.startswith("SCHILY.acl.") for k in member.pax_headers), (name, "text ACL")
            if member.islnk():
                target = items[tar_member_path(member.linkname)]
                assert target[0] == stat.S_IFREG, f"{name}: a hard link to a {target[0]:o}"
                items[name] = target  # one file: the very same item
                continue
            kind = _TAR_KINDS.get(member.type)
            assert kind is not None, f"{name}: member type {member.type!r}"
            item: list[object] = [kind, member.mode & 0o7777, int(member.mtime)]
            if owners:
                item += [member.uid, member.gid]
            if kind == stat.S_IFREG:
                f = tar.extractfile(member)
                assert f is not None
                item.append(content_item(f.read(), hash_content=hash_content))
            elif kind == stat.S_IFLNK:
                item.append(member.linkname)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                item.append((member.devmajor, member.devminor))
            if kind != stat.S_IFLNK:
                xattrs = {
                    key[len(_SCHILY_XATTR) :]: value.encode("utf-8", "surrogateescape")
                    for key, value in member.pax_headers.items()
                    if key.startswith(_SCHILY_XATTR)
                }
                item.append(
                    {
                        n: xattr_item(n, v, decode_acl=decode_xattr_acl)
                        for n, v in sorted(xattrs.items())
                        if not n.startswith("system.") or (acls and n in ACL_XATTRS)
                    }
                )
            items[name] = item
    for name in items:  # in any order: mmdebstrap's root "." comes after ./dev
        parent = os.path.dirname(name) or "."
        assert parent in items and items[parent][0] == stat.S_IFDIR, f"{name}: no parent directory in it"
    names_of: dict[int, list[str]] = {}
    for name, item in items.items():
        names_of.setdefault(id(item), []).append(name)
    out = {}
    for name, item in items.items():
        members = names_of[id(item)]
        if len(members) > 1:  # where snapshot() puts the group: after the content, before the xattrs
            out[name] = (*item[:-1], ("group", min(members)), item[-1])
        else:
            out[name] = tuple(item)
    return out


def tar_member_path(name: str) -> str:
    """A member name as a snapshot path: "./usr/bin/" -> "usr/bin", "./" -> "."."""
    path = os.path.normpath("./" + name.lstrip("/"))
    assert path != ".." and not path.startswith("../"), name
    return path


def _name_group(item: tuple[object, ...], groups: dict[tuple[int, int], list[str]]) -> tuple[object, ...]:
    """A hard-link group is named by its smallest path: independent of walk order.
    A file whose other links are outside the tree (a package cache, perf's build-id
    cache in ~/.debug) is in no group: the image cannot keep links it was not given."""
    out: list[object] = []
    for x in item:
        if isinstance(x, tuple) and x[:1] == ("group",):
            members = groups[x[1]]
            if len(members) > 1:
                out.append(("group", min(members)))
        else:
            out.append(x)
    return tuple(out)


def assert_same_tree(
    source: Path,
    extracted: Path,
    *,
    owners: bool = True,
    ignore: set[str] = frozenset(),
    skip_parts: set[str] = frozenset(),
) -> None:
    want = {
        k: v for k, v in snapshot(source, owners=owners, skip_parts=skip_parts).items() if k not in ignore
    }
    got = {k: v for k, v in snapshot(extracted, owners=owners).items() if k not in ignore}
    assert_same_snapshot(want, got)


def without_acls(tree: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """A snapshot with its POSIX ACL xattrs left out (what a squashfs --drop-acls keeps)."""
    return {
        path: (*item[:-1], {k: v for k, v in item[-1].items() if k not in ACL_XATTRS})
        if isinstance(item[-1], dict)
        else item
        for path, item in tree.items()
    }


def assert_same_snapshot(
    want: dict[str, tuple[object, ...]],
    got: dict[str, tuple[object, ...]],
    *,
    names: tuple[str, str] = ("source", "image"),
) -> None:
    """Two snapshots are equal; else say which paths are missing or differ (the
    first few of each, and how many)."""
    a, b = names
    only_want, only_got = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not only_want and not only_got, (
        f"{len(only_want)} only in {a}, e.g. {only_want[:10]}; "
        f"{len(only_got)} only in {b}, e.g. {only_got[:10]}"
    )
    bad = sorted(k for k in want if want[k] != got[k])
    if bad:
        shown = "; ".join(f"{k}: {a} {want[k]!s:.300} {b} {got[k]!s:.300}" for k in bad[:3])
        raise AssertionError(f"{len(bad)} entries differ, e.g. {shown}")


def unsquashfs_extract(image: Path, dest: Path) -> None:
    tool = require_tool("unsquashfs")
    # errors="replace": names need not be UTF-8; only the exit status is judged here.
    listing = subprocess.run([tool, "-lln", str(image)], capture_output=True, text=True, errors="replace")
    assert listing.returncode == 0, listing.stderr
    proc = subprocess.run(
        [tool, "-no-progress", "-d", str(dest), str(image)], capture_output=True, text=True, errors="replace"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
