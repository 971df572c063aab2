"""squashfs options: each field is declared once (pyimg/settings.py) and so is a
spec key under [squashfs], a `pyimg build` flag and a keyword of pyimg.build()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from ..errors import SpecError
from ..settings import setting
from ..values import parse_size, type_name

CompressionName = Literal["zstd", "gzip", "xz"]
LEVEL_RANGES: dict[str, tuple[int, int]] = {"zstd": (1, 22), "gzip": (1, 9), "xz": (0, 9)}
DEFAULT_LEVELS = {"zstd": 3, "gzip": 9, "xz": 6}  # docs/squashfs.md says why zstd 3
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Compression:
    name: CompressionName = "zstd"
    level: int | None = None  # None: the name's default level (DEFAULT_LEVELS)

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"


def parse_compression(value: object, key: str = "squashfs.compression") -> Compression:
    """Compression("zstd", 19) from "zstd:19"; Compression("gzip", None) from "gzip"."""
    if isinstance(value, Compression):
        return value
    if not isinstance(value, str):
        raise SpecError(f'{key}: expected a string like "zstd:15", got {type_name(value)}')
    name, sep, level_text = value.strip().partition(":")
    name = name.strip().lower()
    if name not in LEVEL_RANGES:
        raise SpecError(f"{key}: unknown compression {name!r}: expected one of {', '.join(LEVEL_RANGES)}")
    checked = cast(CompressionName, name)
    if not sep:
        return Compression(checked)
    low, high = LEVEL_RANGES[name]
    try:
        level = int(level_text)
    except ValueError:
        raise SpecError(
            f"{key}: invalid {name} level {level_text!r}: expected a number {low}..{high}"
        ) from None
    if not low <= level <= high:
        raise SpecError(f"{key}: {name} level {level} out of range {low}..{high}")
    return Compression(checked, level)


def parse_block_size(value: object, key: str = "squashfs.block_size") -> int:
    size = parse_size(value, key)  # type: ignore[arg-type]  # parse_size names a wrong type
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise SpecError(f"{key}: block size must be a power of two from 4K to 1M, got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class SquashfsOptions:
    compression: Compression = setting(
        Compression(),
        "zstd[:LEVEL] (default zstd:3), gzip[:LEVEL] or xz[:LEVEL].",
        parse_compression,
        metavar="NAME[:LEVEL]",
    )
    block_size: int = setting(
        128 * 1024, "Block size, 4K..1M, bytes or K/M suffix (default 128K).", parse_block_size,
        metavar="SIZE",
    )  # fmt: skip
    fragments: bool = setting(True, "Pack file tails into fragment blocks.", flag=True)
    dedup: bool = setting(True, "Store identical content once.", flag=True)
