"""skopeo interop (layout ↔ registry, inspect --raw) and the commands end to end."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

from pyimg.store import ops

from .conftest import SKOPEO, Image, Registry, leftovers, needs_skopeo


def skopeo(*args: str) -> str:
    assert SKOPEO is not None
    proc = subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_skopeo
def test_skopeo_copies_what_pyimg_pushed(registry: Registry, image: Image, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    pushed = ops.push(image.path, f"oci:{layout}:v1")
    store = ops.open_store(f"oci:{layout}")
    ours = store.get_manifest("v1").data
    assert skopeo("inspect", "--raw", f"oci:{layout}:v1").encode().rstrip(b"\n") == ours

    # layout → registry with skopeo; pyimg pulls it, the digest is unchanged
    repo = registry.repo()
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{repo}:v1")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{repo}:v1").encode().rstrip(b"\n")
    assert raw == ours
    pulled = ops.pull(f"{repo}:v1", str(tmp_path / "a.sqfs"))
    assert pulled.digest == pushed.digest
    assert filecmp.cmp(tmp_path / "a.sqfs", image.path, shallow=False)

    # pyimg → registry, skopeo → a new layout, pyimg pulls from it
    repo2 = registry.repo()
    ops.push(image.path, f"{repo2}:v2")
    skopeo("copy", "--src-tls-verify=false", f"docker://{repo2}:v2", f"oci:{tmp_path / 'copy'}:v2")
    again = ops.pull(f"oci:{tmp_path / 'copy'}:v2", str(tmp_path / "b.sqfs"))
    assert again.digest == pushed.digest
    assert filecmp.cmp(tmp_path / "b.sqfs", image.path, shallow=False)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).resolve().parents[2])
    e = dict(os.environ, PYTHONPATH=root)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pyimg.cli", *args], capture_output=True, text=True, timeout=120, env=e
    )


def test_cli_push_record_promote_status(registry: Registry, image: Image, tmp_path: Path) -> None:
    repo = registry.repo()
    proc = run("push", image.path, f"{repo}:b1")
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest.startswith("sha256:")
    proc = run("push", image.path, f"{repo}:b1", "--json")
    assert json.loads(proc.stdout)["blobs_uploaded"] == 0

    res = tmp_path / "result.json"
    res.write_text(
        json.dumps(
            {
                "check": "boot",
                "passed": True,
                "kernel": "k",
                "accel": "tcg",
                "timings": {"boot": 1.9},
                "pyimg_version": "0.1.0",
            }
        )
    )
    proc = run("record", f"{repo}:b1", "--result", str(res), "--env", "dev", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["subject"] == digest

    proc = run("promote", f"{repo}@{digest}", "--to", "test", "--actor", "ci")
    assert proc.returncode == 8 and "never promoted to dev" in proc.stderr
    assert run("promote", f"{repo}@{digest}", "--to", "dev", "--actor", "ci").returncode == 0
    proc = run("promote", f"{repo}@{digest}", "--to", "test", "--json", env={"PYIMG_ACTOR": "robot"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["actor"] == "robot"
    proc = run("promote", f"{repo}@{digest}", "--to", "prod")
    assert proc.returncode == 8 and "made in test" in proc.stderr

    proc = run("status", repo, "--json")
    envs = {e["environment"]: e for e in json.loads(proc.stdout)}
    assert envs["test"]["digest"] == digest and envs["prod"]["digest"] is None
    proc = run("status", repo)
    assert f"test: {digest} since" in proc.stdout

    out = tmp_path / "out"
    out.mkdir()
    proc = run("pull", f"{repo}:test", "-o", str(out / "t.sqfs"))
    assert proc.returncode == 0, proc.stderr
    assert filecmp.cmp(out / "t.sqfs", image.path, shallow=False)


def test_cli_errors(registry: Registry, tmp_path: Path) -> None:
    proc = run("pull", f"{registry.repo()}:none", "-o", str(tmp_path / "x"))
    assert proc.returncode == 10 and "no manifest" in proc.stderr
    proc = run("pull", "not a ref", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2
    proc = run("push", str(tmp_path / "missing.sqfs"), f"{registry.repo()}:v")
    assert proc.returncode != 0 and "missing.sqfs" in proc.stderr
    assert leftovers(tmp_path, set()) == set()


def test_sigterm_during_pull_leaves_nothing(image: Image, tmp_path: Path) -> None:
    """A local test server sends the image slowly; SIGTERM mid-download exits 130 and
    leaves neither the output nor its temp file."""
    import http.server
    import signal
    import threading
    import time

    layout = tmp_path / "l"
    ops.push(image.path, f"oci:{layout}:v")
    store = ops.open_store(f"oci:{layout}")
    manifest = store.get_manifest("v")
    blobs = layout / "blobs" / "sha256"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.endswith("/manifests/v"):
                body = manifest.data
                self.send_response(200)
                self.send_header("Content-Type", manifest.media_type)
                self.send_header("Docker-Content-Digest", manifest.digest)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            digest = self.path.rsplit("/", 1)[1]
            data = (blobs / digest.split(":")[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(0, len(data), 4096):
                    self.wfile.write(data[i : i + 4096])
                    self.wfile.flush()
                    if i >= 4 * 4096:
                        sending.set()  # the pull is writing (its temp file may have no name)
                    time.sleep(0.05)
            except OSError:
                pass

    sending = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        root = str(Path(__file__).resolve().parents[2])
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyimg.cli",
                "pull",
                f"127.0.0.1:{server.server_port}/app:v",
                "-o",
                str(out_dir / "o.sqfs"),
            ],
            env=dict(os.environ, PYTHONPATH=root),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert sending.wait(30), "the pull never started downloading"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 130 and "interrupted" in err
    assert leftovers(out_dir, set()) == set()
