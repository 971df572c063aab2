"""A client of the OCI distribution API (distribution-spec 1.1), on httpx.

HTTPS, except plain HTTP for loopback hosts or with insecure=True.  Basic and bearer
(token) auth from auth.find_credentials.  Bounded retries with exponential backoff on
connection errors and 429/5xx, then StoreUnreachableError with the address and reason.
Blobs are checked with HEAD first; small ones go up in one PUT, large ones in PATCH
chunks, and a chunk whose connection dropped is resumed from the offset the registry
reports (GET on the upload URL), or the upload restarts when the registry lost it.
Everything fetched is verified against its digest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..errors import (
    DigestMismatchError,
    StoreAuthError,
    StoreError,
    StoreNotFoundError,
    StoreUnreachableError,
)
from .artifact import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    index_manifest,
    referrer_descriptor,
    verify_manifest_bytes,
)
from .auth import CredentialSearch, find_credentials
from .base import Progress, Sink, VerifyingSink
from .refs import DIGEST_RE, Ref

ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
DEFAULT_CHUNK = 64 << 20
_MAX_MANIFEST = 4 << 20
_RETRY_STATUS = {429, 500, 502, 503, 504}


class _RestartUpload(Exception):
    """The registry lost the upload session: start the blob again."""


def default_resume_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pyimg", "uploads")


def fallback_tag(digest: str) -> str:
    """The referrers tag schema of distribution-spec 1.1: sha256:<hex> -> sha256-<hex>."""
    return digest.replace(":", "-", 1)


def referrer_tag(subject: str, referrer: str) -> str:
    """The tag each referrer gets on a registry without the referrers API (≤ 128 chars)."""
    return f"pyimg-ref.{subject.split(':', 1)[1][:40]}.{referrer.split(':', 1)[1][:40]}"


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class RegistryStore:
    def __init__(
        self,
        ref: Ref,
        *,
        insecure: bool = False,
        auth_file: str | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        resume_dir: str | None = None,
    ) -> None:
        self.ref = ref
        self.address = ref.store
        self.scheme = "http" if insecure or ref.is_loopback() else "https"
        self.base = f"{self.scheme}://{ref.host}"
        self.repo = ref.repo
        self.retries = max(1, retries)
        self.backoff = backoff
        self.chunk_size = chunk_size
        # Where chunked uploads note their session, so a push killed half way resumes in
        # the next process ("" turns it off).
        self.resume_dir = default_resume_dir() if resume_dir is None else resume_dir
        self.resumed_at: int | None = None  # the offset a saved session resumed from
        self.credentials: CredentialSearch = find_credentials(ref.host, auth_file)
        self._auth_header: str | None = None
        self._sleep: Callable[[float], None] = time.sleep
        self.requests: dict[str, int] = {}  # method -> count, for the bench and tests
        self._count_lock = threading.Lock()  # chunked push and pull send from several threads
        # Over plain HTTP (loopback or --insecure) nothing authenticates the registry anyway
        # (digests protect the content): skip loading the CA store, 0.1 s of every call.
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            verify=self.scheme == "https",
            follow_redirects=True,
            headers={"User-Agent": "pyimg"},
        )

    def close(self) -> None:
        self.client.close()

    def _url(self, path: str) -> str:
        return f"{self.base}/v2/{self.repo}/{path}"

    # -- requests, retries, auth ----------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        retry: bool = True,
    ) -> httpx.Response:
        """One request with auth, retries and backoff.  With retry=False a transport
        error propagates as httpx.TransportError (the upload resumes itself)."""
        attempt = 0
        authed = False
        while True:
            h = dict(headers or {})
            if self._auth_header:
                h["Authorization"] = self._auth_header
            with self._count_lock:
                self.requests[method] = self.requests.get(method, 0) + 1
            try:
                resp = self.client.send(
                    self.client.build_request(method, url, headers=h, content=content), stream=stream
                )
            except httpx.TransportError as exc:
                if not retry:
                    raise
                attempt += 1
                if attempt >= self.retries:
                    raise StoreUnreachableError(
                        f"cannot reach the registry at {self.base} after {attempt} attempts: {_reason(exc)}",
                        self.address,
                    ) from exc
                self._sleep(self.backoff * 2 ** (attempt - 1))
                continue
            if resp.status_code == 401 and not authed:
                challenge = resp.headers.get("www-authenticate", "")
                resp.close()
                self._authenticate(challenge)
                authed = True
                continue
            if resp.status_code in _RETRY_STATUS and retry and attempt + 1 < self.retries:
                resp.close()
                attempt += 1
                self._sleep(self.backoff * 2 ** (attempt - 1))
                continue
            if resp.status_code in (401, 403):
                if stream:
                    resp.read()
                what = "rejected" if resp.status_code == 401 else "denied access (403) with"
                raise StoreAuthError(
                    f"{method} {url}: the registry {what} {self.credentials.describe()}: {_errors(resp)}",
                    self.address,
                )
            return resp

    def _authenticate(self, challenge: str) -> None:
        scheme, params = _challenge(challenge)
        creds = self.credentials.found
        if scheme == "basic":
            if creds is None:
                raise StoreAuthError(
                    f"the registry wants credentials (basic auth); found {self.credentials.describe()}",
                    self.address,
                )
            token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            self._auth_header = f"Basic {token}"
            return
        if scheme == "bearer" and params.get("realm"):
            query = {"scope": params.get("scope") or f"repository:{self.repo}:pull,push"}
            if params.get("service"):
                query["service"] = params["service"]
            auth = (creds.username, creds.password) if creds is not None else None
            try:
                resp = self.client.get(params["realm"], params=query, auth=auth)
            except httpx.TransportError as exc:
                raise StoreUnreachableError(
                    f"cannot reach the token service {params['realm']}: {_reason(exc)}", self.address
                ) from exc
            if resp.status_code != 200:
                raise StoreAuthError(
                    f"the token service {params['realm']} refused {self.credentials.describe()} "
                    f"(HTTP {resp.status_code})",
                    self.address,
                )
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise StoreAuthError(f"the token service {params['realm']} gave no token", self.address)
            self._auth_header = f"Bearer {token}"
            return
        raise StoreAuthError(
            f"the registry asks for unsupported authentication {challenge!r}; "
            f"tried {self.credentials.describe()}",
            self.address,
        )

    def _fail(self, resp: httpx.Response, what: str) -> StoreError:
        if resp.status_code == 404:
            return StoreNotFoundError(f"{what}: not found ({_errors(resp)})", self.address)
        body = _errors(resp)
        if "DIGEST_INVALID" in body:
            return DigestMismatchError(
                f"{what}: the registry says the digest does not match: {body}", self.address
            )
        return StoreError(f"{what}: HTTP {resp.status_code}: {body}", self.address)

    def ping(self) -> None:
        resp = self._send("GET", f"{self.base}/v2/")
        if resp.status_code != 200:
            raise self._fail(resp, "GET /v2/")

    # -- blobs ---------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        resp = self._send("HEAD", self._url(f"blobs/{digest}"))
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._fail(resp, f"HEAD blob {digest}")

    def _start_upload(self) -> str:
        resp = self._send("POST", self._url("blobs/uploads/"), headers={"Content-Length": "0"})
        if resp.status_code != 202 or "location" not in resp.headers:
            raise self._fail(resp, "start a blob upload")
        return self._location(resp)

    def _location(self, resp: httpx.Response) -> str:
        return str(resp.url.join(resp.headers["location"]))

    def _finish_upload(self, location: str, digest: str, body: bytes) -> None:
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        resp = self._send(
            "PUT",
            str(url),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
            content=body,
        )
        if resp.status_code != 201:
            raise self._fail(resp, f"finish the upload of {digest}")

    def _upload_status(self, location: str) -> tuple[int, str]:
        resp = self._send("GET", location)
        if resp.status_code in (404, 400, 416):
            raise _RestartUpload
        if resp.status_code != 204:
            raise self._fail(resp, "query the upload")
        end = int(resp.headers.get("range", "0-0").rpartition("-")[2] or 0)
        where = self._location(resp) if "location" in resp.headers else location
        return (end + 1 if end > 0 else 0), where

    def put_blob_bytes(self, data: bytes, digest: str) -> bool:
        if self.blob_exists(digest):
            return False
        self._finish_upload(self._start_upload(), digest, data)
        return True

    def put_blob_file(self, path: str, digest: str, size: int, progress: Progress | None = None) -> bool:
        if self.blob_exists(digest):
            return False
        try:
            with open(path, "rb", buffering=0) as f:
                for _ in range(self.retries):
                    try:
                        self._upload_file(f, digest, size, progress)
                        return True
                    except _RestartUpload:
                        continue
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}", self.address) from exc
        raise StoreError(f"the registry lost the upload of {digest} {self.retries} times", self.address)

    def _session_file(self, digest: str) -> str | None:
        if not self.resume_dir:
            return None
        key = hashlib.sha256(f"{self.base}/{self.repo}@{digest}".encode()).hexdigest()[:32]
        return os.path.join(self.resume_dir, key + ".json")

    def _saved_session(self, digest: str, size: int) -> tuple[int, str] | None:
        """An upload an earlier process left half way, if the registry still has it where
        that process stopped."""
        path = self._session_file(digest)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                saved = json.load(f)
            location, offset = str(saved["location"]), int(saved["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            now, location = self._upload_status(location)
        except (_RestartUpload, StoreError):
            now = -1
        if now != offset or not 0 < offset < size:
            self._forget_session(digest)
            return None
        return offset, location

    def _save_session(self, digest: str, location: str, offset: int) -> None:
        path = self._session_file(digest)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"location": location, "offset": offset}, f)
            os.replace(tmp, path)
        except OSError:
            pass  # resuming across processes is a bonus, never a reason to fail

    def _forget_session(self, digest: str) -> None:
        path = self._session_file(digest)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _upload_file(self, f: Any, digest: str, size: int, progress: Progress | None) -> None:
        if size <= self.chunk_size:
            location = self._start_upload()
            f.seek(0)
            data = f.read(size)
            self._finish_upload(location, digest, data)
            if progress is not None:
                progress(len(data))
            return
        saved = self._saved_session(digest, size)
        if saved is not None:
            offset, location = saved
            self.resumed_at = offset
            if progress is not None:
                progress(offset)
        else:
            offset, location = 0, self._start_upload()
        drops = 0
        while offset < size:
            f.seek(offset)
            chunk = f.read(min(self.chunk_size, size - offset))
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Length": str(len(chunk)),
            }
            try:
                resp = self._send("PATCH", location, headers=headers, content=chunk, retry=False)
            except httpx.TransportError as exc:
                drops += 1
                if drops >= self.retries:
                    raise StoreUnreachableError(
                        f"the upload of {digest} dropped {drops} times at byte {offset}: {_reason(exc)}",
                        self.address,
                    ) from exc
                self._sleep(self.backoff * 2 ** (drops - 1))
                resumed, location = self._upload_status(location)
                if progress is not None and resumed != offset:
                    progress(resumed - offset)
                offset = resumed
                continue
            if resp.status_code in (404, 416):
                self._forget_session(digest)
                raise _RestartUpload
            if resp.status_code != 202:
                raise self._fail(resp, f"upload a chunk of {digest}")
            location = self._location(resp)
            offset += len(chunk)
            self._save_session(digest, location, offset)
            if progress is not None:
                progress(len(chunk))
        self._finish_upload(location, digest, b"")
        self._forget_session(digest)

    def fetch_blob(self, desc: Descriptor, sink: Sink, progress: Progress | None = None) -> None:
        verify = VerifyingSink(desc, sink, self.address)
        drops = 0
        while True:
            headers = {"Range": f"bytes={verify.count}-"} if verify.count else {}
            resp = self._send("GET", self._url(f"blobs/{desc.digest}"), headers=headers, stream=True)
            try:
                if resp.status_code not in (200, 206) or (verify.count and resp.status_code != 206):
                    resp.read()
                    raise self._fail(resp, f"GET blob {desc.digest}")
                for chunk in resp.iter_bytes():  # as received: a drop loses nothing buffered
                    verify(chunk)
                    if progress is not None:
                        progress(len(chunk))
                break
            except httpx.TransportError as exc:
                drops += 1
                if drops >= self.retries:
                    raise StoreUnreachableError(
                        f"the download of {desc.digest} dropped {drops} times: {_reason(exc)}", self.address
                    ) from exc
                self._sleep(self.backoff * 2 ** (drops - 1))
            finally:
                resp.close()
        verify.check()

    # -- manifests -----------------------------------------------------------------------

    def resolve(self, reference: str) -> str | None:
        resp = self._send("HEAD", self._url(f"manifests/{reference}"), headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"HEAD manifest {reference}")
        digest = resp.headers.get("docker-content-digest")
        if digest:
            return str(digest)
        return self.get_manifest(reference).digest

    def get_manifest(self, reference: str) -> Manifest:
        resp = self._send("GET", self._url(f"manifests/{reference}"), headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            raise StoreNotFoundError(f"no manifest {reference!r} in {self.address}", self.address)
        if resp.status_code != 200:
            raise self._fail(resp, f"GET manifest {reference}")
        data = resp.content
        if len(data) > _MAX_MANIFEST:
            raise StoreError(f"manifest {reference} is {len(data)} bytes: too large", self.address)
        expected = reference if DIGEST_RE.match(reference) else resp.headers.get("docker-content-digest")
        digest = verify_manifest_bytes(data, expected, self.address)
        media_type = resp.headers.get("content-type", OCI_MANIFEST).split(";")[0].strip()
        return Manifest(data, media_type, digest)

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        self._put_manifest(manifest, tag or manifest.digest)

    def _put_manifest(self, manifest: Manifest, reference: str) -> httpx.Response:
        resp = self._send(
            "PUT",
            self._url(f"manifests/{reference}"),
            headers={"Content-Type": manifest.media_type},
            content=manifest.data,
        )
        if resp.status_code != 201:
            raise self._fail(resp, f"PUT manifest {reference}")
        got = resp.headers.get("docker-content-digest")
        if got and got != manifest.digest:
            raise DigestMismatchError(
                f"the registry stored manifest {reference} as {got}, expected {manifest.digest}", self.address
            )
        return resp

    def attach(self, manifest: Manifest, subject: str) -> None:
        """PUT by digest; a registry with the referrers API says so with OCI-Subject.  One
        without (distribution 2.8) gets the fallback: the index tagged sha256-<hex>, which
        this client reads, adds to and writes back.  That read-modify-write is not atomic
        (distribution has no conditional PUT): two clients attaching at the same moment
        can lose an entry of the index.  So the referrer also gets a tag of its own
        (pyimg-ref.<subject>.<referrer>, written before the index), and referrers() adds
        what the tag list has and the index lost: no record is ever lost."""
        resp = self._put_manifest(manifest, manifest.digest)
        if resp.headers.get("oci-subject"):
            return
        self._put_manifest(manifest, referrer_tag(subject, manifest.digest))
        tag = fallback_tag(subject)
        try:
            current = [
                Descriptor.from_json(d, self.address)
                for d in self.get_manifest(tag).json.get("manifests", [])
            ]
        except StoreNotFoundError:
            current = []
        if any(d.digest == manifest.digest for d in current):
            return
        current.append(referrer_descriptor(manifest))
        self._put_manifest(index_manifest(current), tag)

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        url = self._url(f"referrers/{subject}")
        if artifact_type:
            url += "?" + str(httpx.QueryParams({"artifactType": artifact_type}))
        resp = self._send("GET", url, headers={"Accept": OCI_INDEX})
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith(OCI_INDEX):
            listed = resp.json().get("manifests", [])
        elif resp.status_code in (404, 405, 400):
            try:
                listed = self.get_manifest(fallback_tag(subject)).json.get("manifests", [])
            except StoreNotFoundError:
                listed = []
        else:
            raise self._fail(resp, f"GET referrers of {subject}")
        out = [Descriptor.from_json(d, self.address) for d in listed]
        if resp.status_code != 200:
            out += self._lost_referrers(subject, {d.digest for d in out})
        if artifact_type:
            out = [d for d in out if d.artifact_type == artifact_type]
        return out

    def _lost_referrers(self, subject: str, listed: set[str]) -> list[Descriptor]:
        """Referrers whose own tag exists but whom the fallback index lost to a race."""
        prefix = referrer_tag(subject, "sha256:")
        out = []
        for tag in self.tags():
            if tag.startswith(prefix) and not any(
                d.split(":", 1)[1].startswith(tag[len(prefix) :]) for d in listed
            ):
                out.append(referrer_descriptor(self.get_manifest(tag)))
        return out

    def tags(self) -> list[str]:
        out: list[str] = []
        url: str | None = self._url("tags/list?n=1000")
        while url:
            resp = self._send("GET", url)
            if resp.status_code == 404:
                return []
            if resp.status_code != 200:
                raise self._fail(resp, "list tags")
            out.extend(resp.json().get("tags") or [])
            link = resp.links.get("next", {}).get("url")
            url = str(resp.url.join(link)) if link else None
        return sorted(out)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text


def _errors(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            return "; ".join(
                f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)
            )
    except ValueError:
        pass
    text = resp.text.strip()[:200] if resp.content else ""
    return text or resp.reason_phrase or str(resp.status_code)
