"""The registry client's transport: chunks, resume, retries, auth, unreachable
registries, digest mismatches, corrupted layouts."""

from __future__ import annotations

import base64
import filecmp
import json
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyimg.errors import (
    CorruptStoreError,
    DigestMismatchError,
    StoreAuthError,
    StoreNotFoundError,
    StoreUnreachableError,
)
from pyimg.store import ops
from pyimg.store.layout import LayoutStore
from pyimg.store.refs import parse_ref
from pyimg.store.registry import RegistryStore

from .conftest import Image, Registry, leftovers

# Upload chunks of 1 MiB, for a single-blob image (chunked=False) of several MiB.
CHUNKED = ops.StoreOptions(chunk_size=1 << 20, backoff=0.01)


def test_chunked_push(
    registry: Registry, big_image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = registry.repo() + ":v"
    stores: list[RegistryStore] = []
    real = ops.open_store

    def spy(*a: Any, **k: Any) -> Any:
        s = real(*a, **k)
        stores.append(s)  # type: ignore[arg-type]
        return s

    monkeypatch.setattr(ops, "open_store", spy)
    ops.push(big_image.path, ref, options=CHUNKED, chunked=False)
    assert stores[0].requests["PATCH"] == -(-big_image.size // (1 << 20))
    ops.pull(ref, str(tmp_path / "o"))
    assert filecmp.cmp(tmp_path / "o", big_image.path, shallow=False)


def _drop_patch(monkeypatch: pytest.MonkeyPatch, at: set[int]) -> list[int]:
    """Make the n-th PATCH requests (1-based) fail as a dropped connection, before sending."""
    count = [0]
    real_send = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        if request.method == "PATCH":
            count[0] += 1
            if count[0] in at:
                raise httpx.RemoteProtocolError("server disconnected (injected)", request=request)
        return real_send(self, request, **kw)

    monkeypatch.setattr(httpx.Client, "send", send)
    return count


def test_chunked_push_resumes_after_drop(
    registry: Registry, big_image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = registry.repo() + ":v"
    with pytest.MonkeyPatch.context() as mp:
        count = _drop_patch(mp, {3})
        pushed = ops.push(big_image.path, ref, options=CHUNKED, chunked=False)
    chunks = -(-big_image.size // (1 << 20))
    assert count[0] == chunks + 1  # one PATCH repeated, none restarted
    pulled = ops.pull(ref, str(tmp_path / "o"))
    assert pulled.digest == pushed.digest
    assert filecmp.cmp(tmp_path / "o", big_image.path, shallow=False)


def test_interrupted_push_leaves_store_valid(
    registry: Registry, big_image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every PATCH after the second fails: the push gives up with a clear error, no tag
    appears, and the next push (a new store, as in a new process) resumes the image
    from the two chunks the registry has."""
    ref = registry.repo() + ":v"
    with pytest.MonkeyPatch.context() as mp:  # (monkeypatch.undo() would undo the env too)
        _drop_patch(mp, set(range(3, 100)))
        with pytest.raises(StoreUnreachableError, match="dropped"):
            ops.push(big_image.path, ref, options=CHUNKED, chunked=False)
    with pytest.raises(StoreNotFoundError):
        ops.pull(ref, str(tmp_path / "o"))
    stores: list[RegistryStore] = []
    real = ops.open_store

    def spy(*a: Any, **k: Any) -> Any:
        s = real(*a, **k)
        stores.append(s)  # type: ignore[arg-type]
        return s

    monkeypatch.setattr(ops, "open_store", spy)
    again = ops.push(big_image.path, ref, options=CHUNKED, chunked=False)
    assert again.blobs_uploaded == 1  # the image; the two small blobs made it the first time
    assert stores[0].resumed_at == 2 << 20
    assert stores[0].requests["PATCH"] == -(-big_image.size // (1 << 20)) - 2
    assert not os.listdir(stores[0].resume_dir)  # the finished session is forgotten
    ops.pull(ref, str(tmp_path / "o"))
    assert filecmp.cmp(tmp_path / "o", big_image.path, shallow=False)


def test_interrupted_layout_push_leaves_store_valid(
    big_image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]

    def progress(n: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt

    ref = f"oci:{tmp_path / 'l'}:v"
    with pytest.raises(KeyboardInterrupt):
        ops.push(big_image.path, ref, progress=progress)
    layout = LayoutStore(str(tmp_path / "l"))
    assert layout.tags() == []
    assert not [n for n in os.listdir(layout.blobs) if n.startswith(".")]  # no temp blob left
    ops.push(big_image.path, ref)
    ops.pull(ref, str(tmp_path / "o"))
    assert filecmp.cmp(tmp_path / "o", big_image.path, shallow=False)


def test_unreachable_registry(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    opts = ops.StoreOptions(retries=3, backoff=0.01)
    with pytest.raises(StoreUnreachableError) as err:
        ops.pull(f"127.0.0.1:{port}/app:v", str(tmp_path / "o"), options=opts)
    assert f"127.0.0.1:{port}" in str(err.value) and "after 3 attempts" in str(err.value)
    assert leftovers(tmp_path, set()) == set()


def test_backoff_is_bounded_and_grows() -> None:
    store = RegistryStore(parse_ref("127.0.0.1:9/app"), retries=4, backoff=0.5)
    slept: list[float] = []
    store._sleep = slept.append
    with pytest.raises(StoreUnreachableError):
        store.blob_exists("sha256:" + "0" * 64)
    assert slept == [0.5, 1.0, 2.0]
    store.close()


def test_pull_refuses_corrupted_blob(registry: Registry, image: Image, tmp_path: Path) -> None:
    ref = registry.repo() + ":v"
    pushed = ops.push(image.path, ref)
    store = ops.open_store(ref)
    layer = json.loads(store.get_manifest("v").data)["layers"][0]
    store.close()
    data = registry.blob_path(layer["digest"])
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        out = tmp_path / "o.sqfs"
        with pytest.raises(DigestMismatchError, match="refused"):
            ops.pull(f"{registry.host}/{ref.split('/', 1)[1].split(':')[0]}@{pushed.digest}", str(out))
        assert leftovers(tmp_path, set()) == set()  # nothing written, no temp file
    finally:
        data.write_bytes(original)


def test_pull_refuses_manifest_with_wrong_digest() -> None:
    body = b'{"schemaVersion":2}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=body,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )

    digest = "sha256:" + "0" * 64
    store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler))
    with pytest.raises(DigestMismatchError, match="expected"):
        store.get_manifest(digest)
    store.close()


def _layout_with_image(tmp_path: Path, image: Image) -> Path:
    ops.push(image.path, f"oci:{tmp_path / 'l'}:v")
    return tmp_path / "l"


def test_corrupted_layout_blob(image: Image, tmp_path: Path) -> None:
    layout = _layout_with_image(tmp_path, image)
    store = LayoutStore(str(layout))
    digest = json.loads(store.get_manifest("v").data)["layers"][0]["digest"]
    blob = layout / "blobs/sha256" / digest.split(":")[1]
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DigestMismatchError):
        ops.pull(f"oci:{layout}:v", str(out_dir / "o"))
    blob.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        ops.pull(f"oci:{layout}:v", str(out_dir / "o"))
    assert leftovers(out_dir, set()) == set()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "oci-layout").unlink(),
        lambda d: (d / "index.json").write_text("{not json"),
        lambda d: (d / "index.json").write_text('{"manifests": [{"mediaType": 1}]}'),
        lambda d: (d / "oci-layout").write_text('{"imageLayoutVersion": "9"}'),
    ],
)
def test_corrupted_layout_structure(image: Image, tmp_path: Path, damage: Any) -> None:
    layout = _layout_with_image(tmp_path, image)
    damage(layout)
    with pytest.raises(CorruptStoreError):
        ops.pull(f"oci:{layout}:v", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_corrupted_layout_manifest(image: Image, tmp_path: Path) -> None:
    layout = _layout_with_image(tmp_path, image)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    (layout / "blobs/sha256" / digest.split(":")[1]).write_text('{"tampered": true}')
    with pytest.raises(DigestMismatchError):
        ops.pull(f"oci:{layout}:v", str(tmp_path / "o"))


def test_missing_layout_is_not_created_by_pull(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        ops.pull(f"oci:{tmp_path / 'nope'}:v", str(tmp_path / "o"))
    assert not (tmp_path / "nope").exists()


# -- auth ------------------------------------------------------------------------------


def test_basic_auth(auth_registry: tuple[Registry, str, str], image: Image, tmp_path: Path) -> None:
    reg, user, password = auth_registry
    ref = reg.repo() + ":v"
    with pytest.raises(StoreAuthError) as err:
        ops.push(image.path, ref)
    assert "no credentials" in str(err.value) and "config.json" in str(err.value)

    config = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    config.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    pushed = ops.push(image.path, ref, options=ops.StoreOptions(auth_file=str(config)))
    pulled = ops.pull(ref, str(tmp_path / "o"), options=ops.StoreOptions(auth_file=str(config)))
    assert pulled.digest == pushed.digest

    wrong = tmp_path / "wrong.json"
    bad = base64.b64encode(f"{user}:nope".encode()).decode()
    wrong.write_text(json.dumps({"auths": {f"https://{reg.host}": {"auth": bad}}}))
    with pytest.raises(StoreAuthError) as err:
        ops.pull(ref, str(tmp_path / "o2"), options=ops.StoreOptions(auth_file=str(wrong)))
    assert f"user '{user}' from {wrong}" in str(err.value)
    assert "nope" not in str(err.value)  # never the secret
    assert not (tmp_path / "o2").exists()


def test_auth_from_environment(
    auth_registry: tuple[Registry, str, str], image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, user, password = auth_registry
    monkeypatch.setenv("PYIMG_REGISTRY_USERNAME", user)
    monkeypatch.setenv("PYIMG_REGISTRY_PASSWORD", password)
    assert ops.push(image.path, reg.repo() + ":v").manifest_uploaded


def test_bearer_token_flow() -> None:
    """The token dance against a local test server: 401 with a Bearer challenge, the
    token endpoint gets the basic credentials, the retry carries the token."""
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/token":
            assert request.url.params["scope"] == "repository:app:pull"
            return httpx.Response(200, json={"token": "T0K"})
        if request.headers.get("authorization") != "Bearer T0K":
            challenge = 'Bearer realm="http://127.0.0.1:9/token",service="reg",scope="repository:app:pull"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200)

    os.environ["PYIMG_REGISTRY_USERNAME"] = "u"
    os.environ["PYIMG_REGISTRY_PASSWORD"] = "p"
    try:
        store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler))
        assert store.blob_exists("sha256:" + "0" * 64)
    finally:
        del os.environ["PYIMG_REGISTRY_USERNAME"], os.environ["PYIMG_REGISTRY_PASSWORD"]
    assert seen[1][0] == "/token" and seen[1][1] == "Basic " + base64.b64encode(b"u:p").decode()
    assert seen[2][1] == "Bearer T0K"


def test_403_names_credentials() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no push"}]})

    store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler))
    with pytest.raises(StoreAuthError, match=r"403.*no credentials.*DENIED"):
        store.blob_exists("sha256:" + "0" * 64)


def test_https_unless_loopback_or_insecure() -> None:
    assert RegistryStore(parse_ref("registry.example.com/app")).base == "https://registry.example.com"
    assert RegistryStore(parse_ref("10.1.2.3:5000/app"), insecure=True).base == "http://10.1.2.3:5000"
    assert RegistryStore(parse_ref("127.0.0.1:5000/app")).base == "http://127.0.0.1:5000"


def test_download_resumes_with_range_after_drop(tmp_path: Path) -> None:
    """A blob whose connection drops half way is fetched on with Range: from where it stopped."""
    import hashlib

    from pyimg.store.artifact import Descriptor

    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ranges: list[str | None] = []

    class Dropping(httpx.SyncByteStream):
        def __iter__(self) -> Any:
            yield data[:100_000]
            raise httpx.ReadError("connection reset (injected)")

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        if request.headers.get("range") is None:
            return httpx.Response(200, stream=Dropping())
        start = int(request.headers["range"].split("=")[1].rstrip("-"))
        return httpx.Response(206, content=data[start:])

    store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler), backoff=0)
    got: list[bytes] = []
    store.fetch_blob(Descriptor("application/octet-stream", digest, len(data)), got.append)
    assert b"".join(got) == data
    assert ranges == [None, "bytes=100000-"]


class DroppingProxy:
    """A TCP proxy in front of the registry that cuts every connection once, in the
    middle of the upload, after `cut_after` bytes from the client have passed."""

    def __init__(self, target: str, cut_after: int) -> None:
        import threading

        host, port = target.split(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.sent = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        import select

        upstream = socket.create_connection(self.target)
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 5)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        with self.lock:
                            self.sent += len(data)
                            cut = self.cuts == 0 and self.sent > self.cut_after
                            if cut:
                                self.cuts += 1
                        if cut:
                            upstream.sendall(data[: len(data) // 2])
                            return  # both sockets close: the client sees a dropped connection
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.stop = True
        self.server.close()


def test_push_survives_a_real_connection_drop(registry: Registry, big_image: Image, tmp_path: Path) -> None:
    """The connection dies inside a PATCH body (the registry has part of the chunk): the
    push resumes or restarts that blob and the result verifies."""
    proxy = DroppingProxy(registry.host, cut_after=2_500_000)
    try:
        repo = f"{proxy.host}/{registry.repo().split('/', 1)[1]}"
        pushed = ops.push(big_image.path, f"{repo}:v", options=CHUNKED, chunked=False)
        assert proxy.cuts == 1
    finally:
        proxy.close()
    pulled = ops.pull(f"{registry.repo().split('/')[0]}/{repo.split('/', 1)[1]}:v", str(tmp_path / "o"))
    assert pulled.digest == pushed.digest
    assert filecmp.cmp(tmp_path / "o", big_image.path, shallow=False)
