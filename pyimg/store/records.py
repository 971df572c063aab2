"""Check records: a boot result attached to an image's digest as an OCI referrer.

The record is a manifest with artifactType application/vnd.pyimg.check.v1+json, the
empty config, one layer (the result JSON, canonical) and `subject` = the image
manifest.  Its annotations repeat the check kind, pass/fail and environment so a
referrers listing is enough to choose; the result itself is always fetched (and
verified) before a promotion relies on it.  The same result attached twice is the same
manifest: attaching is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError, StoreError
from .artifact import (
    A_CHECK,
    A_ENV,
    A_PASSED,
    A_VERSION,
    CHECK_ARTIFACT,
    EMPTY_CONFIG,
    EMPTY_JSON,
    Descriptor,
    canonical_json,
    layers,
    referrer_manifest,
    sha256_digest,
)
from .base import Store
from .ops import StoreOptions, fetch_bytes, open_store, read_image_artifact
from .refs import Ref, parse_ref

_KNOWN = ("check", "passed", "environment", "kernel", "accel", "timings", "pyimg_version")


@dataclass(frozen=True)
class BootResult:
    """A check's result, as the boot code writes it (JSON with these keys; more are kept)."""

    check: str  # the kind of check: "boot", ...
    passed: bool
    environment: str  # where it was made: dev, test, ...
    kernel: str | None = None
    accel: str | None = None  # kvm, tcg
    timings: dict[str, float] = field(default_factory=dict)
    pyimg_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Any, where: str, *, environment: str | None = None) -> BootResult:
        if not isinstance(value, dict):
            raise SpecError("a check result must be a JSON object", where)
        env = value.get("environment")
        if environment is not None:
            if env not in (None, "", environment):
                raise SpecError(f"the result says it was made in {env!r}, not {environment!r}", where)
            env = environment
        if not isinstance(value.get("check"), str) or not value["check"]:
            raise SpecError("the result has no 'check' (the kind of check, e.g. \"boot\")", where)
        if not isinstance(value.get("passed"), bool):
            raise SpecError("the result has no boolean 'passed'", where)
        if not isinstance(env, str) or not env:
            raise SpecError("the result names no 'environment' (give --env)", where)
        timings = value.get("timings") or {}
        if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) for v in timings.values()):
            raise SpecError("'timings' must map names to seconds", where)
        for key in ("kernel", "accel", "pyimg_version"):
            if value.get(key) is not None and not isinstance(value[key], str):
                raise SpecError(f"{key!r} must be a string", where)
        return cls(
            check=value["check"],
            passed=value["passed"],
            environment=env,
            kernel=value.get("kernel"),
            accel=value.get("accel"),
            timings={str(k): float(v) for k, v in timings.items()},
            pyimg_version=value.get("pyimg_version"),
            extra={k: v for k, v in value.items() if k not in _KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            check=self.check,
            passed=self.passed,
            environment=self.environment,
            kernel=self.kernel,
            accel=self.accel,
            timings=self.timings,
            pyimg_version=self.pyimg_version,
        )
        return out


def load_result(path: str, environment: str | None) -> BootResult:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except OSError as exc:
        raise SpecError(f"cannot read the result: {exc.strerror}", path) from exc
    except ValueError as exc:
        raise SpecError(f"the result is not JSON: {exc}", path) from None
    return BootResult.from_json(value, path, environment=environment)


@dataclass(frozen=True)
class Record:
    digest: str  # the record manifest's
    subject: str  # the image manifest's
    result: BootResult


@dataclass(frozen=True)
class RecordResult:
    ref: str
    subject: str
    record: str
    passed: bool
    environment: str

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def attach_record(store: Store, reference: str, result: BootResult) -> tuple[str, str]:
    """Attach a result to the image a reference names; (subject digest, record digest)."""
    art = read_image_artifact(store, reference)
    blob = canonical_json(result.to_json())
    blob_desc = Descriptor(CHECK_ARTIFACT, sha256_digest(blob), len(blob))
    annotations = {
        A_CHECK: result.check,
        A_PASSED: "true" if result.passed else "false",
        A_ENV: result.environment,
    }
    if result.pyimg_version:
        annotations[A_VERSION] = result.pyimg_version
    manifest = referrer_manifest(art.manifest.descriptor(), CHECK_ARTIFACT, blob_desc, annotations)
    store.put_blob_bytes(EMPTY_JSON, EMPTY_CONFIG.digest)
    store.put_blob_bytes(blob, blob_desc.digest)
    store.attach(manifest, art.manifest.digest)
    return art.manifest.digest, manifest.digest


def record(
    ref: Ref | str,
    result: BootResult | Mapping[str, Any],
    *,
    environment: str | None = None,
    options: StoreOptions | None = None,
) -> RecordResult:
    """Attach a result to the image `ref` names.  `result` may be the boot code's JSON
    object as a dict (`pyimg boot REF --record --env ENV` calls
    `record(ref, result_dict, environment=ENV)`)."""
    if not isinstance(result, BootResult):
        result = BootResult.from_json(dict(result), "the boot result", environment=environment)
    elif environment is not None and result.environment != environment:
        raise SpecError(f"the result was made in {result.environment!r}, not {environment!r}")
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    store = open_store(ref, options)
    try:
        subject, digest = attach_record(store, ref.reference, result)
    finally:
        store.close()
    return RecordResult(str(ref.with_digest(subject)), subject, digest, result.passed, result.environment)


def list_records(store: Store, subject: str) -> list[Record]:
    """Every check record attached to `subject`, each fetched and verified."""
    out = []
    for desc in store.referrers(subject, CHECK_ARTIFACT):
        manifest = store.get_manifest(desc.digest)
        value = manifest.json
        subj = value.get("subject")
        if not isinstance(subj, dict) or subj.get("digest") != subject:
            raise StoreError(
                f"record {desc.digest} is listed for {subject} but names another subject", store.address
            )
        blobs = layers(value, store.address)
        if len(blobs) != 1:
            raise StoreError(f"record {desc.digest} has {len(blobs)} layers, expected 1", store.address)
        try:
            data = json.loads(fetch_bytes(store, blobs[0], 1 << 20))
        except ValueError:
            raise StoreError(f"record {desc.digest} holds no JSON", store.address) from None
        try:
            result = BootResult.from_json(data, f"{store.address}@{desc.digest}")
        except SpecError as exc:
            raise StoreError(f"record {desc.digest}: {exc.reason}", store.address) from None
        out.append(Record(desc.digest, subject, result))
    return out
