"""`pyimg boot` and `pyimg run` (typer).  The lead mounts them with `register(app)`;
`python -m pyimg.boot.boot_cli boot ...` works on its own too.

Only this module prints: a progress line on a terminal, the result (or `--json`), the
console's tail on a failure.  Exit codes: 0 passed; 11 the guest booted but failed
(timeout, panic, init failed, health check); 9 `BootError` (bad input, no QEMU);
130 interrupted.  QEMU is stopped on every path (the library sees to it; SIGTERM
becomes the same KeyboardInterrupt as Ctrl-C).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..cli_support import fail, sigterm_as_interrupt
from ..errors import PyImgError

if TYPE_CHECKING:  # the runner is imported by the commands only: `pyimg build` does not pay for it
    from . import qemu as q
    from .run import BootOptions, BootResult

BOOT_FAILED_EXIT = 11  # 7-10 are other errors (ResourceError, PromotionError, BootError, StoreError)
DEFAULT_INIT = "/sbin/init"  # = run.DEFAULT_INIT (tested)
DEFAULT_MEMORY = 512  # = run.DEFAULT_MEMORY
DEFAULT_TIMEOUT = 60.0  # = run.DEFAULT_TIMEOUT


class _Ticker:
    """`pyimg boot: STAGE  N.N s` redrawn on stderr 5 times a second, only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.stage = "starting"
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def __call__(self, stage: str) -> None:
        self.stage = stage

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            sys.stderr.write(f"\r\033[Kpyimg boot: {self.stage}  {time.monotonic() - self.started:.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _options(**given: Any) -> BootOptions:
    from . import qemu as q
    from .run import BootOptions, parse_config

    config = parse_config(given.pop("config") or (), given.pop("config_file") or ())
    forwards = q.parse_forwards(given.pop("forward", None) or ())
    return BootOptions(config=config, forwards=forwards, **given)


def _local_image(image: str, store: Any) -> tuple[str, str | None]:
    """(IMAGE as a file, the store reference pinned to its manifest digest, or None for
    a file): a store reference (oci:DIR:TAG, HOST/REPO@DIGEST…) is pulled into the
    cache once and verified (pyimg/store: fetch_pinned_image); a path stays as it is."""
    from ..store.ops import fetch_pinned_image, is_store_ref

    if not is_store_ref(image):
        return image, None
    from .kernel import cache_dir

    path, pinned = fetch_pinned_image(image, str(cache_dir() / "images"), store)
    return path, str(pinned)


def _store_options(insecure: bool, auth_file: str | None) -> Any:
    from ..store.ops import StoreOptions

    return StoreOptions(insecure=insecure, auth_file=auth_file)


def _record(ref: str, result: BootResult, env: str, store: Any) -> str:
    """Attach the boot record to the image's digest in its store; the record's digest."""
    from ..store.records import record

    return record(ref, result.check_record(env), environment=env, options=store).record


KernelOpt = Annotated[
    str,
    typer.Option(
        "--kernel",
        help="The kernel (vmlinuz); default: the one `pyimg kernel fetch` cached last (fetched now if none).",
    ),
]
InitrdOpt = Annotated[
    str,
    typer.Option("--initrd", help="auto (pyimg's boot initramfs), none, or an initramfs file used as is."),
]
ModulesOpt = Annotated[
    str | None,
    typer.Option("--modules", help="The kernel's module tree (default: ROOT/lib/modules/VERSION beside it)."),
]
AppendOpt = Annotated[str, typer.Option("--append", help="More kernel command line.")]
InitOpt = Annotated[str, typer.Option("--init", help="The image's init (init= on the command line).")]
ConfigOpt = Annotated[
    list[str] | None,
    typer.Option("--config", help="KEY=VALUE for the guest's /run/pyimg/config/KEY (repeatable)."),
]
ConfigFileOpt = Annotated[
    list[str] | None, typer.Option("--config-file", help="A file of KEY=VALUE lines (repeatable).")
]
MemoryOpt = Annotated[int, typer.Option("--memory", min=64, help="Guest memory, MiB.")]
AccelOpt = Annotated[str, typer.Option("--accel", help="auto (KVM where it works, else TCG), kvm, tcg.")]
DriveOpt = Annotated[str, typer.Option("--drive", help="virtio (/dev/vda) or nvme (/dev/nvme0n1).")]
CpusOpt = Annotated[int, typer.Option("--cpus", min=1, help="Guest CPUs.")]
CpuOpt = Annotated[
    str | None, typer.Option("--cpu", help="QEMU's -cpu model (default: host under KVM, max under TCG).")
]


StoreRecordOpt = Annotated[
    bool,
    typer.Option(
        "--record", help="Attach the boot record to IMAGE (a store reference) for ENV: what promotion reads."
    ),
]
EnvOpt = Annotated[str | None, typer.Option("--env", metavar="ENV", help="The environment of --record.")]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Allow plain HTTP to a registry that is not on a loopback address.")
]
AuthFileOpt = Annotated[
    str | None, typer.Option("--auth-file", metavar="FILE", help="Registry credentials (docs/store.md).")
]
ImageArg = Annotated[
    str,
    typer.Argument(
        help="The image (squashfs or ext4), or a store reference (oci:DIR:TAG, HOST/REPO@DIGEST) "
        "pulled and verified first; never modified."
    ),
]


def boot_command(
    image: ImageArg,
    expect: Annotated[
        str, typer.Option("--expect", help="Regex: the console line that says the guest is up.")
    ],
    kernel: KernelOpt = "",
    initrd: InitrdOpt = "auto",
    modules: ModulesOpt = None,
    append: AppendOpt = "",
    init: InitOpt = DEFAULT_INIT,
    health: Annotated[
        str | None, typer.Option("--health", help="URL path to GET after the line, e.g. /health.")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="The guest port serving --health (forwarded from 127.0.0.1).")
    ] = None,
    health_timeout: Annotated[
        float | None,
        typer.Option(
            "--health-timeout", help="Seconds for the health check after the line (default: the rest)."
        ),
    ] = None,
    host_port: Annotated[
        int | None, typer.Option("--host-port", help="Host port for --port (default: a free one).")
    ] = None,
    config: ConfigOpt = None,
    config_file: ConfigFileOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds for the whole boot, health check included.")
    ] = DEFAULT_TIMEOUT,
    memory: MemoryOpt = DEFAULT_MEMORY,
    cpus: CpusOpt = 1,
    cpu: CpuOpt = None,
    accel: AccelOpt = "auto",
    drive: DriveOpt = "virtio",
    log: Annotated[str | None, typer.Option("--log", help="Keep the whole serial console here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the boot record as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
    record: StoreRecordOpt = False,
    env: EnvOpt = None,
    insecure: InsecureOpt = False,
    auth_file: AuthFileOpt = None,
) -> None:
    """Boot IMAGE under QEMU and check it: exit 0 only when the guest prints --expect's line
    (and, with --health, the health check answers 2xx)."""
    sigterm_as_interrupt()
    ticker = _Ticker(enabled=not json_out and not quiet)
    try:
        store = _store_options(insecure, auth_file)
        if record:
            from ..errors import SpecError
            from ..store.ops import is_store_ref

            if not env:
                raise SpecError("--record needs --env ENV (the environment the boot was made in)")
            if not is_store_ref(image):
                raise SpecError(
                    "--record needs IMAGE to be a store reference (oci:DIR:TAG, HOST/REPO:TAG)", image
                )
        local, pinned = _local_image(image, store)
        options = _options(
            image=local,
            kernel=kernel,
            expect=expect,
            initrd=initrd,
            modules=modules,
            append=append,
            init=init,
            health=health,
            port=port,
            host_port=host_port,
            health_timeout=health_timeout,
            config=config,
            config_file=config_file,
            timeout=timeout,
            memory=memory,
            cpus=cpus,
            cpu=cpu,
            accel=accel,
            drive=drive,
            log=log,
        )
        from .run import boot

        result = boot(options, progress=ticker)
        if record and env and pinned and result.reason != "interrupted":
            recorded = _record(pinned, result, env, store)  # the digest that was booted
            if not json_out and not quiet:
                typer.echo(f"{image}: boot record for {env} attached ({recorded})", err=True)
    except PyImgError as exc:
        ticker.close()
        fail(exc)
    except KeyboardInterrupt:
        ticker.close()
        typer.echo("pyimg: interrupted; QEMU stopped", err=True)
        raise typer.Exit(130) from None
    ticker.close()
    _report(result, json_out, quiet)
    if result.reason == "interrupted":
        raise typer.Exit(130)
    if not result.passed:
        raise typer.Exit(BOOT_FAILED_EXIT)


def _report(result: BootResult, json_out: bool, quiet: bool) -> None:
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=1))
        if not result.passed:
            typer.echo(f"pyimg: boot failed ({result.reason}): {result.message}", err=True)
        return
    if result.passed:
        if not quiet:
            timing = f"line after {result.seconds_to_marker:.2f} s"
            if result.seconds_to_health is not None:
                timing += f", healthy after {result.seconds_to_health:.2f} s ({result.health_url})"
            typer.echo(
                f"{result.image}: boot passed ({result.accel}; {timing}); "
                f"{result.image_format} blake3:{result.image_digest}"
            )
        return
    typer.echo(f"pyimg: boot failed ({result.reason}): {result.message}", err=True)
    typer.echo(f"  accel: {result.accel} ({result.accel_note}); {result.seconds:.1f} s", err=True)
    if result.console_tail:
        typer.echo("  console (last lines):", err=True)
        for line in result.console_tail[-20:]:
            typer.echo(f"  | {line}", err=True)
    if result.log:
        typer.echo(f"  whole console: {result.log}", err=True)


def run_command(
    image: ImageArg,
    kernel: KernelOpt = "",
    forward: Annotated[
        list[str] | None,
        typer.Option(
            "--forward", help="HOST:GUEST TCP port on 127.0.0.1 (HOST 0: any free one; repeatable)."
        ),
    ] = None,
    initrd: InitrdOpt = "auto",
    modules: ModulesOpt = None,
    append: AppendOpt = "",
    init: InitOpt = DEFAULT_INIT,
    config: ConfigOpt = None,
    config_file: ConfigFileOpt = None,
    memory: MemoryOpt = DEFAULT_MEMORY,
    cpus: CpusOpt = 1,
    cpu: CpuOpt = None,
    accel: AccelOpt = "auto",
    drive: DriveOpt = "virtio",
    insecure: InsecureOpt = False,
    auth_file: AuthFileOpt = None,
) -> None:
    """Boot IMAGE interactively: the terminal is the serial console (Ctrl-A x quits QEMU),
    ports forwarded from 127.0.0.1.  The image is never modified."""
    sigterm_as_interrupt()

    def started(vm: q.Qemu) -> None:
        for fwd in vm.spec.forwards:
            typer.echo(f"pyimg run: http://127.0.0.1:{fwd.host}/ -> guest port {fwd.guest}", err=True)
        typer.echo(f"pyimg run: {vm.spec.accel}; Ctrl-A x quits, Ctrl-A c is QEMU's monitor", err=True)

    try:
        options = _options(
            image=_local_image(image, _store_options(insecure, auth_file))[0],
            kernel=kernel,
            expect="",
            forward=forward,
            initrd=initrd,
            modules=modules,
            append=append,
            init=init,
            config=config,
            config_file=config_file,
            memory=memory,
            cpus=cpus,
            cpu=cpu,
            accel=accel,
            drive=drive,
        )
        from .run import run

        rc = run(options, on_start=started)
    except PyImgError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("\npyimg run: interrupted; QEMU stopped", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"pyimg run: QEMU exited ({rc})", err=True)
    raise typer.Exit(0 if rc == 0 else BOOT_FAILED_EXIT)


def register(app: typer.Typer) -> None:
    """Mount `boot` and `run` on the main `pyimg` app."""
    app.command("boot")(boot_command)
    app.command("run")(run_command)


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register(app)
    app()


if __name__ == "__main__":
    main()
