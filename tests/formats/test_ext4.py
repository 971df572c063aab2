"""ext4 images checked by the real oracles: `e2fsck -fn` passes on every image and
`debugfs` (rdump, stat, ex, ea_get, htree) shows the tree that went in."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import blake3
import pytest

from pyimg.errors import LimitError, SpecError
from pyimg.formats.base import WriteResult
from pyimg.formats.ext4 import Ext4Writer, resolve_features
from pyimg.formats.ext4_options import Ext4Options
from pyimg.options import BuildOptions, Policy
from pyimg.region import Region
from pyimg.tree import DataRef, FrozenTree, Inode, Kind, Tree, new_dir

from ..ext4_oracle import e2fsck_clean
from ..oracles import require_tool

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
T0 = 1_700_000_000_000_000_000  # a fixed mtime (ns)


# The oracle helpers are shared with the end-to-end tests (tests/ext4_oracle.py).
e2fsck = e2fsck_clean
tool = require_tool


def debugfs(image: Path, command: str) -> str:
    proc = subprocess.run([tool("debugfs"), "-R", command, str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def build(tmp_path: Path, tree: Tree | FrozenTree, name: str = "img.ext4", jobs: int = 1,
          epoch: int | None = None, **ext4: object) -> tuple[Path, WriteResult]:  # fmt: skip
    frozen = tree.freeze() if isinstance(tree, Tree) else tree
    options = BuildOptions(sources=(), output="x", format="ext4", jobs=jobs, policy=Policy(epoch=epoch),
                           format_options={"ext4": Ext4Options(**ext4)})  # type: ignore[arg-type]  # fmt: skip
    image = tmp_path / name
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    seen: list[int] = []
    try:
        result = Ext4Writer(options).write(frozen, Region(fd), seen.append)
        os.ftruncate(fd, result.image_size)
    finally:
        os.close(fd)
    assert sum(seen) <= result.bytes_in
    e2fsck(image)
    return image, result


def add_file(tree: Tree, tmp: Path, path: bytes, data: bytes | None = None, *, size: int | None = None,
             mode: int = 0o644, uid: int = 0, gid: int = 0, mtime_ns: int = T0,
             xattrs: dict[bytes, bytes] | None = None, source: Path | None = None) -> Inode:  # fmt: skip
    """A regular file whose content lives in a real file under tmp (or in `source`)."""
    src = source or tmp / ("src_" + path.decode().replace("/", "_"))
    if data is not None:
        src.write_bytes(data)
    size = src.stat().st_size if size is None else size
    data = DataRef.at(str(src), 0, size) if size else None
    inode = Inode(Kind.FILE, mode, uid, gid, mtime_ns, size=size, data=data, xattrs=dict(xattrs or {}))
    tree.add(path, inode)
    return inode


def varied_tree(tmp: Path) -> Tree:
    tmp.mkdir(parents=True, exist_ok=True)
    tree = Tree(new_dir(0o755, 0, 0, T0))
    rnd = blake3.blake3(b"seed").digest(length=3 << 20)
    tree.add(b"etc", new_dir(0o755, 0, 0, T0 + 5))
    add_file(tree, tmp, b"etc/hello", b"hello world\n", uid=1000, gid=100, mtime_ns=T0 + 123_456_789)
    add_file(tree, tmp, b"etc/empty", b"")
    add_file(tree, tmp, b"etc/exact4k", rnd[:4096], mode=0o600)
    add_file(tree, tmp, b"etc/4k1", rnd[:4097], mode=0o4755)
    add_file(tree, tmp, b"big/random", rnd[: 1 << 20])
    add_file(tree, tmp, b"big/zeros_inside", rnd[:8192] + bytes(64 << 10) + rnd[8192:12288] + b"tail")
    add_file(tree, tmp, b"big/all_zero", bytes(200_000))
    tree.add(b"links/fast", Inode(Kind.SYMLINK, 0o777, 0, 0, T0, size=9, target=b"../etc/hello"[:9]))
    slow = b"/very/long/" + b"x" * 120
    tree.add(b"links/slow", Inode(Kind.SYMLINK, 0o777, 5, 6, T0, size=len(slow), target=slow))
    hard = add_file(tree, tmp, b"links/hard1", b"shared by two names\n")
    tree.add(b"links/hard2", hard)
    tree.add(b"dev/null", Inode(Kind.CHAR, 0o666, 0, 0, T0, rdev=(1, 3)))
    tree.add(b"dev/nvme", Inode(Kind.BLOCK, 0o660, 0, 6, T0, rdev=(259, 300)))
    tree.add(b"dev/fifo", Inode(Kind.FIFO, 0o644, 0, 0, T0))
    tree.add(b"dev/sock", Inode(Kind.SOCKET, 0o755, 0, 0, T0))
    tree.add(b"sticky", new_dir(0o1777, 0, 0, T0))
    add_file(tree, tmp, b"xattr/small", b"x", xattrs={b"user.a": b"1", b"security.selinux": b"system_u:r\0"})
    big = {b"user.big%d" % i: bytes([65 + i]) * 200 for i in range(3)}
    add_file(tree, tmp, b"xattr/block1", b"y", xattrs=big)
    add_file(tree, tmp, b"xattr/block2", b"z", xattrs=big)
    return tree


def stat_of(image: Path, path: str) -> dict[str, str]:
    out = debugfs(image, f"stat {path}")
    fields: dict[str, str] = {}
    for key in ("User", "Group", "Links", "Mode", "File ACL", "Size", "Blockcount"):
        m = re.search(rf"{key}:\s+(\S+)", out)
        if m:
            fields[key] = m.group(1)
    m = re.search(r" mtime: 0x([0-9a-f]+):([0-9a-f]+)", out)
    if m:
        fields["mtime"] = str(int(m.group(1), 16))
        fields["mtime_extra"] = str(int(m.group(2), 16))
    m = re.search(r"major/minor number:\s+(\d+):(\d+)", out)
    if m:
        fields["rdev"] = f"{int(m.group(1))}:{int(m.group(2))}"
    fields["raw"] = out
    return fields


def check_round_trip(tmp_path: Path, image: Path, tree: Tree) -> None:
    out = tmp_path / "rdump"
    out.mkdir()
    debugfs(image, f"rdump / {out}")
    frozen = tree.freeze()
    for node in frozen.nodes[1:]:
        inode = node.inode
        path = node.path.decode()
        got = out / path
        if inode.kind in (Kind.CHAR, Kind.BLOCK, Kind.SOCKET, Kind.FIFO):
            st = stat_of(image, "/" + path)
            if inode.kind in (Kind.CHAR, Kind.BLOCK):
                assert st["rdev"] == f"{inode.rdev[0]}:{inode.rdev[1]}", path
            kind_word = {Kind.CHAR: "character special", Kind.BLOCK: "block special",
                         Kind.FIFO: "FIFO", Kind.SOCKET: "socket"}[inode.kind]  # fmt: skip
            assert kind_word in st["raw"], (path, st["raw"][:200])
            continue
        st = stat_of(image, "/" + path)
        assert int(st["Mode"], 8) == inode.mode, path  # rdump drops setuid bits: check the inode
        if inode.kind is Kind.SYMLINK:
            assert os.readlink(got).encode() == inode.target
        elif inode.kind is Kind.FILE:
            expect = Path(inode.data.path).read_bytes() if inode.data else b""
            assert got.read_bytes() == expect, path
        else:
            assert got.is_dir(), path
        assert (int(st["User"]), int(st["Group"])) == (inode.uid, inode.gid), path
        assert int(st["Links"]) == frozen.nlink[node.ino] + (1 if node.path == b"" else 0), path
        assert int(st["mtime"]) == inode.mtime_ns // 10**9, path
        assert int(st["mtime_extra"]) >> 2 == inode.mtime_ns % 10**9, path
        for name, value in inode.xattrs.items():
            shown = debugfs(image, f"ea_get /{path} {name.decode()}")
            assert value.rstrip(b"\0").decode() in shown, (path, name, shown)
    assert (out / "lost+found").is_dir()


@pytest.mark.parametrize(
    "ext4",
    [
        {},
        {"features": ("-metadata_csum", "-64bit")},
        {"journal": 0},
        {"features": ("-dir_index", "-filetype")},
        {"dedup": False},
    ],
    ids=["default", "no-csum-no-64bit", "journal", "no-dir-index", "no-dedup"],
)  # fmt: skip
def test_round_trip_varied(tmp_path: Path, ext4: dict[str, object]) -> None:
    tree = varied_tree(tmp_path / "src")
    image, result = build(tmp_path, tree, **ext4)
    check_round_trip(tmp_path, image, tree)
    assert image.stat().st_size == result.image_size == result.facts.size
    assert result.image_size % 4096 == 0
    frozen = tree.freeze()
    for ino, inode in enumerate(frozen.inodes, 1):
        if inode.kind is Kind.FILE:
            data = Path(inode.data.path).read_bytes() if inode.data else b""
            assert result.digests[ino] == blake3.blake3(data).digest()


def test_hard_links_share_an_inode(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    image, _ = build(tmp_path, tree)
    one, two = debugfs(image, "stat /links/hard1"), debugfs(image, "stat /links/hard2")
    assert re.search(r"Inode: (\d+)", one).group(1) == re.search(r"Inode: (\d+)", two).group(1)  # type: ignore[union-attr]
    assert "Links: 2" in one


def test_xattrs_in_inode_and_shared_block(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    image, _ = build(tmp_path, tree)
    small = stat_of(image, "/xattr/small")
    assert small["File ACL"] == "0"  # in the inode body
    b1, b2 = stat_of(image, "/xattr/block1"), stat_of(image, "/xattr/block2")
    assert b1["File ACL"] != "0" and b1["File ACL"] == b2["File ACL"]  # one block, refcount 2
    for i in range(3):
        assert (chr(65 + i) * 200) in debugfs(image, f"ea_get /xattr/block2 user.big{i}")


def test_fast_and_slow_symlinks(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    image, _ = build(tmp_path, tree)
    assert stat_of(image, "/links/fast")["Blockcount"] == "0"
    assert stat_of(image, "/links/slow")["Blockcount"] == "8"


def test_sparse_5gib_file_allocates_no_holes(tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(5 << 30)
        f.write(b"tail")
    tree = Tree(new_dir(mtime_ns=T0))
    add_file(tree, tmp_path, b"sparse", source=src)
    image, result = build(tmp_path, tree)
    extents = [line for line in debugfs(image, "ex /sparse").splitlines()[1:] if line.strip()]
    assert len(extents) == 2, extents
    assert int(stat_of(image, "/sparse")["Blockcount"]) == 16  # two 4 KiB blocks
    assert result.bytes_stored == 4096 + 4 + 4 - 4  # "head" block + partial "tail" block
    assert os.stat(image).st_blocks * 512 < 8 << 20  # the image file itself stays small
    assert int(stat_of(image, "/sparse")["Size"]) == (5 << 30) + 4


def test_fragmented_file_gets_an_extent_tree(tmp_path: Path) -> None:
    src = tmp_path / "frag"
    with open(src, "wb") as f:
        for i in range(2000):  # 2000 one-block extents: leaves + an index level
            f.seek(i * 8192)
            f.write(bytes([i % 251 + 1]) * 4096)
    tree = Tree(new_dir(mtime_ns=T0))
    add_file(tree, tmp_path, b"frag", source=src)
    image, _ = build(tmp_path, tree)
    ex = debugfs(image, "ex /frag")
    assert re.search(r"^\s*2/\s*2", ex, re.M), ex[:500]  # depth 2
    out = tmp_path / "frag.out"
    debugfs(image, f"dump /frag {out}")
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.slow
def test_htree_100k_entries(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"d", new_dir(mtime_ns=T0))
    for i in range(100_000):
        tree.add(b"d/entry-%06d" % i, Inode(Kind.FILE, 0o644, 0, 0, T0))
    image, result = build(tmp_path, tree)
    assert "Indirect levels: 0" in debugfs(image, "htree /d").split("Number of entries")[0]
    assert stat_of(image, "/d")["Blockcount"] != "8"
    listing = debugfs(image, "ls -p /d")
    assert listing.count("/entry-") == 100_000
    assert result.facts.inodes >= 100_012


def test_htree_two_levels_long_names(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"d", new_dir(mtime_ns=T0))
    for i in range(12_000):
        tree.add(b"d/" + (b"n%06d" % i) * 30, Inode(Kind.FILE, 0o644, 0, 0, T0))
    image, _ = build(tmp_path, tree)
    assert "Indirect levels: 1" in debugfs(image, "htree /d")


@pytest.mark.slow
def test_70k_subdirectories_use_dir_nlink(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"d", new_dir(mtime_ns=T0))
    for i in range(70_000):
        tree.add(b"d/s%05d" % i, new_dir(mtime_ns=T0))
    image, _ = build(tmp_path, tree)
    assert stat_of(image, "/d")["Links"] == "1"
    assert stat_of(image, "/d/s00042")["Links"] == "2"


def test_journal(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    image, result = build(tmp_path, tree, journal=8 << 20)
    assert "has_journal" in result.facts.features and result.facts.journal_blocks == 2048
    assert "shared_blocks" not in result.facts.features  # no dedup by default with a journal
    head = subprocess.run([tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True).stdout
    assert "has_journal" in head and re.search(r"Total journal size:\s+8M", head), head


def test_dedup_and_a_journal_are_refused_together(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    with pytest.raises(SpecError, match="read-only"):
        build(tmp_path, tree, journal=8 << 20, dedup=True)
    with pytest.raises(SpecError, match="contradicts"):
        build(tmp_path, tree, dedup=False, features=("+shared_blocks",))


def test_dedup_shares_blocks(tmp_path: Path) -> None:
    data = blake3.blake3(b"dup").digest(length=1 << 20)
    tree = Tree(new_dir(mtime_ns=T0))
    add_file(tree, tmp_path, b"a", data)
    add_file(tree, tmp_path, b"b", data)
    image, result = build(tmp_path, tree)
    assert "shared_blocks" in result.facts.features
    ex_a = debugfs(image, "ex /a").splitlines()[1:]
    assert ex_a and ex_a == debugfs(image, "ex /b").splitlines()[1:]
    _plain, plain_result = build(tmp_path, tree, name="plain.ext4", dedup=False)
    assert "shared_blocks" not in plain_result.facts.features
    used = int(result.facts.blocks) - int(result.facts.free_blocks)
    used_plain = int(plain_result.facts.blocks) - int(plain_result.facts.free_blocks)
    assert used_plain - used == 256
    assert result.image_size < plain_result.image_size
    assert result.bytes_stored == 1 << 20 and plain_result.bytes_stored == 2 << 20
    for name in ("a", "b"):
        out = tmp_path / f"{name}.out"
        debugfs(image, f"dump /{name} {out}")
        assert out.read_bytes() == data


def test_determinism_jobs_and_runs(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    for i in range(30):
        add_file(
            tree, tmp_path / "src", b"many/f%02d" % i, blake3.blake3(b"%d" % i).digest(length=50_000 * i)
        )
    one, _ = build(tmp_path, tree, name="j1.ext4", jobs=1)
    four, _ = build(tmp_path, tree, name="j4.ext4", jobs=4)
    again, _ = build(tmp_path, tree, name="j4b.ext4", jobs=4)
    assert one.read_bytes() == four.read_bytes() == again.read_bytes()


def test_explicit_size(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    image, result = build(tmp_path, tree, size=300 << 20)
    assert image.stat().st_size == 300 << 20 and result.facts.groups == 3
    with pytest.raises(LimitError, match="needs at least"):
        build(tmp_path, tree, name="small.ext4", size=1 << 20)


def test_uuid_given_and_derived(tmp_path: Path) -> None:
    tree = varied_tree(tmp_path / "src")
    _, derived = build(tmp_path, tree)
    _, given = build(tmp_path, tree, name="u.ext4", uuid="12345678-1234-5678-1234-567812345678")
    assert given.facts.uuid == "12345678-1234-5678-1234-567812345678" != derived.facts.uuid


def test_bad_input_raises_typed_errors(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"d/" + b"n" * 256, Inode(Kind.FILE, 0o644, 0, 0, T0))
    with pytest.raises(LimitError, match="255") as info:
        build(tmp_path, tree)
    assert info.value.path is not None and "nnnn" in info.value.path
    with pytest.raises(SpecError, match="unknown ext4 feature"):
        resolve_features(("+no_such_feature",))
    with pytest.raises(SpecError, match="cannot be disabled"):
        resolve_features(("-extents",))
    with pytest.raises(SpecError):
        resolve_features(("+inline_data",))
    assert "metadata_csum" not in resolve_features(("-metadata_csum,-64bit",))
    huge = Tree(new_dir(mtime_ns=T0))
    huge.add(b"f", Inode(Kind.FILE, 0o644, 0, 0, T0, size=1 << 45, data=DataRef.at("/dev/null", 0, 1 << 45)))
    with pytest.raises(LimitError, match="too big"):
        build(tmp_path, huge)


def _one_bad_inode(case: str) -> tuple[Tree, tuple[str, ...]]:
    """A tree of ordinary entries and one inode ext4 (with these features) cannot hold."""
    tree = Tree(new_dir(mtime_ns=T0))
    for i in range(50):
        tree.add(b"ok/f%d" % i, Inode(Kind.FILE, 0o644, 1000, 1000, T0))
    features: tuple[str, ...] = ()
    big = DataRef.at("/dev/null", 0, 1 << 31)
    if case == "large_file":
        tree.add(b"bad", Inode(Kind.FILE, 0o644, 0, 0, T0, size=1 << 31, data=big))
        features = ("-large_file",)
    elif case == "symlink":
        tree.add(b"bad", Inode(Kind.SYMLINK, 0o777, 0, 0, T0, size=4096, target=b"t" * 4096))
    elif case == "links":
        linked = Inode(Kind.FILE, 0o644, 0, 0, T0)
        for i in range(65001):
            tree.add(b"bad%d" % i, linked)
    elif case == "dir_nlink":
        for i in range(64999):
            tree.add(b"bad/d%d" % i, new_dir(mtime_ns=T0))
        features = ("-dir_nlink",)
    elif case == "uid":
        tree.add(b"bad", Inode(Kind.FILE, 0o644, 1 << 32, 0, T0))
    elif case == "mtime":
        tree.add(b"bad", Inode(Kind.FILE, 0o644, 0, 0, (1 << 34) * 10**9))
    elif case == "xattrs":
        tree.add(b"bad", Inode(Kind.FILE, 0o644, 0, 0, T0, xattrs={b"user.a": b"1"}))
        features = ("-ext_attr",)
    return tree, features


@pytest.mark.parametrize(
    ("case", "reason"),
    [("large_file", "large_file feature"), ("symlink", "symlink target of 4096"),
     ("links", "65001 hard links"), ("dir_nlink", "dir_nlink feature"), ("uid", "beyond 32 bits"),
     ("mtime", "mtime out of"), ("xattrs", "ext_attr feature")],
)  # fmt: skip
def test_every_inode_limit_is_refused_with_its_path(tmp_path: Path, case: str, reason: str) -> None:
    tree, features = _one_bad_inode(case)
    with pytest.raises(LimitError, match=reason) as info:
        build(tmp_path, tree, features=features)
    assert info.value.path is not None and "bad" in info.value.path
    assert not list(tmp_path.iterdir()) or os.path.getsize(tmp_path / "img.ext4") == 0  # nothing written


def _golden_tree(tmp: Path, which: int) -> Tree:
    tmp.mkdir(parents=True, exist_ok=True)
    tree = Tree(new_dir(0o755, 0, 0, T0))
    if which == 0:
        add_file(tree, tmp, b"hello.txt", b"hello\n", uid=1, gid=2)
        tree.add(b"link", Inode(Kind.SYMLINK, 0o777, 0, 0, T0, size=9, target=b"hello.txt"))
    elif which == 1:
        for i in range(300):
            add_file(tree, tmp, b"dir/file%03d" % i, b"%d\n" % (i % 7), mtime_ns=T0 + i)
        tree.add(b"dev/console", Inode(Kind.CHAR, 0o600, 0, 0, T0, rdev=(5, 1)))
    else:
        add_file(tree, tmp, b"a", bytes(range(256)) * 64, xattrs={b"user.k": b"v" * 150, b"trusted.t": b"1"})
        add_file(tree, tmp, b"b", bytes(range(256)) * 64)
        add_file(tree, tmp, b"sparse", b"\0" * 40960 + b"end")
    return tree


@pytest.mark.parametrize("which", [0, 1, 2])
def test_golden_digests(tmp_path: Path, which: int) -> None:
    image, _ = build(tmp_path, _golden_tree(tmp_path / "src", which), epoch=1_700_000_000)
    digest = blake3.blake3(image.read_bytes()).hexdigest()
    golden = GOLDEN / f"ext4_{which}.txt"
    if os.environ.get("PYIMG_UPDATE_GOLDEN") == "1":
        golden.write_text(digest + "\n")
    assert golden.read_text().strip() == digest, f"image bytes changed for golden tree {which}"


def test_socket_node_from_a_real_socket_mode(tmp_path: Path) -> None:
    # a tree built from modes as a directory source would produce them
    sock = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    finally:
        server.close()
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"s", Inode(Kind.SOCKET, 0o755, 0, 0, T0))
    image, _ = build(tmp_path, tree)
    assert "Type: socket" in debugfs(image, "stat /s")


def test_lost_found_from_the_tree_and_journal_in_explicit_size(tmp_path: Path) -> None:
    tree = Tree(new_dir(mtime_ns=T0))
    tree.add(b"lost+found", new_dir(0o700, 0, 0, T0))
    add_file(tree, tmp_path, b"f", b"data")
    image, result = build(tmp_path, tree, size=64 << 20, journal=0)
    assert "Inode: 11 " in debugfs(image, "stat /lost+found")
    assert image.stat().st_size == 64 << 20 and result.facts.journal_blocks == 1024
    bad = Tree(new_dir(mtime_ns=T0))
    bad.add(b"lost+found", Inode(Kind.FILE, 0o644, 0, 0, T0))
    with pytest.raises(LimitError, match="lost\\+found"):
        build(tmp_path, bad, name="bad.ext4")


def test_one_changed_file_changes_only_its_blocks_and_the_superblock(tmp_path: Path) -> None:
    """The UUID follows the content, but the checksum seed (metadata_csum_seed) and the
    htree hash seed follow the options alone: after a same-size edit of one file the
    next image differs from the last in that file's data block and the superblock (its
    UUID), not in every checksummed inode and directory block (docs/ext4.md)."""
    import random

    import pyimg

    src = tmp_path / "src"
    rng = random.Random(4)
    for i in range(600):
        d = src / f"d{i % 30:02}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04}").write_bytes(rng.randbytes(rng.randint(10, 30000)))
    v1, v2 = tmp_path / "v1.ext4", tmp_path / "v2.ext4"
    pyimg.build([str(src)], str(v1), format="ext4", epoch=1_700_000_000)
    changed = src / "d10" / "f0310"
    data = bytearray(changed.read_bytes())
    data[0] ^= 1
    changed.write_bytes(bytes(data))
    pyimg.build([str(src)], str(v2), format="ext4", epoch=1_700_000_000)
    e2fsck(v2)
    a, b = v1.read_bytes(), v2.read_bytes()
    assert len(a) == len(b)
    differ = [i // 4096 for i in range(0, len(a), 4096) if a[i : i + 4096] != b[i : i + 4096]]
    assert differ[0] == 0 and len(differ) == 2, differ  # the superblock, the file's one data block
    assert a[1024 + 0x68 : 1024 + 0x78] != b[1024 + 0x68 : 1024 + 0x78]  # two trees, two UUIDs
    dumped = subprocess.run([require_tool("dumpe2fs"), "-h", str(v2)], capture_output=True, text=True)
    assert "metadata_csum_seed" in dumped.stdout, dumped.stdout
