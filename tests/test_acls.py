"""POSIX ACLs end to end: real ACLs (setfacl, GNU tar --acls) into ext4, checked by
debugfs (the raw on-disk value, decoded here independently of pyimg) and e2fsck,
and against mke2fs -d's encoding of the same tree; squashfs refuses them by path
unless drop_acls, which builds and reports the paths."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

import pyimg
from pyimg.errors import LimitError, SourceError
from pyimg.xattrs import AclError, acl_from_text, acl_to_ext4, parse_acl

from .ext4_oracle import decode_ext4_acl, e2fsck_clean
from .oracles import IN_CI, decode_xattr_acl, require_tool, run_cli

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"


def _setfacl(*args: str) -> None:
    proc = subprocess.run([require_tool("setfacl"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"setfacl failed (no ACL support here?): {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def acl_tree(root: Path) -> Path:
    """A file and a directory with access ACLs (named users and groups), a
    directory with a default ACL, and a plain file."""
    (root / "d/sub").mkdir(parents=True)
    (root / "f").write_bytes(b"with an ACL\n")
    (root / "plain").write_bytes(b"no ACL\n")
    (root / "d/sub/g").write_bytes(b"inside\n")
    _setfacl("-m", "u:1234:rw,g:55:r", str(root / "f"))
    _setfacl("-m", "u:1234:rwx,u:99:r", str(root / "d"))
    _setfacl("-d", "-m", "g:77:rx", str(root / "d/sub"))
    return root


def _ea_list(image: Path, path: str) -> dict[str, bytes]:
    """The raw xattrs of `path` as debugfs shows them (ext4's on-disk values)."""
    proc = subprocess.run([require_tool("debugfs"), "-R", f"ea_list {path}", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s+(\S+) \((\d+)\) = (.*)$", line)
        if m:
            value = m.group(3).strip()
            raw = (
                value[1:-1].encode("latin-1")
                if value.startswith('"')
                else bytes.fromhex(value.replace(" ", ""))
            )
            assert len(raw) == int(m.group(2))
            found[m.group(1)] = raw
    return found


def _source_acls(root: Path) -> dict[str, dict[str, list[tuple[int, int, int]]]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            acls = {
                n: decode_xattr_acl(os.getxattr(full, n))
                for n in os.listxattr(full)
                if n in (ACCESS, DEFAULT)
            }
            if acls:
                out["/" + os.path.relpath(full, root)] = acls
    return out


def test_directory_acls_into_ext4(tmp_path: Path) -> None:
    src = acl_tree(tmp_path / "src")
    want = _source_acls(src)
    assert set(want) == {"/f", "/d", "/d/sub"} and DEFAULT in want["/d/sub"]
    image = tmp_path / "img.ext4"
    pyimg.build([str(src)], str(image), format="ext4")
    e2fsck_clean(image)
    for path, acls in want.items():
        got = _ea_list(image, path)
        assert {n: decode_ext4_acl(v) for n, v in got.items() if n.startswith("system.")} == acls, path
    assert _ea_list(image, "/plain") == {}
    # The very bytes mke2fs -d writes for the same ACLs.
    mke2fs = tmp_path / "ref.ext4"
    proc = subprocess.run([require_tool("mke2fs"), "-q", "-O", "ext_attr", "-d", str(src), str(mke2fs), "8M"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for path in want:
        assert _ea_list(image, path) == _ea_list(mke2fs, path), path


def test_directory_acls_refused_by_squashfs_then_dropped(tmp_path: Path) -> None:
    src = acl_tree(tmp_path / "src")
    out = tmp_path / "img.sqfs"
    proc = run_cli("build", str(src), "-o", str(out))
    assert proc.returncode == LimitError.exit_code, proc.stderr
    # The first path in tree order, the reason, the way out.
    assert "/d:" in proc.stderr and "ACL" in proc.stderr and "--drop-acls" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]
    manifest = tmp_path / "m.json"
    proc = run_cli("build", str(src), "-o", str(out), "--drop-acls", "--json", "--manifest", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dropped_acls"] == ["/d", "/d/sub", "/f"]
    record = json.loads(manifest.read_text())
    assert record["dropped_acls"] == ["/d", "/d/sub", "/f"] and record["options"]["drop_acls"] is True
    listing = subprocess.run([require_tool("unsquashfs"), "-lln", str(out)], capture_output=True, text=True)
    assert listing.returncode == 0 and "/d/sub/g" in listing.stdout
    # The API, and the spec key.
    result = pyimg.build([str(src)], str(out), drop_acls=True)
    assert result.dropped_acls == ["/d", "/d/sub", "/f"]
    spec = tmp_path / "s.toml"
    spec.write_text(f'output = "{out}"\n[[source]]\npath = "{src}"\n[policy]\ndrop_acls = true\n')
    assert pyimg.build([], spec=str(spec)).dropped_acls == ["/d", "/d/sub", "/f"]


def test_drop_acls_in_ext4_keeps_other_xattrs(tmp_path: Path) -> None:
    src = acl_tree(tmp_path / "src")
    os.setxattr(src / "f", "user.keep", b"me")
    image = tmp_path / "img.ext4"
    result = pyimg.build([str(src)], str(image), format="ext4", drop_acls=True)
    assert result.dropped_acls == ["/d", "/d/sub", "/f"]
    e2fsck_clean(image)
    assert _ea_list(image, "/f") == {"user.keep": b"me"}
    assert _ea_list(image, "/d") == {}


@pytest.mark.parametrize("xattrs", [False, True], ids=["text-form", "text-and-xattr-form"])
def test_gnu_tar_acls_into_ext4(tmp_path: Path, xattrs: bool) -> None:
    src = acl_tree(tmp_path / "src")
    want = _source_acls(src)
    archive = tmp_path / "a.tar"
    flags = ["--acls", "--xattrs"] if xattrs else ["--acls"]
    proc = subprocess.run([require_tool("tar"), *flags, "-cf", str(archive), "-C", str(src), "."],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    image = tmp_path / "img.ext4"
    pyimg.build([str(archive)], str(image), format="ext4")
    e2fsck_clean(image)
    for path, acls in want.items():
        got = _ea_list(image, path)
        assert {n: decode_ext4_acl(v) for n, v in got.items()} == acls, path
    proc = run_cli("build", str(archive), "-o", str(tmp_path / "img.sqfs"))
    assert proc.returncode == LimitError.exit_code and "/d:" in proc.stderr, proc.stderr


def _tar_with(tmp_path: Path, pax: dict[str, str], name: str = "f") -> Path:
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(b"x"))
    return archive


def test_tar_acl_by_name_only_is_refused(tmp_path: Path) -> None:
    # GNU tar --acls writes names (user:daemon:r--), which only the build host's
    # user database could turn into ids: refused, naming the archive and member.
    archive = _tar_with(
        tmp_path, {"SCHILY.acl.access": "user::rw-\nuser:daemon:r--\ngroup::r--\nmask::r--\nother::r--\n"}
    )
    with pytest.raises(SourceError) as err:
        pyimg.build([str(archive)], str(tmp_path / "o.ext4"), format="ext4")
    assert str(archive) in str(err.value) and "'f'" in str(err.value) and "by name" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["x.tar"]


def test_star_acl_with_ids(tmp_path: Path) -> None:
    archive = _tar_with(
        tmp_path, {"SCHILY.acl.access": "user::rw-,user:daemon:r--:1,group::r--,mask::r--,other::r--"}
    )
    image = tmp_path / "o.ext4"
    pyimg.build([str(archive)], str(image), format="ext4")
    assert decode_ext4_acl(_ea_list(image, "/f")[ACCESS]) == [
        (1, 6, 0xFFFFFFFF), (2, 4, 1), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
@pytest.mark.parametrize("name", ["system.richacl", "system.nfs4_acl", "system.sockprotoname", "other.ns"])
def test_other_system_xattrs_refused(tmp_path: Path, fmt: str, name: str) -> None:
    archive = _tar_with(tmp_path, {f"SCHILY.xattr.{name}": "v"})
    proc = run_cli("build", str(archive), "-o", str(tmp_path / "o.img"), "--format", fmt, "--drop-acls")
    assert proc.returncode == LimitError.exit_code, proc.stderr
    assert "/f:" in proc.stderr and name in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["x.tar"]


def test_malformed_acl_value_refused(tmp_path: Path) -> None:
    bad = struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF)  # no group::, other::
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"SCHILY.xattr." + ACCESS: bad.decode("utf-8", "surrogateescape")}
        tar.addfile(info)
    proc = run_cli("build", str(archive), "-o", str(tmp_path / "o.img"), "--format", "ext4")
    assert proc.returncode == LimitError.exit_code, proc.stderr
    assert "/f:" in proc.stderr and "ACL" in proc.stderr


def test_acl_codecs() -> None:
    value = acl_from_text("user::rw-\nuser:1000:r--\ngroup::r--\ngroup:5:rwx\nmask::rwx\nother::---\n")
    assert parse_acl(value) == [(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (8, 7, 5),
                                (0x10, 7, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]  # fmt: skip
    assert acl_from_text("default:user::rwx,default:group::r-x,default:other::---") == acl_from_text(
        "u::rwx,g::r-x,o::---"
    )
    disk = acl_to_ext4(value)
    assert len(disk) == 4 + 4 * 4 + 2 * 8 and decode_ext4_acl(disk) == parse_acl(value)
    bad = [
        "user::rw-",  # no group::, other::
        "user::rw-\ngroup::r--\nuser:1:r--\nother::r--",  # no mask:: for user:1
        "user::rwz\ngroup::r--\nother::r--",
        "user::rw-\nuser:1:r--\ngroup::r--\nother::r--",
        "bogus::rw-",
    ]
    for text in bad:
        with pytest.raises(AclError):
            acl_from_text(text)


def test_id_maps_rename_acl_entries_too(tmp_path: Path) -> None:
    """--uid-map/--gid-map rename the named ACL entries as they rename owners (in the
    kernel's order afterwards); ids mapped onto one entry are refused by path."""
    src = acl_tree(tmp_path / "src")
    image = tmp_path / "img.ext4"
    pyimg.build([str(src)], str(image), format="ext4", uid_map={1234: 5, 99: 2000}, gid_map={77: 1})
    e2fsck_clean(image)
    d = decode_ext4_acl(_ea_list(image, "/d")[ACCESS])
    assert [(tag, ident) for tag, _, ident in d if tag == 0x02] == [(0x02, 5), (0x02, 2000)]
    f = decode_ext4_acl(_ea_list(image, "/f")[ACCESS])
    assert (0x02, 6, 5) in f and (0x08, 4, 55) in f  # u:1234:rw -> u:5:rw, g:55 untouched
    sub = decode_ext4_acl(_ea_list(image, "/d/sub")[DEFAULT])
    assert [ident for tag, _, ident in sub if tag == 0x08] == [1]
    with pytest.raises(LimitError, match="repeated"):
        pyimg.build([str(src)], str(tmp_path / "bad.ext4"), format="ext4", uid_map={1234: 99})
