"""The only importer of the compiled C core, and the one place C errors become exceptions.

The C core reports a failure one way (csrc/common/common.h): a negative PYIMG_E*
code, and a message kept on the handle, or, for the calls that run on several
threads at once, in a `pyimg_err` of the call's own.  The code alone picks the
exception class; the message is only shown.
"""

from __future__ import annotations

from typing import Any

from ._core import ffi, lib
from .errors import FormatError, LimitError, OutputError, PyImgError, ResourceError, SourceError

__all__ = ["Callback", "check", "check_handle", "ffi", "lib", "new_err"]

_ERROR_CLASS: dict[int, type[PyImgError]] = {
    lib.PYIMG_ENOMEM: ResourceError,
    lib.PYIMG_ELIMIT: LimitError,
    lib.PYIMG_EINVAL: FormatError,  # a caller's bug: pyimg handed the core something it should not
    lib.PYIMG_EOUTPUT: OutputError,
    lib.PYIMG_ECALLBACK: FormatError,  # only when the callback left no exception behind
    lib.PYIMG_ENOSPC: LimitError,
    lib.PYIMG_ESOURCE: SourceError,
}


class Callback:
    """The context of a C-to-Python callback: the object it works with, and the
    exception it raised, kept (an exception must not cross into C) for check() to
    raise once the call that ran the callback has returned."""

    __slots__ = ("error", "handle", "target")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.handle = ffi.new_handle(self)  # what C carries as its void *ctx

    def fail(self, exc: BaseException) -> int:
        if self.error is None:  # the first failure is the cause
            self.error = exc
        return -1


def new_err() -> Any:
    """A `pyimg_err` for one call of the C core that runs on a worker thread."""
    return ffi.new("pyimg_err *")


def check(
    rc: int, message: Any = None, path: str | bytes | None = None, callback: Callback | None = None
) -> int:
    """Return rc when it is not negative; else raise the typed error for its code.

    `message`: the failure's text, read only on failure: a `pyimg_err *`, a char*
    from C, or a callable returning one (a handle's ..._error()).  `callback`: the
    context of a callback the call may have run; an exception it kept is raised
    (a PyImgError as it is, anything else chained under a FormatError).
    """
    if rc >= 0:
        return rc
    code = -rc
    if callback is not None and callback.error is not None:
        exc, callback.error = callback.error, None
        if isinstance(exc, PyImgError) or not isinstance(exc, Exception):
            raise exc  # typed already, or KeyboardInterrupt and the like: as they are
        cls = ResourceError if isinstance(exc, MemoryError) else FormatError
        raise cls(f"{_text(message) or 'a callback failed'}: {exc!r}", path) from exc
    reason = _text(message) or ffi.string(lib.pyimg_strerror(rc)).decode()
    raise _ERROR_CLASS.get(code, FormatError)(reason, path)


def check_handle(handle: Any, what: str) -> Any:
    """A newly made C handle, or ResourceError when it is NULL (out of memory)."""
    if handle == ffi.NULL:
        raise ResourceError(f"out of memory: cannot allocate the {what}")
    return handle


def _text(message: Any) -> str:
    # cdata counts as callable (function pointers are): test for it first
    text = message() if callable(message) and not isinstance(message, ffi.CData) else message
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    if ffi.typeof(text) is ffi.typeof("pyimg_err *"):
        return str(ffi.string(text.msg).decode("utf-8", "replace"))
    return str(ffi.string(text).decode("utf-8", "replace")) if text != ffi.NULL else ""
