"""Promotion: environments in order, the records each requires, and the audit trail.

Policy (TOML; without one: dev → test → prod, each later one requiring a passing boot
record made in the one before):

    [[environment]]
    name = "dev"

    [[environment]]
    name = "test"
    requires = [{ check = "boot", environment = "dev" }]

    [[environment]]
    name = "prod"
    requires = [{ check = "boot", environment = "test" }]

`in_order = true` (the default, top level) also requires the digest to have been
promoted to the environment before the target one.

Audit trail: every promotion is an artifact of its own (artifactType
application/vnd.pyimg.promotion.v1+json, subject = the image, one JSON layer: who, when,
from which environment, the previous digest, the records relied on) stored under a
tag of its own, `pyimg-audit.<UTC time>.<env>.<digest prefix>`.  Entries are never
rewritten, only added, and each has its own tag, so concurrent promoters cannot lose
one another's entries (the registry's tag list is the index); the environment's own
tag (its name) is moved after the entry is stored.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import re
import socket
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PromotionError, SpecError, StoreError
from .artifact import (
    A_ENV,
    EMPTY_CONFIG,
    EMPTY_JSON,
    PROMOTION_ARTIFACT,
    Descriptor,
    canonical_json,
    layers,
    referrer_manifest,
    rfc3339,
    sha256_digest,
)
from .base import Store
from .ops import StoreOptions, fetch_bytes, open_store, read_image_artifact
from .records import Record, list_records
from .refs import Ref, parse_ref

AUDIT_PREFIX = "pyimg-audit."
_ENV_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
A_ACTOR = "vnd.pyimg.promotion.actor"
A_TIME = "vnd.pyimg.promotion.time"
A_ENTRY = "vnd.pyimg.promotion"  # the entry's JSON again: status reads one manifest per entry


@dataclass(frozen=True)
class Requirement:
    check: str
    environment: str

    def describe(self) -> str:
        return f"a passing {self.check} record made in {self.environment}"


@dataclass(frozen=True)
class Environment:
    name: str
    requires: tuple[Requirement, ...] = ()


@dataclass(frozen=True)
class Policy:
    environments: tuple[Environment, ...]
    in_order: bool = True

    def names(self) -> list[str]:
        return [e.name for e in self.environments]

    def position(self, name: str) -> int:
        for i, env in enumerate(self.environments):
            if env.name == name:
                return i
        raise PromotionError(f"unknown environment {name!r} (the policy has: {', '.join(self.names())})")


def default_policy(names: tuple[str, ...] = ("dev", "test", "prod")) -> Policy:
    envs = [Environment(names[0])]
    for before, name in itertools.pairwise(names):
        envs.append(Environment(name, (Requirement("boot", before),)))
    return Policy(tuple(envs))


def load_policy(path: str | None) -> Policy:
    if path is None:
        return default_policy()
    try:
        with open(path, "rb") as f:
            value = tomllib.load(f)
    except OSError as exc:
        raise SpecError(f"cannot read the policy: {exc.strerror}", path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"the policy is not valid TOML: {exc}", path) from None
    unknown = set(value) - {"environment", "in_order"}
    if unknown:
        raise SpecError(f"unknown policy keys: {', '.join(sorted(unknown))}", path)
    raw = value.get("environment")
    if not isinstance(raw, list) or not raw:
        raise SpecError("the policy names no [[environment]]", path)
    envs: list[Environment] = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not _ENV_RE.match(name):
            raise SpecError(f"environment name {name!r}: lowercase letters, digits, '-', '_' (≤ 40)", path)
        if name in (e.name for e in envs):
            raise SpecError(f"environment {name!r} is named twice", path)
        reqs = []
        for req in item.get("requires", []):
            if not isinstance(req, dict) or not isinstance(req.get("environment"), str):
                raise SpecError(f"{name}: each requirement needs an environment", path)
            if req["environment"] not in (e.name for e in envs):
                raise SpecError(
                    f"{name}: requires a record from {req['environment']!r}, not an earlier environment", path
                )
            reqs.append(Requirement(str(req.get("check", "boot")), req["environment"]))
        envs.append(Environment(name, tuple(reqs)))
    in_order = value.get("in_order", True)
    if not isinstance(in_order, bool):
        raise SpecError("in_order must be true or false", path)
    return Policy(tuple(envs), in_order)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    environment: str
    digest: str
    actor: str
    time: str  # RFC 3339, UTC
    from_environment: str | None
    previous: str | None  # what the environment ran before
    records: tuple[str, ...]
    rollback: bool
    tag: str = ""  # the entry's own tag (not part of its content)

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "digest": self.digest,
            "actor": self.actor,
            "time": self.time,
            "from_environment": self.from_environment,
            "previous": self.previous,
            "records": list(self.records),
            "rollback": self.rollback,
        }

    @classmethod
    def from_json(cls, value: Any, tag: str, where: str) -> AuditEntry:
        try:
            return cls(
                environment=str(value["environment"]),
                digest=str(value["digest"]),
                actor=str(value["actor"]),
                time=str(value["time"]),
                from_environment=value.get("from_environment"),
                previous=value.get("previous"),
                records=tuple(value.get("records") or ()),
                rollback=bool(value.get("rollback")),
                tag=tag,
            )
        except (KeyError, TypeError):
            raise StoreError(f"audit entry {tag} is malformed", where) from None


def audit_tag(env: str, when: float, manifest_digest: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(int(when)))
    micro = round((when - int(when)) * 1e6) % 1_000_000
    return f"{AUDIT_PREFIX}{stamp}.{micro:06d}Z.{env}.{manifest_digest.split(':', 1)[1][:12]}"


def audit_trail(store: Store) -> list[AuditEntry]:
    """Every promotion in the store, oldest first."""
    out = []
    for tag in store.tags():
        if not tag.startswith(AUDIT_PREFIX):
            continue
        manifest = store.get_manifest(tag)
        value = manifest.json
        if value.get("artifactType") != PROMOTION_ARTIFACT:
            raise StoreError(f"{tag} is not a promotion artifact", store.address)
        blobs = layers(value, store.address)
        if len(blobs) != 1:
            raise StoreError(f"{tag}: expected one layer", store.address)
        annotations = value.get("annotations") if isinstance(value.get("annotations"), dict) else {}
        entry_json = annotations.get(A_ENTRY) if isinstance(annotations, dict) else None
        try:
            if isinstance(entry_json, str) and sha256_digest(entry_json.encode()) == blobs[0].digest:
                data = json.loads(entry_json)  # the same bytes as the layer, which need no GET
            else:
                data = json.loads(fetch_bytes(store, blobs[0], 1 << 20))
        except ValueError:
            raise StoreError(f"{tag} holds no JSON", store.address) from None
        out.append(AuditEntry.from_json(data, tag, store.address))
    out.sort(key=lambda e: (e.time, e.tag))
    return out


@dataclass(frozen=True)
class PromotionResult:
    ref: str
    environment: str
    digest: str
    entry: AuditEntry
    audit_tag: str
    relied_on: tuple[Record, ...] = field(default=())

    def summary(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "environment": self.environment,
            "digest": self.digest,
            "audit_tag": self.audit_tag,
            **{k: v for k, v in self.entry.to_json().items() if k not in ("environment", "digest")},
        }


def check_promotion(
    policy: Policy, target: str, digest: str, records: list[Record], history: list[AuditEntry]
) -> tuple[str | None, list[Record]]:
    """(the environment before the target, the records relied on), or PromotionError
    saying which record is missing or failed."""
    pos = policy.position(target)
    env = policy.environments[pos]
    before = policy.environments[pos - 1].name if pos > 0 else None
    if (
        policy.in_order
        and before is not None
        and not any(e.environment == before and e.digest == digest for e in history)
    ):
        raise PromotionError(
            f"{digest} was never promoted to {before}: promote it to {before} before {target} "
            f"(order: {' → '.join(policy.names())})"
        )
    relied = []
    for req in env.requires:
        matching = [
            r for r in records if r.result.check == req.check and r.result.environment == req.environment
        ]
        passed = [r for r in matching if r.result.passed]
        if passed:
            relied.append(passed[0])
            continue
        if matching:
            raise PromotionError(
                f"{target} requires {req.describe()}: the {req.check} record made in {req.environment} "
                f"({matching[0].digest}) failed"
            )
        raise PromotionError(f"{target} requires {req.describe()}: there is none for {digest}")
    return before, relied


def promote(
    ref: Ref | str,
    target: str,
    *,
    policy: Policy | None = None,
    actor: str | None = None,
    options: StoreOptions | None = None,
    clock: Callable[[], float] = time.time,
) -> PromotionResult:
    """Move the environment's tag to the digest if the records satisfy the policy."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if not ref.digest:
        raise SpecError(f"{ref}: promote names a digest (REF@sha256:…), not a tag")
    policy = policy or default_policy()
    policy.position(target)
    actor = actor or os.environ.get("PYIMG_ACTOR") or default_actor()
    store = open_store(ref, options)
    try:
        art = read_image_artifact(store, ref.digest)
        history = audit_trail(store)
        records = list_records(store, art.manifest.digest)
        before, relied = check_promotion(policy, target, art.manifest.digest, records, history)
        previous = store.resolve(target)
        rollback = previous != art.manifest.digest and any(
            e.environment == target and e.digest == art.manifest.digest for e in history
        )
        now = clock()
        entry = AuditEntry(
            environment=target,
            digest=art.manifest.digest,
            actor=actor,
            time=rfc3339(now),
            from_environment=before,
            previous=previous,
            records=tuple(r.digest for r in relied),
            rollback=rollback,
        )
        blob = canonical_json(entry.to_json())
        blob_desc = Descriptor(PROMOTION_ARTIFACT, sha256_digest(blob), len(blob))
        manifest = referrer_manifest(
            art.manifest.descriptor(),
            PROMOTION_ARTIFACT,
            blob_desc,
            {A_ENV: target, A_ACTOR: actor, A_TIME: entry.time, A_ENTRY: blob.decode()},
        )
        store.put_blob_bytes(EMPTY_JSON, EMPTY_CONFIG.digest)
        store.put_blob_bytes(blob, blob_desc.digest)
        tag = audit_tag(target, now, manifest.digest)
        store.put_manifest(manifest, tag)  # the audit entry first ...
        store.put_manifest(art.manifest, target)  # ... then the environment's tag moves
    finally:
        store.close()
    return PromotionResult(str(ref), target, art.manifest.digest, entry, tag, tuple(relied))


@dataclass(frozen=True)
class EnvironmentStatus:
    name: str
    digest: str | None
    since: str | None
    history: tuple[AuditEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.name,
            "digest": self.digest,
            "since": self.since,
            "history": [dict(e.to_json(), audit_tag=e.tag) for e in self.history],
        }


def status(
    ref: Ref | str, *, policy: Policy | None = None, options: StoreOptions | None = None
) -> list[EnvironmentStatus]:
    """Which digest each environment runs, since when, and its history."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    policy = policy or default_policy()
    store = open_store(ref, options)
    try:
        history = audit_trail(store)
        names = policy.names() + sorted({e.environment for e in history} - set(policy.names()))
        out = []
        for name in names:
            current = store.resolve(name)
            mine = tuple(e for e in history if e.environment == name)
            since = None
            for e in reversed(mine):  # the start of the current run of promotions of `current`
                if e.digest != current:
                    break
                since = e.time
            out.append(EnvironmentStatus(name, current, since, mine))
    finally:
        store.close()
    return out
