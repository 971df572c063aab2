"""ext4 options: each field is declared once (pyimg/settings.py) and so is a spec
key under [ext4], a `pyimg build` flag and a keyword of pyimg.build()."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from ..errors import SpecError
from ..settings import setting
from ..values import list_of, parse_int, parse_size, typed

LABEL_MAX = 16  # bytes, s_volume_name
_YES = ("true", "yes", "on", "")
_NO = ("false", "no", "off", "none")


def parse_journal(value: object, key: str = "ext4.journal") -> int | None:
    """false -> None (no journal), true -> 0 (default size), a size -> bytes.  The
    CLI's words ("yes", "no"; `--journal` alone is "yes") mean the booleans."""
    if isinstance(value, str) and value.strip().lower() in _YES + _NO:
        value = value.strip().lower() in _YES
    if isinstance(value, bool):
        return 0 if value else None
    size = parse_size(value, key)  # type: ignore[arg-type]  # parse_size names a wrong type
    if size == 0:
        raise SpecError(f"{key}: a journal size must be positive (use false for no journal)")
    return size


def parse_ext4_size(value: object, key: str = "ext4.size") -> int | None:
    """ "auto" -> None, else bytes."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    size = parse_size(value, key)  # type: ignore[arg-type]
    if size == 0:
        raise SpecError(f'{key}: the image size must be positive (or "auto")')
    return size


def parse_features(values: object, key: str = "ext4.features") -> tuple[str, ...]:
    """Feature edits "+name"/"-name" (a bare name means "+name"): a list, or a
    comma-separated string; each item of a list may hold several, comma-separated
    (the CLI's `--features a,b --features c`)."""
    if isinstance(values, str):
        values = [values]
    if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values):
        values = [part for v in values for part in v.split(",") if part.strip()]
    edits = []
    for i, item in enumerate(list_of(values, str, key)):
        text = item.strip()
        if not re.fullmatch(r"[+-]?[a-z0-9_]+", text):
            raise SpecError(f"{key}[{i}]: invalid feature edit {item!r}: expected +name or -name")
        edits.append(text if text[0] in "+-" else "+" + text)
    return tuple(edits)


def parse_uuid(value: object, key: str = "ext4.uuid") -> str:
    try:
        return str(uuid.UUID(typed(value, str, key)))
    except ValueError:
        raise SpecError(f"{key}: invalid UUID {value!r}") from None


def parse_label(value: object, key: str = "ext4.label") -> str:
    label = typed(value, str, key)
    try:
        encoded = label.encode()
    except UnicodeEncodeError:
        raise SpecError(f"{key}: {label!r} is not valid UTF-8") from None
    if len(encoded) > LABEL_MAX:
        raise SpecError(f"{key}: {label!r} is longer than {LABEL_MAX} bytes")
    return label


def parse_headroom(value: object, key: str = "ext4.headroom") -> int:
    return parse_int(value, key, 0, 1000)


def parse_dedup(value: object, key: str = "ext4.dedup") -> bool | None:
    return None if value is None else typed(value, bool, key)


@dataclass(frozen=True, slots=True)
class Ext4Options:
    size: int | None = setting(
        None, "'auto' (default: the smallest image that holds the tree) or an exact size like 2G.",
        parse_ext4_size, metavar="SIZE",
    )  # fmt: skip
    headroom: int = setting(
        10, "With size auto: free space, percent (default 10).", parse_headroom, metavar="PERCENT"
    )
    journal: int | None = setting(
        None, "Add a journal, for images mounted read-write; --journal alone picks the size, "
        "--journal=64M sets it.", parse_journal, metavar="[=SIZE]", optional_value="yes",
    )  # fmt: skip
    features: tuple[str, ...] = setting(
        (), "Comma-separated edits of the feature set, e.g. -metadata_csum,-64bit.", parse_features,
        append=True, repeat=True, metavar="EDITS",
    )  # fmt: skip
    uuid: str | None = setting(
        None, "File system UUID (default: derived from the content).", parse_uuid, metavar="UUID"
    )
    dedup: bool | None = setting(
        None, "Store identical content once (default: on unless there is a journal).", parse_dedup,
        flag=True,
    )  # fmt: skip
    label: str = setting("", "Volume label, at most 16 bytes.", parse_label, metavar="TEXT")
