"""Bad input end to end: a clear error (path + reason), a non-zero exit from the CLI,
no output file (no temp file either), and the input untouched."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pyimg
from pyimg.errors import OutputError, PyImgError, SourceError


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 200_000)
    (src / "b").write_bytes(b"b" * 10)
    return src


def _nothing_written(out_dir: Path, *, keep: set[str]) -> None:
    left = set(os.listdir(out_dir)) - keep
    assert not left, f"left behind: {left}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyimg.cli", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def test_missing_source_cli(tmp_path: Path) -> None:
    proc = _cli("build", str(tmp_path / "nope"), "-o", str(tmp_path / "out.sqfs"))
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "no such file" in proc.stderr
    _nothing_written(tmp_path, keep=set())


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    real_open = os.open

    def deny(path: object, flags: int, *args: object, **kw: object) -> int:
        if str(path).endswith("/a"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(SourceError) as err:
        pyimg.build([str(src)], str(tmp_path / "out.sqfs"))
    assert str(src / "a") in str(err.value) and "denied" in str(err.value).lower()
    _nothing_written(tmp_path, keep={"src"})


def test_file_changing_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    import pyimg.content as content

    real_pread = os.pread

    def pread_then_touch(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        os.utime(src / "a", ns=(0, 123))  # the file changes under the reader
        return data

    monkeypatch.setattr(content.os, "pread", pread_then_touch)
    with pytest.raises(SourceError, match="changed while"):
        pyimg.build([str(src)], str(tmp_path / "out.sqfs"), jobs=1)
    _nothing_written(tmp_path, keep={"src"})


def test_file_growing_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    import pyimg.content as content

    real_pread = os.pread

    def pread_then_grow(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        with open(src / "b", "ab") as f:
            f.write(b"more")
        return data

    monkeypatch.setattr(content.os, "pread", pread_then_grow)
    with pytest.raises(SourceError) as err:
        pyimg.build([str(src)], str(tmp_path / "out.sqfs"), jobs=1)
    assert "changed while" in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b"])
def test_tar_member_escaping_the_root(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    proc = _cli("build", str(archive), "-o", str(tmp_path / "out.sqfs"))
    assert proc.returncode != 0 and "evil.tar" in proc.stderr, proc.stderr
    _nothing_written(tmp_path, keep={"evil.tar"})


def test_tar_path_through_symlink(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("etc")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        tar.addfile(link)
        info = tarfile.TarInfo("etc/shadow")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(SourceError) as err:
        pyimg.build([str(archive)], str(tmp_path / "out.sqfs"))
    assert "symlink" in str(err.value)
    _nothing_written(tmp_path, keep={"evil.tar"})


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_tar(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    with tarfile.open(good, "w:gz" if suffix.endswith("gz") else "w") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"f{i}")
            data = os.urandom(50_000)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SourceError) as err:
        pyimg.build([str(bad)], str(tmp_path / "out.sqfs"), jobs=1)
    assert str(bad) in str(err.value)
    _nothing_written(tmp_path, keep={good.name, bad.name})


def test_output_inside_a_source(tmp_path: Path) -> None:
    src = _src(tmp_path)
    before = sorted(os.listdir(src))
    with pytest.raises(OutputError, match="input"):
        pyimg.build([str(src)], str(src / "img.sqfs"))
    assert sorted(os.listdir(src)) == before


def test_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    import pyimg.formats.imagefile as imagefile

    def enospc(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imagefile.os, "pwritev", enospc)
    out = tmp_path / "out.sqfs"
    with pytest.raises(OutputError) as err:
        pyimg.build([str(src)], str(out))
    assert "no space left" in str(err.value) and str(out) in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


def test_interrupt_leaves_nothing_and_keeps_old_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out.sqfs"
    out.write_bytes(b"the previous image")
    import pyimg.formats.imagefile as imagefile

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefile.os, "pwritev", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pyimg.build([str(src)], str(out))
    assert out.read_bytes() == b"the previous image"
    _nothing_written(tmp_path, keep={"src", "out.sqfs"})


def test_input_is_never_modified(tmp_path: Path) -> None:
    src = _src(tmp_path)
    os.utime(src / "a", ns=(1, 2))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_atime_ns, p.read_bytes()) for p in src.iterdir()}
    pyimg.build([str(src)], str(tmp_path / "out.sqfs"))
    after = {p: (p.stat().st_mtime_ns, p.stat().st_atime_ns, p.read_bytes()) for p in src.iterdir()}
    assert {p: v[0::2] for p, v in before.items()} == {p: v[0::2] for p, v in after.items()}


def test_bad_options_are_spec_errors(tmp_path: Path) -> None:
    src = _src(tmp_path)
    for bad in ({"block_size": "3K"}, {"compression": "zstd:99"}, {"compression": "lzo"}, {"format": "fat"}):
        with pytest.raises(PyImgError):
            pyimg.build([str(src)], str(tmp_path / "o.sqfs"), **bad)  # type: ignore[arg-type]
    _nothing_written(tmp_path, keep={"src"})
    proc = _cli("build", str(src), "-o", str(tmp_path / "o.sqfs"), "--block-size", "3K")
    assert proc.returncode == 2 and "block size" in proc.stderr
