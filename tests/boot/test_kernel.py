"""Kernels: the bzImage check, and kernel fetch against a fake apt (the real one
is what the debian_kernel fixture uses)."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

import pyimg.boot.kernel as kernel
from pyimg.boot.kernel import KernelFiles, cache_dir, check_bzimage, fetch_kernel
from pyimg.errors import BootError

from ..oracles import require_tool, run_cli
from .fakes import fake_bzimage, fake_module


def test_the_debian_kernel_is_a_bzimage(debian_kernel: KernelFiles) -> None:
    image = check_bzimage(debian_kernel.vmlinuz)
    assert image.release == debian_kernel.release == debian_kernel.modules.name
    assert image.protocol >= (2, 0) and "Debian" in image.banner


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "no such kernel file"),
        (lambda p: (p.write_bytes(b"hello"), p)[1], "no boot sector signature"),
        (lambda p: (p.write_bytes(gzip.compress(bytes(4096))), p)[1], "no boot sector signature"),
        (lambda p: (p.write_bytes(b"\x7fELF" + bytes(8192)), p)[1], "vmlinux"),
        (lambda p: fake_bzimage(p, magic=b"HdrX"), '"HdrS"'),
        (lambda p: fake_bzimage(p, loadflags=0), "a zImage"),
        (lambda p: (p.mkdir(), p)[1], "a directory"),
    ],
    ids=["missing", "text", "gzip", "elf", "no-hdrs", "zimage", "directory"],
)
def test_not_a_bzimage(tmp_path: Path, make: object, reason: str) -> None:
    path = make(tmp_path / "vmlinuz")  # type: ignore[operator]
    with pytest.raises(BootError, match=reason):
        check_bzimage(path)


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "pyimg"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home/.cache/pyimg"


class FakeApt:
    """apt-cache / apt-get download / dpkg as pyimg.boot.kernel.run sees them: the
    'download' builds a real .deb (dpkg-deb) holding a fake kernel package."""

    def __init__(self, tmp: Path, version: str = "6.1.99-1") -> None:
        self.version = version
        self.downloads = 0
        self.lock = threading.Lock()
        tree = tmp / "pkg"
        (tree / "boot").mkdir(parents=True)
        fake_bzimage(tree / "boot/vmlinuz-6.1.0-99-cloud-amd64", "6.1.0-99-cloud-amd64")
        modules = tree / "lib/modules/6.1.0-99-cloud-amd64"
        (modules / "kernel").mkdir(parents=True)
        (modules / "kernel/virtio.ko").write_bytes(fake_module("virtio"))
        (modules / "modules.builtin").write_text("")
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN/control").write_text(
            f"Package: linux-image-6.1.0-99-cloud-amd64\nVersion: {version}\nArchitecture: amd64\n"
            "Maintainer: test <t@example>\nDescription: fake\n"
        )
        self.deb = tmp / "fake.deb"
        subprocess.run(
            [require_tool("dpkg-deb"), "-b", str(tree), str(self.deb)], capture_output=True, check=True
        )
        self.real_run = kernel.run

    def __call__(self, command: Sequence[str], cwd: str | None = None) -> str:
        if command[:2] == ["dpkg", "--print-architecture"]:
            return "amd64\n"
        if command[:2] == ["apt-cache", "show"]:
            assert command[-1] == "linux-image-cloud-amd64"
            return (
                f"Package: linux-image-cloud-amd64\nVersion: {self.version}\n"
                f"Depends: linux-image-6.1.0-99-cloud-amd64 (= {self.version})\n"
            )
        if command[:2] == ["apt-get", "download"]:
            assert command[-1] == f"linux-image-6.1.0-99-cloud-amd64={self.version}"
            with self.lock:
                self.downloads += 1
            assert cwd is not None
            Path(cwd, "linux-image-6.1.0-99-cloud-amd64_6.1.99-1_amd64.deb").write_bytes(
                self.deb.read_bytes()
            )
            return ""
        return self.real_run(command, cwd)  # dpkg -x: the real one


def test_fetch_extracts_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(tmp_path)
    monkeypatch.setattr(kernel, "run", apt)
    first = fetch_kernel("cloud", cache=tmp_path / "cache")
    assert first.vmlinuz.name == "vmlinuz-6.1.0-99-cloud-amd64" and first.vmlinuz.is_file()
    assert first.modules.name == "6.1.0-99-cloud-amd64" and (first.modules / "kernel/virtio.ko").is_file()
    assert (first.release, first.package_version) == ("6.1.0-99-cloud-amd64", "6.1.99-1")
    assert first.vmlinuz.parts[-4] == "linux-image-6.1.0-99-cloud-amd64_6.1.99-1"  # keyed by the version
    again = fetch_kernel("cloud", cache=tmp_path / "cache")
    assert again == first and apt.downloads == 1
    assert fetch_kernel("cloud", cache=tmp_path / "cache", offline=True) == first
    assert not list((tmp_path / "cache/kernels").glob(".fetch-*")) and not list(
        first.vmlinuz.parents[2].glob("*.deb")
    )


def test_concurrent_fetches_share_one_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(tmp_path)
    monkeypatch.setattr(kernel, "run", apt)
    results: list[KernelFiles] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_kernel("cloud", cache=tmp_path / "cache"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert os.listdir(tmp_path / "cache/kernels") == ["linux-image-6.1.0-99-cloud-amd64_6.1.99-1"]


def test_fetch_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BootError, match="unknown kernel flavour 'tiny'"):
        fetch_kernel("tiny", cache=tmp_path)
    with pytest.raises(BootError, match="no cloud kernel in the cache"):
        fetch_kernel("cloud", cache=tmp_path, offline=True)

    def no_apt(command: Sequence[str], cwd: str | None = None) -> str:
        if command[0] == "dpkg":
            return "amd64\n"
        raise BootError(f"{command[0]} failed (exit 100): E: No packages found")

    monkeypatch.setattr(kernel, "run", no_apt)
    with pytest.raises(BootError, match="apt does not know linux-image-cloud-amd64"):
        fetch_kernel("cloud", cache=tmp_path)


def test_cli_kernel_fetch_offline(debian_kernel: KernelFiles, tmp_path: Path) -> None:
    proc = run_cli("kernel", "fetch", "--offline")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"vmlinuz: {debian_kernel.vmlinuz}",
        f"modules: {debian_kernel.modules}",
    ]
    proc = run_cli("kernel", "fetch", "--offline", "--cache", str(tmp_path))
    assert proc.returncode == 9 and "no cloud kernel in the cache" in proc.stderr
