"""The whole pipeline: build → push → boot the stored image with each environment's
config and `--record` → promote dev → test → prod.  Config stays outside the image:
the digest that reaches prod is byte-identical to the one built, and a promotion
without the boot record of the environment before it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pyimg
from pyimg.boot.kernel import KernelFiles as Kernel
from pyimg.store import ops
from pyimg.store.promote import status
from tests.boot.qemu_support import kernel, no_qemu_left
from tests.oracles import run_cli

__all__ = ["kernel", "no_qemu_left"]  # fixtures

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stored_example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(the built image, its store reference by digest, the layout directory)."""
    work = tmp_path_factory.mktemp("pipeline")
    image = work / "app.sqfs"
    pyimg.build(
        [], str(image), spec=str(REPO / "examples" / "app" / "app.toml"), manifest=str(work / "app.json")
    )
    layout = work / "store"
    pushed = ops.push(str(image), f"oci:{layout}:app-1")
    return image, f"oci:{layout}@{pushed.digest}", str(layout)


def _boot(ref: str, kernel: Kernel, env: str, greeting: str) -> dict[str, object]:
    proc = run_cli(
        "boot", ref, "--kernel", str(kernel.vmlinuz), "--expect", "example: ready",
        "--health", "/health", "--port", "80", "--config", f"GREETING={greeting}",
        "--timeout", "150", "--record", "--env", env, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record: dict[str, object] = json.loads(proc.stdout)
    assert json.loads(str(record["health_body"])) == {"status": "ok", "greeting": greeting}
    return record


def test_promote_what_passed_through_dev_test_prod(
    stored_example: tuple[Path, str, str], kernel: Kernel
) -> None:
    image, ref, layout = stored_example
    built = pyimg.digest(str(image)).blake3
    refused = run_cli("promote", ref, "--to", "test")
    assert refused.returncode == 8 and "dev" in refused.stderr  # not in dev yet, no dev record

    for env, greeting in (("dev", "hello dev"), ("test", "hello test")):
        assert run_cli("promote", ref, "--to", env).returncode == 0
        record = _boot(ref, kernel, env, greeting)
        assert record["image_digest"] == built  # the booted bytes are the built bytes
    promoted = run_cli("promote", ref, "--to", "prod", "--json")
    assert promoted.returncode == 0, promoted.stderr  # test's passing record allows prod

    envs = {e.name: e for e in status(f"oci:{layout}")}
    assert {envs[name].digest for name in ("dev", "test", "prod")} == {ref.split("@", 1)[1]}
    pulled = image.parent / "prod.sqfs"
    assert run_cli("pull", f"oci:{layout}:prod", "-o", str(pulled)).returncode == 0
    assert pulled.read_bytes() == image.read_bytes()  # prod runs exactly what was built


def test_record_needs_a_store_reference_and_an_environment(
    stored_example: tuple[Path, str, str], kernel: Kernel
) -> None:
    image, ref, _ = stored_example
    common = ["--kernel", str(kernel.vmlinuz), "--expect", "x", "--record"]
    no_env = run_cli("boot", ref, *common)
    assert no_env.returncode == 2 and "--record needs --env" in no_env.stderr
    no_ref = run_cli("boot", str(image), *common, "--env", "dev")
    assert no_ref.returncode == 2 and "store reference" in no_ref.stderr
