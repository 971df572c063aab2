"""Sources on real files: directories, tar archives in every flavour, single files,
and every bad input (each error: its type, the path it names, a readable reason)."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pyimg.collect import Collected, check_output_not_input, collect, resolve_kind
from pyimg.content import ContentReader
from pyimg.errors import OutputError, SourceError, SpecError
from pyimg.options import BuildOptions, Policy, SourceSpec
from pyimg.tree import DataRef, Inode, Kind

from ..oracles import IN_CI, can_xattr, collect_unprivileged, make_socket

IS_ROOT = os.geteuid() == 0


def opts(
    *sources: SourceSpec, policy: Policy | None = None, output: str = "/nonexistent/out.img"
) -> BuildOptions:
    return BuildOptions(sources=sources, output=output, policy=policy or Policy())


def run(*sources: SourceSpec, policy: Policy | None = None) -> Collected:
    return collect(opts(*sources, policy=policy))


def content(ref: DataRef | None) -> bytes:
    assert ref is not None
    with ContentReader(ref) as reader:
        return reader.read(0, ref.size)


def entry(collected: Collected, path: bytes) -> Inode:
    inode = collected.tree.get(path)
    assert inode is not None, f"{path!r} missing; have {sorted(collected.tree.entries)}"
    return inode


# ----------------------------------------------------------------------------- directories


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    os.link(root / "etc/hosts", root / "usr/bin/hosts-link")  # hard link across directories
    (root / "empty").write_bytes(b"")
    os.symlink("/does/not/exist", root / "dangling")
    os.symlink("/etc/hosts", root / "absolute")
    os.symlink("loop", root / "loop")  # points at itself
    os.mkfifo(root / "fifo")
    os.chmod(root, 0o750)
    return root


def test_directory_entries(rootfs: Path) -> None:
    with run(SourceSpec(str(rootfs))) as c:
        root = entry(c, b"")
        assert root.kind is Kind.DIR and root.mode == 0o750  # the dir itself becomes the root
        hosts = entry(c, b"etc/hosts")
        assert hosts.kind is Kind.FILE and hosts.size == 20
        assert content(hosts.data) == b"127.0.0.1 localhost\n"
        assert hosts.data is not None and hosts.data.offset == 0 and hosts.data.stamp is not None
        assert entry(c, b"usr/bin/hosts-link") is hosts  # same Inode object
        assert entry(c, b"empty").data is None
        assert entry(c, b"dangling").target == b"/does/not/exist"
        assert entry(c, b"absolute").target == b"/etc/hosts"
        loop = entry(c, b"loop")
        assert loop.kind is Kind.SYMLINK and loop.target == b"loop" and loop.size == 4
        assert entry(c, b"fifo").kind is Kind.FIFO
        # owner "auto": files on disk become root's, whoever ran the build
        assert all((i.uid, i.gid) == (0, 0) for i in c.tree.entries.values())


def test_directory_placed_under_dest(rootfs: Path) -> None:
    policy = Policy(epoch=1000)
    with run(SourceSpec(str(rootfs), dest=b"/opt/app"), policy=policy) as c:
        assert entry(c, b"opt/app").mode == 0o750
        assert entry(c, b"opt/app/etc/hosts").kind is Kind.FILE
        implicit = entry(c, b"opt")
        assert (implicit.mode, implicit.uid, implicit.gid, implicit.mtime_ns) == (0o755, 0, 0, 1000 * 10**9)


def test_socket_and_device(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    make_socket(root / "sock")
    if IS_ROOT:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(root / "null", 0o666)  # past the umask
    with run(SourceSpec(str(root))) as c:
        assert entry(c, b"sock").kind is Kind.SOCKET
        if IS_ROOT:
            null = entry(c, b"null")
            assert (null.kind, null.rdev, null.mode) == (Kind.CHAR, (1, 3), 0o666)


def test_xattrs(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    if not can_xattr(root):
        if IN_CI:
            pytest.fail("CI's file system must support user xattrs")
        pytest.skip("no user xattrs on this file system")
    (root / "f").write_bytes(b"x")
    os.setxattr(root / "f", "user.b", b"2")
    os.setxattr(root / "f", "user.a", b"\x00binary")
    with run(SourceSpec(str(root))) as c:
        xattrs = entry(c, b"f").xattrs
        assert xattrs == {b"user.a": b"\x00binary", b"user.b": b"2"}
        assert list(xattrs) == [b"user.a", b"user.b"]  # sorted


def test_sparse_file(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(32 * 1024 * 1024)
        f.write(b"middle")
    with run(SourceSpec(str(root))) as c:
        sparse = entry(c, b"sparse")
        assert sparse.size == 64 * 1024 * 1024
        assert sparse.data is not None and sparse.data.size == 64 * 1024 * 1024
        with ContentReader(sparse.data) as reader:
            assert reader.read(32 * 1024 * 1024, 6) == b"middle"


def test_owner_preserve_keeps_disk_ids(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    if IS_ROOT:
        os.chown(root / "f", 1234, 5678)
    st = os.lstat(root / "f")
    with run(SourceSpec(str(root)), policy=Policy(owner="preserve")) as c:
        assert (entry(c, b"f").uid, entry(c, b"f").gid) == (st.st_uid, st.st_gid)


def test_unreadable_file(tmp_path: Path) -> None:
    # Root reads anything, so chmod 000 alone proves nothing in CI: collect in a
    # child that cannot override file permissions.
    root = tmp_path / "src"
    root.mkdir()
    secret = root / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    error = collect_unprivileged(root)
    assert error.get("path") == str(secret), error
    assert "permission denied" in error["reason"]


def test_unreadable_directory(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "locked").mkdir(parents=True)
    (root / "locked").chmod(0)
    try:
        error = collect_unprivileged(root)
    finally:
        (root / "locked").chmod(0o700)  # let pytest clean up
    assert error.get("path") == str(root / "locked"), error
    assert "cannot read directory" in error["reason"] and "Permission denied" in error["reason"]


def test_missing_source(tmp_path: Path) -> None:
    for kind in ("auto", "dir", "tar", "file"):
        missing = str(tmp_path / "nope")
        with pytest.raises(SourceError) as info:
            run(SourceSpec(missing, kind=kind, dest=b"x"))  # type: ignore[arg-type]
        assert info.value.path == missing
        assert info.value.reason == "no such file or directory"


def test_kind_mismatch(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a directory") as info:
        run(SourceSpec(str(tmp_path / "f"), kind="dir"))
    assert info.value.path == str(tmp_path / "f")
    with pytest.raises(SourceError, match="is a directory"):
        run(SourceSpec(str(tmp_path), kind="file", dest=b"x"))


# ----------------------------------------------------------------------------- single files


def test_single_file(tmp_path: Path) -> None:
    f = tmp_path / "motd"
    f.write_bytes(b"hello\n")
    f.chmod(0o600)
    with run(SourceSpec(str(f), dest=b"/etc/motd", mode=0o4755, uid=7, gid=8)) as c:
        motd = entry(c, b"etc/motd")
        assert (motd.mode, motd.uid, motd.gid, motd.size) == (0o4755, 7, 8, 6)
        assert content(motd.data) == b"hello\n"
    with run(SourceSpec(str(f), dest=b"/etc/motd")) as c:
        assert entry(c, b"etc/motd").mode == 0o600


def test_single_file_needs_dest(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes(b"not a tar")
    for kind in ("auto", "file"):
        with pytest.raises(SpecError) as info:
            run(SourceSpec(str(f), kind=kind))  # type: ignore[arg-type]
        assert info.value.path == str(f)
        assert "dest" in info.value.reason


def test_gzip_file_that_is_not_a_tar_is_a_single_file(tmp_path: Path) -> None:
    f = tmp_path / "changelog.gz"
    f.write_bytes(gzip.compress(b"just text\n" * 100))
    assert resolve_kind(SourceSpec(str(f), dest=b"/usr/share/doc/x/changelog.gz")) == "file"
    zeros = tmp_path / "blank.img"
    zeros.write_bytes(bytes(4096))  # tarfile.is_tarfile says yes to this; we do not
    assert resolve_kind(SourceSpec(str(zeros), dest=b"/blank.img")) == "file"


def test_mode_only_for_single_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="single-file"):
        run(SourceSpec(str(tmp_path), mode=0o644))


# ----------------------------------------------------------------------------- tar archives


Member = tuple[tarfile.TarInfo, bytes | None]


def info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    ti.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti


def write_tar(
    path: Path, members: Iterable[Member], fmt: int = tarfile.PAX_FORMAT, compression: str = ""
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compression == "gz":
        raw = gzip.compress(raw, mtime=0)
    elif compression == "xz":
        raw = lzma.compress(raw)
    elif compression == "zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


LONG = "d" * 60 + "/" + "n" * 120 + ".txt"  # > 100 bytes: GNU longname or pax path


def sample_members() -> list[Member]:
    return [
        (info("./", tarfile.DIRTYPE, mode=0o700, uid=0, gid=0), None),
        (info("etc", tarfile.DIRTYPE), None),
        (info("etc/passwd", uid=0, gid=0), b"root:x:0:0\n"),
        (info("home/user/file", uid=1000, gid=1000), b"data" * 1000),  # implicit parents
        (info(LONG), b"long"),
        (info("etc/passwd-link", tarfile.LNKTYPE, linkname="etc/passwd"), None),
        (info("lib", tarfile.SYMTYPE, linkname="usr/lib", mode=0o777), None),
        (info("dangling", tarfile.SYMTYPE, linkname="/nowhere", mode=0o777), None),
        (info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660), None),
        (info("run/fifo", tarfile.FIFOTYPE), None),
        (info("empty"), b""),
    ]


@pytest.mark.parametrize("compression", ["", "gz", "xz", "zst"])
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_variants(tmp_path: Path, compression: str, fmt: int) -> None:
    archive = write_tar(tmp_path / "a.tar", sample_members(), fmt, compression)
    with run(SourceSpec(str(archive))) as c:
        root = entry(c, b"")
        assert root.mode == 0o700
        passwd = entry(c, b"etc/passwd")
        assert content(passwd.data) == b"root:x:0:0\n"
        assert passwd.mtime_ns == 1_600_000_000 * 10**9
        assert entry(c, b"etc/passwd-link") is passwd
        user_file = entry(c, b"home/user/file")
        assert (user_file.uid, user_file.gid) == (1000, 1000)  # "auto" keeps tar owners
        assert content(user_file.data) == b"data" * 1000
        assert entry(c, b"home").mode == 0o755  # implicit parent
        assert content(entry(c, LONG.encode()).data) == b"long"
        assert entry(c, b"lib").target == b"usr/lib"
        assert entry(c, b"dangling").target == b"/nowhere"
        assert entry(c, b"dev/null").rdev == (1, 3) and entry(c, b"dev/null").kind is Kind.CHAR
        assert entry(c, b"dev/sda").kind is Kind.BLOCK and entry(c, b"dev/sda").rdev == (8, 0)
        assert entry(c, b"run/fifo").kind is Kind.FIFO
        assert entry(c, b"empty").data is None
        assert passwd.data is not None
        if compression:
            assert passwd.data.path == c.spool_path and passwd.data.stamp is None
        else:
            assert passwd.data.path == str(archive)  # points into the archive, no copy
            assert passwd.data.stamp == (archive.stat().st_size, archive.stat().st_mtime_ns)
        spool = c.spool_path
    if spool is not None:
        assert not os.path.exists(spool)  # cleaned on exit


def test_ustar_format(tmp_path: Path) -> None:
    members = [(info("a/b"), b"x"), (info("c", tarfile.SYMTYPE, linkname="a/b"), None)]
    archive = write_tar(tmp_path / "u.tar", members, tarfile.USTAR_FORMAT)
    with run(SourceSpec(str(archive), dest=b"/srv")) as c:
        assert content(entry(c, b"srv/a/b").data) == b"x"
        assert entry(c, b"srv/c").target == b"a/b"


def test_pax_xattrs_and_fractional_mtime(tmp_path: Path) -> None:
    ti = info("f")
    ti.pax_headers = {
        "SCHILY.xattr.user.one": "1",
        "SCHILY.xattr.system.posix_acl_access": "kept",  # the formats check (and refuse) it
        "LIBARCHIVE.xattr.user.two%3Dx": "AHR3bw",  # base64 of b"\x00two", unpadded; name "user.two=x"
        "mtime": "1600000000.123456789",
    }
    archive = write_tar(tmp_path / "x.tar", [(ti, b"f")])
    with run(SourceSpec(str(archive))) as c:
        f = entry(c, b"f")
        assert f.xattrs == {b"system.posix_acl_access": b"kept", b"user.one": b"1", b"user.two=x": b"\x00two"}
        assert f.mtime_ns == 1_600_000_000_123_456_789


def test_tar_epoch_clamp_and_owner_root(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [(info("f", uid=1000, gid=1000, mtime=2_000_000_000), b"x")])
    with run(SourceSpec(str(archive)), policy=Policy(owner="root", epoch=1_700_000_000)) as c:
        f = entry(c, b"f")
        assert (f.uid, f.gid, f.mtime_ns) == (0, 0, 1_700_000_000 * 10**9)


def test_tar_excluded_hardlink_target_keeps_content(tmp_path: Path) -> None:
    members = [(info("doc/a.txt"), b"shared"), (info("bin/b", tarfile.LNKTYPE, linkname="doc/a.txt"), None)]
    archive = write_tar(tmp_path / "a.tar.gz", members, compression="gz")
    with run(SourceSpec(str(archive)), policy=Policy(excludes=("/doc",))) as c:
        assert b"doc/a.txt" not in c.tree and b"doc" not in c.tree
        assert content(entry(c, b"bin/b").data) == b"shared"


def test_zstd_multiple_frames(tmp_path: Path) -> None:
    plain = write_tar(tmp_path / "p.tar", [(info("f"), b"x" * 5000), (info("g"), b"y" * 5000)])
    raw = plain.read_bytes()
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "m.tar.zst").write_bytes(cctx.compress(raw[:4096]) + cctx.compress(raw[4096:]))
    with run(SourceSpec(str(tmp_path / "m.tar.zst"))) as c:
        assert content(entry(c, b"g").data) == b"y" * 5000


@pytest.mark.skipif(
    shutil.which("tar") is None and not IN_CI, reason="GNU tar needed to write sparse members"
)
@pytest.mark.parametrize("compression", ["", "gz"])
def test_sparse_tar_member(tmp_path: Path, compression: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 8 * 1024 * 1024
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(4 * 1024 * 1024)
        f.write(b"middle")
    archive = tmp_path / ("s.tar" + (".gz" if compression else ""))
    flags = "-cSzf" if compression else "-cSf"
    subprocess.run(["tar", flags, str(archive), "-C", str(src), "sparse"], check=True)
    with run(SourceSpec(str(archive))) as c:
        sparse = entry(c, b"sparse")
        assert sparse.size == size and sparse.data is not None and sparse.data.size == size
        assert sparse.data.path == c.spool_path
        with ContentReader(sparse.data) as reader:
            assert reader.read(4 * 1024 * 1024, 6) == b"middle"
            assert reader.read(0, 16) == bytes(16)


def test_later_source_wins(tmp_path: Path) -> None:
    lower = write_tar(tmp_path / "lower.tar", [(info("etc/conf"), b"old"), (info("etc/keep"), b"k")])
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/conf").write_bytes(b"new")
    with run(SourceSpec(str(lower)), SourceSpec(str(upper))) as c:
        assert content(entry(c, b"etc/conf").data) == b"new"
        assert content(entry(c, b"etc/keep").data) == b"k"


def test_no_temporary_file_left_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    good = write_tar(tmp_path / "good.tar.gz", [(info("f"), b"x")], compression="gz")
    with pytest.raises(SourceError):
        run(SourceSpec(str(good)), SourceSpec(str(tmp_path / "missing")))
    assert list((tmp_path / "tmp").iterdir()) == []


# ----------------------------------------------------------------------------- bad archives


def assert_archive_error(archive: Path, *words: str, source: SourceSpec | None = None) -> SourceError:
    with pytest.raises(SourceError) as info_:
        run(source or SourceSpec(str(archive)))
    error = info_.value
    assert error.path == str(archive), error
    for word in words:
        assert word in error.reason, error
    return error


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
def test_tar_dotdot_refused(tmp_path: Path, compression: str) -> None:
    archive = write_tar(
        tmp_path / "evil.tar",
        [(info("ok"), b"x"), (info("a/../../etc/passwd"), b"x")],
        compression=compression,
    )
    assert_archive_error(archive, "a/../../etc/passwd", "..")


def test_tar_absolute_refused(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "abs.tar", [(info("/etc/passwd"), b"x")], tarfile.GNU_FORMAT)
    assert_archive_error(archive, "/etc/passwd", "absolute")


def test_tar_hardlink_escaping_refused(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "l.tar", [(info("h", tarfile.LNKTYPE, linkname="../outside"), None)])
    assert_archive_error(archive, "'h'", "..")


def test_tar_path_through_symlink_refused(tmp_path: Path) -> None:
    members = [(info("etc", tarfile.SYMTYPE, linkname="/etc"), None), (info("etc/passwd"), b"pwned")]
    archive = write_tar(tmp_path / "sym.tar", members)
    assert_archive_error(archive, "etc/passwd", "symlink", "'etc'")


def test_tar_path_through_symlink_of_earlier_source(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    os.symlink("/tmp", base / "var")
    archive = write_tar(tmp_path / "layer.tar", [(info("var/log/x"), b"x")])
    with pytest.raises(SourceError) as info_:
        run(SourceSpec(str(base)), SourceSpec(str(archive)))
    assert info_.value.path == str(archive) and "symlink" in info_.value.reason


def test_tar_hardlink_to_missing_target(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "h.tar", [(info("link", tarfile.LNKTYPE, linkname="missing"), None)])
    assert_archive_error(archive, "link", "missing", "hard link")


def test_tar_corrupt_header(tmp_path: Path) -> None:
    archive = write_tar(
        tmp_path / "c.tar", [(info("a"), b"x" * 100), (info("b"), b"y" * 100)], tarfile.GNU_FORMAT
    )
    raw = bytearray(archive.read_bytes())
    raw[1024 : 1024 + 512] = b"\xa5" * 512  # the second header becomes garbage
    archive.write_bytes(bytes(raw))
    assert_archive_error(archive, "corrupt or truncated")


def test_tar_garbage_file(tmp_path: Path) -> None:
    archive = tmp_path / "garbage.tar"
    archive.write_bytes(os.urandom(3000))
    assert_archive_error(archive, "corrupt or truncated")


@pytest.mark.parametrize("cut", [700, 1100, 2000])  # in data, in the 2nd header, in the 2nd data
def test_tar_truncated_plain(tmp_path: Path, cut: int) -> None:
    archive = write_tar(
        tmp_path / "t.tar", [(info("a"), b"x" * 400), (info("b"), b"y" * 1000)], tarfile.GNU_FORMAT
    )
    archive.write_bytes(archive.read_bytes()[:cut])
    assert_archive_error(archive, "truncated")


@pytest.mark.parametrize("compression", ["gz", "xz", "zst"])
def test_tar_truncated_compressed(tmp_path: Path, compression: str) -> None:
    members = [(info(f"f{i}"), os.urandom(20000)) for i in range(4)]
    archive = write_tar(tmp_path / "t.tar", members, compression=compression)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    error = assert_archive_error(archive, "corrupt or truncated", source=SourceSpec(str(archive), kind="tar"))
    assert error.__cause__ is not None


def test_tar_corrupt_compressed_stream(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "c.tar.gz", [(info("f"), os.urandom(50000))], compression="gz")
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    assert_archive_error(archive, "corrupt or truncated")


# ----------------------------------------------------------------------------- output is input


def test_output_inside_directory_source(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    options = opts(SourceSpec(str(tmp_path / "src")), output=str(tmp_path / "src/sub/image.sqfs"))
    with pytest.raises(OutputError) as info_:
        check_output_not_input(options)
    assert info_.value.reason == "output is also an input"
    assert info_.value.path == str(tmp_path / "src/sub/image.sqfs")
    with pytest.raises(OutputError):
        check_output_not_input(opts(SourceSpec(str(tmp_path / "src")), output=str(tmp_path / "src")))


def test_output_is_tar_or_file_source(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [(info("f"), b"x")])
    os.symlink(archive, tmp_path / "alias.tar")
    with pytest.raises(OutputError, match="output is also an input"):
        check_output_not_input(opts(SourceSpec(str(tmp_path / "alias.tar")), output=str(archive)))
    with pytest.raises(OutputError):
        check_output_not_input(opts(SourceSpec(str(archive)), output=str(archive)))


def test_output_elsewhere_is_fine(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "srcfoo").mkdir()
    check_output_not_input(opts(SourceSpec(str(tmp_path / "src")), output=str(tmp_path / "srcfoo/img")))
    check_output_not_input(opts(SourceSpec(str(tmp_path / "src")), output=str(tmp_path / "image.sqfs")))


def test_undecodable_names_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    raw_name = b"caf\xe9-\xff"  # latin-1, not UTF-8
    with open(os.path.join(os.fsencode(root), raw_name), "wb") as f:
        f.write(b"x")
    os.symlink(b"target-\xfe", os.path.join(os.fsencode(root), b"link"))
    members = [(info(os.fsdecode(b"t/" + raw_name)), b"y")]
    archive = write_tar(tmp_path / "n.tar", members, tarfile.GNU_FORMAT)
    with run(SourceSpec(str(root)), SourceSpec(str(archive))) as c:
        assert content(entry(c, raw_name).data) == b"x"
        assert entry(c, b"link").target == b"target-\xfe"
        assert content(entry(c, b"t/" + raw_name).data) == b"y"


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_the_spool_has_no_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, o_tmpfile: bool) -> None:
    """The spool is reached as /proc/self/fd/N and listed in no directory, with
    O_TMPFILE or without (a named file unlinked at once): a build killed by kill -9
    leaves no spool file behind (it left pyimg-spool-* in $TMPDIR, or beside the
    output when TMPDIR lies in a source)."""
    from pyimg.sources import Spool

    if not o_tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE")
    spool = Spool(str(tmp_path))
    try:
        ref = spool.store(io.BytesIO(b"member data"), 11, "a.tar.gz:m")
        assert os.listdir(tmp_path) == []
        assert ref.path == spool.path and ref.path.startswith("/proc/self/fd/")
        assert content(ref) == b"member data"
    finally:
        spool.close()
    assert spool.path is None and os.listdir(tmp_path) == []


@pytest.mark.parametrize("call", ["open", "flock", "stat"])
def test_an_interrupt_while_the_spool_has_a_name_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Without O_TMPFILE: a KeyboardInterrupt raised the moment the named spool's
    create, lock or /proc check returns (before its unlink) removes the name."""
    import fcntl

    from pyimg.sources import Spool

    monkeypatch.delattr(os, "O_TMPFILE")
    real = {"open": os.open, "flock": fcntl.flock, "stat": os.stat}
    fired: list[str] = []

    def then_interrupt(*args: Any, **kwargs: Any) -> Any:
        result = real[call](*args, **kwargs)
        if not fired and os.listdir(tmp_path):
            fired.append(call)
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(fcntl if call == "flock" else os, call, then_interrupt)
    spool = Spool(str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):
            spool.store(io.BytesIO(b"m"), 1, "a.tar:m")
    finally:
        monkeypatch.undo()
        spool.close()
    assert fired == [call] and os.listdir(tmp_path) == []


def test_a_named_spool_left_by_a_kill_is_removed_by_the_next_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without O_TMPFILE a spool file has a name for the moment between its creation
    and its unlink; a kill -9 there leaves it.  The next build that spools in that
    directory removes it (nobody holds its lock), and keeps one a running build holds."""
    import fcntl

    from pyimg.sources import Spool

    monkeypatch.delattr(os, "O_TMPFILE")
    stale = tmp_path / "pyimg-spool-host-999999-00ff.tmp"
    held = tmp_path / "pyimg-spool-elsewhere-1-00ff.tmp"
    unrelated = tmp_path / "pyimg-spool-notours"
    for p in (stale, held, unrelated):
        p.write_bytes(b"x")
    fd = os.open(held, os.O_RDONLY)
    spool = Spool(str(tmp_path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running build holds its spool file
        spool.store(io.BytesIO(b"m"), 1, "a.tar:m")
        assert sorted(os.listdir(tmp_path)) == sorted([held.name, unrelated.name])
    finally:
        spool.close()
        os.close(fd)


def test_a_temp_file_taken_by_a_concurrent_clean_up_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another build's clean-up can see our new named file before we lock it (it
    looks stale) and remove it: we notice and take a new name, never writing into a
    file that no directory lists under the name we will rename."""
    from pyimg import output

    real_flock = output.fcntl.flock
    raced: list[str] = []

    def flock_after_a_clean_up(fd: int, op: int) -> None:
        if not raced:
            name = os.readlink(f"/proc/self/fd/{fd}")
            raced.append(name)
            os.unlink(name)  # what a concurrent remove_stale_temps does in that moment
        real_flock(fd, op)

    monkeypatch.setattr(output.fcntl, "flock", flock_after_a_clean_up)
    monkeypatch.delattr(output.os, "O_TMPFILE")
    with output.AtomicOutput(str(tmp_path / "img")) as out:
        assert raced and out.tmp != raced[0] and os.path.samestat(os.stat(out.tmp), os.fstat(out.fd))
    assert os.listdir(tmp_path) == []


def test_the_spool_goes_to_tmpdir_without_tempfiles_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$TMPDIR (a missing one skipped, as tempfile does), found without
    tempfile.gettempdir(), whose probe file a kill -9 could leave behind."""
    import tempfile

    from pyimg.sources import Spool

    def no_probe() -> str:
        raise AssertionError("tempfile.gettempdir() probes the directory with a file of its own")

    monkeypatch.setattr(tempfile, "gettempdir", no_probe)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setenv("TEMP", str(tmp_path))
    spool = Spool()
    try:
        ref = spool.store(io.BytesIO(b"x" * 100), 100, "a.tar.gz:m")
        assert os.readlink(ref.path).startswith(f"{tmp_path}/")  # "DIR/#INODE (deleted)"
        assert os.listdir(tmp_path) == []
    finally:
        spool.close()
