"""How failures of the C core reach Python: one channel, the code picks the class,
a callback's exception is kept and raised, and out-of-memory is a typed error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pyimg
from pyimg import _ffi
from pyimg._ffi import Callback, check, check_handle, ffi, lib, new_err
from pyimg.compression import BlockCompressor
from pyimg.errors import (
    FormatError,
    LimitError,
    OutputError,
    PyImgError,
    ResourceError,
    SourceError,
)
from pyimg.formats import squashfs
from pyimg.sources import directory

CODES = {
    name: getattr(lib, name) for name in dir(lib) if name.startswith("PYIMG_E") and name != "PYIMG_ERRMSG_MAX"
}


def test_every_code_has_a_class_and_a_text() -> None:
    assert set(CODES.values()) == set(_ffi._ERROR_CLASS)
    for code in CODES.values():
        assert ffi.string(lib.pyimg_strerror(-code)).decode() != "unknown error"


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("PYIMG_ENOMEM", ResourceError),
        ("PYIMG_ELIMIT", LimitError),
        ("PYIMG_EINVAL", FormatError),
        ("PYIMG_EOUTPUT", OutputError),
        ("PYIMG_ENOSPC", LimitError),
        ("PYIMG_ESOURCE", SourceError),
        ("PYIMG_ECALLBACK", FormatError),
    ],
)
def test_the_code_picks_the_class_not_the_text(name: str, cls: type[PyImgError]) -> None:
    with pytest.raises(cls) as err:
        check(-CODES[name], "reading the source: says nothing about the class", "/some/path")
    assert type(err.value) is cls and err.value.path == "/some/path"


def test_a_call_error_struct_carries_the_message() -> None:
    err = new_err()
    err.msg = b"writing the image: disk on fire"
    with pytest.raises(OutputError, match="disk on fire"):
        check(-lib.PYIMG_EOUTPUT, err)
    with pytest.raises(OutputError, match="writing the image failed"):  # no message: the code's text
        check(-lib.PYIMG_EOUTPUT, new_err())


def test_block_runs_without_room_is_a_negative_code() -> None:
    data = b"\1" * 4096 + bytes(4096) + b"\1" * 4096
    first, count = ffi.new("uint32_t[1]"), ffi.new("uint32_t[1]")
    assert lib.pyimg_block_runs(data, len(data), 4096, 0, first, count, 1) == -lib.PYIMG_EINVAL


def test_a_null_handle_is_a_resource_error() -> None:
    with pytest.raises(ResourceError, match="out of memory"):
        check_handle(ffi.NULL, "walker")
    others = set(_ffi._ERROR_CLASS.values()) - {ResourceError}
    assert ResourceError.exit_code not in {cls.exit_code for cls in others}


class _NoWalker:
    """lib, except that the walker cannot be allocated."""

    def __getattr__(self, name: str) -> Any:
        if name == "pyimg_walk_new":
            return lambda: ffi.NULL
        return getattr(lib, name)


def test_a_walker_out_of_memory_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    monkeypatch.setattr(directory, "lib", _NoWalker())
    with pytest.raises(ResourceError):
        pyimg.build([str(tmp_path / "src")], str(tmp_path / "out.sqfs"), format="squashfs", epoch=0)
    assert not (tmp_path / "out.sqfs").exists()


def test_the_cli_reports_out_of_memory_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    code = (
        "import sys; from pyimg.sources import directory; from pyimg._ffi import ffi, lib\n"
        "class L:\n"
        "    def __getattr__(self, n):\n"
        "        return (lambda: ffi.NULL) if n == 'pyimg_walk_new' else getattr(lib, n)\n"
        "directory.lib = L()\n"
        "from pyimg.cli import main\n"
        "sys.argv = ['pyimg', 'build', sys.argv[1], '-o', sys.argv[2], '--epoch', '0']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "out.sqfs")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == ResourceError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr and "out of memory" in proc.stderr


class _Failing(BlockCompressor):
    error: BaseException = ValueError("the compressor broke")

    def compress(self, block: bytes | memoryview) -> bytes:
        raise self.error


def _squashfs_with_failing_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> Any:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "file").write_bytes(b"data")
    monkeypatch.setattr(_Failing, "error", error)
    monkeypatch.setattr(squashfs, "BlockCompressor", _Failing)  # the metadata compressor only
    with pytest.raises(BaseException) as err:
        pyimg.build([str(tmp_path / "src")], str(tmp_path / "out.sqfs"), format="squashfs", epoch=0)
    assert not (tmp_path / "out.sqfs").exists()
    return err.value


def test_a_callback_exception_is_kept_and_chained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cause = ValueError("the compressor broke")
    exc = _squashfs_with_failing_metadata(tmp_path, monkeypatch, cause)
    assert type(exc) is FormatError
    assert exc.__cause__ is cause
    assert "the compressor broke" in str(exc) and "compression failed" in str(exc)


def test_a_typed_callback_exception_comes_through_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cause = LimitError("too much of something")
    assert _squashfs_with_failing_metadata(tmp_path, monkeypatch, cause) is cause


def test_a_callback_out_of_memory_is_a_resource_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exc = _squashfs_with_failing_metadata(tmp_path, monkeypatch, MemoryError())
    assert type(exc) is ResourceError and isinstance(exc.__cause__, MemoryError)


def test_a_callback_keeps_its_first_exception() -> None:
    callback = Callback(object())
    first = ValueError("first")
    assert callback.fail(first) == -1 and callback.fail(ValueError("second")) == -1
    with pytest.raises(FormatError) as err:
        check(-lib.PYIMG_ECALLBACK, "metadata block: compression failed", None, callback)
    assert err.value.__cause__ is first
    assert callback.error is None  # raised once, then forgotten
