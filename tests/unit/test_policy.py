"""Policy (owner, id maps, epoch clamp, excludes): the rules alone (pure logic),
then applied while collecting real directories (under tmp_path: the directory
walker is C and reads the real file system)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyimg.collect import collect
from pyimg.errors import SpecError
from pyimg.options import BuildOptions, Policy, SourceSpec
from pyimg.sources import Rules, owner_pair
from pyimg.tree import Inode, Kind

from ..oracles import IS_ROOT

NS = 1_000_000_000


def file_inode(uid: int = 1000, gid: int = 1000, mtime: int = 5) -> Inode:
    return Inode(Kind.FILE, 0o644, uid, gid, mtime * NS)


# ----------------------------------------------------------------------------- Rules alone


@pytest.mark.parametrize(
    ("owner", "recorded", "expected"),
    [
        ("auto", False, (0, 0)),  # files on disk: the builder's ids never leak
        ("auto", True, (1000, 1000)),  # tar: owners are part of the archive
        ("preserve", False, (1000, 1000)),
        ("preserve", True, (1000, 1000)),
        ("root", True, (0, 0)),
        ("42:43", False, (42, 43)),
        ("42:43", True, (42, 43)),
    ],
)
def test_owner_policy(owner: str, recorded: bool, expected: tuple[int, int]) -> None:
    inode = Rules(Policy(owner=owner)).apply(file_inode(), recorded_owner=recorded)
    assert (inode.uid, inode.gid) == expected


def test_id_maps_apply_after_owner_policy() -> None:
    rules = Rules(Policy(owner="preserve", uid_map=((1000, 0), (7, 8)), gid_map=((1000, 50),)))
    inode = rules.apply(file_inode(), recorded_owner=True)
    assert (inode.uid, inode.gid) == (0, 50)
    # "auto" makes disk files 0:0 first; a map from 0 then renames that
    rules = Rules(Policy(uid_map=((0, 99),)))
    assert rules.apply(file_inode(), recorded_owner=False).uid == 99


def test_epoch_clamp() -> None:
    rules = Rules(Policy(epoch=100))
    assert rules.apply(file_inode(mtime=200), recorded_owner=True).mtime_ns == 100 * NS
    assert rules.apply(file_inode(mtime=50), recorded_owner=True).mtime_ns == 50 * NS
    assert Rules(Policy()).apply(file_inode(mtime=200), recorded_owner=True).mtime_ns == 200 * NS
    # the sub-second part past the epoch is clamped too
    late = Inode(Kind.FILE, 0o644, 0, 0, 100 * NS + 1)
    assert rules.apply(late, recorded_owner=True).mtime_ns == 100 * NS


def test_parent_template() -> None:
    t = Rules(Policy(epoch=123)).parent_template
    assert (t.kind, t.mode, t.uid, t.gid, t.mtime_ns) == (Kind.DIR, 0o755, 0, 0, 123 * NS)
    assert Rules(Policy()).parent_template.mtime_ns == 0


def test_excludes() -> None:
    rules = Rules(Policy(excludes=("*.pyc", "/var/cache/*", "usr/share/doc", "__pycache__")))
    assert rules.excluded(b"a.pyc")
    assert rules.excluded(b"usr/lib/python3/x.pyc")  # a name pattern matches anywhere
    assert not rules.excluded(b"usr/lib/python3/x.py")
    assert rules.excluded(b"var/cache/apt")
    assert rules.excluded(b"var/cache/apt/archives/x.deb")
    assert not rules.excluded(b"var/cache")  # "/var/cache/*": the directory itself stays
    assert not rules.excluded(b"srv/var/cache/x")  # a path pattern is anchored at the root
    assert rules.excluded(b"usr/share/doc")  # leading "/" added to a path pattern
    assert not rules.excluded(b"usr/share/doc-base")
    assert rules.excluded_within(b"usr/share/doc/bash/README")  # below an excluded dir
    assert rules.excluded_within(b"lib/__pycache__/m.cpython-311.opt")
    assert not rules.excluded_within(b"lib/python/m.py")
    assert not rules.excluded(b"")  # the root is never excluded


def test_excludes_case_sensitive_and_raw_names() -> None:
    rules = Rules(Policy(excludes=("*.PYC", "caf\u00e9")))
    assert not rules.excluded(b"a.pyc")
    assert rules.excluded("dir/caf\u00e9".encode())
    assert not rules.excluded(b"dir/caf\xe9")  # latin-1 bytes are another name
    assert not rules.excluded(b"\xff\xfe")  # undecodable names are fine


def test_owner_pair() -> None:
    assert owner_pair("root") == (0, 0)
    assert owner_pair("5:6") == (5, 6)
    assert owner_pair("auto") is None and owner_pair("preserve") is None
    with pytest.raises(SpecError, match="owner"):
        owner_pair("nobody")


# ----------------------------------------------------------------------------- collect a directory


def put(path: Path, contents: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(contents)
    if mode is not None:
        path.chmod(mode)


def build(tmp_path: Path) -> tuple[int, int]:
    """A source tree at tmp_path/src; returns the owner of usr/bin/tool (1000:1000,
    or the builder's ids where chown is not allowed)."""
    src = tmp_path / "src"
    src.mkdir()
    src.chmod(0o751)
    put(src / "usr/bin/tool", "#!/bin/sh\n", 0o755)
    put(src / "usr/share/doc/tool/README", "readme")
    put(src / "usr/lib/py/m.py", "x = 1\n")
    put(src / "usr/lib/py/m.pyc", "\0bytecode")
    put(src / "var/cache/apt/pkgcache.bin", "cache")
    os.symlink("../../bin/tool", src / "usr/lib/py/link")
    for path in (src, src / "usr/bin/tool", src / "usr/lib/py/m.py"):
        os.utime(path, (2_000_000_000, 2_000_000_000))
    owner = (1000, 1000) if IS_ROOT else (os.getuid(), os.getgid())
    os.chown(src / "usr/bin/tool", *owner)
    return owner


def options(tmp_path: Path, *sources: SourceSpec, policy: Policy | None = None) -> BuildOptions:
    return BuildOptions(sources=sources, output=str(tmp_path / "out.img"), policy=policy or Policy())


def test_collect_directory_with_policy(tmp_path: Path) -> None:
    build(tmp_path)
    policy = Policy(excludes=("*.pyc", "/usr/share/doc", "/var/cache/*"), epoch=1_700_000_000)
    with collect(options(tmp_path, SourceSpec(str(tmp_path / "src")), policy=policy)) as c:
        paths = set(c.tree.entries)
        assert b"usr/lib/py/m.pyc" not in paths
        assert not any(p.startswith(b"usr/share/doc") for p in paths)
        assert b"var/cache" in paths and b"var/cache/apt" not in paths
        assert b"var/cache/apt/pkgcache.bin" not in paths
        tool = c.tree.entries[b"usr/bin/tool"]
        assert (tool.mode, tool.uid, tool.gid, tool.size) == (0o755, 0, 0, 10)
        assert tool.mtime_ns == 1_700_000_000 * NS  # clamped
        assert c.tree.entries[b""].mode == 0o751
        assert c.tree.entries[b"usr/lib/py/link"].target == b"../../bin/tool"


def test_collect_preserve_and_maps(tmp_path: Path) -> None:
    uid, gid = build(tmp_path)
    policy = Policy(owner="preserve", uid_map=((uid, 10),), gid_map=((gid, 20),))
    with collect(options(tmp_path, SourceSpec(str(tmp_path / "src")), policy=policy)) as c:
        tool = c.tree.entries[b"usr/bin/tool"]
        assert (tool.uid, tool.gid) == (10, 20)


def test_layers_and_single_files(tmp_path: Path) -> None:
    build(tmp_path)
    put(tmp_path / "overlay/usr/bin/tool", "new tool")
    put(tmp_path / "motd", "hi", 0o600)
    sources = (
        SourceSpec(str(tmp_path / "src")),
        SourceSpec(str(tmp_path / "overlay")),
        SourceSpec(str(tmp_path / "motd"), dest=b"/etc/motd", mode=0o644, uid=3),
        SourceSpec(str(tmp_path / "motd"), dest=b"/usr/share/doc/skipped"),
    )
    policy = Policy(excludes=("/usr/share/doc",), epoch=5)
    with collect(options(tmp_path, *sources, policy=policy)) as c:
        tool = c.tree.entries[b"usr/bin/tool"]
        assert tool.size == len("new tool")
        assert tool.data is not None and tool.data.path == str(tmp_path / "overlay/usr/bin/tool")
        motd = c.tree.entries[b"etc/motd"]
        assert (motd.mode, motd.uid, motd.gid) == (0o644, 3, 0)
        etc = c.tree.entries[b"etc"]  # created as a parent: the template
        assert (etc.mode, etc.uid, etc.mtime_ns) == (0o755, 0, 5 * NS)
        assert b"usr/share/doc/skipped" not in c.tree  # excludes apply to every source kind
        assert b"usr/lib/py/m.pyc" in c.tree  # earlier layer kept what the overlay lacks


def test_directory_replacing_file_and_back(tmp_path: Path) -> None:
    put(tmp_path / "a/thing/inside", "x")
    put(tmp_path / "b/thing", "now a file")
    with collect(options(tmp_path, SourceSpec(str(tmp_path / "a")), SourceSpec(str(tmp_path / "b")))) as c:
        assert c.tree.entries[b"thing"].kind is Kind.FILE
        assert b"thing/inside" not in c.tree


def test_names_with_any_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    long_name = "n" * 255  # the longest a real directory holds; not refused here: the formats decide
    put(src / long_name, "x")
    put(src / "tab\tand\nnewline", "y")
    with collect(options(tmp_path, SourceSpec(str(src)))) as c:
        assert long_name.encode() in c.tree
        assert b"tab\tand\nnewline" in c.tree
