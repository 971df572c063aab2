from __future__ import annotations

import pytest

from pyimg.errors import SpecError
from pyimg.store.refs import is_loopback_host, parse_ref

D = "sha256:" + "ab" * 32


def test_layout_refs() -> None:
    r = parse_ref("oci:/tmp/x")
    assert (r.kind, r.path, r.tag, r.digest, r.reference) == ("layout", "/tmp/x", None, None, "latest")
    r = parse_ref("oci:/tmp/x:v1")
    assert (r.path, r.tag) == ("/tmp/x", "v1")
    r = parse_ref(f"oci:rel/dir@{D}")
    assert (r.path, r.digest, r.reference) == ("rel/dir", D, D)
    assert str(r) == f"oci:rel/dir@{D}"


def test_registry_refs() -> None:
    r = parse_ref("127.0.0.1:5000/team/app:b1")
    assert (r.kind, r.host, r.repo, r.tag) == ("registry", "127.0.0.1:5000", "team/app", "b1")
    r = parse_ref(f"registry.example.com/app@{D}")
    assert (r.host, r.repo, r.digest) == ("registry.example.com", "app", D)
    assert parse_ref("localhost/app").tag is None
    assert parse_ref("[::1]:5000/app:x").host == "[::1]:5000"


@pytest.mark.parametrize(
    "bad",
    [
        "app",  # no host
        "https://host/app",
        "reg.example/App",  # uppercase repository
        "reg.example/app:bad tag",
        "reg.example/app@sha256:short",
        "oci:",
        "reg.example/",
        "build/root.sqfs",  # a path, not HOST/REPO
    ],
)
def test_bad_refs(bad: str) -> None:
    with pytest.raises(SpecError):
        parse_ref(bad)


def test_loopback() -> None:
    assert is_loopback_host("127.0.0.1:5000")
    assert is_loopback_host("127.3.4.5")
    assert is_loopback_host("localhost:80")
    assert is_loopback_host("[::1]:5000")
    assert not is_loopback_host("10.0.0.1:5000")
    assert not is_loopback_host("registry.example.com")
