"""cpio (newc) options: each field is declared once (pyimg/settings.py) and so is a
spec key under [cpio], a `pyimg build` flag and a keyword of pyimg.build()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import SpecError
from ..settings import setting
from ..values import is_decimal, type_name

CompressionName = Literal["none", "gzip", "zstd"]
COMPRESSIONS: tuple[CompressionName, ...] = ("none", "gzip", "zstd")
DEFAULT_LEVELS = {"gzip": 6, "zstd": 3}
# zstd stops at 19: the "ultra" levels 20-22 want windows the kernel's initramfs
# decompressor may not be able to allocate.
LEVEL_RANGES = {"gzip": (1, 9), "zstd": (1, 19)}


@dataclass(frozen=True, slots=True)
class CpioCompression:
    name: CompressionName = "none"
    level: int | None = None  # None: the name's default (DEFAULT_LEVELS)

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    def resolved_level(self) -> int | None:
        """The level actually used (None without compression); raises SpecError."""
        if self.name not in COMPRESSIONS:
            raise SpecError(f"cpio compression {self.name!r}: choose none, gzip or zstd")
        if self.name == "none":
            if self.level is not None:
                raise SpecError("cpio compression none takes no level")
            return None
        lo, hi = LEVEL_RANGES[self.name]
        level = DEFAULT_LEVELS[self.name] if self.level is None else self.level
        if not lo <= level <= hi:
            raise SpecError(f"cpio {self.name} level {level} out of range {lo}..{hi}")
        return level


def parse_compression(value: object, key: str = "cpio.compression") -> CpioCompression:
    """'none', 'gzip', 'gzip:9', 'zstd', 'zstd:19' -> CpioCompression (validated)."""
    if isinstance(value, CpioCompression):
        value.resolved_level()
        return value
    if not isinstance(value, str):
        raise SpecError(f'{key}: expected a string like "zstd:19", got {type_name(value)}')
    name, sep, level_text = value.strip().lower().partition(":")
    if name not in COMPRESSIONS:
        raise SpecError(f"{key}: {value!r}: choose none, gzip[:LEVEL] or zstd[:LEVEL]")
    if sep and not is_decimal(level_text):
        raise SpecError(f"{key}: level {level_text!r} is not a number")
    chosen = CpioCompression(name, int(level_text) if sep else None)
    try:
        chosen.resolved_level()
    except SpecError as exc:
        raise SpecError(f"{key}: {exc.reason}") from None
    return chosen


@dataclass(frozen=True, slots=True)
class CpioOptions:
    compression: CpioCompression = setting(
        CpioCompression(), "none (default), gzip[:LEVEL] or zstd[:LEVEL] (the whole archive).",
        parse_compression, metavar="NAME[:LEVEL]",
    )  # fmt: skip
    drop_xattrs: bool = setting(
        False, "Leave xattrs out (newc cannot hold them; without this a tree with xattrs is "
        "refused, naming the first path).", flag=True,
    )  # fmt: skip

    def resolved_level(self) -> int | None:
        return self.compression.resolved_level()


def parse_cpio_compression(text: str, key: str = "cpio.compression") -> CpioOptions:
    """CpioOptions with the compression `text` names (for code that builds archives
    directly, like the boot initramfs)."""
    return CpioOptions(parse_compression(text, key))
