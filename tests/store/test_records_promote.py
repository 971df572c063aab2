"""Records (referrers, and the sha256-<hex> fallback on the real registry), promotion,
the audit trail, status and rollback."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from pyimg.errors import PromotionError, SpecError, StoreError
from pyimg.store import ops
from pyimg.store.artifact import CHECK_ARTIFACT, OCI_INDEX, Manifest, index_manifest, referrer_descriptor
from pyimg.store.promote import audit_trail, load_policy, promote, status
from pyimg.store.records import BootResult, list_records, load_result, record
from pyimg.store.refs import parse_ref
from pyimg.store.registry import RegistryStore, fallback_tag

from .conftest import Image, Registry, make_image


def result(env: str, passed: bool = True, **extra: object) -> BootResult:
    value = {
        "check": "boot",
        "passed": passed,
        "environment": env,
        "kernel": "6.1.0-28-cloud-amd64",
        "accel": "tcg",
        "timings": {"boot": 2.0},
        "pyimg_version": "0.1.0",
        **extra,
    }
    return BootResult.from_json(value, "test")


def test_records_round_trip(store_addr: str, image: Image) -> None:
    digest = ops.push(image.path, f"{store_addr}:b1").digest
    r1 = record(f"{store_addr}:b1", result("dev"))
    r2 = record(f"{store_addr}@{digest}", result("test", passed=False, serial="log"))
    assert r1.subject == r2.subject == digest
    assert record(f"{store_addr}:b1", result("dev")).record == r1.record  # idempotent
    as_dict = {k: v for k, v in result("dev").to_json().items() if k != "environment"}
    assert record(f"{store_addr}:b1", as_dict, environment="dev").record == r1.record  # the boot code's way
    store = ops.open_store(store_addr)
    try:
        found = {r.digest: r.result for r in list_records(store, digest)}
    finally:
        store.close()
    assert set(found) == {r1.record, r2.record}
    assert found[r2.record].passed is False and found[r2.record].extra == {"serial": "log"}
    assert found[r1.record] == result("dev")


def test_registry_uses_fallback_tag(registry: Registry, image: Image) -> None:
    """Distribution 2.8 has no referrers API: the record is listed under sha256-<hex>."""
    repo = registry.repo()
    digest = ops.push(image.path, f"{repo}:b1").digest
    name = repo.split("/", 1)[1]
    api = httpx.get(f"http://{registry.host}/v2/{name}/referrers/{digest}")
    assert api.status_code == 404
    rec = record(f"{repo}:b1", result("dev"))
    index = httpx.get(
        f"http://{registry.host}/v2/{name}/manifests/{fallback_tag(digest)}", headers={"Accept": OCI_INDEX}
    ).json()
    assert index["mediaType"] == OCI_INDEX
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(rec.record, CHECK_ARTIFACT)]
    assert index["manifests"][0]["annotations"]["vnd.pyimg.check.passed"] == "true"


def test_registry_referrers_api_path() -> None:
    """A registry with the referrers API (a local test server): its answer is used, the
    fallback tag is never read, and the client filters by artifactType if the server did not."""
    subject = "sha256:" + "a" * 64
    rec = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": CHECK_ARTIFACT,
            "subject": {"digest": subject},
        }
    )
    other = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/other",
            "subject": {"digest": subject},
        }
    )
    listing = index_manifest([referrer_descriptor(rec), referrer_descriptor(other)])
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == f"/v2/app/referrers/{subject}":
            return httpx.Response(200, content=listing.data, headers={"Content-Type": OCI_INDEX})
        return httpx.Response(404)

    store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler))
    assert [d.digest for d in store.referrers(subject, CHECK_ARTIFACT)] == [rec.digest]
    assert all("manifests" not in p for p in paths)


def test_registry_with_referrers_api_skips_fallback_on_attach() -> None:
    puts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        puts.append(request.url.path)
        return httpx.Response(201, headers={"OCI-Subject": "sha256:" + "a" * 64})

    store = RegistryStore(parse_ref("127.0.0.1:9/app"), transport=httpx.MockTransport(handler))
    rec = Manifest.of({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"})
    store.attach(rec, "sha256:" + "a" * 64)
    assert puts == [f"/v2/app/manifests/{rec.digest}"]


def test_bad_result_files(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text('{"check": "boot"}')
    with pytest.raises(SpecError, match="passed"):
        load_result(str(f), "dev")
    f.write_text('{"check": "boot", "passed": true, "environment": "test"}')
    with pytest.raises(SpecError, match="not 'dev'"):
        load_result(str(f), "dev")
    f.write_text("[1]")
    with pytest.raises(SpecError):
        load_result(str(f), "dev")
    f.write_text('{"check": "boot", "passed": true}')
    assert load_result(str(f), "dev").environment == "dev"


def test_record_needs_an_image(store_addr: str, image: Image) -> None:
    ops.push(image.path, f"{store_addr}:b1")
    with pytest.raises(StoreError):
        record(f"{store_addr}:nope", result("dev"))


def test_promotion_flow_and_rollback(store_addr: str, image: Image, tmp_path: Path) -> None:
    old = ops.push(image.path, f"{store_addr}:b1").digest
    new_img = make_image(tmp_path, "new", size=2000)
    new = ops.push(new_img.path, f"{store_addr}:b2").digest
    at = f"{store_addr}@"

    with pytest.raises(PromotionError, match="never promoted to dev"):
        promote(at + old, "test", actor="alice")  # out of order
    promote(at + old, "dev", actor="alice")  # dev needs nothing
    with pytest.raises(PromotionError, match="passing boot record made in dev: there is none"):
        promote(at + old, "test", actor="alice")
    record(at + old, result("dev", passed=False))
    with pytest.raises(PromotionError, match=r"made in dev .* failed"):
        promote(at + old, "test", actor="alice")
    record(at + old, result("dev"))
    p = promote(at + old, "test", actor="alice")
    assert p.entry.from_environment == "dev" and len(p.entry.records) == 1
    with pytest.raises(PromotionError, match="made in test"):
        promote(at + old, "prod", actor="alice")
    record(at + old, result("test"))
    promote(at + old, "prod", actor="bob")

    for env in ("dev", "test", "prod"):
        record(at + new, result(env)) if env != "prod" else None
    promote(at + new, "dev", actor="ci")
    promote(at + new, "test", actor="ci")
    promote(at + new, "prod", actor="ci")
    rb = promote(at + old, "prod", actor="oncall")  # a rollback: an older digest that passed
    assert rb.entry.rollback and rb.entry.previous == new

    envs = {e.name: e for e in status(store_addr)}
    assert envs["prod"].digest == old and envs["prod"].since == rb.entry.time
    assert [e.digest for e in envs["prod"].history] == [old, new, old]
    assert [e.actor for e in envs["prod"].history] == ["bob", "ci", "oncall"]
    assert envs["test"].digest == new and envs["dev"].digest == new
    pulled = ops.pull(f"{store_addr}:prod", str(tmp_path / "prod.sqfs"))
    assert pulled.digest == old
    with pytest.raises(PromotionError, match="unknown environment"):
        promote(at + old, "staging")
    with pytest.raises(SpecError, match="digest"):
        promote(f"{store_addr}:b1", "dev")


def test_policy_file(store_addr: str, image: Image, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "in_order = false\n"
        '[[environment]]\nname = "ci"\n'
        '[[environment]]\nname = "live"\nrequires = [{ check = "boot", environment = "ci" },'
        ' { check = "smoke", environment = "ci" }]\n'
    )
    pol = load_policy(str(policy))
    assert pol.names() == ["ci", "live"] and not pol.in_order
    d = ops.push(image.path, f"{store_addr}:b").digest
    record(f"{store_addr}@{d}", result("ci"))
    with pytest.raises(PromotionError, match="smoke"):
        promote(f"{store_addr}@{d}", "live", policy=pol)
    record(
        f"{store_addr}@{d}",
        BootResult.from_json({"check": "smoke", "passed": True, "environment": "ci"}, "t"),
    )
    assert promote(f"{store_addr}@{d}", "live", policy=pol).entry.from_environment == "ci"
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[environment]]\nname = "a"\nrequires = [{ environment = "b" }]\n[[environment]]\nname = "b"\n'
    )
    with pytest.raises(SpecError, match="earlier"):
        load_policy(str(bad))


def test_concurrent_promoters_lose_no_entries(store_addr: str, image: Image) -> None:
    d = ops.push(image.path, f"{store_addr}:b").digest
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            promote(f"{store_addr}@{d}", "dev", actor=f"p{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = ops.open_store(store_addr)
    try:
        trail = audit_trail(store)
    finally:
        store.close()
    assert sorted(e.actor for e in trail) == [f"p{i}" for i in range(6)]


def test_audit_entry_format(store_addr: str, image: Image) -> None:
    d = ops.push(image.path, f"{store_addr}:b").digest
    p = promote(f"{store_addr}@{d}", "dev", actor="alice", clock=lambda: 1767225600.25)
    assert p.audit_tag.startswith("pyimg-audit.20260101T000000.250000Z.dev.")
    store = ops.open_store(store_addr)
    try:
        m = json.loads(store.get_manifest(p.audit_tag).data)
    finally:
        store.close()
    assert m["artifactType"] == "application/vnd.pyimg.promotion.v1+json"
    assert m["subject"]["digest"] == d
    assert m["annotations"]["vnd.pyimg.promotion.time"] == "2026-01-01T00:00:00.250000Z"


def test_no_record_lost_when_the_fallback_index_is(registry: Registry, image: Image) -> None:
    """Concurrent attachers race on the sha256-<hex> index (no conditional PUT in
    distribution 2.8); each record's own tag keeps it findable."""
    repo = registry.repo()
    digest = ops.push(image.path, f"{repo}:b").digest
    results = [result("dev", run=i) for i in range(6)]
    threads = [threading.Thread(target=record, args=(f"{repo}@{digest}", r)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # and the worst case: the index lost everything
    store = ops.open_store(repo)
    assert isinstance(store, RegistryStore)
    try:
        store.put_manifest(index_manifest([]), fallback_tag(digest))
        found = list_records(store, digest)
    finally:
        store.close()
    assert sorted(r.result.extra["run"] for r in found) == list(range(6))
