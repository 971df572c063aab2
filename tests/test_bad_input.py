"""Bad input end to end: a clear error (path + reason), a non-zero exit from the CLI,
no output file (no temp file either), and the input untouched."""

from __future__ import annotations

import errno
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pyimg
from pyimg.errors import OutputError, PyImgError, SourceError

from .oracles import run_cli, run_unprivileged


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 200_000)
    (src / "b").write_bytes(b"b" * 10)
    return src


def _nothing_written(out_dir: Path, *, keep: set[str]) -> None:
    left = set(os.listdir(out_dir)) - keep
    assert not left, f"left behind: {left}"


def test_missing_source_cli(tmp_path: Path) -> None:
    proc = run_cli("build", str(tmp_path / "nope"), "-o", str(tmp_path / "out.sqfs"))
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "no such file" in proc.stderr
    _nothing_written(tmp_path, keep=set())


FORMATS = ["squashfs", "ext4"]


_BUILD = """
import json, sys
import pyimg
from pyimg.errors import SourceError
try:
    pyimg.build([sys.argv[1]], sys.argv[2])
except SourceError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"built": sys.argv[2]}))
"""


def test_unreadable_file(tmp_path: Path) -> None:
    # Root reads everything: build in a child that cannot override file permissions,
    # as an unprivileged builder would.
    src = _src(tmp_path)
    (src / "a").chmod(0)
    result = run_unprivileged(_BUILD, str(src), str(tmp_path / "out.sqfs"))
    assert "error" in result, result
    assert str(src / "a") in result["error"] and "permission denied" in result["error"]
    _nothing_written(tmp_path, keep={"src"})


def _after_collect(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run `action` once the tree is collected: before any content is read, or
    (ext4's prescan) after it was read once, when it must be caught again."""
    import pyimg.api as api

    real_collect = api.collect

    def collect_then_act(options: pyimg.BuildOptions, on_file: Any = None) -> Any:
        collected = real_collect(options, on_file)
        action()
        return collected

    monkeypatch.setattr(api, "collect", collect_then_act)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("victim", ["a", "b"])  # a large file and a small one
def test_file_changing_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, victim: str
) -> None:
    src = _src(tmp_path)
    _after_collect(monkeypatch, lambda: os.utime(src / victim, ns=(0, 123)))
    with pytest.raises(SourceError) as err:
        pyimg.build([str(src)], str(tmp_path / "out.img"), format=fmt)
    assert str(src / victim) in str(err.value) and "changed while" in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_growing_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    src = _src(tmp_path)

    def grow() -> None:
        with open(src / "b", "ab") as f:
            f.write(b"more")

    _after_collect(monkeypatch, grow)
    with pytest.raises(SourceError) as err:
        pyimg.build([str(src)], str(tmp_path / "out.img"), format=fmt)
    assert str(src / "b") in str(err.value) and "changed while" in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_vanishing_before_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    src = _src(tmp_path)
    _after_collect(monkeypatch, lambda: os.unlink(src / "b"))
    with pytest.raises(SourceError) as err:
        pyimg.build([str(src)], str(tmp_path / "out.img"), format=fmt)
    assert str(src / "b") in str(err.value) and "No such file" in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b"])
def test_tar_member_escaping_the_root(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    proc = run_cli("build", str(archive), "-o", str(tmp_path / "out.sqfs"))
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
    import pyimg.region as imagefile

    def enospc(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imagefile.os, "pwritev", enospc)
    out = tmp_path / "out.sqfs"
    with pytest.raises(OutputError) as err:
        pyimg.build([str(src)], str(out))
    assert "no space left" in str(err.value) and str(out) in str(err.value)
    _nothing_written(tmp_path, keep={"src"})


def test_interrupt_leaves_nothing_and_keeps_old_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out.sqfs"
    out.write_bytes(b"the previous image")
    import pyimg.region as imagefile

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
    proc = run_cli("build", str(src), "-o", str(tmp_path / "o.sqfs"), "--block-size", "3K")
    assert proc.returncode == 2 and "block size" in proc.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_failure_from_the_kernel(tmp_path: Path, fmt: str) -> None:
    """A real write error (the file size limit, as a full disk would): the CLI exits
    non-zero with the reason and leaves no file, for the C writer (ext4) too."""
    import resource
    import signal

    src = _src(tmp_path)
    (src / "c").write_bytes(os.urandom(2 << 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = run_cli("build", str(src), "-o", str(out_dir / "img"), "--format", fmt, preexec_fn=limit)
    assert proc.returncode != 0
    # ext4 knows its size before it writes: it refuses up front (Region.check_room).
    reason = (
        "larger than this file system (or the file size limit) allows" if fmt == "ext4" else "File too large"
    )
    assert reason in proc.stderr and str(out_dir / "img") in proc.stderr, proc.stderr
    assert os.listdir(out_dir) == []


def test_write_failure_inside_the_ext4_c_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C writer's own write errors, past the up-front check: the kernel's reason,
    the image path, a typed error and no file left."""
    import resource
    import signal

    import pyimg
    from pyimg.errors import OutputError
    from pyimg.region import Region

    src = _src(tmp_path)
    (src / "c").write_bytes(os.urandom(2 << 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(Region, "check_room", lambda self, end, written: None)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        with pytest.raises(OutputError, match="File too large") as caught:
            pyimg.build([str(src)], str(out_dir / "img"), format="ext4")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert caught.value.path == str(out_dir / "img")
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_an_epoch_too_large_names_where_it_came_from(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x")
    out = str(tmp_path / "img")
    huge = "99999999999"  # the year 5138: beyond squashfs (2106) and ext4 (2446)
    by_flag = run_cli("build", str(src), "-o", out, "--format", fmt, "--epoch", huge)
    assert by_flag.returncode == 4 and "from --epoch" in by_flag.stderr, by_flag.stderr
    by_env = run_cli(
        "build", str(src), "-o", out, "--format", fmt, env=dict(os.environ, SOURCE_DATE_EPOCH=huge)
    )
    assert by_env.returncode == 4 and "from SOURCE_DATE_EPOCH" in by_env.stderr, by_env.stderr
    spec = tmp_path / "s.toml"
    spec.write_text(f'format = "{fmt}"\n[[source]]\npath = "{src}"\n[policy]\nepoch = {huge}\n')
    by_spec = run_cli("build", "--spec", str(spec), "-o", out)
    assert by_spec.returncode == 4 and "from the spec's policy.epoch" in by_spec.stderr, by_spec.stderr
    assert not os.path.exists(out)
