"""The real Debian kernel for the boot tests: fetched once into the user's cache
(pyimg kernel fetch); in CI a kernel that cannot be had is a failure, never a skip."""

from __future__ import annotations

import pytest

from pyimg.boot.kernel import KernelFiles, fetch_kernel
from pyimg.errors import BootError

from ..oracles import IN_CI


@pytest.fixture(scope="session")
def debian_kernel() -> KernelFiles:
    try:
        return fetch_kernel("cloud", offline=True)  # no apt-cache (~3 s) when one is cached
    except BootError:
        pass
    try:
        return fetch_kernel("cloud")
    except BootError as exc:
        if IN_CI:
            pytest.fail(f"the Debian cloud kernel is required in CI: {exc}")
        pytest.skip(f"no Debian kernel here: {exc}")
