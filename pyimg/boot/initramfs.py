"""The boot initramfs: busybox, the modules a root device, a file system and
(optionally) the network need, and a small init (init.sh) that loads them, mounts
the root read-only and switch_roots into it.  docs/boot.md describes it.

    result = build_initramfs("initrd.img", modules="lib/modules/6.1.0-57-cloud-amd64",
                             root_fs="squashfs")

Contents (all root-owned, every mtime the epoch):
  /init                    the script (pyimg/boot/init.sh)
  /bin/busybox, /bin/APPLET -> busybox    (the applets the init uses, and a few more)
  /lib/modules/NAME.ko     each module, decompressed; /lib/modules/load-order
  /pyimg/initramfs.conf    the file system it was built for (rootfstype= overrides)
  /dev/console, /proc, /sys, /newroot
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import blake3

from ..errors import BootError, SpecError
from ..formats.cpio_options import CpioOptions, parse_cpio_compression
from ..tree import Kind
from .archive import ArchiveBuilder
from .config import config_initrd
from .kernel import check_bzimage
from .modules import ModuleTree, Resolution

ROOT_FILESYSTEMS: Mapping[str, tuple[str, ...]] = {"squashfs": ("squashfs",), "ext4": ("ext4",)}
ROOT_DEVICES: Mapping[str, tuple[str, ...]] = {
    "virtio-blk": ("virtio_pci", "virtio_blk"),
    "virtio-scsi": ("virtio_pci", "virtio_scsi", "sd_mod"),
    "nvme": ("nvme",),
    "none": (),  # the caller names the modules itself (extra_modules)
}
NETWORK_MODULES = ("virtio_pci", "virtio_net")
DEFAULT_COMPRESSION = "zstd"
# The applets the init runs, and a few for a pyimg.shell session.
APPLETS = (
    "sh", "mount", "umount", "insmod", "switch_root", "poweroff", "reboot", "sleep", "cat", "mkdir",
    "cp", "chmod", "findfs", "ls", "dmesg", "ln", "rm", "echo", "uname", "lsmod", "ps", "ip",
)  # fmt: skip
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True, slots=True)
class InitramfsResult:
    output: str
    size: int
    digest: str  # BLAKE3 of the file, hex
    modules: tuple[str, ...]  # in load order
    optional: tuple[str, ...]  # of those, the ones only softdeps asked for
    builtin: tuple[str, ...]  # requested or needed, already in the kernel
    missing_softdeps: tuple[str, ...]
    busybox: str
    seconds: float


def modules_for(
    root_fs: str, root_device: str = "virtio-blk", network: bool = False, extra: Iterable[str] = ()
) -> list[str]:
    """The module requests (names or aliases) a boot needs, in request order."""
    if root_fs not in ROOT_FILESYSTEMS:
        known = " or ".join(ROOT_FILESYSTEMS)
        raise BootError(f"the initramfs cannot mount a {root_fs!r} root (it mounts {known})")
    if root_device not in ROOT_DEVICES:
        raise BootError(f"unknown root device {root_device!r} (choose {', '.join(ROOT_DEVICES)})")
    requests = [*ROOT_DEVICES[root_device], *ROOT_FILESYSTEMS[root_fs]]
    if network:
        requests += NETWORK_MODULES
    requests += list(extra)
    return list(dict.fromkeys(requests))


def detect_root_fs(image: str | os.PathLike[str]) -> str:
    """The root format of an image file, by its magic: "squashfs" ("hsqs" at 0) or
    "ext4" (0xEF53 at 1080, the superblock's s_magic); a BootError naming what it is
    otherwise (a cpio archive, a compressed file, something else)."""
    path = Path(image)
    try:
        with path.open("rb") as f:
            head = f.read(2048)
    except OSError as exc:
        raise BootError(f"cannot read the image: {exc.strerror}", path) from exc
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext4"
    what = "a cpio archive" if head[:6] in (b"070701", b"070702") else "not squashfs or ext4"
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":
        what = "a compressed file"
    raise BootError(f"the initramfs cannot mount this image: {what} (it mounts squashfs or ext4)", path)


def find_busybox(busybox: str | os.PathLike[str] | None = None) -> Path:
    """A static busybox: the one given, else Debian's busybox-static (/bin/busybox)."""
    if busybox is not None:
        candidates = [Path(busybox)]
    else:
        found = shutil.which("busybox")
        candidates = [Path(p) for p in (*BUSYBOX_PATHS, *([found] if found else []))]
    for path in candidates:
        if path.is_file():
            return path
    if busybox is not None:
        raise BootError("no such busybox", os.fspath(busybox))
    raise BootError("no busybox found (install Debian's busybox-static, or give --busybox PATH)")


def check_busybox(path: Path, data: bytes) -> None:
    """Refuse a busybox the initramfs could not run: not ELF, dynamically linked
    (the initramfs has no libc), or without an applet the init uses."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise BootError("busybox is not an ELF executable", path)
    if _has_interpreter(data):
        raise BootError(
            "busybox is dynamically linked; the initramfs needs a static one (busybox-static)", path
        )
    missing = [a for a in APPLETS if a not in busybox_applets(data)]
    if missing:
        raise BootError(f"busybox lacks the applets {', '.join(missing)}", path)


def busybox_applets(data: bytes) -> set[str]:
    """The applet names a busybox binary holds: its sorted, NUL-separated name table
    starts with "[" and "[[" (one search instead of one per applet: 2 MB each)."""
    start = data.find(b"\0[\0[[\0")
    if start < 0:
        return set()
    names = set()
    for raw in data[start + 1 : start + 1 + 16384].split(b"\0"):
        if not raw or not all(33 <= c < 127 for c in raw):
            break
        names.add(raw.decode())
    return names


def _has_interpreter(data: bytes) -> bool:
    """Whether an ELF file has a PT_INTERP program header (a dynamic executable)."""
    end = "<" if data[5] == 1 else ">"
    try:
        if data[4] == 2:
            (phoff,) = struct.unpack_from(end + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
        else:
            (phoff,) = struct.unpack_from(end + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
        return any(struct.unpack_from(end + "I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))
    except struct.error:
        raise BootError("busybox: malformed ELF program headers") from None


def init_script() -> bytes:
    """The init, as shipped in the package (pyimg/boot/init.sh)."""
    return resources.files("pyimg.boot").joinpath("init.sh").read_bytes()


def optional_modules(tree: ModuleTree, requests: Sequence[str], resolution: Resolution) -> set[str]:
    """Modules of the resolution that only softdeps brought in: not the requests'
    modules, nor anything those reach through depends=.  The init loads them but
    goes on if one fails (a CPU-specific crypto driver on a CPU without the feature)."""
    required: set[str] = set()
    stack = [name for request in requests for name in tree.lookup(request)[0]]
    while stack:
        name = stack.pop()
        if name not in required:
            required.add(name)
            stack.extend(tree.module(name).depends)
    return {m.name for m in resolution.modules} - required


def build_initramfs(
    output: str | os.PathLike[str],
    modules: str | os.PathLike[str],
    root_fs: str = "squashfs",
    *,
    root_device: str = "virtio-blk",
    network: bool = False,
    extra_modules: Iterable[str] = (),
    kernel: str | os.PathLike[str] | None = None,
    busybox: str | os.PathLike[str] | None = None,
    compression: str = DEFAULT_COMPRESSION,
    config: Mapping[str, str] | None = None,
    epoch: int | None = None,
) -> InitramfsResult:
    """Build the boot initramfs at `output` (atomically).

    modules: the kernel's module tree (lib/modules/VERSION, or a root holding one).
    root_fs: squashfs or ext4; root_device: virtio-blk (default), virtio-scsi, nvme
    or none; network: add virtio_net; extra_modules: more names or aliases.
    kernel: a bzImage to check against the modules (its release must match theirs).
    compression: none, gzip[:LEVEL] or zstd[:LEVEL] (default zstd:3).
    config: KEY=VALUE boot config, appended as its own archive (config_initrd) --
    usually given per boot instead, with append_initrds.
    epoch: every mtime (default SOURCE_DATE_EPOCH, else 0): the bytes depend only on
    the inputs (busybox, the modules, the options) and pyimg's version.
    """
    started = time.monotonic()
    try:
        options = parse_cpio_compression(compression, "compression")
    except SpecError as exc:
        raise BootError(exc.reason) from None
    requests = modules_for(root_fs, root_device, network, extra_modules)
    tree = ModuleTree.open(modules)
    resolution = tree.resolve(requests)
    optional = optional_modules(tree, requests, resolution)
    if kernel is not None:
        _check_kernel_matches(kernel, tree, resolution)
    box = find_busybox(busybox)
    box_data = _read(box)
    check_busybox(box, box_data)
    when = _epoch(epoch)
    with ArchiveBuilder(when) as archive:
        for directory in ("bin", "dev", "lib/modules", "newroot", "proc", "sys", "pyimg"):
            archive.directory(directory)
        archive.device("dev/console", Kind.CHAR, 5, 1, 0o600)
        archive.data("init", init_script(), 0o755)
        archive.host_file("bin/busybox", box, 0o755)
        for applet in APPLETS:
            archive.symlink(f"bin/{applet}", "busybox")
        order = []
        for module in resolution.modules:
            archive.data(f"lib/modules/{module.name}.ko", module.read(), 0o644)
            order.append(f"{module.name} {'optional' if module.name in optional else 'required'}\n")
        archive.data("lib/modules/load-order", "".join(order).encode())
        archive.data("pyimg/initramfs.conf", f"_pyimg_fstype={root_fs}\n".encode())
        archive.write(output, options)
    if config:
        _append(output, config_initrd(config, epoch=when))
    size = os.path.getsize(output)
    return InitramfsResult(
        output=os.fspath(output),
        size=size,
        digest=blake3.blake3(Path(output).read_bytes()).hexdigest(),
        modules=tuple(resolution.names),
        optional=tuple(m for m in resolution.names if m in optional),
        builtin=resolution.builtin,
        missing_softdeps=resolution.missing_softdeps,
        busybox=str(box),
        seconds=time.monotonic() - started,
    )


def _append(output: str | os.PathLike[str], extra: bytes) -> None:
    from .config import append_initrds

    append_initrds(output, [output, extra])


def _check_kernel_matches(kernel: str | os.PathLike[str], tree: ModuleTree, resolution: Resolution) -> None:
    image = check_bzimage(kernel)
    for module in resolution.modules:
        built_for = module.vermagic.split(" ", 1)[0]
        if image.release and built_for and built_for != image.release:
            raise BootError(
                f"module {module.name} is built for kernel {built_for}, the kernel is {image.release}",
                module.path,
            )
    if image.release and image.release != tree.version and not resolution.modules:
        raise BootError(f"the module tree is for {tree.version}, the kernel is {image.release}", tree.root)


def _epoch(epoch: int | None) -> int:
    if epoch is not None:
        if epoch < 0:
            raise BootError(f"epoch {epoch} is negative")
        return epoch
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    try:
        return int(value) if value else 0
    except ValueError:
        raise BootError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BootError(f"cannot read: {exc.strerror}", path) from exc


__all__ = [
    "DEFAULT_COMPRESSION",
    "ROOT_DEVICES",
    "ROOT_FILESYSTEMS",
    "CpioOptions",
    "InitramfsResult",
    "build_initramfs",
    "check_busybox",
    "detect_root_fs",
    "find_busybox",
    "init_script",
    "modules_for",
]
