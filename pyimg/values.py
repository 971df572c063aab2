"""Value parsers shared by every option: sizes, typed values, ids.

Each takes the value (from TOML, the CLI or the API) and the key to name in its
message, and returns the checked value or raises SpecError naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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


def is_decimal(text: str, *, signed: bool = False) -> bool:
    """ASCII digits only (str.isdigit also takes "⒋" and "²", which int() refuses)."""
    if signed and text.startswith("-"):
        text = text[1:]
    return text.isascii() and text.isdigit()


def parse_int(value: object, key: str, low: int, high: int) -> int:
    """A whole number in low..high; from the CLI it may come as digits in a string."""
    if isinstance(value, str) and is_decimal(value.strip(), signed=True):
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


MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, "no id" to chown(2) and the kernel: never an owner


def parse_id(value: int, key: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise SpecError(f"{key}: id {value} out of range 0..{MAX_ID} (4294967295 is the reserved -1)")
    return value


def parse_owner(value: object, key: str = "policy.owner") -> str:
    """ "auto", "preserve", "root" or "UID:GID" (canonical form returned)."""
    if not isinstance(value, str):
        raise SpecError(f'{key}: expected auto, preserve, root or "UID:GID", got {type_name(value)}')
    text = value.strip()
    if text in ("auto", "preserve", "root"):
        return text
    uid, sep, gid = text.partition(":")
    if sep and is_decimal(uid.strip()) and is_decimal(gid.strip()):
        return f"{parse_id(int(uid), key)}:{parse_id(int(gid), key)}"
    raise SpecError(
        f"{key}: invalid owner {value!r}: expected auto, preserve, root or UID:GID (e.g. 1000:1000)"
    )


def parse_id_map(value: object, key: str) -> tuple[tuple[int, int], ...]:
    """{ "1000" = 0 } (TOML keys are strings) or pairs -> sorted ((from, to), ...)."""
    if isinstance(value, Mapping):
        pairs: Iterable[Any] = value.items()
    elif isinstance(value, (list, tuple)) and _all_pairs(value):
        pairs = value  # (from, to) pairs, as the API may give them
    else:
        raise SpecError(f"{key}: expected a table of ids (FROM = TO), got {type_name(value)}")
    result: dict[int, int] = {}
    for source, target in pairs:
        text = str(source).strip()
        if not is_decimal(text):
            raise SpecError(f"{key}: invalid id {source!r}: map keys are numeric ids")
        result[parse_id(int(text), key)] = parse_id(typed(target, int, f"{key}.{text}"), f"{key}.{text}")
    return tuple(sorted(result.items()))


IdMap = tuple[tuple[int, int], ...]


def _all_pairs(items: list[Any] | tuple[Any, ...]) -> bool:
    return all(isinstance(p, (list, tuple)) and len(p) == 2 for p in items)


def merge_id_maps(old: IdMap, new: IdMap) -> IdMap:
    """A later map's entries replace an earlier map's entry for the same id."""
    return tuple(sorted((dict(old) | dict(new)).items()))


def parse_epoch(value: object, key: str = "policy.epoch") -> int:
    """Seconds since 1970, not negative; from the CLI it may come as digits."""
    if isinstance(value, str) and is_decimal(value.strip(), signed=True):
        value = int(value)
    epoch = typed(value, int, key)
    if epoch < 0:
        raise SpecError(f"{key}: must not be negative ({epoch})")
    return epoch


def parse_excludes(value: object, key: str = "policy.exclude") -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise SpecError(f"{key}: expected a list of patterns, got a string")
    patterns = list_of(list(value) if isinstance(value, (tuple, list)) else value, str, key)
    for i, pattern in enumerate(patterns):
        if not pattern.strip("/"):
            raise SpecError(f"{key}[{i}]: empty pattern {pattern!r} (it would exclude everything)")
    return tuple(patterns)
