"""The one exception hierarchy of pyimg.

Library code raises these and never prints or exits; the CLI alone turns them into
messages and exit codes.  Every error names the offending path (when there is one)
and the reason.
"""

from __future__ import annotations

import os


class PyImgError(Exception):
    """Base of every error pyimg raises on purpose."""

    exit_code = 1

    def __init__(self, reason: str, path: str | bytes | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = _show_path(path) if path is not None else None
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class SourceError(PyImgError):
    """A source cannot be read, is corrupt, changed while read, or escapes the root."""

    exit_code = 3


class SpecError(PyImgError):
    """The spec file or an option is invalid."""

    exit_code = 2


class LimitError(PyImgError):
    """The tree does not fit the format: a name too long, too many ids, a file too big..."""

    exit_code = 4


class FormatError(PyImgError):
    """The format writer failed (an internal encoder error reported by the C core)."""

    exit_code = 5


class OutputError(PyImgError):
    """The image cannot be written: full disk, output is an input, no permission."""

    exit_code = 6


class ResourceError(PyImgError):
    """The build ran out of a resource of this machine: memory (the C core could not
    allocate a handle or a table).  Not the tree's fault: a smaller --jobs, or more
    memory, may let the same build pass."""

    exit_code = 7


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a build.  `committed` says whether the outputs had
    already landed (the commit completes once begun): the message can be truthful."""

    def __init__(self, output: str, *, committed: bool) -> None:
        self.output = output
        self.committed = committed
        super().__init__(output)


def _show_path(path: str | bytes | os.PathLike[str]) -> str:
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return os.fspath(path)


class BootError(PyImgError):
    """Boot pieces (pyimg/boot/) refused their input: a missing or wrong kernel, a
    module tree or module that is missing or whose dependencies cannot be resolved,
    a root format the initramfs cannot mount, an invalid config key, a failed
    kernel fetch.  Exit code 9."""

    exit_code = 9


class StoreError(PyImgError):
    """The image store (an OCI layout directory or a registry) failed or refused.

    `path` is the store address (oci:DIR or HOST/REPO), `reason` says what went wrong."""

    exit_code = 10


class StoreNotFoundError(StoreError):
    """A tag, digest, blob or repository does not exist in the store."""


class StoreAuthError(StoreError):
    """The registry answered 401 or 403; the message names the credentials tried."""


class StoreUnreachableError(StoreError):
    """The registry could not be reached after bounded retries."""


class DigestMismatchError(StoreError):
    """A blob or manifest whose content does not match its digest: refused."""


class CorruptStoreError(StoreError):
    """The OCI layout directory is not valid (missing oci-layout, bad index.json...)."""


class PromotionError(StoreError):
    """A promotion was refused: an environment out of order, a missing or failed record."""

    exit_code = 8
