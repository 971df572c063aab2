"""The only importer of the compiled C core, and the one place C errors become exceptions."""

from __future__ import annotations

from typing import Any

from ._core import ffi, lib
from .errors import FormatError, LimitError, OutputError, PyImgError

__all__ = ["check", "ffi", "lib"]

_ERROR_CLASS: dict[int, type[PyImgError]] = {
    lib.PYIMG_ELIMIT: LimitError,
    lib.PYIMG_EIO: OutputError,
    lib.PYIMG_ENOSPC: LimitError,
}


def check(rc: int, message: Any = None, path: str | bytes | None = None) -> int:
    """Return rc when it is not negative; else raise the typed error for it.

    `message` is the handle's error text (a char* from C, or a callable returning
    one), read only on failure, after the GIL is back.
    """
    if rc >= 0:
        return rc
    text = message() if callable(message) else message
    if text is not None and not isinstance(text, str):
        text = ffi.string(text).decode("utf-8", "replace") if text != ffi.NULL else ""
    reason = text or ffi.string(lib.pyimg_strerror(rc)).decode()
    raise _ERROR_CLASS.get(-rc, FormatError)(reason, path)
