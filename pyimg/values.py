"""Value parsers shared by every option: sizes, typed values, ids.

Each takes the value (from TOML, the CLI or the API) and the key to name in its
message, and returns the checked value or raises SpecError naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar, cast

from .errors import SpecError

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(value: str | int, key: str = "size") -> int:
    """Bytes from "4096", "128K", "1M", "2G", "1T" (binary; "KiB"/"KB"/"B" accepted) or an int."""
    if isinstance(value, bool):
        raise SpecError(f"{key}: expected a size like 4096, 128K or 2G, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"{key}: a size cannot be negative ({value})")
        return value
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a size like 4096, 128K or 2G, got {type_name(value)}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise SpecError(
            f"{key}: invalid size {value!r}: expected a number with an optional K, M, G or T suffix"
        )
    number, unit, _ = match.groups()
    return int(number) << _SIZE_SHIFT[unit.lower()]


def parse_int(value: object, key: str, low: int, high: int) -> int:
    """A whole number in low..high; from the CLI it may come as digits in a string."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    number = typed(value, int, key)
    if not low <= number <= high:
        raise SpecError(f"{key}: expected a number {low}..{high}, got {number}")
    return number


def type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", str: "a string", float: "a number", list: "a list"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


def typed(value: object, kind: type[T], key: str) -> T:
    # bool is an int in Python; TOML keeps them apart and so do we.
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise SpecError(f"{key}: expected {type_name(kind())}, got {type_name(value)}")


def list_of(value: object, kind: type[T], key: str) -> list[T]:
    if not isinstance(value, list):
        raise SpecError(f"{key}: expected a list, got {type_name(value)}")
    return [typed(item, kind, f"{key}[{i}]") for i, item in enumerate(value)]


def table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{key}: expected a table, got {type_name(value)}")
    return cast(Mapping[str, Any], value)
