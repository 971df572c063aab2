"""The in-memory tree every source fills and every format writer reads.

A tree maps image paths (raw bytes, relative, no leading slash; the root is b"") to
Inode objects.  Hard links are several paths holding the *same* Inode object.
Sources overlay each other in order (later wins); policy (ownership, time clamp,
excludes) is applied once when the tree is collected.  `Tree.freeze()` turns it into
a FrozenTree: entries sorted by raw name bytes (depth first, children by name),
inode numbers in that order, link counts computed — the only input a writer sees.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import SourceError

NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a tree is built and used.

    A build makes a few objects per tree entry and frees nothing until the end;
    each burst of allocations would make the collector traverse every live object
    again (0.15 s of a 0.55 s walk of 100k small files, ~10 % of a build) without
    freeing a thing: the tree holds no reference cycles.  Paused, not tuned: the
    previous state is restored on exit (or failure).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6
    SOCKET = 7


_KIND_FROM_IFMT = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
}

IFMT_OF_KIND = {kind: ifmt for ifmt, kind in _KIND_FROM_IFMT.items()}


def kind_from_mode(st_mode: int) -> Kind | None:
    return _KIND_FROM_IFMT.get(stat.S_IFMT(st_mode))


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~0.5 us per file; never changed once made
class DataRef:
    """Where a regular file's bytes live: `size` bytes at `offset` in the real file
    whose raw path is `base + rel`.

    The path is kept in two parts so that a tree of 100k files does not hold a
    full path string per file (~100 bytes each): a directory source shares one
    `base` (its directory, "/"-ended) among all its files, and `rel` is then the
    very bytes object that names the file in the tree.  Tar archives and spool
    files give the whole path as `base` (`DataRef.at`).  Plain tar archives point
    into the archive; compressed ones are spooled to a temporary file first.

    `stamp_size` and `stamp_mtime_ns` are the file's st_size and st_mtime_ns as
    collected (for a tar member: the archive's), which readers check to catch files
    that change while the image is built; stamp_size -1: not checked (a spool file
    cannot change under us).  Two ints rather than a tuple: for a directory source
    they are the inode's own size and mtime objects, so they cost nothing.

    `ident` is the file's identity as the walk saw it (cache.IDENT_KEY's 40 bytes:
    st_dev, st_ino, size, mtime and ctime in ns), kept only when a build cache asks
    for it (whole-image reuse, reuse.py); b"" otherwise and for tar members.
    """

    base: bytes
    rel: bytes
    offset: int
    size: int
    stamp_size: int = -1
    stamp_mtime_ns: int = 0
    ident: bytes = b""

    @classmethod
    def at(cls, path: str | bytes, offset: int, size: int, stamp: tuple[int, int] | None = None) -> DataRef:
        """A DataRef for the file `path`, whole (no shared base)."""
        stamp_size, stamp_mtime_ns = stamp if stamp is not None else (-1, 0)
        return cls(os.fsencode(path), b"", offset, size, stamp_size, stamp_mtime_ns)

    @property
    def fs_path(self) -> bytes:
        """The path as the OS takes it."""
        return self.base + self.rel

    @property
    def path(self) -> str:
        """The path as error messages and os functions show it (os.fsdecode)."""
        return os.fsdecode(self.base + self.rel)

    @property
    def stamp(self) -> tuple[int, int] | None:
        """(st_size, st_mtime_ns) as collected, or None when not checked."""
        return None if self.stamp_size < 0 else (self.stamp_size, self.stamp_mtime_ns)


@dataclass(slots=True, eq=False)
class Inode:
    kind: Kind
    mode: int  # permission bits only (0o7777): setuid, setgid, sticky included
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0  # regular files: content size; symlinks: len(target)
    target: bytes = b""  # symlink target, stored as is, never followed
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of char/block devices
    # Full names (b"user.x") -> values, sorted by name.  Replaced, never edited in
    # place: most inodes share the one empty mapping (a dict each costs 64 bytes).
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)
    data: DataRef | None = None  # regular files with size > 0

    @property
    def mtime(self) -> int:
        """Whole seconds (floor), as formats with second resolution store it."""
        return self.mtime_ns // 1_000_000_000


def new_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> Inode:
    return Inode(Kind.DIR, mode, uid, gid, mtime_ns)


def split_path(path: bytes) -> list[bytes]:
    return [part for part in path.split(b"/") if part]


def normalize_path(path: bytes | str, *, where: str | bytes | None = None) -> bytes:
    """Image path from any spelling: b'/usr//bin/./ls' -> b'usr/bin/ls'.

    `..` is refused rather than resolved: no source may place anything outside the root;
    a NUL byte is refused (it would end the name in every reader).
    """
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    if b"\0" in raw:
        raise SourceError(
            f"path {raw!r} has a NUL byte (no file name can hold one)", where if where is not None else raw
        )
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise SourceError(f"path {raw!r} escapes the image root", where if where is not None else raw)
    return b"/".join(parts)


class Tree:
    """A mutable tree, filled by sources in order; later entries replace earlier ones."""

    def __init__(self, root: Inode | None = None) -> None:
        self.entries: dict[bytes, Inode] = {b"": root or new_dir()}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: bytes) -> bool:
        return path in self.entries

    def get(self, path: bytes) -> Inode | None:
        return self.entries.get(path)

    def add(self, path: bytes, inode: Inode, *, parent_template: Inode | None = None) -> None:
        """Place `inode` at `path` (normalized).  Missing parents are created as
        directories copied from `parent_template` (default: 0755 root:root, time 0).

        A non-directory replacing a directory removes that directory's subtree; a
        directory replacing a directory keeps the children (layers merge).
        """
        if path == b"":
            if inode.kind is not Kind.DIR:
                raise SourceError("the image root must be a directory", "/")
            self.entries[b""] = inode
            return
        self._ensure_parents(path, parent_template)
        old = self.entries.get(path)
        if old is not None and old.kind is Kind.DIR and inode.kind is not Kind.DIR:
            self.remove(path)
        self.entries[path] = inode

    def remove(self, path: bytes) -> None:
        """Remove `path` and, for a directory, everything below it."""
        self.entries.pop(path, None)
        prefix = path + b"/" if path else b""
        for other in [p for p in self.entries if p.startswith(prefix) and p]:
            del self.entries[other]

    def _ensure_parents(self, path: bytes, template: Inode | None) -> None:
        slash = path.rfind(b"/")
        direct_parent = self.entries.get(path[:slash] if slash >= 0 else b"")
        if direct_parent is not None and direct_parent.kind is Kind.DIR:
            return  # the common case: sources add parents before children
        parts = path.split(b"/")
        for depth in range(1, len(parts)):
            parent = b"/".join(parts[:depth])
            existing = self.entries.get(parent)
            if existing is None:
                t = template or new_dir()
                self.entries[parent] = new_dir(t.mode, t.uid, t.gid, t.mtime_ns)
            elif existing.kind is not Kind.DIR:
                # A later layer puts something below what was a file: the file yields.
                t = template or new_dir()
                self.entries[parent] = new_dir(t.mode, t.uid, t.gid, t.mtime_ns)

    def freeze(self) -> FrozenTree:
        return FrozenTree(self.entries)


def _sort_key(path: bytes) -> bytes:
    # Depth-first order with children sorted by name bytes: compare component by
    # component.  Names never hold NUL, so mapping "/" to NUL (lower than any name
    # byte) makes one plain bytes comparison do exactly that, without splitting.
    return path.replace(b"/", b"\0")


@dataclass(slots=True)
class Node:
    """One directory entry of a frozen tree."""

    path: bytes
    inode: Inode
    ino: int  # 1-based inode number; hard links share it
    parent: int  # index of the parent node in FrozenTree.nodes (root: its own index 0)
    children: Sequence[int] = ()  # indexes, sorted by name bytes (directories only)

    @property
    def name(self) -> bytes:
        """The last component of the path (b"" for the root).  Computed, not kept: a
        bytes object per entry is ~45 bytes on trees of 100k entries, and writers
        read each name once or twice."""
        return self.path[self.path.rfind(b"/") + 1 :]

    @property
    def image_path(self) -> bytes:
        """The absolute path inside the image, as error messages show it."""
        return b"/" + self.path


class FrozenTree:
    """Entries in their one canonical order, with inode numbers and link counts.

    nodes[0] is the root.  Order is depth first with children sorted by raw name
    bytes, so it never depends on readdir order.  Inode numbers are assigned in that
    order, a hard-link group taking the number of its first path.
    """

    def __init__(self, entries: dict[bytes, Inode]) -> None:
        # One pass, no per-entry helper calls: this runs once per entry of trees
        # with hundreds of thousands of them.
        nodes: list[Node] = []
        index_of: dict[bytes, int] = {}
        ino_of: dict[int, int] = {}  # id(inode) -> ino
        inodes: list[Inode] = []
        nlink = [0]  # nlink[ino]: the link count as the formats store it
        children: dict[int, list[int]] = {}  # node index -> its children, directories only
        directory = Kind.DIR
        for path in sorted(entries, key=_sort_key):
            inode = entries[path]
            ino = ino_of.get(id(inode))
            if ino is None:
                inodes.append(inode)
                ino = ino_of[id(inode)] = len(inodes)
                # A directory counts its own "." (and, below, each subdirectory's "..").
                nlink.append(1 if inode.kind is directory else 0)
            nlink[ino] += 1
            index = len(nodes)
            if path:
                slash = path.rfind(b"/")
                parent = index_of[path[:slash] if slash >= 0 else b""]
                children[parent].append(index)
                if inode.kind is directory:
                    nlink[nodes[parent].ino] += 1
            else:
                parent = 0
            if inode.kind is directory:
                kids: list[int] = []
                children[index] = kids
                nodes.append(Node(path, inode, ino, parent, kids))
            else:
                nodes.append(Node(path, inode, ino, parent))
            index_of[path] = index
        self.nodes = nodes
        self.inodes = inodes  # inodes[ino - 1]
        self.nlink = nlink
        # index_of is dropped here: a dict over every path costs ~50 bytes an entry
        # for the whole build, and writers look up a path or two (see find).

    def find(self, path: bytes) -> int | None:
        """The index of the node at image path `path`, or None; walks the tree from
        the root (meant for a lookup or two, not for every entry)."""
        index = 0
        for part in split_path(path):
            for child in self.nodes[index].children:
                if self.nodes[child].name == part:
                    index = child
                    break
            else:
                return None
        return index

    def names(self) -> list[bytes]:
        """Every node's name (Node.name), in node order, in one pass: for writers
        that store them all (b"" for the root)."""
        return [path[path.rfind(b"/") + 1 :] for path in [node.path for node in self.nodes]]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __len__(self) -> int:
        return len(self.nodes)

    def newest_mtime_ns(self) -> int:
        return max((inode.mtime_ns for inode in self.inodes), default=0)

    def postorder(self) -> list[int]:
        """Node indexes, children before their directory (root last)."""
        order: list[int] = []
        stack: list[tuple[int, bool]] = [(0, False)]
        while stack:
            index, expanded = stack.pop()
            node = self.nodes[index]
            if expanded or not node.children:
                order.append(index)
                continue
            stack.append((index, True))
            for child in reversed(node.children):
                stack.append((child, False))
        return order
