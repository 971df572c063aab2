"""Small archives made in memory (the initramfs, the config initrd): a Tree built
entry by entry, written by the same cpio writer as `pyimg build --format cpio`.

Generated contents (the init script, decompressed modules, config values) are put
back to back in one spool file and the tree's DataRefs point into it, so the
writer reads every file the same way, whether it is a host file or generated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType

from ..errors import BootError
from ..formats.base import WriteResult
from ..formats.cpio import write_archive
from ..formats.cpio_options import CpioOptions
from ..output import AtomicOutput
from ..region import Region
from ..tree import DataRef, Inode, Kind, Tree, new_dir

PLAIN = CpioOptions()  # uncompressed


class ArchiveBuilder:
    """Entries owned by root, every mtime the epoch.  Use as a context manager (the
    spool file is removed on exit)."""

    def __init__(self, epoch: int = 0) -> None:
        self.mtime_ns = epoch * 1_000_000_000
        self.tree = Tree(new_dir(0o755, 0, 0, self.mtime_ns))
        self._spool = tempfile.NamedTemporaryFile(prefix="pyimg-archive-", suffix=".spool")  # noqa: SIM115
        self._spool_size = 0

    def __enter__(self) -> ArchiveBuilder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()

    def _parents(self, path: str) -> bytes:
        raw = path.strip("/").encode()
        parts = raw.split(b"/")
        for depth in range(1, len(parts)):
            parent = b"/".join(parts[:depth])
            if parent not in self.tree:
                self.tree.add(parent, new_dir(0o755, 0, 0, self.mtime_ns))
        return raw

    def directory(self, path: str, mode: int = 0o755) -> None:
        self.tree.add(self._parents(path), new_dir(mode, 0, 0, self.mtime_ns))

    def data(self, path: str, content: bytes, mode: int = 0o644) -> None:
        """A file with these bytes."""
        ref = None
        if content:
            self._spool.write(content)
            ref = DataRef.at(self._spool.name, self._spool_size, len(content))
            self._spool_size += len(content)
        inode = Inode(Kind.FILE, mode, 0, 0, self.mtime_ns, size=len(content), data=ref)
        self.tree.add(self._parents(path), inode)

    def host_file(self, path: str, source: str | os.PathLike[str], mode: int | None = None) -> None:
        """A copy of a file of this machine (checked unchanged when it is read)."""
        try:
            st = os.stat(source)
        except OSError as exc:
            raise BootError(f"cannot read: {exc.strerror}", os.fspath(source)) from exc
        ref = (
            DataRef.at(os.fspath(source), 0, st.st_size, (st.st_size, st.st_mtime_ns)) if st.st_size else None
        )
        inode = Inode(
            Kind.FILE,
            mode if mode is not None else st.st_mode & 0o7777,
            0,
            0,
            self.mtime_ns,
            size=st.st_size,
            data=ref,
        )
        self.tree.add(self._parents(path), inode)

    def symlink(self, path: str, target: str) -> None:
        raw = target.encode()
        self.tree.add(
            self._parents(path), Inode(Kind.SYMLINK, 0o777, 0, 0, self.mtime_ns, size=len(raw), target=raw)
        )

    def device(self, path: str, kind: Kind, major: int, minor: int, mode: int = 0o600) -> None:
        self.tree.add(self._parents(path), Inode(kind, mode, 0, 0, self.mtime_ns, rdev=(major, minor)))

    def _write(self, region: Region, options: CpioOptions) -> WriteResult:
        self._spool.flush()
        return write_archive(self.tree.freeze(), region, None, options)

    def write(self, output: str | os.PathLike[str], options: CpioOptions = PLAIN) -> WriteResult:
        """The archive, written atomically to `output`."""
        with AtomicOutput(os.fspath(output)) as out:
            result = self._write(out.region(), options)
            out.size_to(result.image_size)
            out.commit()
        return result

    def to_bytes(self, options: CpioOptions = PLAIN) -> bytes:
        with tempfile.TemporaryFile(prefix="pyimg-archive-") as f:
            result = self._write(Region(f.fileno()), options)
            f.seek(0)
            data = f.read()
        if len(data) != result.image_size:
            raise BootError("the archive is not the size its writer reported")
        return data


def pad4(path: Path | str) -> int:
    """Bytes of zeros that bring the file at `path` to a multiple of 4."""
    return -os.path.getsize(path) % 4
