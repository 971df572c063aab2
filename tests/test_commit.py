"""The commit: image and manifest land together or not at all, a signal during the
commit finishes it (and says so), and no temp file survives even `kill -9`."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyimg
from pyimg import output
from pyimg.errors import Interrupted, OutputError
from tests.oracles import run_cli


def _tree(root: Path, files: int = 3) -> Path:
    src = root / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i}").write_bytes(os.urandom(1000 + i))
    return src


def test_image_and_manifest_land_together(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    out, manifest = tmp_path / "o" / "img.sqfs", tmp_path / "o" / "img.json"
    out.parent.mkdir()
    result = pyimg.build([str(src)], str(out), manifest=str(manifest), epoch=0)
    assert out.exists() and manifest.exists()
    assert sorted(os.listdir(out.parent)) == ["img.json", "img.sqfs"]  # no temp file left
    assert result.digest == pyimg.digest(str(out)).blake3


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["-o", "{d}/img.sqfs", "--manifest", "{d}/img.sqfs"], "manifest would overwrite the image"),
        (["-o", "{d}/img.sqfs/"], "ends in '/'"),
        (["-o", "{d}/img.sqfs", "--manifest", "{d}/nodir/m.json"], "manifest's directory does not exist"),
        (["-o", "{d}/img.sqfs", "--manifest", "{d}"], "manifest path is a directory"),
    ],
)
def test_output_paths_checked_before_any_work(tmp_path: Path, args: list[str], reason: str) -> None:
    src = _tree(tmp_path)
    d = tmp_path / "o"
    d.mkdir()
    proc = run_cli("build", str(src), *[a.format(d=d) for a in args])
    assert proc.returncode == 6 and reason in proc.stderr, proc.stderr
    assert os.listdir(d) == []


def signal_during_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the commit's renames sends a SIGINT first (held until they are done)."""
    real_rename = os.rename

    def rename_then_signal(a: str, b: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_rename(a, b)

    monkeypatch.setattr(output.os, "rename", rename_then_signal)


def test_a_signal_during_the_commit_completes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _tree(tmp_path)
    out, manifest = tmp_path / "img.sqfs", tmp_path / "img.json"
    signal_during_renames(monkeypatch)
    with pytest.raises(Interrupted) as caught:
        pyimg.build([str(src)], str(out), manifest=str(manifest), epoch=0)
    assert caught.value.committed
    assert out.exists() and manifest.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_signal_after_the_commit_says_the_image_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in build()'s cleanup after the commit (here as the GC pause ends) is
    Interrupted(committed=True): it was a bare KeyboardInterrupt, and the CLI said
    "no image written" over the new image."""
    import contextlib

    import pyimg.api

    src = _tree(tmp_path)
    out, manifest = tmp_path / "img.sqfs", tmp_path / "img.json"

    @contextlib.contextmanager
    def paused_then_interrupted() -> Iterator[None]:
        yield
        raise KeyboardInterrupt

    monkeypatch.setattr(pyimg.api, "gc_paused", paused_then_interrupted)
    with pytest.raises(Interrupted) as caught:
        pyimg.build([str(src)], str(out), manifest=str(manifest), epoch=0)
    assert caught.value.committed
    assert out.read_bytes()[:4] == b"hsqs" and manifest.exists()


def test_an_interrupted_digest_leaves_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyimg.api

    src = _tree(tmp_path)
    out = tmp_path / "img.sqfs"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pyimg.api, "digest_image", interrupted)
    with pytest.raises(Interrupted) as caught:
        pyimg.build([str(src)], str(out), epoch=0)
    assert not caught.value.committed
    assert os.listdir(tmp_path) == ["src"]


def test_the_temp_files_are_named_only_after_every_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With O_TMPFILE a temp file gets its name just before its rename, after all
    the fsyncs: a kill -9 during the manifest's fsync left the image's named temp."""
    src = _tree(tmp_path)
    d = tmp_path / "o"
    d.mkdir()
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append(sorted(os.listdir(d)))
        real_fsync(fd)

    monkeypatch.setattr(output.os, "fsync", fsync)
    pyimg.build([str(src)], str(d / "img.sqfs"), manifest=str(d / "img.json"), epoch=0)
    # The image's fsync and the manifest's (the directory's comes after the renames): no name yet.
    assert seen[:2] == [[], []]
    assert sorted(os.listdir(d)) == ["img.json", "img.sqfs"]


def test_stale_named_temps_of_dead_builds_are_removed(tmp_path: Path) -> None:
    """A named temp file is locked by its build while it runs: one nobody holds is
    stale (its build died, even by kill -9) and the next build removes it; one that
    is held stays, whatever host or pid its name gives."""
    stale = tmp_path / f".img.sqfs.pyimg-{output._HOST}-999999-00ff.tmp"
    held = tmp_path / ".img.sqfs.pyimg-elsewhere-1-00ff.tmp"
    unrelated = tmp_path / ".img.sqfs.tmp"
    for p in (stale, held, unrelated):
        p.write_bytes(b"x")
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds its temp file
        output.remove_stale_temps(str(tmp_path))
    finally:
        os.close(fd)
    assert not stale.exists() and held.exists() and unrelated.exists()


def test_a_running_builds_named_temp_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(output.os, "O_TMPFILE")
    with output.AtomicOutput(str(tmp_path / "img")) as out:
        output.remove_stale_temps(str(tmp_path))  # another build's cleanup, meanwhile
        assert os.path.exists(out.tmp)


def test_without_o_tmpfile_the_named_temp_is_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(output.os, "O_TMPFILE")
    src = _tree(tmp_path)
    with pytest.raises(OutputError), output.AtomicOutput(str(tmp_path / "img")) as out:
        assert out.tmp and os.path.exists(out.tmp)
        raise OutputError("boom")
    assert sorted(os.listdir(tmp_path)) == [src.name]


def _has_o_tmpfile(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("o_tmpfile", "call"),
    [(True, "link"), (False, "open"), (False, "flock")],
    ids=["o_tmpfile-link", "named-open", "named-flock"],
)
def test_an_interrupt_just_after_a_temp_files_syscall_leaves_no_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, o_tmpfile: bool
) -> None:
    """A signal's KeyboardInterrupt raised the moment the temp file's create, lock or
    link returns: the name must already be known, for close() to remove.  After the
    link it was not (CI: a SIGTERM in a cpio build left `.img.pyimg-….tmp`)."""
    src = _tree(tmp_path)
    d = tmp_path / "o"
    d.mkdir()
    if not o_tmpfile:
        monkeypatch.delattr(output.os, "O_TMPFILE")
    elif not _has_o_tmpfile(d):
        pytest.skip("no O_TMPFILE on this file system: the named case covers it")
    fired: list[str] = []
    real = {"open": os.open, "flock": fcntl.flock, "link": os.link}

    def then_interrupt(*args: object, **kwargs: object) -> object:
        result = real[call](*args, **kwargs)  # type: ignore[operator]
        if not fired and [n for n in os.listdir(d) if n.endswith(".tmp")]:
            fired.append(call)
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(output.fcntl if call == "flock" else output.os, call, then_interrupt)
    with pytest.raises(Interrupted) as caught:
        pyimg.build([str(src)], str(d / "img.sqfs"), manifest=str(d / "img.json"), epoch=0)
    assert fired == [call] and not caught.value.committed
    assert os.listdir(d) == []


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])
def test_kill_9_leaves_the_old_image_and_no_temp_file(tmp_path: Path, delay: float) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
    out = tmp_path / "o" / "img.sqfs"
    out.parent.mkdir()
    out.write_bytes(b"old image")
    child = subprocess.Popen(
        [sys.executable, "-m", "pyimg.cli", "build", str(src), "-o", str(out), "-q", "--jobs", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    child.kill()
    child.wait()
    names = os.listdir(out.parent)
    assert names == ["img.sqfs"], names  # the old image or the complete new one, nothing else
    data = out.read_bytes()
    assert data == b"old image" or data[:4] == b"hsqs"


def test_digest_of_a_directory_says_so(tmp_path: Path) -> None:
    proc = run_cli("digest", str(tmp_path))
    assert proc.returncode == 6 and "is a directory, not an image file" in proc.stderr


def test_a_signal_inside_an_imports_callback_is_sent_again_not_lost() -> None:
    """CPython drops an exception raised in a weakref callback ("Exception ignored
    in: <function _get_module_lock.<locals>.cb>"): a SIGTERM that landed there during
    an import was lost and the build exited 0.  There the handler sends the signal
    again; anywhere else it raises KeyboardInterrupt."""
    from pyimg import interrupts

    namespace: dict[str, object] = {}
    source = "import sys\ndef cb():\n    return sys._getframe()\n"
    exec(compile(source, "<frozen importlib._bootstrap>", "exec"), namespace)
    callback_frame = namespace["cb"]()  # type: ignore[operator]
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        interrupts.raise_keyboard_interrupt(signal.SIGUSR1, callback_frame)  # no exception here
        for _ in range(100):
            if got:
                break
            time.sleep(0.001)
        assert got == [signal.SIGUSR1]
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_keyboard_interrupt(signal.SIGUSR1, sys._getframe())
    finally:
        signal.signal(signal.SIGUSR1, previous)
