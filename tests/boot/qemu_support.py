"""Fixtures and helpers of the QEMU boot tests (test_qemu_*.py import them): Debian's
cloud kernel fetched once into pyimg's cache (`pyimg kernel fetch`), busybox root
trees, and checks that no QEMU outlives a boot, by pid."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyimg.boot.kernel import KernelFiles
from tests.oracles import require_tool


@pytest.fixture(scope="session")
def kernel(debian_kernel: KernelFiles) -> KernelFiles:
    """Debian's cloud kernel (conftest's debian_kernel: cached, else fetched; in CI never a
    skip), and QEMU to boot it with."""
    require_tool("qemu-system-x86_64")
    return debian_kernel


def make_busybox_root(root: Path, init_script: str) -> Path:
    """A busybox root: /bin/busybox, /bin/sh, the mount points, /sbin/init = init_script."""
    busybox = require_tool("busybox")
    for d in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    init = root / "sbin" / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    return root


def alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def assert_gone(pid: int | None) -> None:
    assert pid is not None and pid > 0
    assert not alive(pid), f"QEMU (pid {pid}) still runs"


@pytest.fixture
def no_qemu_left() -> Iterator[list[int]]:
    """Tests append QEMU pids here; after the test each must be gone."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        assert_gone(pid)
