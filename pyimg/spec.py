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
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from . import settings
from .cache_remote import spec_value as spec_cache_value
from .errors import SourceError, SpecError
from .formats import FORMATS, all_settings, format_spec
from .formats.ext4_options import parse_ext4_size, parse_features, parse_journal, parse_uuid
from .formats.squashfs_options import parse_block_size, parse_compression
from .options import BuildOptions, CacheOptions, Policy, SourceSpec
from .tree import normalize_path
from .values import list_of as _list_of
from .values import parse_id, parse_owner, parse_size
from .values import table as _table
from .values import typed as _typed

__all__ = [  # the value parsers live with what they parse; these names stay importable here
    "load_options",
    "load_spec",
    "merge_options",
    "options_from_spec",
    "parse_block_size",
    "parse_compression",
    "parse_ext4_size",
    "parse_features",
    "parse_journal",
    "parse_owner",
    "parse_size",
    "parse_uuid",
]

_FIXED_TOP_KEYS = {"output", "format", "jobs", "manifest", "source", "policy", "cache", "cache_max"}
_SOURCE_KEYS = {"path", "kind", "dest", "mode", "uid", "gid"}


# ----------------------------------------------------------------------------- values


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
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise SpecError(
            f"not UTF-8 (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})", path
        ) from None


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
    _check_keys(spec, _FIXED_TOP_KEYS | set(FORMATS), "")
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
    cache = settings.apply(CacheOptions(), {k: spec[k] for k in ("cache", "cache_max") if k in spec}, "")
    if cache.cache is not None:
        cache = dataclasses.replace(cache, cache=spec_cache_value(cache.cache, base_dir))
    fields["cache"] = cache
    fields["format_options"] = {
        name: settings.apply(spec_.options(), dict(_table(spec[name], name)), name)
        for name, spec_ in FORMATS.items()
        if name in spec
    }
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
    policy: Policy = settings.apply(Policy(), dict(table), "policy")
    if "epoch" in table:
        policy = dataclasses.replace(policy, epoch_from="the spec's policy.epoch")
    return policy


# ----------------------------------------------------------------------------- CLI over spec


def merge_options(
    base: BuildOptions | None,
    *,
    sources: Sequence[SourceSpec] | None = None,
    output: str | None = None,
    format: str | None = None,
    jobs: int | None = None,
    manifest: str | None = None,
    **values: Any,
) -> BuildOptions:
    """`base` (from a spec, or None) with every given (non-None) CLI value applied.

    Scalars replace the spec's value.  Lists add to it: `sources` are applied after
    the spec's (so they overlay them), `exclude` and list-valued format options
    (ext4 `features`) are appended, and uid_map/gid_map entries override the spec's
    entry for the same id.  `values` are options by name: the policy's (options.py
    Policy: `owner`, `epoch`, `exclude`…) and the chosen format's (pyimg/formats/:
    `compression`, `label`…); one that the chosen format does not have is refused,
    naming it.  Raw CLI
    strings are validated with the same parsers as the spec.  Refuses a result
    without output or sources.
    """
    if base is None:
        base = BuildOptions(sources=(), output="")
    policy = base.policy
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
    policy_keys = {name for name, _ in settings.settings_of(Policy)}
    given = {key: value for key, value in values.items() if value is not None}
    policy = settings.apply(policy, {k: v for k, v in given.items() if k in policy_keys}, "")
    if "epoch" in given:
        policy = dataclasses.replace(policy, epoch_from="--epoch")
    cache_keys = {name for name, _ in settings.settings_of(CacheOptions)}
    cache = settings.apply(base.cache, {k: v for k, v in given.items() if k in cache_keys}, "")
    if cache != base.cache:
        top["cache"] = cache
    format_values = {k: v for k, v in given.items() if k not in policy_keys and k not in cache_keys}
    chosen = top.get("format", base.format)
    top["format_options"] = _format_options(base.format_options, chosen, format_values)
    result = dataclasses.replace(base, policy=policy, **top)
    if not result.output:
        raise SpecError("no output image given (spec key 'output' or the CLI's output option)")
    if not result.sources:
        raise SpecError("no source given (spec [[source]] tables or the CLI's source arguments)")
    return result


def _format_options(configured: Mapping[str, Any], chosen: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's format tables, with the given values applied to the chosen format's.

    A spec may hold tables for several formats (one spec, built as either); a value
    given on the CLI or to the API is for the format being built, and one that format
    does not have is refused, naming the formats it belongs to."""
    values = {key: value for key, value in given.items() if value is not None}
    spec = format_spec(chosen)
    own = {name for name, _ in settings.settings_of(spec.options)}
    offered = all_settings()
    for key in values:
        if key in own:
            continue
        if key in offered:
            owners = ", ".join(fmt for fmt, _ in offered[key])
            raise SpecError(f"{key}: does nothing for format {chosen} (it is an option of {owners})")
        raise SpecError(f"unknown option {key!r}")
    result = dict(configured)
    if values:
        result[chosen] = settings.apply(configured.get(chosen, spec.options()), values, "")
    return result


# ----------------------------------------------------------------------------- small checks


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


def _format(value: object, key: str) -> str:
    if not isinstance(value, str) or value not in FORMATS:
        raise SpecError(f"{key}: expected one of {', '.join(FORMATS)}, got {value!r}")
    return value


def _jobs(value: object, key: str) -> int:
    jobs = _typed(value, int, key)
    if jobs < 1:
        raise SpecError(f"{key}: must be at least 1, got {jobs}")
    return jobs


def _optional_id(value: object, key: str) -> int | None:
    return None if value is None else parse_id(_typed(value, int, key), key)
