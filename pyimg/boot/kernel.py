"""Kernels: check that a file is an x86 bzImage, and fetch Debian's kernel package
into the user's cache (never installed: `apt-get download` + `dpkg -x`).

The cache: `$XDG_CACHE_HOME/pyimg/kernels/PACKAGE_VERSION/` (or `~/.cache/pyimg/...`),
one directory per package version, holding the extracted package and a
`kernel.json` that names the vmlinuz and the module tree.  A fetch extracts into a
temporary directory beside it and renames it into place, so two fetches at once
never see half a kernel: the second rename loses and that fetch uses the winner's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BootError

FLAVOURS = ("cloud", "generic")
KERNEL_JSON = "kernel.json"

# The x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header of the
# real-mode part of a bzImage.
BOOT_FLAG_AT = 0x1FE  # 0xAA55
HEADER_AT = 0x202  # "HdrS"
VERSION_AT = 0x206  # boot protocol version, u16
KERNEL_VERSION_AT = 0x20E  # u16 pointer to the version string, minus 0x200
LOADFLAGS_AT = 0x211  # bit 0: LOADED_HIGH, the protected-mode code loads at 1 MiB (a bzImage)


@dataclass(frozen=True, slots=True)
class KernelImage:
    path: Path
    release: str  # "6.1.0-57-cloud-amd64": what `uname -r` says, the module tree's name
    banner: str  # the whole version string the header points at
    protocol: tuple[int, int]  # boot protocol (major, minor)


def check_bzimage(path: str | os.PathLike[str]) -> KernelImage:
    """The kernel at `path` if it is an x86 bzImage; a BootError saying what it is
    not otherwise (missing, too short, no boot sector, no "HdrS" setup header, an
    old zImage)."""
    kernel = Path(path)
    try:
        with kernel.open("rb") as f:
            head = f.read(0x8000)
    except FileNotFoundError:
        raise BootError("no such kernel file", kernel) from None
    except IsADirectoryError:
        raise BootError("the kernel is a directory, not a bzImage file", kernel) from None
    except OSError as exc:
        raise BootError(f"cannot read the kernel: {exc.strerror}", kernel) from exc
    if len(head) < 0x264 or head[BOOT_FLAG_AT : BOOT_FLAG_AT + 2] != b"\x55\xaa":
        raise BootError(
            "not a bzImage: no boot sector signature 0x55AA at 0x1FE (is it vmlinux or gzip'd?)", kernel
        )
    if head[HEADER_AT : HEADER_AT + 4] != b"HdrS":
        raise BootError('not a bzImage: no "HdrS" setup header at 0x202', kernel)
    (version,) = struct.unpack_from("<H", head, VERSION_AT)
    if version < 0x0200 or not head[LOADFLAGS_AT] & 1:
        raise BootError(f"a zImage (boot protocol {version >> 8}.{version & 0xFF}), not a bzImage", kernel)
    (pointer,) = struct.unpack_from("<H", head, KERNEL_VERSION_AT)
    banner = ""
    at = pointer + 0x200
    if pointer and at < len(head):
        end = head.find(b"\0", at)
        banner = head[at : end if end >= 0 else len(head)].decode("ascii", "replace")
    return KernelImage(kernel, banner.split(" ", 1)[0], banner, (version >> 8, version & 0xFF))


@dataclass(frozen=True, slots=True)
class KernelFiles:
    """A fetched kernel: what `pyimg kernel fetch` prints."""

    vmlinuz: Path
    modules: Path  # lib/modules/RELEASE
    release: str
    package: str  # linux-image-6.1.0-57-cloud-amd64
    package_version: str  # 6.1.192-3
    flavour: str

    def as_dict(self) -> dict[str, str]:
        return {
            "vmlinuz": str(self.vmlinuz),
            "modules": str(self.modules),
            "release": self.release,
            "package": self.package,
            "package_version": self.package_version,
            "flavour": self.flavour,
        }


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/pyimg`, else `~/.cache/pyimg` (XDG base directory spec: a
    relative XDG_CACHE_HOME is ignored)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pyimg"


def meta_package(flavour: str, arch: str) -> str:
    """Debian's meta package that always depends on the newest kernel of a flavour."""
    if flavour not in FLAVOURS:
        raise BootError(f"unknown kernel flavour {flavour!r} (choose {' or '.join(FLAVOURS)})")
    return f"linux-image-cloud-{arch}" if flavour == "cloud" else f"linux-image-{arch}"


def run(command: Sequence[str], cwd: str | None = None) -> str:
    """Run a tool (apt-cache, apt-get, dpkg), its stdout; BootError with its last
    lines of stderr on failure.  Tests replace this function."""
    try:
        proc = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        raise BootError(f"{command[0]} is not installed (pyimg kernel fetch needs apt and dpkg)") from None
    if proc.returncode != 0:
        tail = " / ".join(line for line in proc.stderr.strip().splitlines()[-3:] if line)
        raise BootError(f"{' '.join(command)} failed (exit {proc.returncode}): {tail or 'no message'}")
    return proc.stdout


def resolve_package(flavour: str, arch: str | None = None) -> tuple[str, str]:
    """(versioned package, its version) for a flavour, from apt's lists (no network):
    one `apt-cache show` of the meta package, whose Depends names the versioned
    package with its exact version (`linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)`).
    apt-cache takes ~3 s here (it parses the lists when there is no pkgcache.bin)."""
    arch = arch or run(["dpkg", "--print-architecture"]).strip()
    meta = meta_package(flavour, arch)
    try:
        show = run(["apt-cache", "show", "--no-all-versions", meta])
    except BootError as exc:
        raise BootError(f"apt does not know {meta} (run apt-get update first?): {exc.reason}") from None
    fields = dict(
        (key.strip(), value.strip())
        for key, sep, value in (line.partition(":") for line in show.splitlines())
        if sep
    )
    for alternative in fields.get("Depends", "").split(","):
        name, _, rest = alternative.split("|")[0].strip().partition(" ")
        if name.startswith("linux-image-"):
            version = rest.strip().removeprefix("(").removesuffix(")").strip()
            if version.startswith("="):
                return name, version[1:].strip()
            break
    raise BootError(f"apt-cache show {meta}: no 'Depends: linux-image-... (= VERSION)'")


def fetch_kernel(
    flavour: str = "cloud",
    *,
    cache: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    offline: bool = False,
) -> KernelFiles:
    """Debian's kernel of that flavour (the version apt's lists name), from the
    cache or downloaded and extracted into it.  Concurrent calls are safe.

    offline: do not ask apt at all; the kernel of that flavour fetched last (a
    BootError if the cache has none).  Saves apt-cache's ~3 s for test runs."""
    meta_package(flavour, "amd64")  # validates the flavour before running anything
    root = Path(cache) if cache is not None else cache_dir()
    kernels = root / "kernels"
    if offline:
        return _newest_cached(kernels, flavour)
    package, version = resolve_package(flavour, arch)
    final = kernels / f"{package}_{version.replace(':', '%3a')}"
    cached = _load(final)
    if cached is not None:
        return cached
    try:
        kernels.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BootError(f"cannot create the kernel cache: {exc.strerror}", kernels) from exc
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kernels))
    try:
        _download_and_extract(package, version, flavour, work)
        os.chmod(work, 0o755)  # mkdtemp made it 0700
        try:
            os.rename(work, final)
        except OSError:
            if _load(final) is None:  # not a lost race: something else is there
                raise
        else:
            _fsync_dir(kernels)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    loaded = _load(final)
    if loaded is None:
        raise BootError("the fetched kernel is not where it was put", final)
    return loaded


def _newest_cached(kernels: Path, flavour: str) -> KernelFiles:
    found = []
    for directory in sorted(kernels.glob("linux-image-*")) if kernels.is_dir() else []:
        files = _load(directory)
        if files is not None and files.flavour == flavour:
            found.append(((directory / KERNEL_JSON).stat().st_mtime_ns, str(directory), files))
    if not found:
        raise BootError(
            f"no {flavour} kernel in the cache (run pyimg kernel fetch without --offline)", kernels
        )
    return max(found, key=lambda item: (item[0], item[1]))[2]


def _download_and_extract(package: str, version: str, flavour: str, work: Path) -> None:
    run(["apt-get", "download", "-q", f"{package}={version}"], cwd=str(work))
    debs = sorted(work.glob("*.deb"))
    if len(debs) != 1:
        raise BootError(f"apt-get download {package} left {len(debs)} .deb files", work)
    run(["dpkg", "-x", str(debs[0]), str(work / "root")])
    debs[0].unlink()
    vmlinuz = sorted((work / "root" / "boot").glob("vmlinuz-*"))
    trees = sorted(p for p in (work / "root" / "lib" / "modules").glob("*") if p.is_dir())
    if len(vmlinuz) != 1 or len(trees) != 1:
        raise BootError(f"{package} holds {len(vmlinuz)} vmlinuz and {len(trees)} module trees, not one each")
    image = check_bzimage(vmlinuz[0])
    record = {
        "vmlinuz": str(vmlinuz[0].relative_to(work)),
        "modules": str(trees[0].relative_to(work)),
        "release": image.release or trees[0].name,
        "package": package,
        "package_version": version,
        "flavour": flavour,
    }
    (work / KERNEL_JSON).write_text(json.dumps(record, indent=1) + "\n")


def _load(directory: Path) -> KernelFiles | None:
    """The kernel a cache directory holds, or None when it holds none (yet)."""
    try:
        record = json.loads((directory / KERNEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    vmlinuz = directory / record["vmlinuz"]
    modules = directory / record["modules"]
    if not vmlinuz.is_file() or not modules.is_dir():
        return None
    return KernelFiles(
        vmlinuz, modules, record["release"], record["package"], record["package_version"], record["flavour"]
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
