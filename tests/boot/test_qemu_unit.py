"""The QEMU runner's pieces without booting: the command line, the KVM probe, ports,
the console reader, the health check, config parsing."""

from __future__ import annotations

import http.server
import io
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from pyimg.boot import qemu as q
from pyimg.boot.run import BootOptions, default_modules, image_format, kernel_command_line
from pyimg.errors import BootError


def test_command_line_attaches_the_image_read_only() -> None:
    spec = q.QemuSpec(kernel="/k", append="console=ttyS0", initrd="/i", image="/a,b.img")
    argv = q.command(spec, "qemu")
    assert "-no-reboot" in argv and "-nodefaults" in argv
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("file=/a,,b.img,") and "readonly=on" in drive and "format=raw" in drive
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert "-netdev" not in argv  # no network unless asked
    nvme = q.command(q.QemuSpec(kernel="/k", append="", image="/a.img", drive="nvme"), "qemu")
    assert "snapshot=on" in nvme[nvme.index("-drive") + 1]  # a throw-away overlay
    kvm = q.command(q.QemuSpec(kernel="/k", append="", accel="kvm"), "qemu")
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_forwards_bind_loopback_only() -> None:
    spec = q.QemuSpec(kernel="/k", append="", forwards=(q.Forward(8080, 80), q.Forward(2222, 22)))
    argv = q.command(spec, "qemu")
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in netdev and "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert "virtio-net-pci,netdev=net0" in argv
    assert q.parse_forwards(["8080:80", "0:22"]) == (q.Forward(8080, 80), q.Forward(0, 22))
    for bad in ("80", "a:b", "1:0", "70000:80"):
        with pytest.raises(BootError, match="--forward"):
            q.parse_forwards([bad])


def test_kvm_probe_needs_a_device_that_opens_read_write(tmp_path: Path) -> None:
    assert q.kvm_usable(str(tmp_path / "nope"))[0] is False
    usable, why = q.kvm_usable("/dev/null")  # opens, but is no KVM
    assert usable is False and "cannot create a VM" in why
    assert q.choose_accel("tcg") == ("tcg", "requested")
    with pytest.raises(BootError, match="unknown accelerator"):
        q.choose_accel("hvf")


def test_ports() -> None:
    port = q.free_port()
    assert q.port_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not q.port_free(port)


def test_qemu_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYIMG_QEMU", "qemu-system-nothing")
    with pytest.raises(BootError, match=r"apt-get install --no-install-recommends qemu-system-x86"):
        q.find_qemu()


def test_console_reads_lines_and_sees_a_panic() -> None:
    r, w = os.pipe()
    log = io.BytesIO()
    with os.fdopen(r, "rb", buffering=0) as reader:
        console = q.Console(reader, log)
        os.write(w, b"booting\r\nready: 4")
        time.sleep(0.05)
        os.write(w, b"2\nKernel panic - not syncing: Attempted to kill init! exitcode=0x00000300\n")
        found = console.wait_for(re.compile(r"ready: \d+"), time.monotonic() + 5)
        assert found == (1, "ready: 42")
        os.close(w)
        assert console.wait_for(re.compile("never"), time.monotonic() + 5) is None
        console.join(5)
    assert console.eof and console.panic == "Attempted to kill init! exitcode=0x00000300"
    assert log.getvalue().startswith(b"booting\r\nready: 42\n")


def test_console_wait_times_out() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as reader:
        console = q.Console(reader, None)
        started = time.monotonic()
        assert console.wait_for(re.compile("x"), started + 0.3) is None
        assert 0.25 < time.monotonic() - started < 2
        os.close(w)
        console.join(5)


def test_http_get() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        answer = q.http_get(port, "/health")
        assert answer.status == 200 and answer.body == b"ok"
        assert q.http_get(port, "/other").status == 503
    finally:
        server.shutdown()
        server.server_close()
    assert q.http_get(q.free_port(), "/health").status is None  # refused: no answer


def test_kernel_command_line_and_formats(tmp_path: Path) -> None:
    options = BootOptions(image="i", kernel="k", expect="x", append="quiet", init="/bin/app")
    line = kernel_command_line(options, "squashfs")
    assert line.split() == [
        "console=ttyS0", "root=/dev/vda", "rootfstype=squashfs", "ro", "init=/bin/app", "panic=-1", "quiet",
    ]  # fmt: skip
    nvme = BootOptions(image="i", kernel="k", expect="x", drive="nvme")
    assert "root=/dev/nvme0n1" in kernel_command_line(nvme, "ext4")
    sq = tmp_path / "a.sqfs"
    sq.write_bytes(b"hsqs" + bytes(2000))
    ext = tmp_path / "a.ext4"
    ext.write_bytes(bytes(1080) + b"\x53\xef" + bytes(1000))
    assert image_format(str(sq)) == "squashfs" and image_format(str(ext)) == "ext4"
    other = tmp_path / "x"
    other.write_bytes(bytes(4096))
    with pytest.raises(BootError, match="not squashfs or ext4"):
        image_format(str(other))
    root = tmp_path / "k"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-x").write_bytes(b"")
    (root / "lib" / "modules" / "6.1.0-x").mkdir(parents=True)
    assert default_modules(str(root / "boot" / "vmlinuz-6.1.0-x")) == str(
        root / "lib" / "modules" / "6.1.0-x"
    )
    assert default_modules(str(root / "boot" / "bzImage")) is None


def test_cli_defaults_match_the_library() -> None:
    from pyimg.boot import boot_cli, run

    assert boot_cli.DEFAULT_INIT == run.DEFAULT_INIT
    assert boot_cli.DEFAULT_MEMORY == run.DEFAULT_MEMORY
    assert boot_cli.DEFAULT_TIMEOUT == run.DEFAULT_TIMEOUT
