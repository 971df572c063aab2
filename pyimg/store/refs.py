"""Store addresses.

    oci:PATH[:TAG|@DIGEST]              an OCI image layout directory
    HOST[:PORT]/REPO[:TAG|@DIGEST]      a registry speaking the OCI distribution API

With neither tag nor digest the tag is `latest` (as docker and skopeo do).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from ..errors import SpecError

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed address.  Exactly one of (path) or (host, repo) is set."""

    kind: str  # "layout" or "registry"
    path: str = ""  # layout directory
    host: str = ""  # HOST[:PORT]
    repo: str = ""
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What names the manifest: the digest when given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def store(self) -> str:
        """The store without tag or digest: 'oci:DIR' or 'HOST/REPO'."""
        return f"oci:{self.path}" if self.kind == "layout" else f"{self.host}/{self.repo}"

    def with_tag(self, tag: str | None) -> Ref:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Ref:
        return replace(self, tag=None, digest=digest)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.store}@{self.digest}"
        return f"{self.store}:{self.tag or DEFAULT_TAG}"

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(hostport: str) -> bool:
    host = hostport
    if host.startswith("["):
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise SpecError(f"invalid tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    return tag


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise SpecError(f"invalid digest {digest!r} (sha256: and 64 lowercase hex digits)")
    return digest


def _split_reference(rest: str) -> tuple[str, str | None, str | None]:
    if "@" in rest:
        name, _, digest = rest.rpartition("@")
        return name, None, check_digest(digest)
    head, sep, tail = rest.rpartition(":")
    if sep and tail and "/" not in tail:
        return head, check_tag(tail), None
    return rest, None, None


def parse_ref(text: str) -> Ref:
    """Parse a store address; SpecError says what is wrong with it."""
    if text.startswith("oci:"):
        rest = text[4:]
        path, tag, digest = _split_reference(rest)
        if not path:
            raise SpecError(f"{text!r}: no directory after 'oci:'")
        return Ref("layout", path=path, tag=tag, digest=digest)
    if "://" in text:
        raise SpecError(f"{text!r}: give HOST[:PORT]/REPO[:TAG|@DIGEST] without a scheme")
    host, slash, rest = text.partition("/")
    if not slash or not rest:
        raise SpecError(f"{text!r}: expected oci:PATH[:TAG|@DIGEST] or HOST[:PORT]/REPO[:TAG|@DIGEST]")
    if not _HOST_RE.match(host):
        raise SpecError(f"{text!r}: invalid registry host {host!r}")
    if not ("." in host or ":" in host or host.startswith("[") or host == "localhost"):
        # docker's rule: a first component without '.' or ':' is a path, not a host (there
        # is no default registry here), so dir/file is never taken for a registry.
        raise SpecError(f"{text!r}: {host!r} is not a registry host (HOST.DOMAIN, HOST:PORT or localhost)")
    repo, tag, digest = _split_reference(rest)
    if not REPO_RE.match(repo):
        raise SpecError(f"{text!r}: invalid repository name {repo!r} (lowercase, digits, '._-' and '/')")
    return Ref("registry", host=host, repo=repo, tag=tag, digest=digest)
