"""The QEMU runner: one guest, its serial console read continuously, killed on every path.

    spec = QemuSpec(kernel="vmlinuz", initrd="boot.cpio", image="root.sqfs", append="...")
    with Qemu(spec, log_path="console.log") as vm:
        line = vm.console.wait_for(re.compile("ready"), deadline)

What it guarantees (docs/boot.md):

- the image is attached read-only (`readonly=on`, or `snapshot=on` where the device
  model cannot present a read-only disk): a boot never writes to it;
- the serial console is a pipe read by a thread from the first byte to EOF, copied to
  the log file and kept as a tail (an unread console stalls a guest);
- QEMU runs in its own session (`start_new_session=True`), and its process group is
  killed (SIGKILL, after a short SIGTERM) when the `Qemu` context ends, whatever ended
  it: a pass, a failure, an exception, Ctrl-C.  It also gets SIGKILL should pyimg itself
  die (PR_SET_PDEATHSIG);
- KVM is used only when opening `/dev/kvm` read-write and creating a VM works, and a
  KVM start that QEMU refuses falls back to TCG (`-cpu max`);
- forwarded ports are bound to 127.0.0.1 only.

Library code: nothing here prints; errors are `BootError`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

from ..errors import BootError

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"  # Debian's package for qemu-system-x86_64

_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_PR_SET_PDEATHSIG = 1


def find_qemu(binary: str | None = None) -> str:
    """The path of qemu-system-x86_64 (or `binary`); a BootError naming the package if missing."""
    name = binary or os.environ.get("PYIMG_QEMU") or QEMU
    path = shutil.which(name)
    if path is None:
        raise BootError(
            f"{name} not found: install it with "
            f"`apt-get install --no-install-recommends {QEMU_PACKAGE}` (Debian/Ubuntu)"
        )
    return path


def kvm_usable(device: str = "/dev/kvm") -> tuple[bool, str]:
    """(usable, why): KVM only where /dev/kvm opens read-write and a VM can be created.

    A present but unusable /dev/kvm is common on CI runners (no permission, nested
    virtualisation off); QEMU itself may still refuse it, which `Qemu` handles by
    falling back to TCG.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != 12:
            return False, f"{device}: KVM API version {version}, not 12"
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return False, f"{device}: cannot create a VM ({exc.strerror})"
    finally:
        os.close(fd)
    return True, f"{device} opens read-write and creates a VM"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port on `host` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (QEMU binds it; a lost race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Forward:
    """A TCP port forward: 127.0.0.1:host on the host to the guest's port."""

    host: int
    guest: int

    def rule(self) -> str:
        return f"tcp:127.0.0.1:{self.host}-:{self.guest}"


@dataclass(frozen=True)
class QemuSpec:
    kernel: str
    append: str
    initrd: str | None = None
    image: str | None = None
    drive: str = "virtio"  # virtio (virtio-blk, /dev/vda) or nvme (/dev/nvme0n1)
    memory: int = 512  # MiB
    cpus: int = 1
    accel: str = "tcg"  # kvm or tcg, already decided
    cpu: str | None = None  # QEMU's -cpu model; default host (KVM) or max (TCG)
    network: bool = False  # a virtio-net NIC on QEMU's user network (10.0.2.15, gateway 10.0.2.2)
    forwards: tuple[Forward, ...] = ()
    extra_args: tuple[str, ...] = ()


def root_device(drive: str) -> str:
    """The guest's name of the image's disk for each drive model."""
    return {"virtio": "/dev/vda", "nvme": "/dev/nvme0n1"}[drive]


def command(spec: QemuSpec, qemu: str, *, interactive: bool = False) -> list[str]:
    """QEMU's command line for `spec` (brief §5's recipe, made explicit)."""
    if spec.drive not in ("virtio", "nvme"):
        raise BootError(f"unknown drive {spec.drive!r} (choose virtio or nvme)")
    args = [qemu, "-nodefaults", "-no-user-config", "-machine", "q35", "-m", str(spec.memory)]
    args += ["-smp", str(spec.cpus), "-no-reboot", "-display", "none"]
    if spec.accel == "kvm":
        args += ["-accel", "kvm", "-cpu", spec.cpu or "host"]
    else:
        args += ["-accel", "tcg", "-cpu", spec.cpu or "max"]
    if interactive:
        # The terminal is the serial console; Ctrl-A x quits, Ctrl-A c is the monitor.
        args += ["-chardev", "stdio,id=con,mux=on,signal=off", "-serial", "chardev:con"]
        args += ["-mon", "chardev=con,mode=readline"]
    else:
        args += ["-serial", "stdio", "-monitor", "none"]
    args += ["-kernel", spec.kernel, "-append", spec.append]
    if spec.initrd is not None:
        args += ["-initrd", spec.initrd]
    if spec.image is not None:
        image = spec.image.replace(",", ",,")
        if spec.drive == "virtio":
            args += ["-drive", f"file={image},format=raw,if=virtio,readonly=on,media=disk"]
        else:
            # QEMU's NVMe model cannot present a read-only namespace: writes go to a
            # throw-away overlay in a temp file (snapshot=on) and never reach the image.
            args += ["-drive", f"file={image},format=raw,if=none,id=root,snapshot=on"]
            args += ["-device", "nvme,serial=pyimg-root,drive=root"]
    if spec.network or spec.forwards:
        netdev = "user,id=net0,ipv6=off"
        for fwd in spec.forwards:
            netdev += ",hostfwd=" + fwd.rule()
        args += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    args += list(spec.extra_args)
    return args


class Console:
    """Reads a guest's serial console from a pipe until EOF, on its own thread.

    Every byte goes to the log file (if any) as it arrives; complete lines are kept as
    a bounded tail and matched against what a waiter looks for.  Also remembers the
    first kernel panic line.
    """

    def __init__(self, stream: IO[bytes], log: IO[bytes] | None, tail_lines: int = 40) -> None:
        self._stream = stream
        self._log = log
        self._cond = threading.Condition()
        self._lines: list[str] = []  # every line (bounded by what a boot prints)
        self._partial = b""
        self._eof = False
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.panic: str | None = None
        self._thread = threading.Thread(target=self._read, name="pyimg-console", daemon=True)
        self._thread.start()

    _PANIC = re.compile(r"Kernel panic - not syncing: (.*)")

    def _read(self) -> None:
        fd = self._stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if self._log is not None and chunk:
                with contextlib.suppress(OSError, ValueError):
                    self._log.write(chunk)
                    self._log.flush()
            with self._cond:
                if not chunk:
                    if self._partial:
                        self._add(self._partial)
                        self._partial = b""
                    self._eof = True
                    self._cond.notify_all()
                    return
                data = self._partial + chunk
                *complete, self._partial = data.split(b"\n")
                for raw in complete:
                    self._add(raw)
                if complete:
                    self._cond.notify_all()

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._lines.append(line)
        self.tail.append(line)
        if self.panic is None:
            m = self._PANIC.search(line)
            if m:
                self.panic = m.group(1).strip()

    @property
    def eof(self) -> bool:
        return self._eof

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def wait_for(self, pattern: re.Pattern[str], deadline: float, start: int = 0) -> tuple[int, str] | None:
        """The first line from index `start` on matching `pattern`, as (index, line).

        None when the console ended (QEMU exited), a kernel panic was seen, or the
        deadline (time.monotonic()) passed first.
        """
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    line = self._lines[index]
                    if pattern.search(line):
                        return index, line
                    index += 1
                if self._eof or self.panic is not None:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _qemu_env() -> dict[str, str]:
    """pyimg's environment without what was meant for pyimg itself: a sanitizer runtime
    preloaded for the C core (scripts/sanitize.sh) has no business inside QEMU."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


class _Stderr:
    """QEMU's own messages (not the guest's), read on a thread so the pipe never fills."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, name="pyimg-qemu-stderr", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def text(self, join: float = 0.0) -> str:
        if join:
            self._thread.join(join)
        return b"".join(self._chunks).decode("utf-8", "replace").strip()


@dataclass
class Qemu:
    """A running QEMU for `spec`; a context manager that always kills its process group.

    Non-interactive: the console is a pipe read by `Console`.  Interactive: QEMU gets
    the caller's terminal (stdin/stdout) as the serial console.
    """

    spec: QemuSpec
    log_path: str | None = None
    interactive: bool = False
    qemu: str = field(default_factory=find_qemu)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    console: Console | None = field(default=None, init=False)
    started: float = field(default=0.0, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)
    _stderr: _Stderr | None = field(default=None, init=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def argv(self) -> list[str]:
        return command(self.spec, self.qemu, interactive=self.interactive)

    def start(self) -> Qemu:
        argv = self.argv
        if self.log_path is not None and not self.interactive:
            try:
                self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            except OSError as exc:
                raise BootError(f"cannot write the console log: {exc.strerror}", self.log_path) from None
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=None if self.interactive else subprocess.DEVNULL,
                stdout=None if self.interactive else subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
                env=_qemu_env(),
            )
        except OSError as exc:
            self._close_log()
            raise BootError(f"cannot start QEMU: {exc.strerror}", argv[0]) from None
        assert self.proc.stderr is not None
        self._stderr = _Stderr(self.proc.stderr)
        if not self.interactive:
            assert self.proc.stdout is not None
            self.console = Console(self.proc.stdout, self._log)
        return self

    def stderr(self, join: float = 0.0) -> str:
        return self._stderr.text(join) if self._stderr is not None else ""

    def cpu_seconds(self) -> float | None:
        """QEMU's CPU time so far (user + system, /proc/PID/stat): under TCG the guest's
        own cost, whatever else the host runs (wall time is not, on a loaded machine)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 0.0) -> None:
        """Kill QEMU's whole process group (SIGTERM, then SIGKILL after `grace` s) and reap it."""
        proc = self.proc
        if proc is None:
            self._close_log()
            return
        if proc.poll() is None and grace > 0:
            _killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # The group may hold helpers even after QEMU itself exited: kill it in any case.
        _killpg(proc.pid, signal.SIGKILL)
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C must not leave a zombie or a live QEMU
                continue
        if self.console is not None:
            self.console.join(2.0)
        if self._stderr is not None:
            self._stderr.text(1.0)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> Qemu:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # pragma: no cover - the group is ours
        if exc.errno != errno.EPERM:
            raise


_HOSTFWD_FAILED = re.compile(r"Could not set up host forwarding rule|hostfwd", re.IGNORECASE)
_KVM_FAILED = re.compile(r"kvm", re.IGNORECASE)


def hostfwd_failed(stderr: str) -> bool:
    """QEMU refused a forwarding rule (the host port was taken meanwhile)."""
    return bool(_HOSTFWD_FAILED.search(stderr))


def kvm_failed(stderr: str) -> bool:
    """QEMU could not run the guest under KVM (a present but broken /dev/kvm)."""
    return bool(_KVM_FAILED.search(stderr))


@dataclass(frozen=True)
class HealthAnswer:
    status: int | None  # HTTP status, None when no answer
    detail: str  # the reason line or the connection error
    body: bytes = b""


def http_get(port: int, path: str, timeout: float = 2.0) -> HealthAnswer:
    """One HTTP GET of http://127.0.0.1:port/path (stdlib http.client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "pyimg-boot", "Connection": "close"})
        response = conn.getresponse()
        body = response.read(65536)
        return HealthAnswer(response.status, f"HTTP {response.status} {response.reason}", body)
    except (OSError, http.client.HTTPException) as exc:
        return HealthAnswer(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        conn.close()


def wait_healthy(
    vm: Qemu, port: int, path: str, deadline: float, interval: float = 0.2
) -> tuple[HealthAnswer | None, HealthAnswer | None]:
    """GET `path` until it answers 2xx, QEMU exits or the deadline passes.

    Returns (the 2xx answer or None, the last answer seen).
    """
    last: HealthAnswer | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, last
        answer = http_get(port, path, timeout=max(0.2, min(2.0, remaining)))
        last = answer
        if answer.status is not None and 200 <= answer.status < 300:
            return answer, last
        if vm.poll() is not None:
            return None, last
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def choose_accel(requested: str) -> tuple[str, str]:
    """(accel, why) for `requested` in auto, kvm, tcg."""
    if requested == "tcg":
        return "tcg", "requested"
    usable, why = kvm_usable()
    if requested == "kvm":
        if not usable:
            raise BootError(f"KVM requested but not usable: {why}")
        return "kvm", why
    if requested != "auto":
        raise BootError(f"unknown accelerator {requested!r} (choose auto, kvm or tcg)")
    return ("kvm", why) if usable else ("tcg", f"no KVM: {why}")


def is_forward_text(text: str) -> bool:
    return re.fullmatch(r"\d{1,5}:\d{1,5}", text) is not None


def parse_forwards(texts: Sequence[str]) -> tuple[Forward, ...]:
    """'HOST:GUEST' pairs (HOST 0 picks a free port)."""
    out = []
    for text in texts:
        if not is_forward_text(text):
            raise BootError(f"--forward {text!r}: expected HOST:GUEST port numbers, e.g. 8080:80")
        host, guest = (int(p) for p in text.split(":"))
        if not (0 <= host <= 65535 and 1 <= guest <= 65535):
            raise BootError(f"--forward {text!r}: ports are 1..65535 (host 0: any free port)")
        out.append(Forward(host, guest))
    return tuple(out)
