"""Collect: every source, in order, into one Tree, with the policy applied once.

    with collect(options) as collected:
        frozen = collected.freeze()
        ...  # write the image while the spool file still exists

Later sources overlay earlier ones (Tree.add semantics).  Compressed tar members
are spooled to one temporary file; `Collected` deletes it on exit, so the tree's
DataRefs are only valid inside the `with` block.
"""

from __future__ import annotations

import os
import stat
from types import TracebackType
from typing import Literal

from .errors import OutputError, SourceError, SpecError
from .longpath import stat_long
from .options import BuildOptions, SourceSpec
from .sources import Rules, Spool
from .sources.directory import FileCallback, add_directory
from .sources.single import add_file
from .tree import FrozenTree, Kind, Tree, gc_paused, new_dir, normalize_path
from .xattrs import ACL_NAMES

ResolvedKind = Literal["dir", "tar", "file"]


class Collected:
    """The collected tree and the temporary files its DataRefs may point into."""

    def __init__(self, tree: Tree, spool: Spool) -> None:
        self.tree = tree
        self._spool = spool

    def freeze(self) -> FrozenTree:
        """The tree, frozen; the mutable tree is emptied (its dict would cost ~40
        bytes an entry for the rest of the build; nothing reads it after this)."""
        frozen = self.tree.freeze()
        self.tree.entries.clear()
        return frozen

    @property
    def spool_path(self) -> str | None:
        """The spool file, if any member needed one (for diagnostics and tests)."""
        return self._spool.path

    def __enter__(self) -> Collected:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()


def collect(options: BuildOptions, on_file: FileCallback | None = None) -> Collected:
    """Read every source of `options` into one Tree.  Raises SourceError/SpecError;
    on error no temporary file is left behind.

    `on_file` is told of every regular file with data, in the frozen tree's order,
    when the tree comes from one directory source (the only case where the walk's
    order is the tree's: with several sources, later ones replace entries)."""
    rules = Rules(options.policy)
    tree = Tree(new_dir(0o755, 0, 0, rules.epoch_ns or 0))
    spool = Spool(spool_directory(options))
    if len(options.sources) != 1:
        on_file = None
    identities = bool(options.cache.cache)  # for whole-image reuse (reuse.py)
    try:
        with gc_paused():
            for spec in options.sources:
                add_source(tree, spec, rules, spool, on_file, identities)
    except BaseException:
        spool.close()
        raise
    return Collected(tree, spool)


def drop_acls(tree: FrozenTree) -> list[str]:
    """Policy.drop_acls: remove the POSIX ACLs of every inode; returns the image
    paths ("/etc/x") that had them, in tree order (every name of a hard link)."""
    dropped: list[str] = []
    stripped: set[int] = set()  # id() of the inodes already stripped (hard links)
    for node in tree.nodes:
        inode = node.inode
        if id(inode) not in stripped:
            if not any(name in inode.xattrs for name in ACL_NAMES):
                continue
            inode.xattrs = {k: v for k, v in inode.xattrs.items() if k not in ACL_NAMES}
            stripped.add(id(inode))
        dropped.append(node.image_path.decode("utf-8", "surrogateescape"))
    return dropped


def add_source(
    tree: Tree,
    spec: SourceSpec,
    rules: Rules,
    spool: Spool,
    on_file: FileCallback | None = None,
    identities: bool = False,
) -> None:
    dest = normalize_path(spec.dest, where=spec.path)
    _check_dest(tree, dest, spec)
    kind = resolve_kind(spec)
    if kind != "file" and (spec.mode, spec.uid, spec.gid) != (None, None, None):
        raise SpecError(f"mode, uid and gid apply to single-file sources only (this is a {kind})", spec.path)
    if kind == "dir":
        add_directory(tree, spec.path, dest, rules, on_file, identities)
    elif kind == "tar":
        from .sources.tar import add_tar  # imported on use: tarfile and friends cost every start ~12 ms

        add_tar(tree, spec.path, dest, rules, spool)
    else:
        add_file(tree, spec, dest, rules, identities)


def _check_dest(tree: Tree, dest: bytes, spec: SourceSpec) -> None:
    """A source placed below a symlink of an earlier source would be written through
    it (as a tar member would: refused there too); the nearest existing ancestor of
    `dest` decides."""
    parent = dest
    while parent:
        parent = parent.rpartition(b"/")[0]
        existing = tree.get(parent)
        if existing is None:
            continue
        if existing.kind is Kind.SYMLINK:
            shown = "/" + parent.decode("utf-8", "backslashreplace")
            raise SourceError(f"dest /{dest.decode('utf-8', 'backslashreplace')} goes through the symlink "
                              f"{shown} of an earlier source", spec.path)  # fmt: skip
        return


def resolve_kind(spec: SourceSpec) -> ResolvedKind:
    """What a source is: checked against the file system, "auto" decided here.

    auto: a directory is "dir"; a file named like an archive (.tar, .tar.gz, .tgz,
    .tar.zst, .tar.xz, ...) or whose (decompressed) first block is a tar header is
    "tar"; any other regular file is "file".
    """
    try:
        st = stat_long(spec.path)  # a directory source may be named by a path of any length
    except FileNotFoundError as exc:
        raise SourceError("no such file or directory", spec.path) from exc
    except OSError as exc:
        raise SourceError(f"cannot stat: {exc.strerror}", spec.path) from exc
    is_dir = stat.S_ISDIR(st.st_mode)
    if spec.kind == "dir":
        if not is_dir:
            raise SourceError("not a directory", spec.path)
        return "dir"
    if is_dir:
        if spec.kind != "auto":
            raise SourceError(f"is a directory, not a {spec.kind} source", spec.path)
        return "dir"
    if not stat.S_ISREG(st.st_mode):
        raise SourceError("not a regular file or directory", spec.path)
    if spec.kind in ("tar", "file"):
        return spec.kind
    from .sources.tar import TAR_SUFFIXES, is_tar_archive

    if spec.path.lower().endswith(TAR_SUFFIXES) or is_tar_archive(spec.path):
        return "tar"
    if not spec.dest.strip(b"/"):
        raise SpecError(
            "neither a directory nor a tar archive; a single file needs a dest path in the image", spec.path
        )
    return "file"


def spool_directory(options: BuildOptions) -> str | None:
    """Where the spool file goes: None (tempfile's choice, $TMPDIR first) unless a
    temp directory named by the environment lies inside a directory source — a
    later source would read pyimg's own temporary file into the image, and even
    tempfile's probe of the directory would touch a source —: then beside the
    output (which is never inside a source)."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        tmp = os.environ.get(var)
        if not tmp:
            continue
        tmp = os.path.realpath(tmp)
        for spec in options.sources:
            source = os.path.realpath(spec.path)
            if os.path.isdir(source) and os.path.commonpath([tmp, source]) == source:
                return os.path.dirname(os.path.abspath(options.output))
    return None


def check_output_not_input(options: BuildOptions) -> None:
    """Refuse an output image or manifest that is (or lies inside) one of the
    sources, and a manifest that is the image: before any work.

    A directory source must not contain them (they would be read while being
    written); a file source must not be one of them.
    """
    written = [("output", options.output)]
    if options.manifest:
        written.append(("manifest", options.manifest))
        if os.path.realpath(options.manifest) == os.path.realpath(options.output):
            raise OutputError(
                "the manifest would overwrite the image (same path as the output)", options.manifest
            )
    for what, path in written:
        target = os.path.realpath(path)
        for spec in options.sources:
            source = os.path.realpath(spec.path)
            if os.path.isdir(source):
                if os.path.commonpath([target, source]) == source:
                    raise OutputError(f"{what} is also an input", path)
            elif target == source or _same_file(path, spec.path):
                raise OutputError(f"{what} is also an input", path)


def source_holding(path: str, options: BuildOptions) -> str | None:
    """The directory source that `path` is (or lies inside), if any."""
    target = os.path.realpath(path)
    for spec in options.sources:
        source = os.path.realpath(spec.path)
        if os.path.isdir(source) and os.path.commonpath([target, source]) == source:
            return spec.path
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
