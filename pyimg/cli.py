"""The `pyimg` command.  The only place that prints, draws progress and exits."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Annotated, Any, NoReturn

import typer

from . import __version__
from .api import build, digest
from .errors import PyImgError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Build reproducible, deduplicated filesystem images (squashfs, ext4) without root.",
)
__import__("pyimg.boot.boot_cli").boot.boot_cli.register(app)  # qemu branch: `pyimg boot`, `pyimg run`


def _fail(exc: PyImgError) -> NoReturn:
    typer.echo(f"pyimg: error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """A one-line bar on stderr, redrawn at most 10 times a second; only on a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        fraction = done / total if total else 1.0
        width = 30
        filled = int(width * fraction)
        rate = done / max(now - self.started, 1e-6)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} "
            f"{_human(done)}/{_human(total)} {_human(rate)}/s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so the temp file is removed like on Ctrl-C.
    raise KeyboardInterrupt


@app.command("build")
def build_command(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SOURCE...",
            help="Directories (become the image root), tar archives (.tar, .gz, .zst, .xz) or files; "
            "PATH:/DEST places a source at DEST.  Later sources overlay earlier ones.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="The image file to write.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="squashfs (default), ext4 or cpio.")] = None,
    compression: Annotated[
        str | None,
        typer.Option(
            "--compression",
            help="squashfs: zstd[:LEVEL] (default zstd:3), gzip[:LEVEL], xz[:LEVEL]; "
            "cpio: none (default), gzip[:LEVEL], zstd[:LEVEL].",  # cpio: until the registry
        ),
    ] = None,
    block_size: Annotated[
        str | None,
        typer.Option("--block-size", help="squashfs block size, 4K..1M, bytes or K/M suffix (default 128K)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Threads (default: all cores). Never changes the bytes."),
    ] = None,
    epoch: Annotated[
        int | None,
        typer.Option(
            "--epoch", help="Clamp mtimes to this; the image's own time. Default: SOURCE_DATE_EPOCH."
        ),
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option(
            "--owner", help="auto (default: dirs root-owned, tars as recorded), preserve, root, or UID:GID."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob to leave out (repeatable); with '/' it matches the whole path."),
    ] = None,
    spec: Annotated[
        str | None, typer.Option("--spec", help="A TOML spec file; options given here override it.")
    ] = None,
    manifest: Annotated[str | None, typer.Option("--manifest", help="Write the JSON manifest here.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a summary.")
    ] = False,
    fragments: Annotated[
        bool | None,
        typer.Option(
            "--fragments/--no-fragments",
            help="squashfs: pack file tails into fragment blocks.",
            show_default=False,
        ),
    ] = None,
    dedup: Annotated[
        bool | None,
        typer.Option(
            "--dedup/--no-dedup",
            help="Store identical content once (ext4: read-only images).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="ext4: 'auto' (default) or an exact size like 2G.")
    ] = None,
    headroom: Annotated[
        int | None,
        typer.Option("--headroom", min=0, help="ext4 with --size auto: free space, percent (default 10)."),
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option(
            "--journal",
            metavar="[=SIZE]",
            help="ext4: add a journal, for images mounted read-write; --journal alone picks the size, "
            "--journal=64M sets it.",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features", help="ext4: comma-separated edits of the feature set, e.g. -metadata_csum,-64bit."
        ),
    ] = None,
    uuid: Annotated[
        str | None, typer.Option("--uuid", help="ext4: file system UUID (default: derived from the content).")
    ] = None,
    label: Annotated[str | None, typer.Option("--label", help="ext4: volume label.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
) -> None:
    """Build an image from SOURCEs (directories, tar archives, files)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    bar = ProgressBar() if not json_out else None
    try:
        result = build(
            sources or [],
            output,
            format=format,
            compression=compression,
            block_size=block_size,
            jobs=jobs,
            epoch=epoch,
            owner=owner,
            exclude=exclude or (),
            spec=spec,
            manifest=manifest,
            fragments=fragments,
            dedup=dedup,
            size=size,
            headroom=headroom,
            journal=(True if journal in ("yes", "true", "") else journal) if journal is not None else None,
            features=[f for f in (features or "").split(",") if f],
            uuid=uuid,
            label=label,
            progress=bar,
        )
    except PyImgError as exc:
        if bar:
            bar.close()
        _fail(exc)
    except KeyboardInterrupt:
        if bar:
            bar.close()
        typer.echo("pyimg: interrupted; no image written", err=True)
        raise typer.Exit(130) from None
    if bar:
        bar.close()
    if json_out:
        typer.echo(json.dumps(result.summary(), indent=1))
    elif not quiet:
        saved = f", dedup saved {_human(result.dedup_saved)}" if result.dedup_saved else ""
        typer.echo(
            f"{result.output}: {result.format}, {result.entries} entries, {_human(result.bytes_in)} in → "
            f"{_human(result.image_size)} out{saved}, {result.seconds:.2f} s, blake3:{result.digest}"
        )


@app.command("digest")
def digest_command(
    image: Annotated[str, typer.Argument(help="An image file.")],
    sha256: Annotated[
        bool, typer.Option("--sha256", help="Print the SHA-256 instead of the BLAKE3.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print both digests and the size as JSON.")
    ] = False,
) -> None:
    """Print an image's digest (BLAKE3, hex), as its manifest records it."""
    try:
        d = digest(image)
    except PyImgError as exc:
        _fail(exc)
    if json_out:
        typer.echo(
            json.dumps(
                {"file": os.path.basename(image), "size": d.size, "blake3": d.blake3, "sha256": d.sha256}
            )
        )
    else:
        typer.echo(d.sha256 if sha256 else d.blake3)


@app.command("version")
def version_command() -> None:
    """Print pyimg's version."""
    typer.echo(__version__)


from .boot.cli import register as _register_boot  # noqa: E402  # boot: until the lead mounts it

_register_boot(app)  # boot: `pyimg initramfs`, `pyimg kernel fetch`; until the lead mounts it


def _optional_values(argv: list[str]) -> list[str]:
    """`--journal` takes an optional value (`--journal` or `--journal=64M`), which
    the option parser cannot express: a bare `--journal` becomes `--journal=yes`."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        out.append("--journal=yes" if arg == "--journal" else arg)
    return out


def main() -> None:
    from ._ffi import lib

    lib.pyimg_tune_malloc()  # fewer page faults on 1 MiB buffers; see csrc/common/malloc_tune.c
    sys.argv[1:] = _optional_values(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
