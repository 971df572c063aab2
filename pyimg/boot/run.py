"""`pyimg boot` and `pyimg run`: boot an image under QEMU and judge the boot.

    result = boot(BootOptions(image="app.sqfs", kernel="vmlinuz", expect="app: ready",
                              health="/health", port=80, config=(("GREETING", "hi"),)))
    assert result.passed, result.message

A boot passes only when the guest itself says it is up (a console line matching
`expect`) and, with `health`, when an HTTP GET of that path through a port forwarded
from 127.0.0.1 answers 2xx after that line.  Everything else is a failed `BootResult`
with a reason code and the console's tail; input that cannot boot at all (no QEMU, no
kernel, a bad option) is a `BootError`.  QEMU is killed on every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import BootError, PyImgError
from . import qemu as q

DEFAULT_TIMEOUT = 60.0
DEFAULT_MEMORY = 512
DEFAULT_INIT = "/sbin/init"

# Reason codes of a BootResult (docs/boot.md, "The JSON record").
PASSED = "passed"
TIMEOUT = "timeout"  # no line matched within the timeout
PANIC = "panic"  # a kernel panic other than init's death
INIT_FAILED = "init-failed"  # PID 1 exited (status in the message)
INITRAMFS_FAILED = "initramfs-failed"  # pyimg's initramfs could not mount or switch to the root
STOPPED = "stopped"  # the guest powered off / QEMU exited 0 before the line
QEMU_FAILED = "qemu-failed"  # QEMU exited non-zero before the line (its stderr in the message)
HEALTH_FAILED = "health-failed"  # the line came, the health check never answered 2xx
INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM


@dataclass(frozen=True)
class BootOptions:
    image: str
    kernel: str  # a bzImage; "" = the newest kernel `pyimg kernel fetch` put in the cache
    expect: str  # a regular expression (Python re) searched in each console line
    initrd: str = "auto"  # auto (pyimg's boot initramfs), none, or a file used as is
    modules: str | None = None  # the kernel's module tree (default: beside the kernel)
    append: str = ""  # more kernel command line, after pyimg's own
    init: str = DEFAULT_INIT  # the image's init, passed as init=
    rootfstype: str | None = None  # default: from the image's superblock
    drive: str = "virtio"  # virtio or nvme
    health: str | None = None  # URL path, e.g. /health
    port: int | None = None  # the guest's TCP port that serves `health`
    health_timeout: float | None = None  # seconds after the line (default: what is left of timeout)
    host_port: int | None = None  # preferred host port (another is picked if busy)
    forwards: tuple[q.Forward, ...] = ()  # more forwards (run)
    config: tuple[tuple[str, str], ...] = ()  # KEY=VALUE for /run/pyimg/config/KEY
    timeout: float = DEFAULT_TIMEOUT  # seconds for the whole boot, health check included
    memory: int = DEFAULT_MEMORY  # MiB
    cpus: int = 1
    accel: str = "auto"  # auto, kvm or tcg
    cpu: str | None = None  # QEMU -cpu model (default: host under KVM, max under TCG)
    log: str | None = None  # the console log file


@dataclass(frozen=True)
class BootResult:
    """The record of one boot (`pyimg boot --json`; what promotion will require)."""

    passed: bool
    reason: str  # one of the reason codes above
    message: str  # a sentence for people
    image: str
    image_digest: str  # the image digest (imagehash.py), as `pyimg digest` prints it
    image_format: str
    kernel: str
    kernel_digest: str
    accel: str  # kvm or tcg
    accel_note: str  # why that accelerator
    drive: str
    seconds_to_marker: float | None  # QEMU start -> the expected line
    seconds_to_health: float | None  # QEMU start -> health check passed
    seconds: float  # the whole call
    qemu_cpu_to_marker: float | None  # QEMU's CPU seconds at the line (load-independent under TCG)
    qemu_cpu_to_health: float | None
    marker_line: str | None
    health_url: str | None  # http://127.0.0.1:PORT/PATH as the host reached it
    health_status: int | None
    health_body: str | None  # the start of the 2xx answer (up to 4 KiB, as text)
    host_port: int | None
    guest_port: int | None
    qemu_pid: int | None
    qemu_exit: int | None  # QEMU's exit status if it ended by itself, else None (killed)
    config_keys: tuple[str, ...]
    command_line: str  # the kernel command line
    log: str | None
    console_tail: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config_keys"] = list(self.config_keys)
        out["console_tail"] = list(self.console_tail)
        for key in (
            "seconds",
            "seconds_to_marker",
            "seconds_to_health",
            "qemu_cpu_to_marker",
            "qemu_cpu_to_health",
        ):
            if out[key] is not None:
                out[key] = round(out[key], 3)
        return out

    def check_record(self, environment: str) -> dict[str, Any]:
        """This boot as a check record for the store (pyimg/store/records.py: check,
        passed, environment, kernel, accel, timings, pyimg_version; the whole boot
        record beside them), what `pyimg boot REF --record --env ENV` attaches."""
        from .. import __version__

        timings = {"to_marker": self.seconds_to_marker, "to_health": self.seconds_to_health}
        return self.to_json() | {
            "check": "boot",
            "environment": environment,
            "kernel": self.kernel_digest or self.kernel,
            "timings": {k: round(v, 3) for k, v in timings.items() if v is not None}
            | {"total": self.seconds},
            "pyimg_version": __version__,
        }


Progress = Callable[[str], None]
"""Called with a short stage text ("booting (tcg)", "waiting for health", ...)."""


def image_format(path: str) -> str:
    """squashfs or ext4, from the superblock's magic (pyimg.boot.initramfs.detect_root_fs)."""
    from .initramfs import detect_root_fs

    return detect_root_fs(path)


def default_modules(kernel: str) -> str | None:
    """The module tree that goes with a kernel unpacked from Debian's package:
    ROOT/boot/vmlinuz-VERSION → ROOT/lib/modules/VERSION (or ROOT/usr/lib/modules)."""
    kernel = os.path.abspath(kernel)
    name = os.path.basename(kernel)
    if not name.startswith("vmlinuz-"):
        return None
    version = name[len("vmlinuz-") :]
    root = os.path.dirname(os.path.dirname(kernel))
    for candidate in ("lib/modules", "usr/lib/modules"):
        path = os.path.join(root, candidate, version)
        if os.path.isdir(path):
            return path
    return None


def kernel_command_line(options: BootOptions, fmt: str) -> str:
    parts = [
        "console=ttyS0",
        f"root={q.root_device(options.drive)}",
        f"rootfstype={options.rootfstype or fmt}",
        "ro",
        f"init={options.init}",
        "panic=-1",  # a panic reboots at once, and -no-reboot turns that into QEMU's exit
    ]
    if options.append:
        parts.append(options.append)
    return " ".join(parts)


def parse_config(pairs: Sequence[str], files: Sequence[str] = ()) -> tuple[tuple[str, str], ...]:
    """--config-file FILEs then --config KEY=VALUEs (later wins), checked (pyimg.boot.config)."""
    from .config import load_config

    return tuple(load_config(pairs, files).items())


def modules_dir(options: BootOptions) -> str:
    """The module tree for the boot initramfs: --modules, else the one beside the kernel."""
    if options.modules is not None:
        return options.modules
    found = default_modules(options.kernel)
    if found is None:
        raise BootError(
            "no module tree beside the kernel (ROOT/boot/vmlinuz-V -> ROOT/lib/modules/V): give --modules",
            options.kernel,
        )
    return found


def network_wanted(options: BootOptions) -> bool:
    return options.port is not None or bool(options.forwards)


def cached_initramfs(options: BootOptions, fmt: str, tmp: str) -> str:
    """pyimg's boot initramfs for this kernel, root format, drive and network, built once
    and kept in the cache (~0.3 s saved a boot): it is reproducible, so its inputs are its
    key (the kernel's and busybox's identity, the module tree, the init script, pyimg's
    version).  Built into `tmp` when the cache cannot be written."""
    from .. import __version__
    from .initramfs import build_initramfs, find_busybox, init_script
    from .kernel import cache_dir

    modules = modules_dir(options)
    busybox = find_busybox()
    from . import archive, initramfs
    from . import modules as modules_py

    key_parts = [__version__, fmt, options.drive, str(network_wanted(options)), init_script().hex()]
    for module in (initramfs, modules_py, archive):  # the builder's own code, for a development tree
        with open(str(module.__file__), "rb") as f:
            key_parts.append(hashlib.sha256(f.read()).hexdigest())
    for path in (options.kernel, modules, str(busybox)):
        st = os.stat(path)
        key_parts += [os.path.realpath(path), str(st.st_size), str(st.st_mtime_ns)]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:32]
    cached = cache_dir() / "initramfs" / f"{key}.img"
    if cached.is_file():
        return str(cached)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        target = str(cached)
    except OSError:
        target = os.path.join(tmp, "initramfs")
    build_initramfs(
        target,
        modules,
        fmt,
        root_device="nvme" if options.drive == "nvme" else "virtio-blk",
        network=network_wanted(options),
        kernel=options.kernel,
        busybox=busybox,
    )
    return target


@contextmanager
def _initrd(options: BootOptions, fmt: str) -> Iterator[str | None]:
    """The one initrd file QEMU gets: the boot initramfs (built, or --initrd FILE), then
    the config archive, each padded to 4 bytes (pyimg.boot.config.append_initrds)."""
    if options.initrd == "none":
        if options.config:
            raise BootError("--config needs an initramfs to carry it (not --initrd none)")
        yield None
        return
    if options.initrd != "auto" and not options.config:
        if not os.path.isfile(options.initrd):
            raise BootError("no such initrd file", options.initrd)
        yield options.initrd
        return
    from .config import append_initrds, config_initrd

    tmp = tempfile.mkdtemp(prefix="pyimg-boot-")
    try:
        parts: list[str | bytes] = []
        if options.initrd == "auto":
            parts.append(cached_initramfs(options, fmt, tmp))
        else:
            if not os.path.isfile(options.initrd):
                raise BootError("no such initrd file", options.initrd)
            parts.append(options.initrd)
        if options.config:
            parts.append(config_initrd(dict(options.config)))
        path = os.path.join(tmp, "initrd")
        append_initrds(path, parts)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_kernel(options: BootOptions) -> BootOptions:
    """With no kernel given: the one `pyimg kernel fetch` cached last (and its modules),
    else Debian's cloud kernel fetched into the cache now (apt-get download + dpkg -x)."""
    if options.kernel:
        return options
    from .kernel import fetch_kernel

    try:
        files = fetch_kernel("cloud", offline=True)
    except BootError:
        files = fetch_kernel("cloud")
    return dataclasses.replace(
        options, kernel=str(files.vmlinuz), modules=options.modules or str(files.modules)
    )


def _check_inputs(options: BootOptions) -> re.Pattern[str]:
    for what, path in (("image", options.image), ("kernel", options.kernel)):
        if not os.path.isfile(path):
            raise BootError(f"no such {what} file", path)
        if not os.access(path, os.R_OK):
            raise BootError(f"the {what} is not readable", path)
    try:
        pattern = re.compile(options.expect)
    except re.error as exc:
        raise BootError(f"--expect {options.expect!r} is not a regular expression: {exc}") from None
    if options.health is not None:
        if options.port is None:
            raise BootError("--health needs --port (the guest's port that serves it)")
        if not options.health.startswith("/"):
            raise BootError(f"--health {options.health!r}: give a URL path starting with /")
    for port in (options.port, options.host_port):
        if port is not None and not 1 <= port <= 65535:
            raise BootError(f"port {port} is not in 1..65535")
    if options.health_timeout is not None and options.health_timeout <= 0:
        raise BootError("--health-timeout must be positive")
    if options.drive not in ("virtio", "nvme"):
        raise BootError(f"unknown drive {options.drive!r} (choose virtio or nvme)")
    if options.accel not in ("auto", "kvm", "tcg"):
        raise BootError(f"unknown accelerator {options.accel!r} (choose auto, kvm or tcg)")
    if options.timeout <= 0:
        raise BootError("--timeout must be positive")
    if options.memory < 64:
        raise BootError("--memory: at least 64 MiB")
    return pattern


def _file_digest(path: str) -> str:
    from ..imagehash import digest_image

    return digest_image(path).blake3


def _health_forward(options: BootOptions, avoid: set[int]) -> tuple[q.Forward | None, str]:
    if options.port is None:
        return None, ""
    wanted = options.host_port
    if wanted is not None and wanted not in avoid and q.port_free(wanted):
        return q.Forward(wanted, options.port), ""
    port = q.free_port()
    while port in avoid:
        port = q.free_port()
    note = f"host port {wanted} is in use; using {port}" if wanted is not None else ""
    return q.Forward(port, options.port), note


_INITRAMFS_ERROR = re.compile(r"pyimg-initramfs: error: (.*)")


def _classify(vm: q.Qemu, console: q.Console, pattern: re.Pattern[str], timed_out: bool) -> tuple[str, str]:
    for line in console.tail:
        m = _INITRAMFS_ERROR.search(line)
        if m:
            return INITRAMFS_FAILED, f"the boot initramfs failed: {m.group(1).strip()}"
    if console.panic is not None:
        m = re.search(r"Attempted to kill init! exitcode=(0x[0-9a-fA-F]+)", console.panic)
        if m:
            status = int(m.group(1), 16)
            how = f"exit status {status >> 8}" if status & 0x7F == 0 else f"signal {status & 0x7F}"
            return INIT_FAILED, f"the guest's init ended ({how}); kernel panic: {console.panic}"
        return PANIC, f"kernel panic: {console.panic}"
    rc = vm.poll()
    if rc is not None:
        if rc == 0:
            return STOPPED, f"the guest stopped before printing a line matching /{pattern.pattern}/"
        err = vm.stderr(join=1.0)
        return QEMU_FAILED, f"QEMU exited with status {rc}" + (f": {err}" if err else "")
    if timed_out:
        return TIMEOUT, f"no console line matched /{pattern.pattern}/ in time"
    return QEMU_FAILED, "the console closed while QEMU still runs"


def boot(options: BootOptions, progress: Progress | None = None) -> BootResult:
    """Boot the image, wait for its line (and health), stop QEMU, return the record."""
    started = time.monotonic()
    deadline = started + options.timeout
    say = progress or (lambda _text: None)
    options = resolve_kernel(options)
    pattern = _check_inputs(options)
    binary = q.find_qemu()
    fmt = image_format(options.image)
    digest = _file_digest(options.image)
    kernel_digest = _file_digest(options.kernel)
    accel, accel_note = q.choose_accel(options.accel)
    cmdline = kernel_command_line(options, fmt)
    avoid: set[int] = set()
    notes: list[str] = []

    def result(passed: bool, reason: str, message: str, **fields: Any) -> BootResult:
        base: dict[str, Any] = {
            "passed": passed,
            "reason": reason,
            "message": message + ("".join(f" ({n})" for n in notes) if notes else ""),
            "image": options.image,
            "image_digest": digest,
            "image_format": fmt,
            "kernel": options.kernel,
            "kernel_digest": kernel_digest,
            "accel": accel,
            "accel_note": accel_note,
            "drive": options.drive,
            "seconds_to_marker": None,
            "seconds_to_health": None,
            "seconds": time.monotonic() - started,
            "qemu_cpu_to_marker": None,
            "qemu_cpu_to_health": None,
            "marker_line": None,
            "health_url": None,
            "health_status": None,
            "health_body": None,
            "host_port": None,
            "guest_port": options.port,
            "qemu_pid": None,
            "qemu_exit": None,
            "config_keys": tuple(k for k, _ in options.config),
            "command_line": cmdline,
            "log": options.log,
            "console_tail": (),
        }
        base.update(fields)
        return BootResult(**base)

    with _initrd(options, fmt) as initrd:
        for _attempt in range(4):
            forward, note = _health_forward(options, avoid)
            if note:
                notes.append(note)
            spec = q.QemuSpec(
                kernel=options.kernel,
                append=cmdline,
                initrd=initrd,
                image=options.image,
                drive=options.drive,
                memory=options.memory,
                cpus=options.cpus,
                accel=accel,
                cpu=options.cpu,
                forwards=((forward,) if forward else ()) + options.forwards,
            )
            vm = q.Qemu(spec, log_path=options.log, qemu=binary)
            say(f"booting ({accel})")
            try:
                with vm:
                    outcome = _watch(vm, options, pattern, forward, deadline, say)
            except KeyboardInterrupt:
                return result(
                    False,
                    INTERRUPTED,
                    "interrupted; QEMU stopped",
                    qemu_pid=vm.pid,
                    console_tail=tuple(vm.console.tail) if vm.console else (),
                )
            # QEMU is stopped here, whatever happened.
            if outcome["reason"] == QEMU_FAILED and not outcome.get("console_seen"):
                err = vm.stderr()
                if forward is not None and q.hostfwd_failed(err):
                    avoid.add(forward.host)
                    notes.append(f"host port {forward.host} was taken before QEMU bound it; retried")
                    continue
                if accel == "kvm" and q.kvm_failed(err):
                    accel = "tcg"
                    accel_note = f"KVM opened but QEMU could not use it ({err.splitlines()[0]}); TCG"
                    continue
            outcome.pop("console_seen", None)
            return result(
                qemu_pid=vm.pid,
                qemu_exit=outcome.pop("qemu_exit"),
                console_tail=tuple(vm.console.tail) if vm.console else (),
                **outcome,
            )
    raise BootError("QEMU could not bind a host port for the forward after 4 tries")


def _watch(
    vm: q.Qemu,
    options: BootOptions,
    pattern: re.Pattern[str],
    forward: q.Forward | None,
    deadline: float,
    say: Progress,
) -> dict[str, Any]:
    console = vm.console
    assert console is not None
    say(f"waiting for /{pattern.pattern}/")
    found = console.wait_for(pattern, deadline)
    if found is None:
        # Let QEMU finish a panic or a power-off so the reason and the tail are complete.
        if console.panic is not None or console.eof:
            vm.wait(2.0)
            console.join(1.0)
        reason, message = _classify(vm, console, pattern, time.monotonic() >= deadline)
        return {
            "passed": False,
            "reason": reason,
            "message": message,
            "qemu_exit": vm.poll(),
            "console_seen": bool(console.lines()),
        }
    marker_at = time.monotonic() - vm.started
    marker = found[1]
    fields: dict[str, Any] = {
        "seconds_to_marker": marker_at,
        "qemu_cpu_to_marker": vm.cpu_seconds(),
        "marker_line": marker,
        "qemu_exit": None,
    }
    if options.health is None or forward is None:
        return {"passed": True, "reason": PASSED, "message": f"matched {marker!r}", **fields}
    url = f"http://127.0.0.1:{forward.host}{options.health}"
    fields.update(health_url=url, host_port=forward.host)
    say(f"health check {url}")
    if options.health_timeout is not None:
        deadline = min(deadline, time.monotonic() + options.health_timeout)
    ok, last = q.wait_healthy(vm, forward.host, options.health, deadline)
    if ok is not None:
        return {
            "passed": True,
            "reason": PASSED,
            "message": f"matched {marker!r}; GET {options.health} answered {ok.detail}",
            "seconds_to_health": time.monotonic() - vm.started,
            "qemu_cpu_to_health": vm.cpu_seconds(),
            "health_status": ok.status,
            "health_body": ok.body[:4096].decode("utf-8", "replace"),
            **fields,
        }
    rc = vm.poll()
    if rc is not None or console.panic is not None:
        vm.wait(2.0)
        reason, message = _classify(vm, console, pattern, False)
        return {
            "passed": False,
            "reason": reason,
            "message": message + " (after the line)",
            **fields,
            "qemu_exit": vm.poll(),
        }
    detail = last.detail if last is not None else "no answer"
    return {
        "passed": False,
        "reason": HEALTH_FAILED,
        "message": f"the guest printed its line but GET {url} (guest port {options.port}) "
        f"never answered 2xx in time; last: {detail}",
        "health_status": last.status if last is not None else None,
        **fields,
    }


@contextmanager
def _terminal_kept() -> Iterator[None]:
    """QEMU puts the terminal in raw mode and restores it when it quits by itself; when
    it is killed (Ctrl-C outside the guest, SIGTERM) the terminal is restored here."""
    import termios

    fd = 0
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(options: BootOptions, on_start: Callable[[q.Qemu], None] | None = None) -> int:
    """The interactive form: boot with the terminal as the console and the forwards
    (`options.forwards`, host port 0 = any free one), until the guest stops or the
    user quits QEMU (Ctrl-A x).  Returns QEMU's exit status; QEMU never outlives it."""
    options = resolve_kernel(options)
    for what, path in (("image", options.image), ("kernel", options.kernel)):
        if not os.path.isfile(path):
            raise BootError(f"no such {what} file", path)
    binary = q.find_qemu()
    fmt = image_format(options.image)
    accel, _why = q.choose_accel(options.accel)
    forwards = []
    for fwd in options.forwards:
        if fwd.host == 0:
            forwards.append(q.Forward(q.free_port(), fwd.guest))
        elif not q.port_free(fwd.host):
            raise BootError(f"--forward {fwd.host}:{fwd.guest}: port {fwd.host} on 127.0.0.1 is in use")
        else:
            forwards.append(fwd)
    with _initrd(options, fmt) as initrd:
        while True:
            spec = q.QemuSpec(
                kernel=options.kernel,
                append=kernel_command_line(options, fmt),
                initrd=initrd,
                image=options.image,
                drive=options.drive,
                memory=options.memory,
                cpus=options.cpus,
                accel=accel,
                cpu=options.cpu,
                forwards=tuple(forwards),
            )
            vm = q.Qemu(spec, interactive=True, qemu=binary)
            with _terminal_kept(), vm:
                if on_start is not None:
                    on_start(vm)
                rc = None
                while rc is None:
                    rc = vm.wait(0.5)
                err = vm.stderr(1.0)
            if rc != 0 and accel == "kvm" and q.kvm_failed(err):
                accel = "tcg"  # KVM opened but QEMU cannot use it: as boot() does
                continue
            if rc != 0 and err:
                raise BootError(f"QEMU exited with status {rc}: {err}")
            return rc


__all__ = ["BootOptions", "BootResult", "PyImgError", "boot", "parse_config", "run"]
