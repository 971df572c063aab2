"""The `pyimg` command.  The only place that prints, draws progress and exits."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from . import __version__
from .api import BuildResult, build_with, digest, options_for
from .boot.boot_cli import register as register_boot_commands
from .boot.cli import register as register_initramfs_commands
from .cache import default_dir as cache_default_dir
from .cli_support import after_commit, fail, interrupted, landed, sigterm_as_interrupt
from .errors import Interrupted, PyImgError, SpecError
from .formats import FORMATS, all_settings
from .options import CacheOptions, Policy
from .settings import Setting, cli_flag, settings_of
from .store.cli import register as register_store_commands

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Build reproducible, deduplicated filesystem images (squashfs, ext4) without root.",
)


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
    format: Annotated[
        str | None,
        typer.Option("--format", help=f"{' | '.join(FORMATS)} (default squashfs)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Threads (default: all cores). Never changes the bytes."),
    ] = None,
    spec: Annotated[
        str | None, typer.Option("--spec", help="A TOML spec file; options given here override it.")
    ] = None,
    manifest: Annotated[str | None, typer.Option("--manifest", help="Write the JSON manifest here.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a summary.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Use no build cache.", rich_help_panel="Cache")
    ] = False,
    **values: Any,
) -> None:
    """Build an image from SOURCEs (directories, tar archives, files).

    The policy and format options below are declared once each (options.Policy and
    the format registry, pyimg/formats/); a format option applies to the format that
    declares it, and given for another format it is an error.
    """
    sigterm_as_interrupt()
    bar = ProgressBar() if not json_out else None
    result: BuildResult | None = None
    try:
        if no_cache and values.get("cache") is not None:
            raise SpecError("--cache and --no-cache: give one")
        options = options_for(
            sources or [], output, format=format, jobs=jobs, spec=spec, manifest=manifest, **values
        )
        # The CLI's cache is on by default (the API's is off: docs/cache.md).
        if no_cache or options.cache.cache is None:
            where = None if no_cache else cache_default_dir()
            options = dataclasses.replace(options, cache=dataclasses.replace(options.cache, cache=where))
        # Under a shared cache (oci:DIR, HOST/REPO) the local tier is the default directory.
        local = dataclasses.replace(options.cache, local=options.cache.local or cache_default_dir())
        options = dataclasses.replace(options, cache=local)
        result = build_with(options, progress=bar)
        landed(result.output)
        if bar:
            bar.close()
        _report(result, json_out, quiet)
    except PyImgError as exc:
        if bar:
            bar.close()
        fail(exc)
    except KeyboardInterrupt as exc:
        if bar:
            bar.close()
        if result is not None:  # build() had returned: the image is complete
            interrupted(after_commit(result.output))
        if isinstance(exc, Interrupted) and exc.committed:  # a commit, once begun, completes
            interrupted(after_commit(exc.output))
        interrupted("pyimg: interrupted; no image written")


def _report(result: BuildResult, json_out: bool, quiet: bool) -> None:
    for warning in result.warnings:
        typer.echo(f"pyimg: warning: {warning}", err=True)
    if json_out:
        typer.echo(json.dumps(result.summary(), indent=1))
    elif not quiet:
        saved = f", dedup saved {_human(result.dedup_saved)}" if result.dedup_saved else ""
        typer.echo(
            f"{result.output}: {result.format}, {result.entries} entries, {_human(result.bytes_in)} in → "
            f"{_human(result.image_size)} out{saved}, {result.seconds:.2f} s, blake3:{result.digest}"
        )


def _setting_parameters() -> list[inspect.Parameter]:
    """One CLI option per policy and format setting: the policy's (options.Policy),
    then every format's (pyimg/formats/), with the help of each format declaring it."""
    groups: dict[str, list[tuple[str, Setting]]] = {
        name: [("policy", meta)] for name, meta in settings_of(Policy) if meta.cli
    }
    for name, meta in settings_of(CacheOptions):
        groups[name] = [("cache", meta)]
    for name, declared in all_settings().items():
        groups.setdefault(name, []).extend(declared)
    params = []
    for name, declared in groups.items():
        meta = declared[0][1]
        if not meta.cli:
            continue
        formats = [fmt for fmt, _ in declared if fmt not in ("policy", "cache")]
        own = ("policy", "cache")
        text = " ".join(f"{fmt}: {m.help}" if fmt not in own else m.help for fmt, m in declared)
        panel = " and ".join(formats) + " options" if formats else declared[0][0].capitalize()
        flag = cli_flag(name)
        shown: dict[str, Any] = {"help": text, "show_default": False, "rich_help_panel": panel}
        annotation: Any
        if meta.flag:
            annotation = Annotated[bool | None, typer.Option(f"{flag}/--no-{flag[2:]}", **shown)]
        elif meta.repeat:
            annotation = Annotated[list[str] | None, typer.Option(flag, metavar=meta.metavar, **shown)]
        else:
            annotation = Annotated[str | None, typer.Option(flag, metavar=meta.metavar, **shown)]
        keyword = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name, keyword, default=None, annotation=annotation))
    return params


def _with_settings(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with its **values spelled out as one parameter per policy and format
    setting, so typer sees them (typer reads __signature__ and __annotations__)."""
    fixed = [p for p in inspect.signature(command, eval_str=True).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]  # fmt: skip
    extra = _setting_parameters()
    clash = {p.name for p in fixed} & {p.name for p in extra}
    if clash:
        raise RuntimeError(f"options {sorted(clash)} clash with pyimg build's own")

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        command(**kwargs)

    wrapper.__signature__ = inspect.Signature(fixed + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in fixed + extra} | {"return": None}
    return wrapper


app.command("build")(_with_settings(build_command))


@app.command("digest")
def digest_command(
    image: Annotated[str, typer.Argument(help="An image file.")],
    sha256: Annotated[
        bool,
        typer.Option("--sha256", help="Print the SHA-256 of every byte (as sha256sum does) instead."),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print both digests and the size as JSON.")
    ] = False,
) -> None:
    """Print an image's digest (hex), as its manifest records it: BLAKE3 over the
    image's non-zero 1 MiB segments, so holes cost nothing (docs/manifest.md)."""
    try:
        d = digest(image, sha256=sha256 or json_out)  # the SHA-256 costs every byte: on demand
    except PyImgError as exc:
        fail(exc)
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


register_boot_commands(app)  # boot, run (pyimg/boot/boot_cli.py)
register_initramfs_commands(app)  # initramfs, kernel fetch (pyimg/boot/cli.py)
register_store_commands(app)  # push, pull, record, promote, status (pyimg/store/cli.py)


def _optional_values(argv: list[str]) -> list[str]:
    """Options that take an optional value (`--journal` or `--journal=64M`), which the
    option parser cannot express: a bare `--journal` becomes `--journal=yes`."""
    bare = {
        cli_flag(name): declared[0][1].optional_value
        for name, declared in all_settings().items()
        if declared[0][1].optional_value is not None
    }
    out: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        out.append(f"{arg}={bare[arg]}" if arg in bare else arg)
    return out


def main() -> None:
    from ._ffi import lib

    lib.pyimg_tune_malloc()  # fewer page faults on 1 MiB buffers; see csrc/common/malloc_tune.c
    sys.argv[1:] = _optional_values(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
