"""Fixtures for the store tests: a real registry (Debian's docker-registry, CNCF
distribution 2.8) on a free 127.0.0.1 port with its own storage directory, stopped by
pid when the fixture ends; and small pyimg images with their manifests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import pyimg

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
HTPASSWD = shutil.which("htpasswd")

IN_CI = os.environ.get("CI") == "true"
# Outside CI a missing tool skips; in CI the test runs, and fails on the missing tool.
needs_registry = pytest.mark.skipif(REGISTRY is None and not IN_CI, reason="docker-registry is not installed")
needs_skopeo = pytest.mark.skipif(SKOPEO is None and not IN_CI, reason="skopeo is not installed")


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI (the real registry must run)")
    pytest.skip(f"{what} is not installed")


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path  # its storage directory
    proc: subprocess.Popen[bytes]

    def repo(self, name: str | None = None) -> str:
        """A fresh repository address, so tests do not see each other's tags."""
        return f"{self.host}/{name or 't' + uuid.uuid4().hex[:10]}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, auth: str = "") -> Registry:
    assert REGISTRY is not None
    root = tmp / "storage"
    root.mkdir(parents=True)
    for _ in range(5):
        port = _free_port()
        config = tmp / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n" + auth
        )
        log = open(tmp / "registry.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [REGISTRY, "serve", str(config)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                return Registry(f"127.0.0.1:{port}", root, proc)
            except httpx.TransportError:
                time.sleep(0.05)
        _stop(proc)  # port taken or too slow: try another one
    raise RuntimeError(f"docker-registry did not start: {(tmp / 'registry.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if REGISTRY is None:
        _missing("docker-registry")
    reg = _start(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        _stop(reg.proc)


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[tuple[Registry, str, str]]:
    """A registry with basic auth (htpasswd, bcrypt): (registry, user, password)."""
    if REGISTRY is None or HTPASSWD is None:
        _missing("docker-registry and htpasswd")
    user, password = "ci", "s3cret-pass"
    htfile = tmp_path / "htpasswd"
    out = subprocess.run([HTPASSWD, "-Bbn", user, password], check=True, capture_output=True)
    htfile.write_bytes(out.stdout)
    auth = f"auth:\n  htpasswd:\n    realm: pyimg-test\n    path: {htfile}\n"
    reg = _start(tmp_path / "reg", auth)
    try:
        yield reg, user, password
    finally:
        _stop(reg.proc)


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read the user's real credential files."""
    for var in (
        "PYIMG_REGISTRY_USERNAME",
        "PYIMG_REGISTRY_PASSWORD",
        "REGISTRY_AUTH_FILE",
        "XDG_RUNTIME_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # upload sessions


@dataclass(frozen=True)
class Image:
    path: str
    manifest: str
    size: int


def make_image(directory: Path, name: str = "img", *, size: int = 300_000, epoch: int = 1700000000) -> Image:
    src = directory / f"{name}-src"
    src.mkdir(parents=True)
    # Incompressible content so the image is about `size` bytes.
    (src / "data").write_bytes(os.urandom(size))
    (src / "hello").write_text("hello\n")
    out = directory / f"{name}.sqfs"
    manifest = directory / f"{name}.json"
    pyimg.build([str(src)], str(out), manifest=str(manifest), epoch=epoch)
    return Image(str(out), str(manifest), out.stat().st_size)


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="session")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Large enough for several 1 MiB chunks."""
    return make_image(tmp_path_factory.mktemp("big"), "big", size=5_300_000)


def leftovers(directory: Path, keep: set[str]) -> set[str]:
    return set(os.listdir(directory)) - keep


@pytest.fixture(params=["layout", "registry"])
def store_addr(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store address: an OCI layout directory, then the real registry."""
    if request.param == "layout":
        return f"oci:{tmp_path / 'layout'}"
    reg: Registry = request.getfixturevalue("registry")
    return reg.repo()
