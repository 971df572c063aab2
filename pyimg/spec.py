"""The TOML spec file, option parsing helpers, and merging CLI options over a spec.

    spec = load_spec("image.toml")                      # dict, straight from TOML
    base = options_from_spec(spec, base_dir, origin="image.toml")
    options = merge_options(base, output=cli_output)    # CLI values (None = not given) win

or simply `load_options("image.toml")`.  docs/spec.md describes the format.  Every
problem is a SpecError naming the offending key ("source[2].mode", "policy.epoch")
and what was expected; nothing here touches the environment or the clock.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

from .errors import SourceError, SpecError
from .formats.cpio import CpioOptions, parse_cpio_compression  # cpio: until the registry
from .options import BuildOptions, Ext4Options, Policy, SourceSpec, SquashfsOptions
from .tree import normalize_path

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}

COMPRESSION_LEVELS: dict[str, tuple[int, int]] = {"zstd": (1, 22), "gzip": (1, 9), "xz": (0, 9)}
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 1024 * 1024
EXT4_LABEL_MAX = 16  # bytes, s_volume_name

_TOP_KEYS = {"output", "format", "jobs", "manifest", "source", "policy", "squashfs", "ext4"}
_TOP_KEYS.add("cpio")  # cpio: until the registry
_SOURCE_KEYS = {"path", "kind", "dest", "mode", "uid", "gid"}
_POLICY_KEYS = {"owner", "uid_map", "gid_map", "epoch", "exclude"}
_SQUASHFS_KEYS = {"compression", "block_size", "fragments", "dedup"}
_EXT4_KEYS = {"size", "headroom", "journal", "features", "uuid", "dedup", "label"}


# ----------------------------------------------------------------------------- values


def parse_size(value: str | int, key: str = "size") -> int:
    """Bytes from "4096", "128K", "1M", "2G", "1T" (binary; "KiB"/"KB"/"B" accepted) or an int."""
    if isinstance(value, bool):
        raise SpecError(f"{key}: expected a size like 4096, 128K or 2G, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"{key}: a size cannot be negative ({value})")
        return value
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a size like 4096, 128K or 2G, got {_type_name(value)}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise SpecError(
            f"{key}: invalid size {value!r}: expected a number with an optional K, M, G or T suffix"
        )
    number, unit, _ = match.groups()
    return int(number) << _SIZE_SHIFT[unit.lower()]


def parse_block_size(value: str | int, key: str = "squashfs.block_size") -> int:
    size = parse_size(value, key)
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise SpecError(f"{key}: block size must be a power of two from 4K to 1M, got {value!r}")
    return size


def parse_owner(value: str, key: str = "policy.owner") -> str:
    """ "auto", "preserve", "root" or "UID:GID" (canonical form returned)."""
    if not isinstance(value, str):
        raise SpecError(f'{key}: expected auto, preserve, root or "UID:GID", got {_type_name(value)}')
    text = value.strip()
    if text in ("auto", "preserve", "root"):
        return text
    uid, sep, gid = text.partition(":")
    if sep and uid.strip().isdigit() and gid.strip().isdigit():
        return f"{_id(int(uid), key)}:{_id(int(gid), key)}"
    raise SpecError(
        f"{key}: invalid owner {value!r}: expected auto, preserve, root or UID:GID (e.g. 1000:1000)"
    )


CompressionName = Literal["zstd", "gzip", "xz"]


def parse_compression(value: str, key: str = "squashfs.compression") -> tuple[CompressionName, int | None]:
    """("zstd", 19) from "zstd:19"; ("gzip", None) from "gzip"."""
    if not isinstance(value, str):
        raise SpecError(f'{key}: expected a string like "zstd:15", got {_type_name(value)}')
    name, sep, level_text = value.strip().partition(":")
    name = name.strip().lower()
    if name not in COMPRESSION_LEVELS:
        known = ", ".join(COMPRESSION_LEVELS)
        raise SpecError(f"{key}: unknown compression {name!r}: expected one of {known}")
    checked = cast(CompressionName, name)
    if not sep:
        return checked, None
    low, high = COMPRESSION_LEVELS[name]
    try:
        level = int(level_text)
    except ValueError:
        raise SpecError(
            f"{key}: invalid {name} level {level_text!r}: expected a number {low}..{high}"
        ) from None
    if not low <= level <= high:
        raise SpecError(f"{key}: {name} level {level} out of range {low}..{high}")
    return checked, level


def parse_journal(value: bool | str | int, key: str = "ext4.journal") -> int | None:
    """false -> None (no journal), true -> 0 (default size), a size -> bytes."""
    if isinstance(value, bool):
        return 0 if value else None
    size = parse_size(value, key)
    if size == 0:
        raise SpecError(f"{key}: a journal size must be positive (use false for no journal)")
    return size


def parse_ext4_size(value: str | int, key: str = "ext4.size") -> int | None:
    """ "auto" -> None, else bytes."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    size = parse_size(value, key)
    if size == 0:
        raise SpecError(f'{key}: the image size must be positive (or "auto")')
    return size


def parse_features(values: Sequence[str], key: str = "ext4.features") -> tuple[str, ...]:
    """Feature edits "+name"/"-name" (a bare name means "+name")."""
    edits = []
    for i, item in enumerate(_list_of(values, str, key)):
        text = item.strip()
        if not re.fullmatch(r"[+-]?[a-z0-9_]+", text):
            raise SpecError(f"{key}[{i}]: invalid feature edit {item!r}: expected +name or -name")
        edits.append(text if text[0] in "+-" else "+" + text)
    return tuple(edits)


def parse_uuid(value: str, key: str = "ext4.uuid") -> str:
    try:
        return str(uuid.UUID(_typed(value, str, key)))
    except ValueError:
        raise SpecError(f"{key}: invalid UUID {value!r}") from None


def parse_id_map(
    value: Mapping[str, int] | Iterable[tuple[int, int]], key: str
) -> tuple[tuple[int, int], ...]:
    """{ "1000" = 0 } (TOML keys are strings) or pairs -> sorted ((from, to), ...)."""
    pairs = value.items() if isinstance(value, Mapping) else value
    result: dict[int, int] = {}
    for source, target in pairs:
        text = str(source).strip()
        if not text.isdigit():
            raise SpecError(f"{key}: invalid id {source!r}: map keys are numeric ids")
        result[_id(int(text), key)] = _id(_typed(target, int, f"{key}.{text}"), f"{key}.{text}")
    return tuple(sorted(result.items()))


def parse_dest(value: str | bytes, key: str) -> bytes:
    try:
        return normalize_path(value)
    except SourceError as exc:
        raise SpecError(f"{key}: {exc.reason}") from None


# ----------------------------------------------------------------------------- the file


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML document at `path` (syntax checked only; see options_from_spec)."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise SpecError("no such spec file", path) from None
    except OSError as exc:
        raise SpecError(f"cannot read the spec file: {exc.strerror}", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"invalid TOML: {exc}", path) from None


def load_options(path: str | os.PathLike[str]) -> BuildOptions:
    """load_spec + options_from_spec, paths relative to the spec file's directory."""
    base_dir = os.path.dirname(os.path.abspath(path))
    return options_from_spec(load_spec(path), base_dir, origin=os.fspath(path))


def options_from_spec(spec: Mapping[str, Any], base_dir: str, *, origin: str | None = None) -> BuildOptions:
    """BuildOptions from a parsed spec.  Relative paths are taken from `base_dir`.

    A spec may leave out `output` (the CLI gives it): the result then has
    output == "", and merge_options refuses to finish without one.
    """
    try:
        return _options_from_spec(spec, base_dir)
    except SpecError as exc:
        if origin is None or exc.path is not None:
            raise
        raise SpecError(exc.reason, origin) from None


def _options_from_spec(spec: Mapping[str, Any], base_dir: str) -> BuildOptions:
    _check_keys(spec, _TOP_KEYS, "")
    fields: dict[str, Any] = {}
    if "output" in spec:
        fields["output"] = _path(spec["output"], base_dir, "output")
    if "format" in spec:
        fields["format"] = _format(spec["format"], "format")
    if "jobs" in spec:
        fields["jobs"] = _jobs(spec["jobs"], "jobs")
    if "manifest" in spec:
        fields["manifest"] = _path(spec["manifest"], base_dir, "manifest")
    sources = _list_of(spec.get("source", []), dict, "source")
    fields["sources"] = tuple(_source(s, base_dir, f"source[{i}]") for i, s in enumerate(sources))
    fields["policy"] = _policy(_table(spec.get("policy", {}), "policy"))
    fields["squashfs"] = _squashfs(_table(spec.get("squashfs", {}), "squashfs"))
    fields["ext4"] = _ext4(_table(spec.get("ext4", {}), "ext4"))
    if "cpio" in spec:  # cpio: until the registry
        fields["cpio"] = _cpio(_table(spec["cpio"], "cpio"))  # cpio: until the registry
    fields.setdefault("output", "")
    return BuildOptions(**fields)


def _source(table: Mapping[str, Any], base_dir: str, key: str) -> SourceSpec:
    _check_keys(table, _SOURCE_KEYS, key)
    if "path" not in table:
        raise SpecError(f"{key}: missing required key 'path'")
    kind = table.get("kind", "auto")
    if kind not in ("auto", "dir", "tar", "file"):
        raise SpecError(f"{key}.kind: expected auto, dir, tar or file, got {kind!r}")
    mode = table.get("mode")
    if mode is not None:
        mode = _typed(mode, int, f"{key}.mode")
        if not 0 <= mode <= 0o7777:
            raise SpecError(f"{key}.mode: {mode:#o} is not a permission mode (0 to 0o7777)")
    if kind in ("dir", "tar") and any(k in table for k in ("mode", "uid", "gid")):
        raise SpecError(f"{key}: mode, uid and gid apply to single-file sources only")
    return SourceSpec(
        path=_path(table["path"], base_dir, f"{key}.path"),
        kind=kind,
        dest=parse_dest(_typed(table.get("dest", "/"), str, f"{key}.dest"), f"{key}.dest"),
        mode=mode,
        uid=_optional_id(table.get("uid"), f"{key}.uid"),
        gid=_optional_id(table.get("gid"), f"{key}.gid"),
    )


def _policy(table: Mapping[str, Any]) -> Policy:
    _check_keys(table, _POLICY_KEYS, "policy")
    epoch = table.get("epoch")
    if epoch is not None:
        epoch = _typed(epoch, int, "policy.epoch")
        if epoch < 0:
            raise SpecError(f"policy.epoch: must not be negative ({epoch})")
    return Policy(
        owner=parse_owner(table.get("owner", "auto")),
        uid_map=parse_id_map(_table(table.get("uid_map", {}), "policy.uid_map"), "policy.uid_map"),
        gid_map=parse_id_map(_table(table.get("gid_map", {}), "policy.gid_map"), "policy.gid_map"),
        epoch=epoch,
        excludes=_excludes(table.get("exclude", []), "policy.exclude"),
    )


def _squashfs(table: Mapping[str, Any]) -> SquashfsOptions:
    _check_keys(table, _SQUASHFS_KEYS, "squashfs")
    fields: dict[str, Any] = {}
    if "compression" in table:
        fields["compression"], fields["level"] = parse_compression(table["compression"])
    if "block_size" in table:
        fields["block_size"] = parse_block_size(table["block_size"])
    for name in ("fragments", "dedup"):
        if name in table:
            fields[name] = _typed(table[name], bool, f"squashfs.{name}")
    return SquashfsOptions(**fields)


def _ext4(table: Mapping[str, Any]) -> Ext4Options:
    _check_keys(table, _EXT4_KEYS, "ext4")
    fields: dict[str, Any] = {}
    if "size" in table:
        fields["size"] = parse_ext4_size(table["size"])
    if "headroom" in table:
        fields["headroom"] = _headroom(table["headroom"], "ext4.headroom")
    if "journal" in table:
        fields["journal"] = parse_journal(table["journal"])
    if "features" in table:
        fields["features"] = parse_features(table["features"])
    if "uuid" in table:
        fields["uuid"] = parse_uuid(table["uuid"])
    if "dedup" in table:
        fields["dedup"] = _typed(table["dedup"], bool, "ext4.dedup")
    if "label" in table:
        fields["label"] = _label(table["label"], "ext4.label")
    return Ext4Options(**fields)


def _cpio(table: Mapping[str, Any]) -> CpioOptions:  # cpio: until the registry
    _check_keys(table, {"compression"}, "cpio")  # cpio: until the registry
    text = _typed(table.get("compression", "none"), str, "cpio.compression")  # cpio: until the registry
    return parse_cpio_compression(text)  # cpio: until the registry


# ----------------------------------------------------------------------------- CLI over spec


def merge_options(
    base: BuildOptions | None,
    *,
    sources: Sequence[SourceSpec] | None = None,
    output: str | None = None,
    format: str | None = None,
    jobs: int | None = None,
    manifest: str | None = None,
    owner: str | None = None,
    uid_map: Mapping[str, int] | Iterable[tuple[int, int]] | None = None,
    gid_map: Mapping[str, int] | Iterable[tuple[int, int]] | None = None,
    epoch: int | None = None,
    excludes: Sequence[str] | None = None,
    compression: str | None = None,
    block_size: str | int | None = None,
    fragments: bool | None = None,
    dedup: bool | None = None,
    size: str | int | None = None,
    headroom: int | None = None,
    journal: bool | str | int | None = None,
    features: Sequence[str] | None = None,
    uuid: str | None = None,
    label: str | None = None,
) -> BuildOptions:
    """`base` (from a spec, or None) with every given (non-None) CLI value applied.

    Scalars replace the spec's value.  Lists add to it: `sources` are applied after
    the spec's (so they overlay them), `excludes` and `features` are appended, and
    uid_map/gid_map entries override the spec's entry for the same id.  `dedup`
    sets both squashfs.dedup and ext4.dedup.  Raw CLI strings are validated with
    the same parsers as the spec.  Refuses a result without output or sources.
    """
    if base is None:
        base = BuildOptions(sources=(), output="")
    policy = base.policy
    sqfs = base.squashfs
    ext4 = base.ext4
    top: dict[str, Any] = {}
    if sources is not None:
        top["sources"] = base.sources + tuple(sources)
    if output is not None:
        top["output"] = _typed(output, str, "output")
    if format is not None:
        top["format"] = _format(format, "format")
    if jobs is not None:
        top["jobs"] = _jobs(jobs, "jobs")
    if manifest is not None:
        top["manifest"] = _typed(manifest, str, "manifest")
    if owner is not None:
        policy = dataclasses.replace(policy, owner=parse_owner(owner, "owner"))
    if uid_map is not None:
        merged = dict(policy.uid_map) | dict(parse_id_map(uid_map, "uid_map"))
        policy = dataclasses.replace(policy, uid_map=tuple(sorted(merged.items())))
    if gid_map is not None:
        merged = dict(policy.gid_map) | dict(parse_id_map(gid_map, "gid_map"))
        policy = dataclasses.replace(policy, gid_map=tuple(sorted(merged.items())))
    if epoch is not None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise SpecError(f"epoch: expected a non-negative integer (seconds since 1970), got {epoch!r}")
        policy = dataclasses.replace(policy, epoch=epoch)
    if excludes is not None:
        policy = dataclasses.replace(policy, excludes=policy.excludes + _excludes(excludes, "exclude"))
    if compression is not None and top.get("format", base.format) == "cpio":  # cpio: until the registry
        top["cpio"] = parse_cpio_compression(compression, "compression")  # cpio: until the registry
    elif compression is not None:
        name, level = parse_compression(compression, "compression")
        sqfs = dataclasses.replace(sqfs, compression=name, level=level)
    if block_size is not None:
        sqfs = dataclasses.replace(sqfs, block_size=parse_block_size(block_size, "block_size"))
    if fragments is not None:
        sqfs = dataclasses.replace(sqfs, fragments=_typed(fragments, bool, "fragments"))
    if dedup is not None:
        sqfs = dataclasses.replace(sqfs, dedup=_typed(dedup, bool, "dedup"))
        ext4 = dataclasses.replace(ext4, dedup=dedup)
    if size is not None:
        ext4 = dataclasses.replace(ext4, size=parse_ext4_size(size, "size"))
    if headroom is not None:
        ext4 = dataclasses.replace(ext4, headroom=_headroom(headroom, "headroom"))
    if journal is not None:
        ext4 = dataclasses.replace(ext4, journal=_cli_journal(journal))
    if features is not None:
        ext4 = dataclasses.replace(ext4, features=ext4.features + parse_features(features, "features"))
    if uuid is not None:
        ext4 = dataclasses.replace(ext4, uuid=parse_uuid(uuid, "uuid"))
    if label is not None:
        ext4 = dataclasses.replace(ext4, label=_label(label, "label"))
    result = dataclasses.replace(base, policy=policy, squashfs=sqfs, ext4=ext4, **top)
    if not result.output:
        raise SpecError("no output image given (spec key 'output' or the CLI's output option)")
    if not result.sources:
        raise SpecError("no source given (spec [[source]] tables or the CLI's source arguments)")
    return result


_YES = ("true", "yes", "on")
_NO = ("false", "no", "off", "none")


def _cli_journal(value: bool | str | int) -> int | None:
    # On a command line the words come as strings: "yes"/"no" besides sizes.
    if isinstance(value, str) and value.strip().lower() in _YES + _NO:
        return parse_journal(value.strip().lower() in _YES, "journal")
    return parse_journal(value, "journal")


# ----------------------------------------------------------------------------- small checks


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", str: "a string", float: "a number", list: "a list"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


def _typed(value: object, kind: type[T], key: str) -> T:
    # bool is an int in Python; TOML keeps them apart and so do we.
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise SpecError(f"{key}: expected {_type_name(kind())}, got {_type_name(value)}")


def _list_of(value: object, kind: type[T], key: str) -> list[T]:
    if not isinstance(value, list):
        raise SpecError(f"{key}: expected a list, got {_type_name(value)}")
    return [_typed(item, kind, f"{key}[{i}]") for i, item in enumerate(value)]


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{key}: expected a table, got {_type_name(value)}")
    return cast(Mapping[str, Any], value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            place = f"{where}.{key}" if where else key
            raise SpecError(f"unknown key {place!r} (known: {', '.join(sorted(allowed))})")


def _path(value: object, base_dir: str, key: str) -> str:
    text = _typed(value, str, key)
    if not text:
        raise SpecError(f"{key}: empty path")
    return os.path.join(base_dir, text)  # an absolute path stays as it is


def _format(value: object, key: str) -> Literal["squashfs", "ext4", "cpio"]:  # cpio: until the registry
    if value not in ("squashfs", "ext4", "cpio"):  # cpio: until the registry
        formats = '"squashfs", "ext4" or "cpio"'  # cpio: until the registry
        raise SpecError(f"{key}: expected {formats}, got {value!r}")
    return value


def _jobs(value: object, key: str) -> int:
    jobs = _typed(value, int, key)
    if jobs < 1:
        raise SpecError(f"{key}: must be at least 1, got {jobs}")
    return jobs


def _id(value: int, key: str) -> int:
    if not 0 <= value < 2**32:
        raise SpecError(f"{key}: id {value} out of range 0..4294967295")
    return value


def _optional_id(value: object, key: str) -> int | None:
    return None if value is None else _id(_typed(value, int, key), key)


def _headroom(value: object, key: str) -> int:
    percent = _typed(value, int, key)
    if not 0 <= percent <= 1000:
        raise SpecError(f"{key}: expected a percentage 0..1000, got {percent}")
    return percent


def _label(value: object, key: str) -> str:
    label = _typed(value, str, key)
    if len(label.encode()) > EXT4_LABEL_MAX:
        raise SpecError(f"{key}: {label!r} is longer than {EXT4_LABEL_MAX} bytes")
    return label


def _excludes(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise SpecError(f"{key}: expected a list of patterns, got a string")
    patterns = _list_of(list(value) if isinstance(value, (tuple, list)) else value, str, key)
    for i, pattern in enumerate(patterns):
        if not pattern.strip("/"):
            raise SpecError(f"{key}[{i}]: empty pattern {pattern!r} (it would exclude everything)")
    return tuple(patterns)
