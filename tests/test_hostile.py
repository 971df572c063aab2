"""A hostile corpus, end to end through the CLI: every case either builds a correct
image (checked by the real oracles: unsquashfs, e2fsck, debugfs) or is refused
with the expected exit code and a message naming the path and the reason — never
a traceback, never an output or temp file left behind, never a changed input.

Each case makes its inputs under `in/` and returns the CLI arguments (sources and
options; `-o` and `--format` are added).  `{in}` in the expected words stands for
that directory.  The builds run with TMPDIR set to an empty directory, which must
be empty again afterwards (spool files are removed)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .oracles import require_tool, run_cli

FORMATS = ("squashfs", "ext4")
OK, SPEC, SOURCE, LIMIT, OUTPUT = 0, 2, 3, 4, 6

Make = Callable[[Path], list[str]]
Check = Callable[[Path, Path], None]  # (image, work dir)


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    code: int | dict[str, int]  # one exit code, or one per format
    says: tuple[str, ...] = ()  # words a refusal's message must hold ({in}: the input directory)
    formats: tuple[str, ...] = FORMATS
    check: Check | None = None  # for a built image, beyond the format's oracle


CASES: list[Case] = []


def case(id: str, code: int | dict[str, int], *says: str, formats: tuple[str, ...] = FORMATS,
         check: Check | None = None) -> Callable[[Make], Make]:  # fmt: skip
    def register(make: Make) -> Make:
        CASES.append(Case(id, make, code, says, formats, check))
        return make

    return register


# ---------------------------------------------------------------------------------- tar helpers


def member(name: str, data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
        return info, data
    return info, None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w",
              fmt: int = tarfile.PAX_FORMAT) -> Path:  # fmt: skip
    with tarfile.open(path, mode, format=fmt) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def header(name: str, *, size: bytes | None = None, typeflag: bytes = b"0", **octal: int) -> bytes:
    """A raw ustar header block with a correct checksum; `size` may be raw bytes
    (base-256 numbers, garbage)."""
    block = bytearray(512)
    block[0:100] = name.encode().ljust(100, b"\0")
    fields = {"mode": (100, 8, 0o644), "uid": (108, 8, 0), "gid": (116, 8, 0), "mtime": (136, 12, 0)}
    for key, (at, width, default) in fields.items():
        block[at : at + width] = b"%0*o\0" % (width - 1, octal.get(key, default))
    block[124:136] = size if size is not None else b"%011o\0" % octal.get("size", 0)
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# ---------------------------------------------------------------------------------- the cases
# Item 1: a plain tar cut exactly at a member boundary (no end-of-archive blocks).


def _three_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [member(f"f{i}", bytes([65 + i]) * (700 * (i + 1))) for i in range(3)]


def _cut_after(data: bytes, members: int) -> bytes:
    """The archive up to the end of member `members` (its data padded to 512)."""
    pos = 0
    for _ in range(members):
        size = int(data[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return data[:pos]


@case("tar-cut-at-member-boundary", SOURCE, "{in}/cut.tar", "truncated", "'f1'", "end-of-archive")
def _(d: Path) -> list[str]:
    data = tar_bytes(_three_members(), tarfile.USTAR_FORMAT)
    (d / "cut.tar").write_bytes(_cut_after(data, 2))
    return [str(d / "cut.tar")]


@case("tar-gz-cut-at-member-boundary", SOURCE, "{in}/cut.tar.gz", "truncated", "'f0'")
def _(d: Path) -> list[str]:
    import gzip

    data = tar_bytes(_three_members(), tarfile.USTAR_FORMAT)
    (d / "cut.tar.gz").write_bytes(gzip.compress(_cut_after(data, 1), mtime=0))
    return [str(d / "cut.tar.gz")]


@case("tar-lone-zero-block-end", OK)  # GNU tar accepts one zero block as the end (warns)
def _(d: Path) -> list[str]:
    data = tar_bytes(_three_members(), tarfile.USTAR_FORMAT)
    (d / "a.tar").write_bytes(data[: len(_cut_after(data, 3))] + bytes(512))
    return [str(d / "a.tar")]


# Item 2: NUL bytes in names (pax path and linkpath records, a spec's dest).


@case("pax-path-with-nul", SOURCE, "{in}/a.tar", "NUL")
def _(d: Path) -> list[str]:
    info, data = member("placeholder", b"x")
    info.pax_headers = {"path": "dir/a\0b"}
    return [str(write_tar(d / "a.tar", [(info, data)]))]


@case("pax-linkpath-with-nul", SOURCE, "{in}/a.tar", "NUL", "'l'")
def _(d: Path) -> list[str]:
    info, _ = member("l", type=tarfile.SYMTYPE, linkname="x")
    info.pax_headers = {"linkpath": "target\0/etc/shadow"}
    return [str(write_tar(d / "a.tar", [member("f", b"x"), (info, None)]))]


@case("pax-hardlink-target-with-nul", SOURCE, "{in}/a.tar", "NUL")
def _(d: Path) -> list[str]:
    info, _ = member("h", type=tarfile.LNKTYPE, linkname="x")
    info.pax_headers = {"linkpath": "f\0junk"}
    return [str(write_tar(d / "a.tar", [member("f", b"x"), (info, None)]))]


@case("spec-dest-with-nul", SPEC, "{in}/spec.toml", "source[0].dest", "NUL")
def _(d: Path) -> list[str]:
    (d / "src").mkdir()
    (d / "src/f").write_bytes(b"x")
    (d / "spec.toml").write_text('[[source]]\npath = "src"\ndest = "/opt/a\\u0000b"\n')
    return ["--spec", str(d / "spec.toml")]


# Item 3: device numbers beyond Linux's dev_t (12-bit major, 20-bit minor).


def _device_tar(d: Path, major: int, minor: int) -> list[str]:
    dev = member("dev/x", type=tarfile.CHRTYPE, devmajor=major, devminor=minor)
    return [str(write_tar(d / "dev.tar", [dev]))]


for _major, _minor in ((4096, 0), (0, 1 << 20), (1 << 20, 5)):
    case(f"device-{_major}-{_minor}", LIMIT, "/dev/x", "device number")(
        lambda d, a=_major, b=_minor: _device_tar(d, a, b)
    )


def _debugfs_stat(image: Path, path: str) -> str:
    proc = subprocess.run([require_tool("debugfs"), "-R", f"stat {path}", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _rdump(image: Path, work: Path) -> Path:
    """The ext4 image's tree, extracted by debugfs."""
    dest = work / "rdump"
    dest.mkdir()
    proc = subprocess.run([require_tool("debugfs"), "-R", f"rdump / {dest}", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dest


def _unsquashfs_list(image: Path) -> str:
    proc = subprocess.run([require_tool("unsquashfs"), "-lln", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _largest_device(image: Path, work: Path) -> None:
    if image.read_bytes()[1080:1082] == b"\x53\xef":  # ext4's magic
        assert "Device major/minor number: 4095:1048575" in _debugfs_stat(image, "/dev/x")
    else:  # unsquashfs -lln prints the raw number as major,minor of the old encoding: extract
        st = os.lstat(work / "x/dev/x")  # (extracted by the oracle; as root, a real node)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, 1048575)


case("device-largest", OK, check=_largest_device)(lambda d: _device_tar(d, 4095, (1 << 20) - 1))


# Item 4: what the kernel cannot read back: long symlink targets (squashfs), xattr
# names without a suffix or over 255 bytes, values over 64 KiB (both formats).


def _symlink_tar(d: Path, length: int) -> list[str]:
    link = member("l", type=tarfile.SYMTYPE, linkname="t" * length)
    return [str(write_tar(d / "l.tar", [link]))]


case("symlink-4096", LIMIT, "/l:", "symlink target of 4096 bytes")(lambda d: _symlink_tar(d, 4096))
case("symlink-65535", LIMIT, "/l:", "symlink target")(lambda d: _symlink_tar(d, 65535))


def _symlink_4095(image: Path, work: Path) -> None:
    if (work / "x").exists():  # squashfs, extracted by the oracle
        assert os.readlink(work / "x/l") == "t" * 4095
    else:
        assert os.readlink(_rdump(image, work) / "l") == "t" * 4095


case("symlink-4095", OK, check=_symlink_4095)(lambda d: _symlink_tar(d, 4095))


def _xattr_tar(d: Path, name: str, value: str = "v") -> list[str]:
    info, data = member("f", b"x")
    info.pax_headers = {f"SCHILY.xattr.{name}": value}
    return [str(write_tar(d / "x.tar", [(info, data)]))]


for _name, _why in (("user.", "empty name"), ("trusted.", "empty name"), ("security.", "empty name"),
                    ("user." + "n" * 251, "xattr name of 256 bytes"), ("system.", "empty name")):  # fmt: skip
    case(f"xattr-{_name[:12]}-{len(_name)}", LIMIT, "/f:", _why)(lambda d, n=_name: _xattr_tar(d, n))
case("xattr-value-64k+1", LIMIT, "/f:", "65537 bytes")(lambda d: _xattr_tar(d, "user.big", "v" * 65537))


def _xattr_255(image: Path, work: Path) -> None:
    name = "user." + "n" * 250
    if (work / "x").exists():
        assert os.getxattr(work / "x/f", name) == b"v"
    else:
        proc = subprocess.run([require_tool("debugfs"), "-R", "ea_list /f", str(image)],
                              capture_output=True, text=True)  # fmt: skip
        assert f"{name} (1) = " in proc.stdout


case("xattr-name-255", OK, check=_xattr_255)(lambda d: _xattr_tar(d, "user." + "n" * 250))


# Item 10: nothing pyimg writes may be an input.


def _src_dir(d: Path) -> Path:
    (d / "src/sub").mkdir(parents=True)
    (d / "src/f").write_bytes(b"f" * 5000)
    return d / "src"


@case("manifest-inside-source", OUTPUT, "{in}/src/sub/m.json", "manifest is also an input")
def _(d: Path) -> list[str]:
    return [str(_src_dir(d)), "--manifest", str(d / "src/sub/m.json")]


@case("manifest-is-a-tar-source", OUTPUT, "{in}/a.tar", "manifest is also an input")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("f", b"x")])), "--manifest", str(d / "a.tar")]


@case("manifest-is-a-file-source", OUTPUT, "{in}/file", "manifest is also an input")
def _(d: Path) -> list[str]:
    (d / "file").write_bytes(b"data")
    return [f"{d / 'file'}:/etc/file", "--manifest", str(d / "file")]


@case("manifest-is-the-spec", OUTPUT, "{in}/s.toml", "manifest is also an input")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_text("[policy]\n")
    return ["--spec", str(d / "s.toml"), str(_src_dir(d)), "--manifest", str(d / "s.toml")]


@case("output-is-the-spec", OUTPUT, "{in}/s.toml", "output is also an input")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_text("[policy]\n")
    return ["--spec", str(d / "s.toml"), str(_src_dir(d)), "-o", str(d / "s.toml")]


@case("output-inside-source", OUTPUT, "{in}/src/img", "output is also an input")
def _(d: Path) -> list[str]:
    return [str(_src_dir(d)), "-o", str(d / "src/img")]  # the later -o wins


# Item 7: consistent refusals.


@case("tar-member-below-a-file", SOURCE, "{in}/a.tar", "'f/child'", "not a directory")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("f", b"file"), member("f/child", b"x")]))]


@case("tar-dir-member-below-a-file", SOURCE, "{in}/a.tar", "'f/sub'", "not a directory")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("f", b"file"), member("f/sub", type=tarfile.DIRTYPE)]))]


@case("tar-below-a-file-of-an-earlier-source", SOURCE, "{in}/a.tar", "'etc/hosts/x'", "not a directory")
def _(d: Path) -> list[str]:
    (d / "src/etc").mkdir(parents=True)
    (d / "src/etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    return [str(d / "src"), str(write_tar(d / "a.tar", [member("etc/hosts/x", b"x")]))]


def _compressed_tar(d: Path, name: str, tail: bytes) -> list[str]:
    import bz2
    import lzma

    raw = tar_bytes(_three_members())
    comp = {"a.tar.xz": lzma.compress, "a.tar.bz2": bz2.compress}[name]
    (d / name).write_bytes(comp(raw) + tail)
    return [str(d / name)]


for _name in ("a.tar.xz", "a.tar.bz2"):
    case(f"{_name}-trailing-garbage", SOURCE, "{in}/" + _name, "trailing garbage")(
        lambda d, n=_name: _compressed_tar(d, n, b"garbage after the stream")
    )
case("a.tar.xz-stream-padding", OK)(lambda d: _compressed_tar(d, "a.tar.xz", bytes(8)))
case("a.tar.xz-bad-padding", SOURCE, "{in}/a.tar.xz", "padding")(
    lambda d: _compressed_tar(d, "a.tar.xz", bytes(5))
)


@case("a.tar.xz-two-streams", OK, check=lambda image, work: None)
def _(d: Path) -> list[str]:
    import lzma

    raw = tar_bytes(_three_members())
    (d / "a.tar.xz").write_bytes(lzma.compress(raw[:1024]) + lzma.compress(raw[1024:]))  # as xz -T writes
    return [str(d / "a.tar.xz")]


for _owner in ("4294967295", "4294967295:0", "0:4294967295", "4294967296:0"):
    case(f"owner-{_owner}", SPEC, "owner", "4294967295" if "5" in _owner else "4294967296")(
        lambda d, o=_owner: [str(_src_dir(d)), "--owner", o]
    )


def _link_source(d: Path) -> Path:
    (d / "base").mkdir()
    os.symlink("/etc", d / "base/etc")
    (d / "file").write_bytes(b"x")
    return d / "base"


@case("file-source-through-a-symlink-of-an-earlier-source", SOURCE, "{in}/file", "symlink /etc")
def _(d: Path) -> list[str]:
    return [str(_link_source(d)), f"{d / 'file'}:/etc/passwd"]


@case("dir-source-through-a-symlink-of-an-earlier-source", SOURCE, "{in}/src", "symlink /etc")
def _(d: Path) -> list[str]:
    base = _link_source(d)
    return [str(base), f"{_src_dir(d)}:/etc/sub/dir"]


@case("tar-source-through-a-symlink-of-an-earlier-source", SOURCE, "{in}/a.tar", "symlink /etc")
def _(d: Path) -> list[str]:
    base = _link_source(d)
    return [str(base), f"{write_tar(d / 'a.tar', [member('x', b'x')])}:/etc/sub"]


@case("tar-source-at-a-symlink-of-an-earlier-source", SOURCE, "{in}/a.tar", "'x'", "symlink 'etc'")
def _(d: Path) -> list[str]:
    base = _link_source(d)
    return [str(base), f"{write_tar(d / 'a.tar', [member('x', b'x')])}:/etc"]  # its members: /etc/x


@case("source-replacing-a-symlink-of-an-earlier-source", OK)  # at the symlink itself: it is replaced
def _(d: Path) -> list[str]:
    base = _link_source(d)
    return [str(base), f"{_src_dir(d)}:/etc"]


# Item 8: no tracebacks.


def _pax_tar(d: Path, pax: dict[str, str], **fields: object) -> list[str]:
    info, data = member("f", b"x", **fields)
    info.pax_headers = pax
    return [str(write_tar(d / "p.tar", [(info, data)]))]


for _value in ("inf", "-inf", "nan", "1e20", "1e999999999", "12abc"):
    _says = ("{in}/p.tar", "'f'") if _value != "12abc" else ()
    case(f"pax-mtime-{_value}", SOURCE if _value != "12abc" else OK, *_says)(
        lambda d, v=_value: _pax_tar(d, {"mtime": v})
    )
for _key, _value in (("size", "-5"), ("uid", "-1"), ("gid", "-7")):
    case(f"pax-{_key}{_value}", SOURCE, "{in}/p.tar", "negative")(
        lambda d, k=_key, v=_value: _pax_tar(d, {k: v})
    )


@case("tar-negative-base256-size", SOURCE, "{in}/n.tar", "'g'", "negative size")
def _(d: Path) -> list[str]:
    size = b"\xff" * 12  # base-256: -1
    (d / "n.tar").write_bytes(header("g", size=size) + bytes(1024))
    return [str(d / "n.tar")]


@case("tar-uid-2^33", LIMIT, "/f:", "beyond", "32 bits")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "u.tar", [member("f", b"x", uid=1 << 33)]))]


@case("tar-gid-2^32", LIMIT, "/f:", "32 bits")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "u.tar", [member("f", b"x", gid=1 << 32)]))]


_Y2300 = 10_413_792_000  # 2300-01-01


def _mtime_2300(image: Path, work: Path) -> None:
    out = _debugfs_stat(image, "/f")
    assert "2300" in out, out


@case("dir-mtime-2300", {"squashfs": LIMIT, "ext4": OK}, check=_mtime_2300)
def _(d: Path) -> list[str]:
    (d / "src").mkdir()
    for name in ("f", "g"):
        (d / "src" / name).write_bytes(b"x" * 100)
    os.utime(d / "src/f", ns=(0, _Y2300 * 10**9 + 5))
    return [str(d / "src")]


@case("file-mtime-2300", {"squashfs": LIMIT, "ext4": OK}, check=_mtime_2300)
def _(d: Path) -> list[str]:
    (d / "f").write_bytes(b"x" * 100)
    os.utime(d / "f", ns=(0, _Y2300 * 10**9))
    return [f"{d / 'f'}:/f", "--jobs", "1"]


@case("tar-mtime-2300", {"squashfs": LIMIT, "ext4": OK}, check=_mtime_2300)
def _(d: Path) -> list[str]:
    return _pax_tar(d, {"mtime": f"{_Y2300}.5"})


@case("spec-not-utf8", SPEC, "{in}/s.toml", "not UTF-8")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_bytes(b'output = "caf\xe9.img"\n')
    return ["--spec", str(d / "s.toml"), str(_src_dir(d))]


@case("spec-not-toml", SPEC, "{in}/s.toml", "invalid TOML")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_bytes(b"[[source]\npath = \n")
    return ["--spec", str(d / "s.toml"), str(_src_dir(d))]


# Item 9: a SOURCE that exists is a path, ":/" or not.


def _colon_dir(d: Path) -> Path:
    (d / "back:").mkdir()
    (d / "back:/2024").mkdir()
    (d / "back:/2024/f").write_bytes(b"in a dir with ':/' in its path")
    return d / "back:/2024"


def _has(path: str) -> Check:
    def check(image: Path, work: Path) -> None:
        root = work / "x" if (work / "x").exists() else _rdump(image, work)
        assert (root / path).read_bytes() == b"in a dir with ':/' in its path"

    return check


case("source-with-colon-slash", OK, check=_has("f"))(lambda d: [str(_colon_dir(d))])
case("source-with-colon-slash-and-dest", OK, check=_has("srv/f"))(lambda d: [f"{_colon_dir(d)}:/srv"])


# The image's own time out of the format's range (lost+found would get 1932 for 2477).
for _epoch, _formats in (("4294967296", ("squashfs",)), ("16000000000", FORMATS),
                         ("99999999999999999999999", FORMATS)):  # fmt: skip
    case(f"epoch-{_epoch}", LIMIT, "epoch", formats=_formats)(
        lambda d, e=_epoch: [str(_src_dir(d)), "--epoch", e]
    )


# More of the corpus: archives.


@case("tar-absolute-name", SOURCE, "{in}/a.tar", "absolute")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("/etc/passwd", b"x")]))]


@case("tar-dotdot-name", SOURCE, "{in}/a.tar", "'..'")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("a/../../b", b"x")]))]


@case("tar-through-own-symlink", SOURCE, "{in}/a.tar", "symlink 'etc'")
def _(d: Path) -> list[str]:
    members = [member("etc", type=tarfile.SYMTYPE, linkname="/etc"), member("etc/shadow", b"x")]
    return [str(write_tar(d / "a.tar", members))]


@case("tar-hardlink-missing", SOURCE, "{in}/a.tar", "'nowhere'", "missing")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("h", type=tarfile.LNKTYPE, linkname="nowhere")]))]


@case("tar-hardlink-to-directory", SOURCE, "{in}/a.tar", "is a directory")
def _(d: Path) -> list[str]:
    members = [member("d", type=tarfile.DIRTYPE), member("h", type=tarfile.LNKTYPE, linkname="d")]
    return [str(write_tar(d / "a.tar", members))]


@case("tar-symlink-empty-target", SOURCE, "{in}/a.tar", "empty target")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("l", type=tarfile.SYMTYPE, linkname="")]))]


@case("tar-unsupported-type", SOURCE, "{in}/a.tar", "unsupported member type")
def _(d: Path) -> list[str]:
    (d / "a.tar").write_bytes(header("v", typeflag=b"V") + bytes(1024))  # a GNU volume header
    return [str(d / "a.tar")]


@case("tar-root-not-a-directory", SOURCE, "{in}/a.tar", "root")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member(".", b"a file as the root")]))]


@case("tar-garbage-after-first-member", SOURCE, "{in}/a.tar", "corrupt or truncated")
def _(d: Path) -> list[str]:
    data = tar_bytes(_three_members(), tarfile.USTAR_FORMAT)
    first = len(_cut_after(data, 1))
    (d / "a.tar").write_bytes(data[:first] + b"\x01garbage" * 100 + bytes(1024))
    return [str(d / "a.tar")]


@case("tar-data-cut-short", SOURCE, "{in}/a.tar", "truncated")
def _(d: Path) -> list[str]:
    data = tar_bytes(_three_members(), tarfile.USTAR_FORMAT)
    (d / "a.tar").write_bytes(data[: len(_cut_after(data, 2)) + 512 + 100])
    return [str(d / "a.tar")]


@case("tar-empty-file", SOURCE, "{in}/a.tar")
def _(d: Path) -> list[str]:
    (d / "a.tar").write_bytes(b"")
    return [str(d / "a.tar")]


@case("tar-only-end-blocks", OK)  # an empty archive: an empty image
def _(d: Path) -> list[str]:
    (d / "a.tar").write_bytes(bytes(10240))
    return [str(d / "a.tar")]


@case("tar-not-an-archive", SOURCE, "{in}/a.tar", "corrupt or truncated")
def _(d: Path) -> list[str]:
    (d / "a.tar").write_bytes(b"this is not a tar archive\n" * 100)
    return [str(d / "a.tar")]


def _gz(d: Path, how: str) -> list[str]:
    import gzip

    packed = gzip.compress(tar_bytes(_three_members()), mtime=0)
    packed = {"cut": packed[: len(packed) // 2], "tail": packed + b"junk", "crc": packed[:-8] + bytes(8)}[how]
    (d / "a.tar.gz").write_bytes(packed)
    return [str(d / "a.tar.gz")]


for _how in ("cut", "tail", "crc"):
    case(f"tar-gz-{_how}", SOURCE, "{in}/a.tar.gz", "corrupt or truncated")(lambda d, h=_how: _gz(d, h))


def _zst(d: Path, how: str) -> list[str]:
    import zstandard

    packed = zstandard.ZstdCompressor(write_checksum=True).compress(tar_bytes(_three_members()))
    packed = {"cut": packed[: len(packed) // 2], "tail": packed + b"junk"}[how]
    (d / "a.tar.zst").write_bytes(packed)
    return [str(d / "a.tar.zst")]


for _how in ("cut", "tail"):
    case(f"tar-zst-{_how}", SOURCE, "{in}/a.tar.zst", "corrupt or truncated")(lambda d, h=_how: _zst(d, h))


@case("tar-bz2-cut", SOURCE, "{in}/a.tar.bz2", "truncated")
def _(d: Path) -> list[str]:
    import bz2

    packed = bz2.compress(tar_bytes(_three_members()))
    (d / "a.tar.bz2").write_bytes(packed[: len(packed) // 2])
    return [str(d / "a.tar.bz2")]


@case("tar-xz-cut", SOURCE, "{in}/a.tar.xz", "truncated")
def _(d: Path) -> list[str]:
    import lzma

    packed = lzma.compress(tar_bytes(_three_members()))
    (d / "a.tar.xz").write_bytes(packed[: len(packed) - 20])
    return [str(d / "a.tar.xz")]


@case("tar-pax-xattr-bad-base64", SOURCE, "{in}/p.tar", "base64")
def _(d: Path) -> list[str]:
    return _pax_tar(d, {"LIBARCHIVE.xattr.user.x": "!!!not base64!!!"})


# More of the corpus: names, trees, options, outputs.


@case("name-256-bytes", LIMIT, "n" * 256, "255")
def _(d: Path) -> list[str]:
    return [str(write_tar(d / "a.tar", [member("d/" + "n" * 256, b"x")]))]


def _long_name(image: Path, work: Path) -> None:
    root = work / "x" if (work / "x").exists() else _rdump(image, work)
    assert (root / "d" / ("n" * 255)).read_bytes() == b"x"


case("name-255-bytes", OK, check=_long_name)(
    lambda d: [str(write_tar(d / "a.tar", [member("d/" + "n" * 255, b"x")]))]
)


@case("lost+found-is-a-file", {"squashfs": OK, "ext4": LIMIT}, "/lost+found")
def _(d: Path) -> list[str]:
    (d / "src").mkdir()
    (d / "src/lost+found").write_bytes(b"not a directory")
    return [str(d / "src")]


@case("special-files", OK)
def _(d: Path) -> list[str]:
    (d / "src").mkdir()
    os.mkfifo(d / "src/fifo")
    from .oracles import make_socket

    make_socket(d / "src/socket")
    os.symlink("dangling/target", d / "src/dangling")
    os.symlink("loop", d / "src/loop")
    return [str(d / "src")]


@case("missing-source", SOURCE, "{in}/nope", "no such file")
def _(d: Path) -> list[str]:
    return [str(d / "nope")]


@case("fifo-source", SOURCE, "{in}/fifo", "not a regular file or directory")
def _(d: Path) -> list[str]:
    os.mkfifo(d / "fifo")
    return [str(d / "fifo")]


@case("single-file-without-dest", SPEC, "{in}/plain", "dest")
def _(d: Path) -> list[str]:
    (d / "plain").write_bytes(b"just a file")
    return [str(d / "plain")]


@case("source-dest-escaping", SOURCE, "escapes the image root")
def _(d: Path) -> list[str]:
    return [f"{_src_dir(d)}:/a/../../b"]


@case("output-directory-missing", OUTPUT, "does not exist")
def _(d: Path) -> list[str]:
    return [str(_src_dir(d)), "-o", str(d / "no/such/dir/img")]


@case("output-is-a-directory", OUTPUT, "{in}/outdir", "is a directory")
def _(d: Path) -> list[str]:
    (d / "outdir").mkdir()
    return [str(_src_dir(d)), "-o", str(d / "outdir")]


@case("spec-unknown-key", SPEC, "{in}/s.toml", "unknown key 'outptu'")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_text('outptu = "x.img"\n')
    return ["--spec", str(d / "s.toml"), str(_src_dir(d))]


@case("spec-missing", SPEC, "{in}/none.toml", "no such spec file")
def _(d: Path) -> list[str]:
    return ["--spec", str(d / "none.toml"), str(_src_dir(d))]


@case("spec-drop-acls-not-bool", SPEC, "policy.drop_acls")
def _(d: Path) -> list[str]:
    (d / "s.toml").write_text('[policy]\ndrop_acls = "yes"\n')
    return ["--spec", str(d / "s.toml"), str(_src_dir(d))]


@case("ext4-size-too-small", LIMIT, "needs at least", formats=("ext4",))
def _(d: Path) -> list[str]:
    (d / "src").mkdir()
    (d / "src/big").write_bytes(os.urandom(2 << 20))
    return [str(d / "src"), "--size", "1M"]


@case("ext4-unknown-feature", SPEC, "unknown ext4 feature", formats=("ext4",))
def _(d: Path) -> list[str]:
    return [str(_src_dir(d)), "--features", "+warp_drive"]


@case("squashfs-bad-block-size", SPEC, "block size", formats=("squashfs",))
def _(d: Path) -> list[str]:
    return [str(_src_dir(d)), "--block-size", "3K"]


def _user_xattr(image: Path, work: Path) -> None:
    if (work / "x").exists():
        assert os.getxattr(work / "x/f", "user.note") == b"kept"
    else:
        proc = subprocess.run([require_tool("debugfs"), "-R", "ea_list /f", str(image)],
                              capture_output=True, text=True)  # fmt: skip
        assert 'user.note (4) = "kept"' in proc.stdout, proc.stdout


@case("dir-user-xattr", OK, check=_user_xattr)
def _(d: Path) -> list[str]:
    src = _src_dir(d)
    os.setxattr(src / "f", "user.note", b"kept")
    return [str(src)]


def _acl_dir(d: Path) -> Path:
    src = _src_dir(d)
    proc = subprocess.run([require_tool("setfacl"), "-m", "u:4321:r", str(src / "sub")], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    return src


def _acl_kept(image: Path, work: Path) -> None:
    proc = subprocess.run([require_tool("debugfs"), "-R", "ea_list /sub", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert "system.posix_acl_access" in proc.stdout, proc.stdout


case("dir-acl", {"squashfs": LIMIT, "ext4": OK}, check=_acl_kept)(lambda d: [str(_acl_dir(d))])
case("dir-acl-dropped", OK)(lambda d: [str(_acl_dir(d)), "--drop-acls"])


# ---------------------------------------------------------------------------------- the test


def _state(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, body)
    return out


def _oracle(fmt: str, image: Path, work: Path) -> None:
    if fmt == "squashfs":
        unsquashfs = require_tool("unsquashfs")
        proc = subprocess.run([unsquashfs, "-lln", str(image)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        dest = work / "x"
        proc = subprocess.run([require_tool("unsquashfs"), "-no-progress", "-d", str(dest), str(image)],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        proc = subprocess.run([require_tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True,
                              env={**os.environ, "E2FSCK_CONFIG": "/dev/null"})  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


_PARAMS = [pytest.param(c, fmt, id=f"{c.id}-{fmt}") for c in CASES for fmt in c.formats]


@pytest.mark.parametrize(("hostile", "fmt"), _PARAMS)
def test_hostile(tmp_path: Path, hostile: Case, fmt: str) -> None:
    inputs, out_dir, tmp = tmp_path / "in", tmp_path / "out", tmp_path / "tmpdir"
    for d in (inputs, out_dir, tmp):
        d.mkdir()
    args = hostile.make(inputs)
    before = _state(inputs)
    image = out_dir / "img"
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = run_cli("build", "-o", str(image), "--format", fmt, *args, env=env)  # a case's own -o wins
    code = hostile.code if isinstance(hostile.code, int) else hostile.code[fmt]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert _state(inputs) == before, "an input changed"
    assert os.listdir(tmp) == [], "a temp file was left"
    if code != 0:
        assert proc.stderr.startswith("pyimg: error: "), proc.stderr
        for word in hostile.says:  # the path and the reason
            assert word.replace("{in}", str(inputs)) in proc.stderr, proc.stderr
        assert os.listdir(out_dir) == [], "an output file was left"
        return
    assert os.listdir(out_dir) == ["img"]
    _oracle(fmt, image, tmp_path)
    if hostile.check is not None:
        hostile.check(image, tmp_path)


def test_corpus_size() -> None:
    assert len(CASES) >= 80 and len(_PARAMS) >= 160


def test_manifest_same_as_output_refused_before_any_work(tmp_path: Path) -> None:
    src = _src_dir(tmp_path)
    out = tmp_path / "img"
    out.write_bytes(b"the previous image")
    proc = run_cli("build", str(src), "-o", str(out), "--manifest", str(out))
    assert proc.returncode == OUTPUT and str(out) in proc.stderr and "manifest" in proc.stderr, proc.stderr
    assert out.read_bytes() == b"the previous image"
    assert sorted(os.listdir(tmp_path)) == ["img", "src"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_tmpdir_inside_a_source_keeps_the_spool_out(tmp_path: Path, fmt: str) -> None:
    """A compressed archive is spooled; with TMPDIR inside a directory source that is
    collected after it, the spool file would be walked into the image."""
    src = _src_dir(tmp_path)
    (src / "tmp").mkdir()
    archive = write_tar(tmp_path / "a.tar.gz", [member("from-tar", b"t" * 100_000)], mode="w:gz")
    before = _state(src)
    manifest = tmp_path / "m.json"
    image = tmp_path / "img"
    proc = run_cli("build", str(archive), str(src), "-o", str(image), "--format", fmt, "--manifest",
                   str(manifest), env={**os.environ, "TMPDIR": str(src / "tmp")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    paths = [entry["path"] for entry in json.loads(manifest.read_text())["entries"]]
    assert "/from-tar" in paths and "/tmp" in paths
    assert not [p for p in paths if "spool" in p], paths
    assert _state(src) == before
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz", "img", "m.json", "src"]


@pytest.mark.parametrize("epoch", [1_700_000_000, 1 << 32, (1 << 32) + 12345, (1 << 34) - (1 << 31) - 1])
def test_ext4_superblock_times_past_2106(tmp_path: Path, epoch: int) -> None:
    """s_wtime, s_mtime, s_mkfs_time and s_lastcheck carry bits 32..39 in their _hi
    bytes (0x274..0x277); read here from the raw superblock (e2fsprogs 1.47.0's
    dumpe2fs still prints only the low 32 bits)."""
    image = tmp_path / "img"
    proc = run_cli(
        "build", str(_src_dir(tmp_path)), "-o", str(image), "--format", "ext4", "--epoch", str(epoch)
    )
    assert proc.returncode == 0, proc.stderr
    _oracle("ext4", image, tmp_path)
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    for low, high in ((48, 0x274), (44, 0x275), (264, 0x276), (64, 0x277)):
        assert int.from_bytes(sb[low : low + 4], "little") | sb[high] << 32 == epoch, (low, high)
