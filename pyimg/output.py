"""Atomic output: nothing partial is ever visible, and nothing piles up.

Each file pyimg writes (the image, its manifest) is first a temp file in the target's
directory.  Where the file system has O_TMPFILE the temp file has no name until the
commit gives it one, microseconds before its rename, so a build killed with `kill -9`
leaves nothing behind (short of that instant); elsewhere it is named
`.NAME.pyimg-HOST-PID-RANDOM.tmp`, locked for as long as its build runs, and the next
build in that directory removes the ones nobody holds.  `commit` makes all of a
build's outputs land together: every temp file is fsynced first, then named, then
they are renamed over their targets (image first) with SIGINT and SIGTERM held back
(delivered right after), so Ctrl-C during a commit finishes it rather than tearing
it; the directory is fsynced last.  On any failure before the renames the temp files
are removed and the targets are left exactly as they were.  Only `kill -9` between
the two renames (nothing can hold it) lands the image without its manifest: the old
manifest, or none, stays beside the new image.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from .errors import OutputError
from .region import Region, write_error

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
_TEMP_RE = re.compile(r"^\..+\.pyimg-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def output_mode() -> int:
    """The mode a committed output gets: 0o666 less the process's umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: from /proc (os.umask would set it, for every thread, for
    a moment), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(target: str, what: str = "output") -> str:
    """The absolute target path, or OutputError before any work: an existing
    directory, a path ending in "/", or a directory that does not exist."""
    if target.endswith(os.sep):
        raise OutputError(f"the {what} path ends in '/': it must name a file", target)
    path = os.path.abspath(target)
    if os.path.isdir(path):
        raise OutputError(f"the {what} path is a directory", target)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise OutputError(f"the {what}'s directory does not exist", directory)
    return path


def temp_suffix() -> str:
    """HOST-PID-RANDOM.tmp: what makes a named temp file this build's."""
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def create_locked(path: str, directory: bool = False) -> int | None:
    """Create `path` (it must not exist), a file or a `directory`, and take its
    exclusive lock; None when a concurrent build's remove_stale_temps removed it
    between our create and our lock (it saw one nobody held): the caller tries
    another name."""
    if directory:
        os.mkdir(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd)):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def create_named_temp(make_name: Callable[[], str], directory: bool = False) -> tuple[int, str]:
    """A new temp file (or directory) under a fresh name from `make_name`, created and
    locked (create_locked): (its fd, its name).  `make_name` is called just before
    each attempt, so a caller can record the name before the file exists.  An
    interrupt during the create removes what it made; a name that is taken (a 32-bit
    random clash) or that a concurrent clean-up removed is tried again."""
    while True:
        name = make_name()
        try:
            fd = create_locked(name, directory)
        except FileExistsError:
            continue  # another's
        except OSError:
            raise
        except BaseException:  # (KeyboardInterrupt) the file, if made, is ours
            with contextlib.suppress(OSError):
                os.rmdir(name) if directory else os.unlink(name)
            raise
        if fd is not None:
            return fd, name


def remove_stale_temps(
    directory: str,
    pattern: re.Pattern[str] = _TEMP_RE,
    keep: Callable[[re.Match[str]], bool] = lambda match: False,
) -> None:
    """Remove the named temp files (or directories: create_locked's) of builds that
    are gone: names `pattern` matches, unless `keep`.  A build holds an exclusive
    lock on its temp file for as long as it runs (the kernel drops it when the
    process dies, even by kill -9), so a temp file that can be locked has no owner:
    unlike a host+pid test, this holds across hosts sharing the directory and across
    containers with their own pid namespaces."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            match = pattern.match(name)
            if match is None or keep(match):
                continue
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: its build runs
                    if not os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd)):
                        continue  # (renamed into place meanwhile, and something else is here)
                    if stat.S_ISDIR(os.fstat(fd).st_mode):
                        shutil.rmtree(path)  # (held locked while it goes: its creator waits)
                    else:
                        os.unlink(path)
                finally:
                    os.close(fd)


class AtomicOutput:
    def __init__(self, target: str, what: str = "output") -> None:
        self.target = check_target(target, what)
        self.what = what
        self.directory = os.path.dirname(self.target)
        self.fd = -1
        self.tmp = ""  # the temp file's name, once it has one
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        check_target(self.target, self.what)  # again: the tree was collected since
        remove_stale_temps(self.directory)
        try:
            self._open()
        except BaseException:
            self.close()  # (no __exit__ when __enter__ raises): a named temp file is removed
            raise
        return self

    def _open(self) -> None:
        try:
            self.fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (AttributeError, OSError):
            self.fd = -1  # no O_TMPFILE here: a named temp file
        if self.fd >= 0:
            return

        def claim() -> str:
            # The name is ours before the file exists: an interrupt just after the
            # create finds it here, for close() to remove.
            self.tmp = self._temp_name()
            return self.tmp

        try:
            self.fd, _ = create_named_temp(claim)  # locked while we run (remove_stale_temps)
        except OSError as exc:
            self.tmp = ""
            raise OutputError(f"cannot create a file beside the target: {exc.strerror}", self.target) from exc

    def _temp_name(self) -> str:
        return os.path.join(self.directory, f".{os.path.basename(self.target)}.pyimg-{temp_suffix()}")

    def region(self) -> Region:
        """The whole temp file, for one writer."""
        return Region(self.fd)

    def size_to(self, length: int) -> None:
        """Cut or extend the file to the length its writer used (holes past the data)."""
        try:
            os.ftruncate(self.fd, length)
        except OSError as exc:
            raise OutputError(f"cannot size the {self.what}: {exc.strerror}", self.target) from exc

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                raise OutputError(write_error(exc).reason, self.target) from exc
            view = view[written:]

    def prepare(self) -> None:
        """The usual file mode, and the data on disk."""
        try:
            os.fchmod(self.fd, output_mode())
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"cannot finish the {self.what}: {exc.strerror}", self.target) from exc

    def name(self) -> None:
        """A name in the directory, which rename() needs: an O_TMPFILE file is linked
        to a temp name (a named temp file has one).  The last step before the
        rename, so a `kill -9` between the two is a matter of microseconds; what it
        leaves is a named temp file like any other, removed by the next build."""
        if self.tmp:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # before it has a name (remove_stale_temps)
            # The name is recorded before the link: a signal's KeyboardInterrupt just
            # after the link (before an assignment of its result) left the named
            # file behind, since close() knew no name to remove.
            self.tmp = self._temp_name()
            _link_anonymous(self.fd, self.tmp)
        except OSError as exc:
            self.tmp = ""  # no link was made (or the name is another's: EEXIST)
            raise OutputError(f"cannot finish the {self.what}: {exc.strerror}", self.target) from exc

    def rename(self) -> None:
        try:
            os.rename(self.tmp, self.target)
        except OSError as exc:
            raise OutputError(f"cannot put the {self.what} in place: {exc.strerror}", self.target) from exc
        self.committed = True
        self.tmp = ""

    def commit(self) -> None:
        commit([self])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed and self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = ""

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _link_anonymous(fd: int, path: str) -> None:
    """Give an O_TMPFILE file a name: linkat of /proc/self/fd/N, following that
    symlink (a dir fd makes Python call linkat with AT_SYMLINK_FOLLOW; a plain link
    would link the procfs symlink itself, across devices)."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"proc/self/fd/{fd}", path, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


def commit(outputs: Sequence[AtomicOutput]) -> None:
    """Land every output: all prepared (fsynced) first, then all named, then renamed
    in order with SIGINT/SIGTERM held, then their directories fsynced.  A signal
    that came during the renames is delivered after them: the build is then
    complete.  Any failure before the renames lands nothing."""
    for out in outputs:
        out.prepare()
    for out in outputs:
        out.name()
    with _signals_held():
        for out in outputs:
            out.rename()
        for directory in dict.fromkeys(out.directory for out in outputs):
            _fsync_dir(directory)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in here are delivered on the way out.

    Python-level handlers, not a signal mask: a process-directed signal goes to any
    thread that does not block it (a worker pool's), and CPython then runs the
    handler in the main thread at once.  Outside the main thread: nothing to hold."""
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        previous = {signum: signal.signal(signum, hold) for signum in _HELD_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed from C, which Python cannot reinstall; the default
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def _fsync_dir(directory: str) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return  # the renames are done; durability of the entry is the file system's
        raise OutputError(f"cannot sync the directory: {exc.strerror}", directory) from exc
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):
            raise OutputError(f"cannot sync the directory: {exc.strerror}", directory) from exc
    finally:
        os.close(dir_fd)


def write_file_atomically(target: str, data: bytes) -> None:
    with AtomicOutput(target) as out:
        out.write(data)
        out.commit()
