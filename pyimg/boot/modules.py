"""Kernel modules: find them in a module tree, read what each one needs from its
`.modinfo` ELF section, and resolve a request into the modules to load, in order.

Debian's kernel packages ship no `modules.dep` (depmod makes it at install time),
so dependencies come from the modules themselves: `.modinfo` is a section of
NUL-separated `key=value` strings that modpost writes into every module
(`depends=` the modules whose symbols it uses, `softdep=pre: A B post: C`, `alias=`,
`name=`, `vermagic=`).  We read it with a small ELF section reader (below), not
pyelftools and not depmod; docs/boot.md says why (measured: ~60 us a module against
~3.4 ms with pyelftools; depmod needs a writable copy of the tree).

Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed in memory to
be read, and stored decompressed in the initramfs (busybox insmod cannot read zstd).
Names are normalised `-` -> `_` (the kernel does the same); `modules.builtin` and
`modules.builtin.modinfo` say what is built in: a request for it needs no loading.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import json
import lzma
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard

from ..errors import BootError

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# Where depmod looks first when a name is in several places (depmod.d's default search).
_PRIORITY = ("updates", "extra", "kernel")


def normalize(name: str) -> str:
    """The kernel's spelling of a module name: virtio-blk -> virtio_blk."""
    return name.replace("-", "_")


@dataclass(frozen=True, slots=True)
class Module:
    """One loadable module, as its .modinfo describes it."""

    name: str  # normalised
    path: Path  # the file in the module tree (maybe compressed)
    depends: tuple[str, ...] = ()  # normalised module names, as modpost listed them
    softdep_pre: tuple[str, ...] = ()  # names or aliases to load before it (if found)
    softdep_post: tuple[str, ...] = ()  # ... and after it
    aliases: tuple[str, ...] = ()
    vermagic: str = ""

    def read(self) -> bytes:
        """The module's ELF bytes (decompressed)."""
        return read_module_file(self.path)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a request needs: `modules` in an order insmod can load them (every
    module after all its `depends=` and `softdep=pre:`), `builtin` the requested or
    needed names the kernel already has, `missing_softdeps` the soft dependencies
    that are nowhere (kmod skips those too: they are optional)."""

    modules: tuple[Module, ...]
    builtin: tuple[str, ...] = ()
    missing_softdeps: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


# -- reading modules --------------------------------------------------------------------


def read_module_file(path: Path) -> bytes:
    """A module's bytes, decompressed according to its suffix."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BootError(f"cannot read the module: {exc.strerror}", path) from exc
    name = path.name
    try:
        if name.endswith(".xz"):
            return lzma.decompress(raw)
        if name.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        if name.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as exc:
        raise BootError(f"cannot decompress the module: {exc}", path) from exc
    return raw


def elf_section(data: bytes | Callable[[int, int], bytes], wanted: bytes) -> bytes | None:
    """The bytes of the ELF section named `wanted`, or None; BootError for a file
    that is not ELF.  `data` is the whole file, or a function reading (offset, size)
    of it: only the ELF header, the section header table, the section name table and
    the section itself are read (System V gABI; 32/64-bit, either byte order)."""
    read = data if callable(data) else (lambda offset, size: data[offset : offset + size])
    head = read(0, 64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        raise BootError("not an ELF file")
    end = "<" if head[5] == 1 else ">"
    try:
        if head[4] == 2:
            (shoff,) = struct.unpack_from(end + "Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", head, 0x3A)
            entry = struct.Struct(end + "IIQQQQ")  # name, type, flags, addr, offset, size
        else:
            (shoff,) = struct.unpack_from(end + "I", head, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", head, 0x2E)
            entry = struct.Struct(end + "IIIIII")
        table = read(shoff, shentsize * shnum)
        sections = [entry.unpack_from(table, i * shentsize) for i in range(shnum)]
        names = read(sections[shstrndx][4], sections[shstrndx][5])
        for name_at, _type, _flags, _addr, offset, size in sections:
            if names[name_at : names.index(b"\0", name_at)] == wanted:
                section = read(offset, size)
                if len(section) != size:
                    raise BootError("ELF section past the end of the file")
                return section
    except (struct.error, IndexError, ValueError) as exc:
        raise BootError(f"malformed ELF file: {exc}") from exc
    return None


def read_modinfo(path: Path) -> bytes | None:
    """A module file's .modinfo section: an uncompressed module is read only where
    needed (4 small reads), a compressed one decompressed whole."""
    if not path.name.endswith(".ko"):
        return elf_section(read_module_file(path), b".modinfo")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BootError(f"cannot read the module: {exc.strerror}", path) from exc
    try:
        return elf_section(lambda offset, size: os.pread(fd, size, offset), b".modinfo")
    except OSError as exc:
        raise BootError(f"cannot read the module: {exc.strerror}", path) from exc
    finally:
        os.close(fd)


def parse_modinfo(section: bytes) -> list[tuple[str, str]]:
    """`.modinfo` as (key, value) pairs in file order (keys repeat: alias, softdep)."""
    out: list[tuple[str, str]] = []
    for item in section.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out.append((key.decode("ascii", "replace"), value.decode("utf-8", "replace")))
    return out


def parse_softdep(value: str) -> tuple[list[str], list[str]]:
    """'pre: a b post: c' -> (pre, post).  Words before any 'pre:'/'post:' mark are
    ignored, as kmod ignores them (cifs writes such softdeps)."""
    pre: list[str] = []
    post: list[str] = []
    target: list[str] | None = None
    for word in value.split():
        if word == "pre:":
            target = pre
        elif word == "post:":
            target = post
        elif target is not None:
            target.append(word)
    return pre, post


def module_from_file(path: Path) -> Module:
    try:
        section = read_modinfo(path)
    except BootError as exc:
        if exc.path is not None:
            raise
        raise BootError(f"not a kernel module: {exc.reason}", path) from None
    if section is None:
        raise BootError("not a kernel module: no .modinfo section", path)
    depends: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    aliases: list[str] = []
    name = module_name(path)
    vermagic = ""
    for key, value in parse_modinfo(section):
        if key == "depends":
            depends += [normalize(d) for d in value.split(",") if d]
        elif key == "softdep":
            p, q = parse_softdep(value)
            pre += p
            post += q
        elif key == "alias":
            aliases.append(value)
        elif key == "name" and value:
            name = normalize(value)
        elif key == "vermagic":
            vermagic = value.strip()
    return Module(name, path, tuple(depends), tuple(pre), tuple(post), tuple(aliases), vermagic)


def module_name(path: Path | str) -> str:
    """virtio-rng.ko.xz -> virtio_rng."""
    base = os.path.basename(path)
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return normalize(base[: -len(suffix)])
    return normalize(base)


# -- the module tree ---------------------------------------------------------------------


def find_module_dir(path: str | os.PathLike[str]) -> Path:
    """The module tree `lib/modules/VERSION` from that directory itself, or from a
    root holding exactly one `lib/modules/VERSION` (an extracted kernel package)."""
    root = Path(path)
    if not root.is_dir():
        raise BootError("no such module directory", root)
    if (root / "modules.builtin").is_file() or (root / "kernel").is_dir():
        return root
    base = root / "lib" / "modules"
    if not base.is_dir() and (root / "usr" / "lib" / "modules").is_dir():
        base = root / "usr" / "lib" / "modules"
    versions = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if len(versions) == 1:
        return versions[0]
    if versions:
        names = ", ".join(p.name for p in versions)
        raise BootError(f"several kernels' modules here ({names}): name lib/modules/VERSION itself", root)
    raise BootError("not a kernel module tree (no modules.builtin, no kernel/ directory)", root)


@dataclass
class ModuleTree:
    """A kernel's module tree (`lib/modules/VERSION`): module files found by name,
    builtins from `modules.builtin*`, .modinfo read on demand (and each file once)."""

    root: Path
    files: dict[str, str] = field(default_factory=dict)  # name -> path, of the modules found so far
    builtin: set[str] = field(default_factory=set)
    builtin_aliases: dict[str, str] = field(default_factory=dict)
    _modules: dict[str, Module] = field(default_factory=dict)
    _aliases: dict[str, list[str]] | None = None
    _alias_globs: list[tuple[str, str]] = field(default_factory=list)
    _listed: dict[str, str] = field(default_factory=dict)  # name -> path relative to root, from modules.order
    _walked: bool = False

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModuleTree:
        tree = cls(find_module_dir(path))
        tree._scan()
        return tree

    @property
    def version(self) -> str:
        """The kernel release the tree is for (its directory's name)."""
        return self.root.name

    def _scan(self) -> None:
        # modules.order (shipped in the package) lists every in-tree module: one
        # file read instead of walking ~250 directories (15 ms of CPU).  The walk
        # still happens when a name is not listed there, when every module is
        # needed (aliases), or when out-of-tree directories may override it.
        order = self.root / "modules.order"
        overrides = any((self.root / top).is_dir() for top in _PRIORITY[:2])
        if order.is_file() and not overrides:
            for line in order.read_text(errors="replace").splitlines():
                rel = line.strip()
                if rel.endswith(".ko"):
                    self._listed.setdefault(module_name(rel), rel)
        else:
            self._walk()
        builtin = self.root / "modules.builtin"
        if builtin.is_file():
            for line in builtin.read_text(errors="replace").splitlines():
                if line.strip():
                    self.builtin.add(module_name(line.strip()))
        modinfo = self.root / "modules.builtin.modinfo"
        if modinfo.is_file():
            for item in modinfo.read_bytes().split(b"\0"):
                key, sep, value = item.partition(b"=")
                module, dot, field_name = key.partition(b".")
                if sep and dot and field_name == b"alias":
                    self.builtin_aliases.setdefault(
                        value.decode(errors="replace"), normalize(module.decode())
                    )
        if not self._listed and not self.files and not self.builtin:
            raise BootError("no kernel modules here (no .ko files, no modules.builtin)", self.root)

    def _walk(self) -> None:
        """Every module file under the root (plain strings, not Path objects:
        pathlib cost ~60 us a file, 70 ms for a whole kernel)."""
        if self._walked:
            return
        self._walked = True
        found: dict[str, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(str(self.root)):
            dirnames.sort()
            for filename in filenames:
                if filename.endswith(SUFFIXES):
                    found.setdefault(module_name(filename), []).append(os.path.join(dirpath, filename))
        for name, paths in found.items():
            self.files[name] = paths[0] if len(paths) == 1 else min(paths, key=self._rank)

    def _path(self, name: str, walk: bool = True) -> str | None:
        """The file of the module `name` (normalised), or None; walk=False: only if
        modules.order names it (no walk of the tree for a name it does not)."""
        path = self.files.get(name)
        if path is not None or self._walked:
            return path
        rel = self._listed.get(name)
        if rel is not None:
            for suffix in ("", ".xz", ".zst", ".gz"):  # the order names the .ko; the file may be compressed
                candidate = os.path.join(self.root, rel + suffix)
                if os.path.isfile(candidate):
                    self.files[name] = candidate
                    return candidate
        if not walk:
            return None
        self._walk()
        return self.files.get(name)

    def all_files(self) -> dict[str, str]:
        """name -> path of every module in the tree."""
        self._walk()
        return dict(self.files)

    def _rank(self, path: str) -> tuple[int, str]:
        top = os.path.relpath(path, self.root).split(os.sep)[0]
        return (_PRIORITY.index(top) if top in _PRIORITY else len(_PRIORITY), path)

    def module(self, name: str) -> Module:
        """The module of that (file) name; BootError if there is none."""
        name = normalize(name)
        module = self._modules.get(name)
        if module is None:
            path = self._path(name)
            if path is None:
                raise BootError(f"no module {name!r} in the module tree", self.root)
            module = self._modules[name] = module_from_file(Path(path))
        return module

    def is_builtin(self, name: str) -> bool:
        return normalize(name) in self.builtin

    def lookup(self, request: str) -> tuple[list[str], bool]:
        """(module names, built in?) for a name or an alias.  A module file of that
        name first, then a builtin or a builtin's alias, then the aliases of every
        module (read once, only when a request needs them).  ([], False): nowhere."""
        name = normalize(request)
        if self._path(name, walk=False) is not None:
            return [name], False
        if name in self.builtin or request in self.builtin_aliases:
            return [], True
        if self._path(name) is not None:  # a module modules.order does not list
            return [name], False
        aliases = self._alias_index()
        if request in aliases:
            return sorted(aliases[request]), False
        matches = sorted({mod for pattern, mod in self._alias_globs if fnmatch.fnmatchcase(request, pattern)})
        return matches, False

    def _alias_index(self) -> dict[str, list[str]]:
        """alias -> module names, over every module's alias= (glob aliases kept
        apart).  Reading 4,000 modules' .modinfo costs ~0.4 s of CPU (the generic
        kernel, whose ext4 asks for the alias crypto-crc32c), so a tree of many
        modules keeps its index in the user's cache, keyed by every module file's
        path, size and mtime (~0.07 s to check)."""
        if self._aliases is None:
            files = self.all_files()
            key = _tree_key(self.root, files) if len(files) >= ALIAS_CACHE_MIN else None
            cached = _load_alias_index(key) if key else None
            if cached is not None:
                self._aliases, self._alias_globs = cached
            else:
                exact: dict[str, list[str]] = {}
                for name in sorted(files):
                    for alias in self.module(name).aliases:
                        if any(c in alias for c in "*?["):
                            self._alias_globs.append((alias, name))
                        else:
                            exact.setdefault(alias, []).append(name)
                self._aliases = exact
                if key:
                    _store_alias_index(key, exact, self._alias_globs)
        return self._aliases

    def resolve(self, requests: Iterable[str]) -> Resolution:
        """Every module the requests need, in load order.

        Depth first, in the order of the requests and of each module's lists:
        a module's `softdep=pre:` modules, then its `depends=`, then the module,
        then its `softdep=post:` modules.  A request or a `depends=` entry that is
        nowhere is a BootError naming the chain that needed it; a missing softdep is
        recorded and skipped."""
        order: list[Module] = []
        done: set[str] = set()
        active: set[str] = set()
        builtin: list[str] = []
        missing_soft: list[str] = []

        def need(request: str, chain: Sequence[str], soft: bool) -> None:
            names, is_builtin = self.lookup(request)
            if is_builtin:
                if request not in builtin:
                    builtin.append(request)
                return
            if not names:
                if soft:
                    if request not in missing_soft:
                        missing_soft.append(request)
                    return
                raise BootError(_missing(request, chain), self.root)
            for name in names:
                visit(name, chain)

        def visit(name: str, chain: Sequence[str]) -> None:
            if name in done or name in active:  # active: a softdep cycle; depends= never cycle
                return
            active.add(name)
            module = self.module(name)
            here = [*chain, name]
            for dep in module.softdep_pre:
                need(dep, here, True)
            for dep in module.depends:
                need(dep, here, False)
            active.discard(name)
            done.add(name)
            order.append(module)
            for dep in module.softdep_post:
                need(dep, here, True)

        for request in requests:
            need(request, [], False)
        return Resolution(tuple(order), tuple(builtin), tuple(missing_soft))


ALIAS_CACHE_MIN = 256  # smaller trees are read in a few ms: no cache file for them
ALIAS_CACHE_VERSION = 1


def _tree_key(root: Path, files: Mapping[str, str]) -> str | None:
    digest = blake3.blake3(f"{ALIAS_CACHE_VERSION}\0{root}\0".encode())
    try:
        for name in sorted(files):
            st = os.stat(files[name])
            digest.update(f"{name}\0{files[name]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()


def _alias_cache_file(key: str) -> Path:
    from .kernel import cache_dir

    return cache_dir() / "module-aliases" / f"{key}.json"


def _load_alias_index(key: str) -> tuple[dict[str, list[str]], list[tuple[str, str]]] | None:
    try:
        record = json.loads(_alias_cache_file(key).read_text())
        return dict(record["exact"]), [(pattern, name) for pattern, name in record["globs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_alias_index(key: str, exact: dict[str, list[str]], globs: list[tuple[str, str]]) -> None:
    """Best effort: a cache that cannot be written is only slower next time."""
    target = _alias_cache_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".tmp-", delete=False) as f:
            json.dump({"exact": exact, "globs": globs}, f)
        os.replace(f.name, target)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(f.name)


def _missing(request: str, chain: Sequence[str]) -> str:
    if not chain:
        return f"no module {request!r} (not a module file, not built in, no module's alias)"
    return (
        f"module {chain[-1]!r} depends on {request!r}, which is not in the module tree ({' -> '.join(chain)})"
    )


def resolve_modules(modules_dir: str | os.PathLike[str], requests: Iterable[str]) -> Resolution:
    """The modules `requests` (names or aliases) need from the tree at `modules_dir`
    (lib/modules/VERSION, or a root holding one), in load order."""
    return ModuleTree.open(modules_dir).resolve(requests)
