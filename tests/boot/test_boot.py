"""The initramfs booted for real: Debian's cloud kernel under QEMU (TCG), a root
image built by pyimg on virtio-blk, config appended as an extra initrd.  The
guest's init prints what it sees and powers off; the failure path prints one
clear line and powers off too.  (The QEMU runner proper is `pyimg boot`'s; this
is the minimum to prove the initramfs.)"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

import pyimg
from pyimg.boot.config import append_initrds, config_initrd
from pyimg.boot.initramfs import build_initramfs, find_busybox
from pyimg.boot.kernel import KernelFiles

from ..oracles import require_tool

GUEST_INIT = """#!/bin/sh
B=/bin/busybox
$B echo "GUEST-UP pid=$$"
$B echo "ENV GREETING=[$GREETING] LINES=[$LINES_]"
for f in /run/pyimg/config/*; do
    [ -f "$f" ] && $B echo "FILE ${f##*/} $($B stat -c %a "$f") [$($B cat "$f")]"
done
$B echo "MOUNT-ROOT $($B awk '$2 == "/" {print $3, substr($4, 1, 2)}' /proc/mounts)"
$B echo "MOUNT-RUN $($B awk '$2 == "/run" {print $3}' /proc/mounts)"
$B echo GUEST-DONE
$B poweroff -f
"""


def guest_root(base: Path) -> Path:
    root = base / "root"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "etc"):
        (root / d).mkdir(parents=True)
    (root / "bin/busybox").write_bytes(find_busybox().read_bytes())
    os.chmod(root / "bin/busybox", 0o755)
    os.symlink("busybox", root / "bin/sh")
    (root / "sbin/guest-init").write_text(GUEST_INIT)
    os.chmod(root / "sbin/guest-init", 0o755)
    os.symlink("/sbin/guest-init", root / "sbin/init")  # absolute: resolved inside the new root
    return root


def boot(kernel: KernelFiles, initrd: Path, image: Path | None, append: str, timeout: int = 180) -> str:
    qemu = require_tool("qemu-system-x86_64")
    command = [
        qemu, "-machine", "q35", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet {append}",
    ]  # fmt: skip
    if image is not None:
        command += ["-drive", f"file={image},format=raw,if=virtio,readonly=on"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(
            f"the guest did not power off within {timeout} s:\n{out.decode(errors='replace')[-3000:]}"
        )
    return out.decode(errors="replace").replace("\r", "")


@pytest.fixture(scope="module")
def root_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guest_root(tmp_path_factory.mktemp("guest"))


def test_squashfs_root_with_config(tmp_path: Path, debian_kernel: KernelFiles, root_tree: Path) -> None:
    image = tmp_path / "root.sqfs"
    before = pyimg.build([str(root_tree)], str(image), owner="root").digest
    initrd = tmp_path / "initrd.img"
    build_initramfs(initrd, debian_kernel.modules, "squashfs", kernel=debian_kernel.vmlinuz)
    both = tmp_path / "both.img"
    append_initrds(both, [initrd, config_initrd({"GREETING": 'hello "$world"', "LINES_": "a\nb\n"})])
    console = boot(debian_kernel, both, image, "root=/dev/vda")
    assert "pyimg-initramfs: root /dev/vda (squashfs, read-only): switching to /sbin/init" in console, console
    assert "GUEST-UP pid=1" in console
    assert 'ENV GREETING=[hello "$world"] LINES=[a\nb]' in console
    assert 'FILE GREETING 600 [hello "$world"]' in console and "FILE LINES_ 600 [a\nb]" in console
    assert "MOUNT-ROOT squashfs ro" in console and "MOUNT-RUN tmpfs" in console
    assert "GUEST-DONE" in console
    assert pyimg.digest(str(image)).blake3 == before  # booting never touches the image


def test_ext4_root_gzip_initramfs_init_from_cmdline(
    tmp_path: Path, debian_kernel: KernelFiles, root_tree: Path
) -> None:
    image = tmp_path / "root.ext4"
    pyimg.build([str(root_tree)], str(image), format="ext4", owner="root")
    initrd = tmp_path / "initrd.img"
    build_initramfs(initrd, debian_kernel.modules, "ext4", compression="gzip")
    console = boot(debian_kernel, initrd, image, "root=/dev/vda init=/sbin/guest-init")
    assert "switching to /sbin/guest-init" in console and "MOUNT-ROOT ext4 ro" in console, console
    assert "MOUNT-RUN \n" in console  # no config: /run is left to the root's own init
    assert "FILE " not in console and "GUEST-DONE" in console


def test_failure_prints_one_line_and_powers_off(
    tmp_path: Path, debian_kernel: KernelFiles, root_tree: Path
) -> None:
    image = tmp_path / "root.sqfs"
    pyimg.build([str(root_tree)], str(image), owner="root")
    initrd = tmp_path / "initrd.img"
    # No virtio_blk: the root device never appears.
    build_initramfs(initrd, debian_kernel.modules, "squashfs", root_device="none")
    console = boot(debian_kernel, initrd, image, "root=/dev/vda pyimg.rootwait=1")
    errors = [
        line[line.index("pyimg-") :] for line in console.splitlines() if "pyimg-initramfs: error" in line
    ]
    assert errors == ["pyimg-initramfs: error: root device /dev/vda did not appear within 1 s"], console
    assert "reboot: Power down" in console and "GUEST-UP" not in console


def test_initramfs_only_boot_reaches_its_marker(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    """The whole tree in a cpio built by `pyimg build --format cpio`, no disk: the
    kernel unpacks it as its initramfs and runs its /init."""
    tree = tmp_path / "tree"
    for d in ("bin", "dev", "proc"):
        (tree / d).mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(find_busybox().read_bytes())
    os.chmod(tree / "bin/busybox", 0o755)
    (tree / "init").write_text(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
        '/bin/busybox echo "CPIO-ONLY up: $(/bin/busybox cat /proc/cmdline | /bin/busybox wc -w) words"\n'
        "/bin/busybox poweroff -f\n"
    )
    os.chmod(tree / "init", 0o755)
    archive = tmp_path / "whole.cpio.zst"
    pyimg.build([str(tree)], str(archive), format="cpio", compression="zstd", owner="root", epoch=0)
    out = boot(debian_kernel, archive, None, "rdinit=/init")
    assert "CPIO-ONLY up:" in out, out[-3000:]


def test_the_longest_cpio_path_pyimg_writes_is_unpacked(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    """pyimg refuses cpio names of 4096 bytes or more (with their NUL, more than
    PATH_MAX): the kernel's unpacker skips them without a word — an archive made
    before that check, with a file at 6 KiB of path, booted with its 20 levels below
    4096 bytes and nothing deeper.  The longest name it lets through, 4095 bytes, is
    unpacked: the guest finds the file."""
    levels = [f"{i:02d}-" + "d" * 197 for i in range(20)]
    deep = "deep/" + "/".join(levels)
    leaf = "f" * (4095 - len(deep) - 1)
    assert len(f"{deep}/{leaf}") == 4095
    archive_tar = tmp_path / "tree.tar"
    with tarfile.open(archive_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in (("bin", 0o755), ("proc", 0o755), ("dev", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(find_busybox(), arcname="bin/busybox")
        init = (
            "#!/bin/busybox sh\nB=/bin/busybox\ncd /deep\n"
            + "".join(f"cd {level} || $B echo LEVEL-MISSING\n" for level in levels)
            + f'[ -f {leaf} ] && $B echo "DEEPEST $($B cat {leaf})" || $B echo DEEPEST-MISSING\n'
            + "$B poweroff -f\n"
        ).encode()
        info = tarfile.TarInfo("init")
        info.mode, info.size = 0o755, len(init)
        tar.addfile(info, io.BytesIO(init))
        path = "deep"
        for level in ["", *levels]:
            path = f"{path}/{level}" if level else path
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo(f"{deep}/{leaf}")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"4095-byte"))
    archive = tmp_path / "deep.cpio"
    pyimg.build([str(archive_tar)], str(archive), format="cpio", owner="root", epoch=0)
    out = boot(debian_kernel, archive, None, "rdinit=/init")
    assert "DEEPEST 4095-byte" in out and "MISSING" not in out, out[-3000:]
