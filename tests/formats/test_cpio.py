"""cpio (newc) archives checked by the real oracle: GNU `cpio -t` lists them,
`cpio -i` extracts them and the extraction equals the source; the headers are also
read back by a small parser written from the kernel's buffer-format.rst."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
import zstandard

import pyimg
from pyimg.errors import LimitError, SpecError
from pyimg.formats.cpio import write_archive
from pyimg.formats.cpio_options import CpioOptions, parse_cpio_compression
from pyimg.region import Region
from pyimg.tree import DataRef, Inode, Kind, Tree, new_dir

from ..oracles import IS_ROOT, can_xattr, fix_mtimes, make_varied_tree, require_tool, snapshot

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cpio.txt"


@dataclass
class Entry:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    rdev: tuple[int, int]
    name: bytes
    data: bytes
    offset: int


def parse_newc(raw: bytes) -> list[Entry]:
    """Every entry up to the trailer, which must end the bytes."""
    entries, end = parse_newc_at(raw, 0)
    assert end == len(raw), "bytes after the trailer"
    return entries


def parse_newc_at(raw: bytes, at: int) -> tuple[list[Entry], int]:
    """The entries of the archive at offset `at` and where its trailer ends;
    asserts the 4-byte alignment rules."""
    out: list[Entry] = []
    while True:
        assert at % 4 == 0
        assert raw[at : at + 6] == b"070701", raw[at : at + 16]
        fields = [int(raw[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, check = fields
        assert check == 0
        name = raw[at + 110 : at + 110 + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        data_at = at + 110 + namesize
        data_at += -data_at % 4
        assert raw[at + 110 + namesize : data_at] == bytes(data_at - at - 110 - namesize)
        entry = Entry(ino, mode, uid, gid, nlink, mtime, size, (rmaj, rmin), name[:-1], b"", at)
        entry.data = raw[data_at : data_at + size]
        at = data_at + size
        pad = -at % 4
        assert raw[at : at + pad] == bytes(pad)
        at += pad
        if entry.name == b"TRAILER!!!":
            assert size == 0
            return out, at
        out.append(entry)


def build(tmp_path: Path, source: Path, name: str = "img.cpio", **options: object) -> Path:
    out = tmp_path / name
    options.setdefault("owner", "preserve")
    options.setdefault("drop_xattrs", True)  # `varied` has xattrs; newc cannot hold them
    pyimg.build([str(source)], str(out), format="cpio", **options)  # type: ignore[arg-type]
    return out


def cpio_extract(archive: Path, dest: Path) -> None:
    tool = require_tool("cpio")
    dest.mkdir()
    proc = subprocess.run(
        [tool, "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
        stdin=archive.open("rb"),
        cwd=dest,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr


def without_xattrs_and_dir_mtimes(snap: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """newc keeps no xattrs; GNU cpio -i sets a directory's mtime before filling it
    and never a symlink's (those mtimes are checked on the headers instead)."""
    out = {}
    for path, item in snap.items():
        fields = [x for x in item if not isinstance(x, dict)]
        if fields[0] in (stat.S_IFDIR, stat.S_IFLNK):
            fields[2] = None
        out[path] = tuple(fields)
    return out


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_varied_tree(tmp_path_factory.mktemp("varied") / "root")


def test_cpio_t_lists_every_entry_in_tree_order(tmp_path: Path, varied: Path) -> None:
    archive = build(tmp_path, varied)
    listing = subprocess.run(
        [require_tool("cpio"), "-t", "--quiet"], stdin=archive.open("rb"), capture_output=True, check=True
    ).stdout.splitlines()
    want = sorted(
        os.path.relpath(os.path.join(d, n), varied).encode()
        for d, dirs, files in os.walk(varied)
        for n in dirs + files
    )
    assert listing[0] == b"."
    assert sorted(listing[1:]) == want
    parents = {b"."}
    for name in listing[1:]:  # every directory comes before what it holds
        assert (os.path.dirname(name) or b".") in parents
        parents.add(name)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd", "gzip:1", "zstd:19"])
def test_round_trip_equals_the_tree(tmp_path: Path, varied: Path, compression: str) -> None:
    archive = build(tmp_path, varied, compression=compression)
    raw = archive.read_bytes()
    if compression.startswith("gzip"):
        plain = tmp_path / "plain.cpio"
        plain.write_bytes(
            subprocess.run(
                [require_tool("gzip"), "-dc", str(archive)], capture_output=True, check=True
            ).stdout
        )
        archive = plain
    elif compression.startswith("zstd"):
        plain = tmp_path / "plain.cpio"
        plain.write_bytes(
            subprocess.run(
                [require_tool("zstd"), "-dc", str(archive)], capture_output=True, check=True
            ).stdout
        )
        archive = plain
    else:
        assert len(raw) % 4 == 0
    cpio_extract(archive, tmp_path / "out")
    got = without_xattrs_and_dir_mtimes(snapshot(tmp_path / "out", owners=IS_ROOT))
    want = without_xattrs_and_dir_mtimes(snapshot(varied, owners=IS_ROOT))
    assert got.keys() == want.keys()
    bad = [k for k in want if want[k] != got[k]]
    assert not bad, f"{len(bad)} differ, e.g. {bad[0]}: {want[bad[0]]!s:.200} vs {got[bad[0]]!s:.200}"


def test_headers_match_the_tree(tmp_path: Path, varied: Path) -> None:
    """Directory mtimes, owners, inode numbers in tree order, hard links (data on the
    last link only), devices: read back from the headers themselves."""
    entries = parse_newc(build(tmp_path, varied).read_bytes())
    by_name = {e.name: e for e in entries}
    for entry in entries:
        full = varied / os.fsdecode(entry.name)
        st = os.lstat(full)
        assert entry.mode == st.st_mode, entry.name
        assert entry.mtime == int(st.st_mtime), entry.name
        assert (entry.uid, entry.gid) == (st.st_uid, st.st_gid)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert entry.rdev == (os.major(st.st_rdev), os.minor(st.st_rdev))
    # Inode numbers: 1, 2, 3... in the order first seen; a hard-link group shares one.
    seen: list[int] = []
    for entry in entries:
        if entry.ino not in seen:
            seen.append(entry.ino)
    assert seen == list(range(1, len(seen) + 1))
    group = [by_name[b"etc/hostname"], by_name[b"links/hostname-hard"], by_name[b"links/hostname-hard2"]]
    assert len({e.ino for e in group}) == 1 and all(e.nlink == 3 for e in group)
    assert [e.size for e in group] == [0, 0, 6] and group[-1].data == b"pyimg\n"
    assert by_name[b"links/absolute"].data == b"/etc/passwd"
    assert by_name[b"srv/sparse"].size == 3 * 1024 * 1024


def test_devices_and_owners_without_root(tmp_path: Path) -> None:
    """A tree made in memory (what the initramfs builder does): devices and owners
    need no privilege to be archived."""
    tree = Tree(new_dir(0o755, 0, 0, 10**9))
    tree.add(b"dev", new_dir(0o755, 0, 0, 10**9))
    tree.add(b"dev/console", Inode(Kind.CHAR, 0o600, 0, 5, 2 * 10**9, rdev=(5, 1)))
    tree.add(b"dev/vda", Inode(Kind.BLOCK, 0o660, 0, 6, 3 * 10**9, rdev=(254, 70000)))
    tree.add(b"home", Inode(Kind.DIR, 0o700, 1000, 1000, 0))
    raw = archive_bytes(tmp_path, tree)
    entries = {e.name: e for e in parse_newc(raw)}
    assert entries[b"dev/console"].mode == stat.S_IFCHR | 0o600 and entries[b"dev/console"].rdev == (5, 1)
    assert entries[b"dev/vda"].rdev == (254, 70000) and entries[b"dev/vda"].gid == 6
    assert entries[b"home"].uid == 1000 and entries[b"."].mtime == 1


def archive_bytes(tmp_path: Path, tree: Tree, options: CpioOptions | None = None) -> bytes:
    out = tmp_path / "mem.cpio"
    with out.open("wb") as f:
        result = write_archive(tree.freeze(), Region(f.fileno()), None, options or CpioOptions())
    raw = out.read_bytes()
    assert len(raw) == result.image_size
    return raw


def test_compressed_streams_are_reproducible(tmp_path: Path, varied: Path) -> None:
    plain = build(tmp_path, varied, name="plain.cpio").read_bytes()
    gz = build(tmp_path, varied, name="a.cpio.gz", compression="gzip").read_bytes()
    # gzip header: no FNAME/FEXTRA flags, MTIME 0 (RFC 1952).
    assert gz[:4] == b"\x1f\x8b\x08\x00" and gz[4:8] == bytes(4)
    assert gzip.decompress(gz) == plain
    zst = build(tmp_path, varied, name="a.cpio.zst", compression="zstd").read_bytes()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst) == plain
    for name, compression, raw in (("b.cpio.gz", "gzip", gz), ("b.cpio.zst", "zstd", zst)):
        assert build(tmp_path, varied, name=name, compression=compression).read_bytes() == raw


def test_jobs_never_change_the_bytes(tmp_path: Path, varied: Path) -> None:
    one = build(tmp_path, varied, name="one.cpio", jobs=1, compression="zstd").read_bytes()
    four = build(tmp_path, varied, name="four.cpio", jobs=4, compression="zstd").read_bytes()
    assert one == four


def _golden_tree(base: Path) -> Path:
    t = base / "golden"
    (t / "sub").mkdir(parents=True)
    (t / "hello.txt").write_bytes(b"hello, world\n")
    (t / "sub/data.bin").write_bytes(bytes(range(256)) * 2000)
    os.link(t / "hello.txt", t / "sub/hard")
    os.symlink("../hello.txt", t / "sub/link")
    os.mkfifo(t / "fifo")
    for dirpath, dirnames, filenames in os.walk(t):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    os.chmod(t, 0o755)
    fix_mtimes(t)
    return t


def test_golden_digests(tmp_path: Path) -> None:
    tree = _golden_tree(tmp_path)
    got = {}
    for compression in ("none", "zstd"):
        image = tmp_path / f"{compression}.cpio"
        pyimg.build(
            [str(tree)], str(image), format="cpio", compression=compression, owner="root", epoch=1700000000
        )
        got[compression] = blake3.blake3(image.read_bytes()).hexdigest()  # the bytes, not the image digest
    if os.environ.get("PYIMG_UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(f"{k} {v}\n" for k, v in got.items()))
    expected = dict(line.split() for line in GOLDEN.read_text().splitlines() if line.strip())
    assert got == expected, (
        "golden digests changed: the archive bytes changed (update tests/golden on purpose only)"
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Inode(Kind.FILE, 0o644, 0, 0, -(10**9)), "outside cpio's range"),
        (Inode(Kind.FILE, 0o644, 0, 0, (1 << 32) * 10**9), "outside cpio's range"),
        (
            Inode(Kind.FILE, 0o644, 0, 0, 0, size=1 << 32, data=DataRef.at("/nonexistent", 0, 1 << 32)),
            "4 GiB",
        ),
        (Inode(Kind.BLOCK, 0o600, 0, 0, 0, rdev=(1 << 32, 0)), "too large for cpio"),
    ],
    ids=["mtime-before-1970", "mtime-after-2106", "size", "major"],
)
def test_limits_refused_before_any_data(tmp_path: Path, bad: Inode, reason: str) -> None:
    tree = Tree(new_dir())
    tree.add(b"x", bad)
    with pytest.raises(LimitError) as err:
        archive_bytes(tmp_path, tree)
    assert reason in str(err.value) and "/x" in str(err.value)


@pytest.mark.parametrize(
    ("path", "bad", "reason"),
    [
        # The kernel's unpacker skips a name longer than PATH_MAX with its NUL, silently.
        (b"/".join([b"d" * 200] * 20) + b"/" + b"f" * 76, Inode(Kind.FILE, 0o644, 0, 0, 0), "of 4096 bytes"),
        (b"d/" + b"n" * 256, Inode(Kind.DIR, 0o755, 0, 0, 0), "name of 256 bytes"),
        (b"l", Inode(Kind.SYMLINK, 0o777, 0, 0, 0, 4096, b"t" * 4096), "symlink target of 4096 bytes"),
    ],
    ids=["path-over-4095", "name-over-255", "symlink-target-over-4095"],
)
def test_what_linux_cannot_unpack_is_refused(tmp_path: Path, path: bytes, bad: Inode, reason: str) -> None:
    tree = Tree(new_dir())
    tree.add(path, bad)
    with pytest.raises(LimitError) as err:
        archive_bytes(tmp_path, tree)
    assert reason in str(err.value) and err.value.path == "/" + path.decode(), err.value


def test_longest_path_the_kernel_unpacks(tmp_path: Path) -> None:
    """A name of 4095 bytes (4096 with its NUL, PATH_MAX) is still written."""
    path = b"/".join([b"d" * 200] * 20) + b"/" + b"f" * 75
    assert len(path) == 4095
    tree = Tree(new_dir())
    tree.add(path, Inode(Kind.FILE, 0o644, 0, 0, 0))
    assert path + b"\0" in archive_bytes(tmp_path, tree)


@pytest.mark.parametrize("text", ["xz", "gzip:0", "gzip:10", "zstd:20", "none:3", "zstd:fast"])
def test_bad_compression_is_refused(text: str) -> None:
    with pytest.raises(SpecError):
        parse_cpio_compression(text)


def test_ten_thousand_entries(tmp_path: Path) -> None:
    """What per-entry encoding in Python costs (docs/cpio.md quotes the figure)."""
    tree = Tree(new_dir())
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 100)
    for d in range(100):
        tree.add(b"d%03d" % d, new_dir())
        for f in range(99):
            tree.add(
                b"d%03d/f%03d" % (d, f),
                Inode(Kind.FILE, 0o644, 0, 0, 0, size=100, data=DataRef.at(blob, 0, 100)),
            )
    frozen = tree.freeze()
    assert len(frozen) == 10_001
    out = tmp_path / "big.cpio"
    with out.open("wb") as f:
        started = time.perf_counter()
        write_archive(frozen, Region(f.fileno()), None)
        seconds = time.perf_counter() - started
    assert len(parse_newc(out.read_bytes())) == 10_001
    print(f"cpio of 10k entries: {seconds * 1000:.0f} ms")
    assert seconds < 3.0


def test_reverse_finishing_workers_give_the_serial_bytes(
    tmp_path: Path, varied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyimg.content as content
    import pyimg.formats.cpio as cpio

    from ..test_determinism import _reverse_finishing

    serial = build(tmp_path, varied, name="serial.cpio", jobs=1).read_bytes()
    monkeypatch.setattr(cpio, "ordered_map", _reverse_finishing(content.ordered_map))
    assert build(tmp_path, varied, name="parallel.cpio", jobs=4).read_bytes() == serial


def test_spec_file_and_manifest(tmp_path: Path) -> None:
    tree = _golden_tree(tmp_path)
    spec = tmp_path / "image.toml"
    spec.write_text(
        f'format = "cpio"\noutput = "out.cpio.zst"\n[[source]]\npath = "{tree}"\n'
        '[cpio]\ncompression = "zstd:9"\n'
    )
    result = pyimg.build([], None, spec=str(spec), manifest=str(tmp_path / "m.json"))
    assert result.format == "cpio" and (tmp_path / "out.cpio.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    manifest = result.manifest
    assert manifest["options"]["cpio"] == {"compression": {"name": "zstd", "level": 9}, "drop_xattrs": False}
    assert manifest["format_details"]["compression"] == "zstd"
    files = {e["path"]: e for e in manifest["entries"] if e.get("type") == "file"}
    assert files, manifest["entries"][:3]
    spec.write_text('format = "cpio"\n[cpio]\ncompression = "xz"\n')
    with pytest.raises(SpecError, match="choose none, gzip"):
        pyimg.build([str(tree)], str(tmp_path / "x.cpio"), spec=str(spec))


def test_xattrs_refused_by_path_unless_dropped(tmp_path: Path) -> None:
    tree = Tree(new_dir())
    tree.add(b"plain", Inode(Kind.DIR, 0o755, 0, 0, 0))
    tree.add(b"plain/labelled", Inode(Kind.DIR, 0o755, 0, 0, 0, xattrs={b"security.selinux": b"x"}))
    with pytest.raises(LimitError, match="cpio \\(newc\\) cannot hold them") as err:
        archive_bytes(tmp_path, tree)
    assert err.value.path == "/plain/labelled"
    raw = archive_bytes(tmp_path, tree, CpioOptions(drop_xattrs=True))
    assert {e.name for e in parse_newc(raw)} == {b".", b"plain", b"plain/labelled"}


def test_dropped_xattrs_are_not_in_the_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    if not can_xattr(src):
        pytest.skip("no user xattrs on this file system")  # a tree-level case is tested above
    os.setxattr(src / "f", "user.foo", b"bar")
    manifest = tmp_path / "m.json"
    result = pyimg.build([str(src)], str(tmp_path / "x.cpio"), format="cpio", drop_xattrs=True,
                         manifest=str(manifest))  # fmt: skip
    entries = {e["path"]: e for e in json.loads(manifest.read_text())["entries"]}
    assert "xattrs" not in entries["/f"] and result.artifact.facts.xattrs_dropped == 1


def test_ctrl_c_while_the_writers_threads_end_is_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the writer's thread pool shuts down: its threads are still waited
    for, and the KeyboardInterrupt propagates.  The pool was shut down when the
    garbage collector closed the generator, where the Ctrl-C was printed as
    "Exception ignored" and lost: the build went on and exited 0."""
    from concurrent.futures import ThreadPoolExecutor

    tree = tmp_path / "src"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(os.urandom(5000))
    real_shutdown = ThreadPoolExecutor.shutdown
    joins = []

    def shutdown(self: ThreadPoolExecutor, wait: bool = True, **kwargs: bool) -> None:
        if wait:
            joins.append(self)
            if len(joins) == 1:
                raise KeyboardInterrupt  # as if it came while the threads were joined
        real_shutdown(self, wait, **kwargs)

    monkeypatch.setattr(ThreadPoolExecutor, "shutdown", shutdown)
    with pytest.raises(KeyboardInterrupt):
        pyimg.build([str(tree)], str(tmp_path / "img.cpio"), format="cpio", jobs=2, epoch=0)
    assert len(joins) == 2 and joins[0] is joins[1]  # joined again, to the end
    assert not (tmp_path / "img.cpio").exists()
