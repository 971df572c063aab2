"""`pyimg boot` under QEMU (TCG here): images built by pyimg from busybox trees boot to
their marker from both formats; the example passes its health check with two configs;
a panic, a hang and a failing init end in a clear failure within the timeout; QEMU
never outlives a boot (checked by pid); the image's digest never changes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyimg
from pyimg.boot import boot_cli
from pyimg.boot import run as boot_run
from pyimg.boot.kernel import KernelFiles as Kernel
from pyimg.boot.run import BootOptions, boot
from pyimg.errors import BootError
from tests.boot.qemu_support import alive, assert_gone, kernel, make_busybox_root, no_qemu_left

__all__ = ["kernel", "no_qemu_left"]  # fixtures

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0  # generous: 2 shared cores under TCG; a boot takes ~3-6 s when idle

MARKER_INIT = """#!/bin/busybox sh
/bin/busybox mount -t tmpfs tmpfs /tmp && /bin/busybox mkdir /tmp/bin && /bin/busybox --install -s /tmp/bin
export PATH=/tmp/bin
mount -t proc proc /proc
echo "PYIMG-TEST up: $(cat /run/pyimg/config/WHO 2>/dev/null) ro=$(grep -c ' / .* ro,' /proc/mounts)"
poweroff -f
"""


def _image(tmp_path: Path, init: str, fmt: str = "squashfs", name: str = "root") -> Path:
    root = make_busybox_root(tmp_path / f"{name}-tree", init)
    out = tmp_path / f"{name}.{fmt}"
    pyimg.build([str(root)], str(out), format=fmt, owner="root", epoch=1_700_000_000)
    return out


def _opts(image: Path, kernel: Kernel, **kw: object) -> BootOptions:
    base: dict[str, object] = {
        "image": str(image),
        "kernel": str(kernel.vmlinuz),
        "expect": "PYIMG-TEST up",
        "timeout": TIMEOUT,
        "accel": "auto",
    }
    base.update(kw)
    return BootOptions(**base)  # type: ignore[arg-type]


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyimg.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(("fmt", "drive"), [("squashfs", "virtio"), ("ext4", "virtio"), ("ext4", "nvme")])
def test_boots_to_marker_and_leaves_image_unchanged(
    tmp_path: Path, kernel: Kernel, fmt: str, drive: str, no_qemu_left: list[int]
) -> None:
    image = _image(tmp_path, MARKER_INIT, fmt)
    before = pyimg.digest(str(image))
    log = tmp_path / "console.log"
    result = boot(_opts(image, kernel, drive=drive, config=(("WHO", fmt),), log=str(log)))
    no_qemu_left.append(result.qemu_pid or -1)
    assert result.passed, (result.message, result.console_tail)
    assert result.reason == "passed"
    assert result.marker_line == f"PYIMG-TEST up: {fmt} ro=1"  # the root is mounted read-only
    assert result.image_digest == before.blake3 == pyimg.digest(str(image)).blake3
    assert result.image_format == fmt and result.drive == drive
    assert result.accel in ("kvm", "tcg") and result.accel_note
    assert result.seconds_to_marker is not None and 0 < result.seconds_to_marker < TIMEOUT
    assert "PYIMG-TEST up" in log.read_text(errors="replace")  # the whole console is kept
    json.dumps(result.to_json())  # the record is JSON


def test_cli_json_record(tmp_path: Path, kernel: Kernel) -> None:
    image = _image(tmp_path, MARKER_INIT, "ext4")
    proc = _cli(
        "boot", str(image), "--kernel", str(kernel.vmlinuz),
        "--expect", "PYIMG-TEST up: cli", "--config", "WHO=cli", "--timeout", str(TIMEOUT), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    for key in (
        "passed",
        "reason",
        "kernel",
        "accel",
        "seconds_to_marker",
        "seconds_to_health",
        "image_digest",
    ):
        assert key in record
    assert record["passed"] is True and record["image_digest"] == pyimg.digest(str(image)).blake3
    assert_gone(record["qemu_pid"])


@pytest.fixture(scope="module")
def example_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("example") / "app.sqfs"
    pyimg.build([], str(out), spec=str(REPO / "examples" / "app" / "app.toml"), manifest=None)
    return out


def test_example_health_check_with_two_configs(
    example_image: Path, kernel: Kernel, no_qemu_left: list[int]
) -> None:
    """Two boots, two configs, one image digest; the app reports each config value.  The
    second boot asks for a host port that is in use: another one is picked."""
    before = pyimg.digest(str(example_image)).blake3
    digests = set()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for greeting, host_port in (("bonjour", None), ("hej", taken)):
            result = boot(
                _opts(
                    example_image,
                    kernel,
                    expect="example: ready",
                    health="/health",
                    port=80,
                    host_port=host_port,
                    config=(("GREETING", greeting),),
                )
            )
            no_qemu_left.append(result.qemu_pid or -1)
            assert result.passed, (result.message, result.console_tail)
            assert result.health_status == 200
            assert json.loads(result.health_body or "") == {"status": "ok", "greeting": greeting}
            assert result.seconds_to_health is not None and result.seconds_to_marker is not None
            assert result.seconds_to_health >= result.seconds_to_marker
            assert result.health_url == f"http://127.0.0.1:{result.host_port}/health"
            digests.add(result.image_digest)
    assert result.host_port != taken and f"host port {taken} is in use" in result.message
    assert digests == {before} and pyimg.digest(str(example_image)).blake3 == before


def test_health_that_never_answers(example_image: Path, kernel: Kernel) -> None:
    result = boot(
        _opts(example_image, kernel, expect="example: ready", health="/health", port=81,
              health_timeout=3.0)
    )  # fmt: skip
    assert not result.passed and result.reason == "health-failed", result.message
    assert "never answered 2xx" in result.message and result.marker_line
    assert_gone(result.qemu_pid)


@pytest.mark.parametrize(
    ("init", "reason", "words"),
    [
        ("echo c > /proc/sysrq-trigger", "panic", "sysrq"),
        ("exit 3", "init-failed", "exit status 3"),
        ("sleep 1000", "timeout", "no console line matched"),
        ("--init=/sbin/nowhere", "initramfs-failed", "init /sbin/nowhere not found"),
    ],
    ids=["panic", "init-exits-3", "hang", "no-such-init"],
)
def test_failures_are_clear_and_bounded(
    tmp_path: Path, kernel: Kernel, init: str, reason: str, words: str
) -> None:
    extra = [init] if init.startswith("--") else []
    script = (
        MARKER_INIT.split("echo", 1)[0] + "echo 'PYIMG-TEST booting'\n" + (init if not extra else "") + "\n"
    )
    image = _image(tmp_path, script)
    timeout = 20.0 if reason == "timeout" else TIMEOUT
    started = time.monotonic()
    proc = _cli(
        "boot", str(image), "--kernel", str(kernel.vmlinuz),
        "--expect", "PYIMG-TEST never", "--timeout", str(timeout), "--json", "--log", str(tmp_path / "log"),
        *extra,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == boot_cli.BOOT_FAILED_EXIT == 11, proc.stderr
    record = json.loads(proc.stdout)
    assert record["passed"] is False and record["reason"] == reason, record["message"]
    assert words in record["message"]
    # (a hang may time out before the guest's first line on a loaded machine)
    # (the initramfs stops before the image's init runs)
    if reason not in ("timeout", "initramfs-failed"):
        assert "PYIMG-TEST booting" in (tmp_path / "log").read_text(errors="replace")
    assert record["console_tail"] and record["log"] == str(tmp_path / "log")
    assert f"boot failed ({reason})" in proc.stderr
    assert elapsed < timeout + 15  # ended by the guest, or by the timeout (plus start-up)
    assert_gone(record["qemu_pid"])


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_signal_stops_qemu(tmp_path: Path, kernel: Kernel, sig: signal.Signals) -> None:
    image = _image(tmp_path, "#!/bin/busybox sh\n/bin/busybox sleep 1000\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyimg.cli", "boot", str(image), "--kernel", str(kernel.vmlinuz),
         "--expect", "never", "--timeout", "300", "--accel", "tcg"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        qemu: list[int] = []
        while not qemu and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            qemu = _children(proc.pid)
        assert qemu, "QEMU did not start"
        time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig != signal.SIGKILL:
        assert proc.returncode == 130
        assert b"interrupted" in proc.stderr.read()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10  # SIGKILL: the kernel's PR_SET_PDEATHSIG, asynchronously
    while any(alive(p) for p in qemu) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in qemu:
        assert_gone(pid)


def test_qemu_missing_names_the_package(tmp_path: Path, kernel: Kernel) -> None:
    image = _image(tmp_path, MARKER_INIT)
    proc = _cli(
        "boot", str(image), "--kernel", str(kernel.vmlinuz), "--expect", "x",
        env={"PYIMG_QEMU": "qemu-system-x86_64-not-here"},
    )  # fmt: skip
    assert proc.returncode == BootError.exit_code
    assert "qemu-system-x86" in proc.stderr and "apt-get install" in proc.stderr


def test_bad_input_is_a_boot_error(tmp_path: Path, kernel: Kernel) -> None:
    image = _image(tmp_path, MARKER_INIT)
    cases: list[tuple[dict[str, object], str]] = [
        ({"image": str(tmp_path / "missing")}, "no such image"),
        ({"kernel": str(tmp_path / "missing")}, "no such kernel"),
        ({"expect": "("}, "not a regular expression"),
        ({"health": "/health"}, "needs --port"),
        ({"health": "health", "port": 80}, "starting with /"),
        ({"initrd": "none", "config": (("A", "b"),)}, "needs an initramfs"),
        ({"drive": "scsi"}, "unknown drive"),
        ({"accel": "hvf"}, "unknown accelerator"),
    ]
    for change, words in cases:
        with pytest.raises(BootError, match=words):
            boot(dataclasses.replace(_opts(image, kernel), **change))  # type: ignore[arg-type]
    with pytest.raises(BootError, match="KEY=VALUE"):
        boot_run.parse_config(["no-equals"])
    with pytest.raises(BootError, match="not a valid name"):
        boot_run.parse_config(["bad key=1"])
    config = tmp_path / "boot.conf"
    config.write_text("# comment\nA=1\n\nB=two words\n")
    assert boot_run.parse_config(["A=3"], [str(config)]) == (("A", "3"), ("B", "two words"))


def test_run_is_interactive_forwards_and_quits(example_image: Path, kernel: Kernel) -> None:
    """`pyimg run` on a terminal: the console is the terminal, the forward answers,
    Ctrl-A x quits QEMU, and QEMU is gone when pyimg run returns."""
    import pty
    import re
    import select
    import urllib.request

    pid, fd = pty.fork()
    if pid == 0:  # the child: pyimg run on the pty
        os.environ["PYTHONPATH"] = str(REPO)
        argv = [sys.executable, "-m", "pyimg.cli", "run", str(example_image), "--kernel", str(kernel.vmlinuz)]
        os.execv(sys.executable, [*argv, "--forward", "0:80", "--config", "GREETING=tty"])
    out = b""
    qemu: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"example: ready on port 80 (greeting: tty)" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
            qemu = qemu or _children(pid)
        assert b"example: ready on port 80 (greeting: tty)" in out, out[-2000:]
        port = int(re.search(rb"http://127\.0\.0\.1:(\d+)/ -> guest port 80", out).group(1))  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert json.loads(answer.read()) == {"status": "ok", "greeting": "tty"}
        os.write(fd, b"\x01x")  # Ctrl-A x: QEMU's quit key
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert qemu
    for p in qemu:
        assert_gone(p)
