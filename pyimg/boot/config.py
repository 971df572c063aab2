"""Config at boot, outside the image: KEY=VALUE pairs that reach the guest without
touching the image's bytes.

They travel as an extra initrd: a small uncompressed newc archive holding
`/pyimg/config/KEY` (the value's bytes, exactly), concatenated after the boot
initramfs (the kernel unpacks every archive of the initrd into the same rootfs,
docs/boot.md).  The initramfs's init finds them there, mounts a tmpfs on the new
root's /run, copies them to /run/pyimg/config/KEY (mode 0600, directory 0700) and
exports each as an environment variable of the init it switches to.

A key is a shell/environment name ([A-Za-z_][A-Za-z0-9_]*, at most 128 bytes),
except the few names the init's own shell depends on (PATH, IFS...) and names
starting with `_pyimg` (the init's own variables).  Values are text without NUL,
at most 64 KiB each and 1 MiB in all (the kernel's limits on an exec's
environment are 128 KiB a string and ~2 MiB in all).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import BootError
from ..output import AtomicOutput
from .archive import ArchiveBuilder

CONFIG_DIR = "pyimg/config"  # where the extra initrd puts the files, in the initramfs
MAX_KEY = 128
MAX_VALUE = 64 << 10
MAX_TOTAL = 1 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Names the init's shell itself uses: exporting them would change how it runs.
RESERVED = frozenset(
    {"PATH", "IFS", "PWD", "OLDPWD", "ENV", "PS1", "PS2", "PS4", "OPTIND", "OPTARG", "PPID", "LINENO"}
)


def check_key(key: str, where: str | None = None) -> str:
    """`key` if it is a valid config key; BootError saying why not otherwise."""
    why = None
    if not key:
        why = "an empty key"
    elif len(key.encode()) > MAX_KEY:
        why = f"config key {key[:40]!r}...: longer than {MAX_KEY} bytes"
    elif not _NAME.match(key):
        why = f"config key {key!r} is not a valid name (letters, digits and _, not starting with a digit)"
    elif key in RESERVED:
        why = f"config key {key!r} is reserved (the initramfs's shell uses it)"
    elif key.lower().startswith("_pyimg"):
        why = f"config key {key!r}: names starting with _pyimg are the initramfs's own"
    if why is not None:
        raise BootError(why, where)
    return key


def check_value(key: str, value: str, where: str | None = None) -> str:
    if "\0" in value:
        raise BootError(f"config value of {key!r} holds a NUL byte", where)
    if len(value.encode()) > MAX_VALUE:
        raise BootError(f"config value of {key!r} is longer than {MAX_VALUE} bytes", where)
    return value


def parse_pair(text: str, where: str | None = None) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE); the value is everything after the first '='."""
    key, sep, value = text.partition("=")
    if not sep:
        raise BootError(f"config {text[:60]!r}: expected KEY=VALUE", where)
    key = check_key(key.strip(), where)
    return key, check_value(key, value, where)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """A config file: TOML when its name ends in .toml (a table of scalars: strings
    as they are, integers and floats as TOML writes them, booleans as true/false),
    else KEY=VALUE lines (blank lines and lines starting with # skipped, the key's
    surrounding blanks stripped, the value taken verbatim up to the line's end)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BootError("no such config file", file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BootError(f"cannot read the config file: {exc}", file) from exc
    if file.suffix == ".toml":
        return _from_toml(text, str(file))
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, value = parse_pair(line, f"{file}:{number}")
        out[key] = value
    return out


def _from_toml(text: str, where: str) -> dict[str, str]:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BootError(f"invalid TOML: {exc}", where) from None
    out: dict[str, str] = {}
    for key, value in table.items():
        check_key(key, where)
        if isinstance(value, bool):
            text_value = "true" if value else "false"
        elif isinstance(value, str):
            text_value = value
        elif isinstance(value, int | float):
            text_value = repr(value)
        else:
            raise BootError(f"config key {key!r}: a {type(value).__name__} is not a scalar value", where)
        out[key] = check_value(key, text_value, where)
    return out


def load_config(pairs: Iterable[str] = (), files: Iterable[str | os.PathLike[str]] = ()) -> dict[str, str]:
    """The config from `--config-file`s (in order) then `--config KEY=VALUE`s (in
    order); a later value of a key replaces an earlier one.  Validated."""
    config: dict[str, str] = {}
    for file in files:
        config.update(load_config_file(file))
    for pair in pairs:
        key, value = parse_pair(pair)
        config[key] = value
    return checked(config)


def checked(config: Mapping[str, str]) -> dict[str, str]:
    """A validated copy of a config mapping (keys, values, total size)."""
    out = {check_key(key): check_value(key, value) for key, value in config.items()}
    total = sum(len(key) + len(value.encode()) + 2 for key, value in out.items())
    if total > MAX_TOTAL:
        raise BootError(
            f"the config is {total} bytes, more than the {MAX_TOTAL} an init's environment can take"
        )
    return out


def _builder(config: Mapping[str, str], epoch: int) -> ArchiveBuilder:
    builder = ArchiveBuilder(epoch)
    builder.directory("pyimg", 0o755)
    builder.directory(CONFIG_DIR, 0o700)
    for key in sorted(config):
        builder.data(f"{CONFIG_DIR}/{key}", config[key].encode(), 0o600)
    return builder


def config_initrd(config: Mapping[str, str], *, epoch: int = 0) -> bytes:
    """The extra initrd (an uncompressed newc archive, a multiple of 4 bytes) that
    carries `config`: append it to a boot initramfs (see append_initrds)."""
    with _builder(checked(config), epoch) as builder:
        return builder.to_bytes()


def write_config_initrd(output: str | os.PathLike[str], config: Mapping[str, str], *, epoch: int = 0) -> None:
    """config_initrd, written atomically to `output`."""
    with _builder(checked(config), epoch) as builder:
        builder.write(output)


def append_initrds(output: str | os.PathLike[str], parts: Iterable[str | os.PathLike[str] | bytes]) -> int:
    """One initrd file from several (paths, or bytes such as config_initrd's): each
    padded with zeros to a multiple of 4 bytes, where the kernel looks for the next
    archive (a compressed archive's length is arbitrary; zeros between archives are
    skipped).  QEMU's -initrd takes one file: this is the file.  Written
    atomically; returns its size."""
    size = 0
    with AtomicOutput(os.fspath(output)) as out:
        for part in parts:
            data = part if isinstance(part, bytes) else _read(part)
            data += bytes(-len(data) % 4)
            out.region().pwrite(data, size)
            size += len(data)
        out.size_to(size)
        out.commit()
    return size


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BootError(f"cannot read the initrd: {exc.strerror}", os.fspath(path)) from exc
