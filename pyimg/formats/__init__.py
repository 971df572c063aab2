"""The format registry: every format declares itself here, once.

A format is three things: its options dataclass (whose fields, declared with
pyimg.settings.setting, are its spec keys, CLI flags, API keywords and manifest
record), its writer (the shape in base.py, imported only when a build uses it, so
the CLI starts light), and the facts its writer reports (a frozen dataclass: the
typed part of the Artifact, e.g. an ext4 UUID).  spec.py, cli.py, api.py and
manifest.py derive everything from FORMATS; adding a format is one `register`
call here plus its own modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SpecError
from ..settings import Setting, settings_of
from .cpio_options import CpioOptions
from .ext4_options import Ext4Options
from .squashfs_options import SquashfsOptions

FormatKind = Literal["filesystem", "archive", "container", "transform"]


@dataclass(frozen=True, slots=True)
class FormatSpec:
    name: str
    kind: FormatKind
    summary: str  # one line, for --help
    options: type  # the options dataclass; its settings are the format's options
    writer: str  # "module:Class" of the FormatWriter
    media_type: str  # what the image is, for stores (an OCI layer media type)

    def load_writer(self) -> Any:
        module, _, name = self.writer.partition(":")
        return getattr(importlib.import_module(module), name)


FORMATS: dict[str, FormatSpec] = {}


def register(spec: FormatSpec) -> None:
    """Add a format.  Options another format declares too (same name) must agree on
    their CLI shape, since they share one flag."""
    for name, meta in settings_of(spec.options):
        for other, other_meta in _declared(name):
            if _cli_shape(other_meta) != _cli_shape(meta):
                raise ValueError(f"{spec.name}.{name} and {other}.{name} share a flag but not its shape")
    FORMATS[spec.name] = spec


def format_spec(name: str) -> FormatSpec:
    spec = FORMATS.get(name)
    if spec is None:
        raise SpecError(f"unknown format {name!r} (choose {', '.join(FORMATS)})")
    return spec


def format_of(options_type: type) -> FormatSpec:
    """The format whose options dataclass this is."""
    for spec in FORMATS.values():
        if spec.options is options_type:
            return spec
    raise SpecError(f"{options_type.__name__} is not the options of a registered format")


def all_settings() -> dict[str, list[tuple[str, Setting]]]:
    """Option name -> [(format, Setting)] over every format: what the CLI offers."""
    out: dict[str, list[tuple[str, Setting]]] = {}
    for spec in FORMATS.values():
        for name, meta in settings_of(spec.options):
            out.setdefault(name, []).append((spec.name, meta))
    return out


def _declared(name: str) -> Iterator[tuple[str, Setting]]:
    for spec in FORMATS.values():
        for other, meta in settings_of(spec.options):
            if other == name:
                yield spec.name, meta


def _cli_shape(meta: Setting) -> tuple[bool, bool, str | None, bool]:
    return meta.flag, meta.combine is not None, meta.optional_value, meta.repeat


register(
    FormatSpec(
        name="squashfs",
        kind="filesystem",
        summary="compressed, read-only (the kernel's squashfs 4.0)",
        options=SquashfsOptions,
        writer="pyimg.formats.squashfs:SquashfsWriter",
        media_type="application/vnd.pyimg.squashfs",
    )
)
register(
    FormatSpec(
        name="ext4",
        kind="filesystem",
        summary="ext4, read-only with shared blocks, or read-write with a journal",
        options=Ext4Options,
        writer="pyimg.formats.ext4:Ext4Writer",
        media_type="application/vnd.pyimg.ext4",
    )
)
register(
    FormatSpec(
        name="cpio",
        kind="archive",
        summary="cpio newc, optionally gzip or zstd: what the kernel unpacks as an initramfs",
        options=CpioOptions,
        writer="pyimg.formats.cpio:CpioWriter",
        media_type="application/vnd.pyimg.cpio",
    )
)
