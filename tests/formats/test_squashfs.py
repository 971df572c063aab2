"""squashfs images checked by the real oracle: unsquashfs lists and extracts them,
and the extraction equals the source."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sysconfig
from pathlib import Path

import blake3
import pytest

import pyimg
from pyimg.api import options_for
from pyimg.errors import LimitError
from pyimg.formats.squashfs import SquashfsWriter
from pyimg.region import Region
from pyimg.tree import Inode, Kind, Tree, new_dir

from ..oracles import (
    IS_ROOT,
    assert_same_tree,
    fix_mtimes,
    make_varied_tree,
    require_tool,
    run_cli,
    unsquashfs_extract,
)


def build(
    tmp_path: Path, source: Path, name: str = "img.sqfs", **options: object
) -> tuple[Path, pyimg.BuildResult]:
    out = tmp_path / name
    options.setdefault("owner", "preserve")
    result = pyimg.build([str(source)], str(out), **options)  # type: ignore[arg-type]
    return out, result


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_varied_tree(tmp_path_factory.mktemp("varied") / "root")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression": "gzip", "block_size": "4K"},
        {"compression": "xz", "block_size": "1M"},
        {"compression": "zstd:19", "fragments": False},
        {"dedup": False, "block_size": "64K"},
    ],
    ids=["zstd-default", "gzip-4k", "xz-1m", "zstd19-nofrag", "nodedup-64k"],
)
def test_round_trip_varied_tree(tmp_path: Path, varied: Path, options: dict[str, object]) -> None:
    image, result = build(tmp_path, varied, **options)
    assert image.stat().st_size % 4096 == 0
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    # unsquashfs cannot create sockets; everything else must match exactly.
    assert_same_tree(varied, extracted, ignore={"links/socket"})
    assert result.entries == len(result.manifest["entries"])


def test_listing_shows_every_entry_and_socket(tmp_path: Path, varied: Path) -> None:
    image, result = build(tmp_path, varied)
    tool = require_tool("unsquashfs")
    listing = subprocess.run([tool, "-lln", str(image)], capture_output=True, text=True, check=True).stdout
    assert "links/socket" in listing and listing.count("\n") >= result.entries
    sock_line = next(line for line in listing.splitlines() if line.endswith("links/socket"))
    assert sock_line.startswith("s")


def test_dedup_stores_identical_content_once(tmp_path: Path, varied: Path) -> None:
    with_dedup, r1 = build(tmp_path, varied, name="a.sqfs")
    without, _ = build(tmp_path, varied, name="b.sqfs", dedup=False)
    assert r1.dedup_saved >= 300_000
    assert with_dedup.stat().st_size < without.stat().st_size


def test_small_files_and_tails_share_fragments(tmp_path: Path) -> None:
    # Small files go through the C fragment packer a batch at a time: identical small
    # files are stored once, across batches (more than 256 files) and empty files mixed
    # in; a small file equal to an earlier large file's tail reuses that tail; a large
    # file's tail equal to an earlier small file is stored again (tails are only
    # matched among tails).  The extraction must equal the source either way.
    rng = random.Random(5)
    src = tmp_path / "src"
    tail = rng.randbytes(3000)
    (src / "a").mkdir(parents=True)
    (src / "a" / "big").write_bytes(rng.randbytes(128 * 1024) + tail)
    (src / "a" / "small-as-tail").write_bytes(tail)
    shared = rng.randbytes(2000)
    for i in range(600):
        (src / f"f{i:04d}").write_bytes(shared if i % 2 else b"" if i % 3 == 0 else rng.randbytes(500 + i))
    (src / "z").mkdir()
    (src / "z" / "big").write_bytes(rng.randbytes(128 * 1024) + shared)
    fix_mtimes(src)
    image, result = build(tmp_path, src)
    plain_image, plain = build(tmp_path, src, name="plain.sqfs", dedup=False)
    for built, out in ((image, tmp_path / "out"), (plain_image, tmp_path / "out2")):
        unsquashfs_extract(built, out)
        assert_same_tree(src, out)
    # 300 copies of `shared` stored once (zstd would squeeze the copies that share a
    # fragment block anyway, so the image sizes differ less than this).
    assert result.dedup_saved == 299 * len(shared)
    assert plain.dedup_saved == 0
    assert result.image_size < plain.image_size


def test_sparse_file_is_stored_as_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, all hole
        f.seek(512 << 20)
        f.write(b"x" * 1000)
    image, _ = build(tmp_path, src)
    assert image.stat().st_size < 64 * 1024
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    with open(extracted / "huge", "rb") as f:
        f.seek((512 << 20) - 10)
        assert f.read(1020) == bytes(10) + b"x" * 1000 + bytes(10)
    assert os.path.getsize(extracted / "huge") == 1 << 30


@pytest.mark.parametrize("size", [(1 << 20) + 1, (2 << 20) + 4097])
def test_a_trailing_hole_is_the_image_of_its_zeros_without_fragments(tmp_path: Path, size: int) -> None:
    """A large file's last task inside a hole, its last block short (fragments off):
    the hole's bytes are counted as the block's own size, as for the same zeros
    written out (it was a whole block: the inode's `sparse` differed)."""
    digests = []
    for sparse in (False, True):
        src = tmp_path / f"src{int(sparse)}"
        src.mkdir()
        with open(src / "f", "wb") as f:
            f.write(b"head" * 1000)
            if sparse:
                f.truncate(size)
            else:
                f.write(bytes(size - 4000))
        out = tmp_path / f"img{int(sparse)}"
        digests.append(pyimg.build([str(src)], str(out), epoch=0, fragments=False).digest)
    assert digests[0] == digests[1]


def test_real_tree_round_trip(tmp_path: Path) -> None:
    """A Python installation's standard library: thousands of real files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    image, result = build(tmp_path, stdlib, exclude=["site-packages", "__pycache__"], jobs=2)
    assert result.entries > 1000
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    assert_same_tree(stdlib, extracted, skip_parts={"site-packages", "__pycache__"})


def test_a_file_linked_from_outside_the_tree_is_a_plain_file(tmp_path: Path) -> None:
    """st_nlink counts links the source does not hold (another tree, a cache): the
    image keeps the links it was given, here none."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"shared with something else")
    src = tmp_path / "src"
    src.mkdir()
    os.link(outside, src / "inside")
    image, _ = build(tmp_path, src)
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    assert (extracted / "inside").read_bytes() == b"shared with something else"
    assert (extracted / "inside").stat().st_nlink == 1
    assert_same_tree(src, extracted)


# -- determinism ---------------------------------------------------------------------


def test_same_bytes_across_runs_and_jobs(tmp_path: Path, varied: Path) -> None:
    digests = {
        build(tmp_path, varied, name=f"j{jobs}-{run}.sqfs", jobs=jobs)[1].digest
        for jobs in (1, 4)
        for run in (0, 1)
    }
    assert len(digests) == 1


def _create_tree(root: Path, order: list[int]) -> None:
    root.mkdir()
    for i in order:
        d = root / f"d{i % 5}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(b"content %d\n" % i * (i + 1))
        os.chmod(d / f"f{i}", 0o644)
        os.chmod(d, 0o755)
    os.chmod(root, 0o755)
    fix_mtimes(root)


def test_same_bytes_whatever_the_creation_order(tmp_path: Path) -> None:
    order = list(range(300))
    _create_tree(tmp_path / "a", order)
    random.Random(7).shuffle(order)
    _create_tree(tmp_path / "b", order)
    assert (
        build(tmp_path, tmp_path / "a", name="a.sqfs")[1].digest
        == build(tmp_path, tmp_path / "b", name="b.sqfs")[1].digest
    )


def test_same_bytes_whatever_the_umask(tmp_path: Path, varied: Path) -> None:
    digests = set()
    for mask in (0o022, 0o077):
        old = os.umask(mask)
        try:
            digests.add(build(tmp_path, varied, name=f"u{mask:o}.sqfs")[1].digest)
        finally:
            os.umask(old)
    assert len(digests) == 1


def test_source_date_epoch_clamps_and_is_reproducible(
    tmp_path: Path, varied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1500000000")
    image, result = build(tmp_path, varied)
    assert all(e["mtime"] <= 1500000000 for e in result.manifest["entries"])
    assert result.digest == build(tmp_path, varied, name="again.sqfs")[1].digest
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    assert int(os.lstat(extracted / "etc/hostname").st_mtime) == 1500000000


# -- golden digests --------------------------------------------------------------------

GOLDEN = Path(__file__).parent.parent / "golden" / "squashfs.txt"


def _golden_trees(base: Path) -> dict[str, Path]:
    trees = {}
    t = base / "small"
    t.mkdir(parents=True)
    (t / "hello.txt").write_bytes(b"hello, world\n")
    (t / "sub").mkdir()
    (t / "sub/data.bin").write_bytes(bytes(range(256)) * 2000)
    os.symlink("../hello.txt", t / "sub/link")
    trees["small"] = t
    t = base / "dups"
    t.mkdir()
    for i in range(40):
        (t / f"copy{i:02d}").write_bytes(b"same content\n" * 5000)
        (t / f"uniq{i:02d}").write_bytes(b"unique %d\n" % i * 100)
    trees["dups"] = t
    t = base / "empty"
    t.mkdir()
    trees["empty"] = t
    for tree in trees.values():
        for dirpath, dirnames, filenames in os.walk(tree):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o644)
        os.chmod(tree, 0o755)
        fix_mtimes(tree)
    return trees


def test_golden_digests(tmp_path: Path) -> None:
    expected = dict(line.split() for line in GOLDEN.read_text().splitlines() if line.strip())
    got = {}
    for name, tree in _golden_trees(tmp_path / "trees").items():
        image = tmp_path / f"{name}.sqfs"
        pyimg.build([str(tree)], str(image), owner="root", epoch=1700000000)
        got[name] = blake3.blake3(image.read_bytes()).hexdigest()  # the bytes, not the image digest
    assert got == expected, (
        "golden digests changed: the on-disk output changed (update tests/golden only on purpose)"
    )


# -- limits ------------------------------------------------------------------------------


def test_name_too_long_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    archive = tmp_path / "long.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("d/" + "n" * 300)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "out.sqfs"
    with pytest.raises(LimitError) as err:
        pyimg.build([str(archive)], str(out))
    assert "n" * 300 in str(err.value) and "255" in str(err.value)
    assert not out.exists() and os.listdir(tmp_path) == ["long.tar"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Inode(Kind.FILE, 0o644, 0, 0, -1), "outside squashfs's range"),
        (Inode(Kind.FILE, 0o644, 0, 0, (1 << 32) * 10**9), "outside squashfs's range"),
        (Inode(Kind.CHAR, 0o600, 0, 0, 0, rdev=(1 << 12, 0)), "too large for squashfs"),
        (Inode(Kind.BLOCK, 0o600, 0, 0, 0, rdev=(8, 1 << 20)), "too large for squashfs"),
        (Inode(Kind.FILE, 0o644, 0, 0, 0, xattrs={b"system.x": b"1"}), "holds only user."),
    ],
    ids=["mtime-before-1970", "mtime-after-2106", "major", "minor", "xattr-namespace"],
)
def test_limits_refused_before_any_data(tmp_path: Path, bad: Inode, reason: str) -> None:
    tree = Tree(new_dir())
    tree.add(b"a/fine", Inode(Kind.FILE, 0o644, 0, 0, 10**9))
    tree.add(b"a/bad", bad)
    tree.add(b"z", Inode(Kind.CHAR, 0o600, 0, 0, 0, rdev=(1, 3)))  # a device within limits
    writer = SquashfsWriter(options_for([str(tmp_path)], str(tmp_path / "x.sqfs")))
    with open(tmp_path / "x.sqfs", "wb") as out, pytest.raises(LimitError, match=reason) as err:
        writer.write(tree.freeze(), Region(out.fileno()), lambda n: None)
    assert err.value.path == "/a/bad"
    assert os.path.getsize(tmp_path / "x.sqfs") == 0  # refused before anything was written


def test_too_many_ids_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    archive = tmp_path / "ids.tar"
    with tarfile.open(archive, "w") as tar:
        for uid in range(33000):
            info = tarfile.TarInfo(f"f{uid}")
            info.uid = uid
            info.gid = uid + 40000
            tar.addfile(info, io.BytesIO(b""))
    out = tmp_path / "out.sqfs"
    with pytest.raises(LimitError, match="65536"):
        pyimg.build([str(archive)], str(out))
    assert not out.exists()


@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="device nodes need root")
def test_devices_round_trip(tmp_path: Path, varied: Path) -> None:
    image, _ = build(tmp_path, varied)
    extracted = tmp_path / "x"
    unsquashfs_extract(image, extracted)
    st = os.lstat(extracted / "links/disk")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (259, 70000)


def test_cli_build_and_digest(tmp_path: Path, varied: Path) -> None:
    out = tmp_path / "cli.sqfs"
    manifest = tmp_path / "m.json"
    proc = run_cli("build", str(varied), "-o", str(out), "--manifest", str(manifest), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    digest = run_cli("digest", str(out))
    assert digest.stdout.strip() == summary["digest"] == json.loads(manifest.read_text())["image"]["blake3"]
