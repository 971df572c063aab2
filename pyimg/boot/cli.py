"""`pyimg initramfs` and `pyimg kernel fetch`: typer commands for pyimg/cli.py to
mount (`register(app)`).  They print and exit; the library under them never does.
The boot modules are imported inside the commands, so `pyimg build` does not pay
for them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_support import fail
from ..errors import PyImgError

kernel_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Kernels to boot images with (Debian's, fetched into the cache, never installed).",
)


@kernel_app.command("fetch")
def kernel_fetch_command(
    flavour: Annotated[
        str, typer.Option("--flavour", help="cloud (linux-image-cloud-amd64, default) or generic.")
    ] = "cloud",
    offline: Annotated[
        bool, typer.Option("--offline", help="Do not ask apt: the kernel of that flavour fetched last.")
    ] = False,
    cache: Annotated[
        str | None, typer.Option("--cache", help="Cache directory (default $XDG_CACHE_HOME/pyimg).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Get Debian's kernel (apt-get download + dpkg -x, cached); print its paths.

    Prints the vmlinuz and the module tree (lib/modules/VERSION).
    """
    from .kernel import fetch_kernel

    try:
        files = fetch_kernel(flavour, cache=cache, offline=offline)
    except PyImgError as exc:
        fail(exc)
    if json_out:
        typer.echo(json.dumps(files.as_dict(), indent=1))
    else:
        typer.echo(f"vmlinuz: {files.vmlinuz}")
        typer.echo(f"modules: {files.modules}")


def initramfs_command(
    output: Annotated[str, typer.Option("-o", "--output", help="The initramfs file to write.")],
    modules: Annotated[
        str,
        typer.Option(
            "--modules", help="The kernel's module tree: lib/modules/VERSION (or a root holding one)."
        ),
    ],
    root_fs: Annotated[
        str, typer.Option("--root-fs", help="The root image's format: squashfs or ext4.")
    ] = "squashfs",
    root_device: Annotated[
        str, typer.Option("--root-device", help="virtio-blk (default), virtio-scsi, nvme, or none.")
    ] = "virtio-blk",
    network: Annotated[bool, typer.Option("--network", help="Add the virtio network driver.")] = False,
    module: Annotated[
        list[str] | None, typer.Option("--module", help="Another module (name or alias) to load; repeatable.")
    ] = None,
    kernel: Annotated[
        str | None, typer.Option("--kernel", help="A bzImage to check the modules against (its release).")
    ] = None,
    busybox: Annotated[
        str | None,
        typer.Option("--busybox", help="A static busybox (default: busybox-static's /bin/busybox)."),
    ] = None,
    compression: Annotated[
        str, typer.Option("--compression", help="none, gzip[:LEVEL] or zstd[:LEVEL] (default zstd:3).")
    ] = "zstd",
    config: Annotated[
        list[str] | None,
        typer.Option("--config", help="KEY=VALUE for the guest (/run/pyimg/config/KEY, env); repeatable."),
    ] = None,
    config_file: Annotated[
        list[str] | None,
        typer.Option("--config-file", help="A TOML file (.toml) or KEY=VALUE lines; repeatable."),
    ] = None,
    epoch: Annotated[
        int | None, typer.Option("--epoch", help="Every mtime (default SOURCE_DATE_EPOCH, else 0).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
) -> None:
    """Build a minimal boot initramfs for a squashfs or ext4 root.

    busybox, the modules the root device, file system and network need, and an
    init that mounts root= read-only and switch_roots into init= (default
    /sbin/init); --config values reach the guest as /run/pyimg/config/KEY files
    and environment variables.
    """
    from .config import load_config
    from .initramfs import build_initramfs

    try:
        settings = load_config(config or (), config_file or ()) if (config or config_file) else None
        result = build_initramfs(
            output,
            modules,
            root_fs,
            root_device=root_device,
            network=network,
            extra_modules=module or (),
            kernel=kernel,
            busybox=busybox,
            compression=compression,
            config=settings,
            epoch=epoch,
        )
    except PyImgError as exc:
        fail(exc)
    if json_out:
        summary = {
            "output": result.output,
            "size": result.size,
            "blake3": result.digest,
            "modules": list(result.modules),
            "optional": list(result.optional),
            "builtin": list(result.builtin),
            "missing_softdeps": list(result.missing_softdeps),
            "busybox": result.busybox,
            "seconds": round(result.seconds, 3),
        }
        typer.echo(json.dumps(summary, indent=1))
    elif not quiet:
        typer.echo(
            f"{result.output}: {len(result.modules)} modules ({' '.join(result.modules) or 'none'}), "
            f"{result.size} bytes, {result.seconds:.2f} s, blake3:{result.digest}"
        )


def register(app: typer.Typer) -> None:
    """Mount the boot commands on the `pyimg` app."""
    app.command("initramfs")(initramfs_command)
    app.add_typer(kernel_app, name="kernel")
