"""Settings: an option is declared once, as a field of its options dataclass.

    @dataclass(frozen=True, slots=True)
    class Ext4Options:
        label: str = setting("", "Volume label.", parse=parse_label)

That one declaration drives everything the option needs elsewhere (mkosi's single
settings table is the model): the TOML spec key (`[ext4] label = …`), the CLI flag
(`--label`), the keyword of `pyimg.build(…)`, the validation and its message
(`ext4.label: …` from a spec, `label: …` from the CLI), and the manifest record
(the dataclass's fields, as they are).  A format's options dataclass is registered
with the format (pyimg/formats/__init__.py); adding an option is adding a field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import SpecError

Parse = Callable[[Any, str], Any]
"""(value from TOML, the CLI or the API, key for messages) -> the field's value; raises SpecError."""


Combine = Callable[[Any, Any], Any]
"""(the value so far, a later value) -> the value: how a CLI value adds to the spec's."""


@dataclass(frozen=True, slots=True)
class Setting:
    help: str
    parse: Parse
    flag: bool = False  # a boolean: the CLI has --name/--no-name
    combine: Combine | None = None  # a later value adds to the earlier one (None: replaces it)
    metavar: str | None = None
    optional_value: str | None = None  # the CLI flag alone means this value (`--journal`)
    key: str | None = None  # the spec key / CLI name, when it is not the field's name
    cli: bool = True  # offered on the command line (False: spec and API only)
    repeat: bool = False  # the CLI flag may be given several times (a list)


def setting(
    default: Any,
    help: str,
    parse: Parse | None = None,
    *,
    flag: bool = False,
    append: bool = False,
    combine: Combine | None = None,
    metavar: str | None = None,
    optional_value: str | None = None,
    key: str | None = None,
    cli: bool = True,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also an option (see the module docstring).  A flag
    without `parse` takes booleans only; `append` (for tuples) means a later value
    is added after the earlier one."""
    if append:
        combine = _concatenate
    meta = Setting(help, parse or _boolean, flag, combine, metavar, optional_value, key, cli, repeat)
    return dataclasses.field(default=default, metadata={"setting": meta})


def settings_of(options_type: type) -> Iterator[tuple[str, Setting]]:
    """(option name, Setting) of every option field of an options dataclass; the
    name is the spec key and the CLI's (the field's name unless the Setting says)."""
    for f in dataclasses.fields(options_type):
        meta = f.metadata.get("setting")
        if isinstance(meta, Setting):
            yield meta.key or f.name, meta


def _field_names(options_type: type) -> dict[str, str]:
    """option name -> field name."""
    out = {}
    for f in dataclasses.fields(options_type):
        meta = f.metadata.get("setting")
        if isinstance(meta, Setting):
            out[meta.key or f.name] = f.name
    return out


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply(options: Any, values: dict[str, Any], where: str) -> Any:
    """`options` (a dataclass instance) with each given value parsed and set.

    `where` prefixes the key in messages: "ext4" gives "ext4.label: …"; "" gives
    "label: …" (the CLI's and the API's names).  Unknown keys are refused, naming
    the known ones.  An `append` setting adds to the list already there.
    """
    known = dict(settings_of(type(options)))
    fields = _field_names(type(options))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        meta = known.get(key)
        label = f"{where}.{key}" if where else key
        if meta is None:
            raise SpecError(f"unknown key {label!r} (known: {', '.join(sorted(known))})")
        parsed = meta.parse(value, label)
        name = fields[key]
        changes[name] = meta.combine(getattr(options, name), parsed) if meta.combine else parsed
    return dataclasses.replace(options, **changes) if changes else options


def record(options: Any) -> dict[str, Any]:
    """The options as the manifest records them: every option, by its name, JSON-able."""
    return {key: jsonable(getattr(options, name)) for key, name in _field_names(type(options)).items()}


def _concatenate(old: tuple[Any, ...], new: tuple[Any, ...]) -> tuple[Any, ...]:
    return old + new


def jsonable(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, recursively: what json.dumps takes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise SpecError(f"{key}: expected a boolean, got {type(value).__name__}")
