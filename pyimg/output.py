"""Atomic output: the image is written to a temp file beside the target, fsynced and
renamed over it.  On any failure (or Ctrl-C) the temp file is removed and the target
is left exactly as it was."""

from __future__ import annotations

import contextlib
import os
import tempfile
from types import TracebackType

from .errors import OutputError
from .region import Region


def _umask() -> int:
    # Reading the umask means setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicOutput:
    def __init__(self, target: str) -> None:
        self.target = os.path.abspath(target)
        self.fd = -1
        self.tmp = ""
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        directory = os.path.dirname(self.target)
        if not os.path.isdir(directory):
            raise OutputError("the output directory does not exist", directory)
        if os.path.isdir(self.target):
            raise OutputError("the output path is a directory", self.target)
        try:
            self.fd, self.tmp = tempfile.mkstemp(
                dir=directory, prefix="." + os.path.basename(self.target) + "."
            )
        except OSError as exc:
            raise OutputError(f"cannot create a file beside the target: {exc.strerror}", self.target) from exc
        return self

    def region(self) -> Region:
        """The whole temp file, for one writer."""
        return Region(self.fd)

    def size_to(self, length: int) -> None:
        """Cut or extend the file to the length its writer used (holes past the data)."""
        try:
            os.ftruncate(self.fd, length)
        except OSError as exc:
            raise OutputError(f"cannot size the image: {exc.strerror}", self.target) from exc

    def commit(self) -> None:
        """fsync the data, give it the usual file mode, rename it over the target."""
        try:
            os.fchmod(self.fd, 0o666 & ~_umask())
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.target)
            self.committed = True
            dir_fd = os.open(os.path.dirname(self.target), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise OutputError(f"cannot finish the image: {exc.strerror}", self.target) from exc

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed and self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def write_file_atomically(target: str, data: bytes) -> None:
    with AtomicOutput(target) as out:
        view = memoryview(data)
        while view:
            try:
                written = os.write(out.fd, view)
            except OSError as exc:
                raise OutputError(f"write failed: {exc.strerror}", target) from exc
            view = view[written:]
        out.commit()
