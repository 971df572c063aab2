"""The boot initramfs on the real Debian kernel: what is inside, that it is
reproducible, what it costs, and the clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from pyimg.boot.initramfs import APPLETS, build_initramfs, init_script
from pyimg.boot.kernel import KernelFiles
from pyimg.errors import BootError

from ..formats.test_cpio import Entry, parse_newc, parse_newc_at
from ..oracles import require_tool, run_cli
from .fakes import fake_bzimage

CHAIN = [
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "virtio_blk",
]


def unpacked(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def test_contents(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    require_tool("busybox")
    out = tmp_path / "initrd.img"
    result = build_initramfs(
        out, debian_kernel.modules, "squashfs", network=True, kernel=debian_kernel.vmlinuz
    )
    assert result.modules == (*CHAIN, "squashfs", "failover", "net_failover", "virtio_net")
    assert result.optional == () and result.size == out.stat().st_size
    entries = {e.name: e for e in parse_newc(unpacked(out))}
    assert entries[b"init"].data == init_script() and entries[b"init"].mode & 0o777 == 0o755
    assert entries[b"bin/busybox"].data == Path(result.busybox).read_bytes()
    for applet in APPLETS:
        assert entries[f"bin/{applet}".encode()].data == b"busybox"
    assert entries[b"dev/console"].rdev == (5, 1)
    order = entries[b"lib/modules/load-order"].data.decode().splitlines()
    assert order == [f"{name} required" for name in result.modules]
    for name in result.modules:
        assert entries[f"lib/modules/{name}.ko".encode()].data[:4] == b"\x7fELF"
    assert entries[b"pyimg/initramfs.conf"].data == b"_pyimg_fstype=squashfs\n"
    for name in (b"newroot", b"proc", b"sys"):
        assert entries[name].mode & 0o170000 == 0o040000
    listing = subprocess.run(
        [require_tool("cpio"), "-t", "--quiet"], input=unpacked(out), capture_output=True, check=True
    ).stdout.split()
    assert b"init" in listing and b"lib/modules/virtio_blk.ko" in listing


def test_init_script_parses(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_bytes(init_script())
    proc = subprocess.run([require_tool("busybox"), "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_reproducible_and_fast(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    """Same inputs, same bytes; the build's own time (docs/boot.md quotes it): the
    median CPU time of 5 builds stays under the 0.3 s budget."""
    digests, cpu, wall = set(), [], []
    for i in range(5):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = build_initramfs(tmp_path / f"i{i}.img", debian_kernel.modules, "ext4", epoch=1_700_000_000)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
        digests.add(result.digest)
    assert len(digests) == 1
    print(f"initramfs build: median {statistics.median(wall):.3f} s wall, {statistics.median(cpu):.3f} s CPU")
    assert statistics.median(cpu) < 0.3


def test_config_appended(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    out = tmp_path / "initrd.img"
    build_initramfs(out, debian_kernel.modules, "squashfs", compression="none", config={"A": "1"})
    entries = [e.name for e in parse_newc_all(out.read_bytes())]
    assert b"init" in entries and b"pyimg/config/A" in entries


def parse_newc_all(raw: bytes) -> list[Entry]:
    """Every entry of archives back to back (zeros between them skipped)."""
    out: list[Entry] = []
    at = 0
    while at < len(raw):
        if raw[at] == 0:
            at += 1
            continue
        entries, at = parse_newc_at(raw, at)
        out += entries
    return out


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"root_fs": "xfs"}, "cannot mount a 'xfs' root"),
        ({"root_fs": "cpio"}, "cannot mount a 'cpio' root"),
        ({"root_device": "floppy"}, "unknown root device"),
        ({"extra_modules": ["no_such_module"]}, "no module 'no_such_module'"),
        ({"compression": "xz"}, "choose none, gzip"),
        ({"busybox": "/nonexistent/busybox"}, "no such busybox"),
    ],
)
def test_bad_input(
    tmp_path: Path, debian_kernel: KernelFiles, kwargs: dict[str, object], reason: str
) -> None:
    out = tmp_path / "initrd.img"
    with pytest.raises(BootError, match=reason):
        build_initramfs(out, debian_kernel.modules, **kwargs)  # type: ignore[arg-type]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_dynamic_busybox_is_refused(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    dynamic = shutil.which("ls")
    assert dynamic is not None
    with pytest.raises(BootError, match="dynamically linked"):
        build_initramfs(tmp_path / "i.img", debian_kernel.modules, busybox=dynamic)


def test_kernel_and_modules_must_match(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    other = fake_bzimage(tmp_path / "vmlinuz", "5.10.0-99-amd64")
    with pytest.raises(
        BootError, match=r"built for kernel 6\.1\.0-57-cloud-amd64, the kernel is 5\.10\.0-99-amd64"
    ):
        build_initramfs(tmp_path / "i.img", debian_kernel.modules, kernel=other)
    with pytest.raises(BootError, match="no such kernel file"):
        build_initramfs(tmp_path / "i.img", debian_kernel.modules, kernel=tmp_path / "missing")
    with pytest.raises(BootError, match="no such module directory"):
        build_initramfs(tmp_path / "i.img", tmp_path / "no-modules")


def test_cli(tmp_path: Path, debian_kernel: KernelFiles) -> None:
    out = tmp_path / "initrd.img"
    conf = tmp_path / "boot.toml"
    conf.write_text('NAME = "x"\n')
    proc = run_cli(
        "initramfs", "--modules", str(debian_kernel.modules), "--root-fs", "ext4", "-o", str(out),
        "--config", "A=1", "--config-file", str(conf), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["modules"] == CHAIN and summary["builtin"] == ["ext4"] and out.is_file()
    proc = run_cli("initramfs", "--modules", str(debian_kernel.modules), "-o", str(out), "--config", "1X=2")
    assert proc.returncode == 9 and "pyimg: error: config key '1X' is not a valid name" in proc.stderr
    proc = run_cli("initramfs", "--modules", str(tmp_path / "none"), "-o", str(out))
    assert proc.returncode == 9 and "no such module directory" in proc.stderr


def test_detect_root_fs(tmp_path: Path) -> None:
    import pyimg
    from pyimg.boot.initramfs import detect_root_fs

    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_text("x")
    for fmt, name in (("squashfs", "r.sqfs"), ("ext4", "r.ext4"), ("cpio", "r.cpio")):
        pyimg.build([str(tmp_path / "src")], str(tmp_path / name), format=fmt)
    assert detect_root_fs(tmp_path / "r.sqfs") == "squashfs"
    assert detect_root_fs(tmp_path / "r.ext4") == "ext4"
    with pytest.raises(BootError, match=r"cannot mount this image: a cpio archive"):
        detect_root_fs(tmp_path / "r.cpio")
    with pytest.raises(BootError, match="cannot read the image"):
        detect_root_fs(tmp_path / "missing")
