"""Fixtures for boot tests: Debian's cloud kernel (fetched once into a cache), a boot
initramfs, busybox root trees, and a check that no QEMU outlives a test (by pid)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.oracles import IN_CI, require_tool

KERNEL_PACKAGE = "linux-image-6.1.0-57-cloud-amd64"
KERNEL_VERSION = "6.1.0-57-cloud-amd64"

# What a virtio root needs, in load order (brief §5), and the network for the example.
ROOT_MODULES = [
    "kernel/drivers/virtio/virtio_ring",
    "kernel/drivers/virtio/virtio",
    "kernel/drivers/virtio/virtio_pci_modern_dev",
    "kernel/drivers/virtio/virtio_pci_legacy_dev",
    "kernel/drivers/virtio/virtio_pci",
    "kernel/drivers/block/virtio_blk",
    "kernel/fs/squashfs/squashfs",
    "kernel/net/core/failover",
    "kernel/drivers/net/net_failover",
    "kernel/drivers/net/virtio_net",
]


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path  # lib/modules/VERSION


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyimg" / "test-kernel"


def fetch_kernel(dest: Path) -> Kernel:
    """apt-get download + dpkg -x of Debian's cloud kernel into dest (once)."""
    vmlinuz = dest / "boot" / f"vmlinuz-{KERNEL_VERSION}"
    modules = dest / "lib" / "modules" / KERNEL_VERSION
    if vmlinuz.is_file() and modules.is_dir():
        return Kernel(vmlinuz, modules)
    apt = require_tool("apt-get")
    dpkg = require_tool("dpkg")
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc = subprocess.run(
        [apt, "download", KERNEL_PACKAGE], cwd=work, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        message = f"cannot download {KERNEL_PACKAGE}: {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    (deb,) = work.glob("*.deb")
    subprocess.run([dpkg, "-x", str(deb), str(work / "root")], check=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(work / "root", dest)
    shutil.rmtree(work, ignore_errors=True)
    return Kernel(vmlinuz, modules)


@pytest.fixture(scope="session")
def qemu_bin() -> str:
    return require_tool("qemu-system-x86_64")


@pytest.fixture(scope="session")
def kernel(qemu_bin: str) -> Kernel:
    given = os.environ.get("PYIMG_TEST_KERNEL_ROOT")
    return fetch_kernel(Path(given) if given else _cache_dir() / KERNEL_VERSION)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"; done
root=; fstype=; init=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root=${arg#root=} ;;
    rootfstype=*) fstype=${arg#rootfstype=} ;;
    init=*) init=${arg#init=} ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
mkdir -p /newroot
mount -o ro -t "$fstype" "$root" /newroot || { echo "initramfs: cannot mount $root"; exit 1; }
if [ -d /newroot/run ]; then
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
  if [ -d /run/pyimg ]; then cp -a /run/pyimg /newroot/run/; fi
fi
umount /sys; umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
"""


def build_test_initramfs(kernel: Kernel, dest: Path) -> Path:
    """A boot initramfs made by hand with busybox-static and cpio -o -H newc (until the
    initramfs branch's builder is merged): loads the modules, mounts the root read-only,
    puts the config cpio's run/pyimg/ into the root's /run, switch_roots to init=."""
    cpio = require_tool("cpio")
    busybox = require_tool("busybox")
    tree = dest.with_suffix(".d")
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "newroot", "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    for module in ROOT_MODULES:
        target = tree / "lib" / "modules" / (module + ".ko")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kernel.modules / (module + ".ko"), target)
    (tree / "modules.list").write_text("\n".join(ROOT_MODULES) + "\n")
    (tree / "init").write_text(INIT)
    (tree / "init").chmod(0o755)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with open(dest, "wb") as out:
        subprocess.run(
            [cpio, "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=tree,
            input="\n".join(names).encode() + b"\n",
            stdout=out,
            check=True,
        )
    return dest


@pytest.fixture(scope="session")
def initrd(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "boot.cpio")


def make_busybox_root(root: Path, init_script: str) -> Path:
    """A busybox root: /bin/busybox, /bin/sh, the mount points, /sbin/init = init_script."""
    busybox = require_tool("busybox")
    for d in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    init = root / "sbin" / "init"
    init.write_text(init_script)
    init.chmod(0o755 | stat.S_IFREG)
    return root


def _alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def assert_gone(pid: int | None) -> None:
    assert pid is not None and pid > 0
    assert not _alive(pid), f"QEMU (pid {pid}) still runs"


@pytest.fixture
def no_qemu_left() -> Iterator[list[int]]:
    """Tests append QEMU pids here; after the test each must be gone."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        assert_gone(pid)
