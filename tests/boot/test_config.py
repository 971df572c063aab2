"""Boot config: key validation, the two file forms, precedence, and the extra
initrd that carries it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pyimg.boot.config import (
    append_initrds,
    check_key,
    config_initrd,
    load_config,
    load_config_file,
    write_config_initrd,
)
from pyimg.errors import BootError

from ..formats.test_cpio import parse_newc


@pytest.mark.parametrize("key", ["A", "_x", "greeting", "HOST_NAME_2", "a" * 128])
def test_valid_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("1ABC", "not a valid name"),
        ("A-B", "not a valid name"),
        ("A.B", "not a valid name"),
        ("A B", "not a valid name"),
        ("../etc", "not a valid name"),
        ("é", "not a valid name"),
        ("PATH", "reserved"),
        ("IFS", "reserved"),
        ("_pyimg_root", "the initramfs's own"),
        ("a" * 129, "longer than 128"),
    ],
)
def test_invalid_keys(key: str, reason: str) -> None:
    with pytest.raises(BootError, match=reason):
        check_key(key)
    with pytest.raises(BootError, match=reason):
        load_config([f"{key}=1"])


def test_pairs_keep_the_value_verbatim() -> None:
    assert load_config(["A=b=c", "B=", "C= spaced ", "D=$HOME \"q\" 'x'"]) == {
        "A": "b=c",
        "B": "",
        "C": " spaced ",
        "D": "$HOME \"q\" 'x'",
    }
    with pytest.raises(BootError, match="expected KEY=VALUE"):
        load_config(["NOVALUE"])
    with pytest.raises(BootError, match="NUL"):
        load_config(["A=x\0y"])
    with pytest.raises(BootError, match="longer than 65536"):
        load_config(["A=" + "x" * 65537])


def test_key_value_file(tmp_path: Path) -> None:
    file = tmp_path / "boot.env"
    file.write_text(
        "# comment\n\nGREETING=hello world\n  PORT = 8080\nURL=http://x/?a=1&b=2\nGREETING=again\n"
    )
    assert load_config_file(file) == {"GREETING": "again", "PORT": " 8080", "URL": "http://x/?a=1&b=2"}
    file.write_text("GOOD=1\nbad-key=2\n")
    with pytest.raises(BootError) as err:
        load_config_file(file)
    assert f"{file}:2" in str(err.value) and "bad-key" in str(err.value)


def test_toml_file(tmp_path: Path) -> None:
    file = tmp_path / "boot.toml"
    file.write_text('name = "web-1"\nport = 8080\nratio = 0.5\ndebug = true\nmulti = """a\nb"""\n')
    assert load_config_file(file) == {
        "name": "web-1",
        "port": "8080",
        "ratio": "0.5",
        "debug": "true",
        "multi": "a\nb",
    }
    file.write_text("[table]\nx = 1\n")
    with pytest.raises(BootError, match="not a scalar"):
        load_config_file(file)
    file.write_text("x = [1, 2]\n")
    with pytest.raises(BootError, match="not a scalar"):
        load_config_file(file)
    file.write_text("x = \n")
    with pytest.raises(BootError, match="invalid TOML"):
        load_config_file(file)
    with pytest.raises(BootError, match="no such config file"):
        load_config_file(tmp_path / "missing.toml")


def test_files_then_pairs_later_wins(tmp_path: Path) -> None:
    one = tmp_path / "one.env"
    one.write_text("A=1\nB=1\n")
    two = tmp_path / "two.toml"
    two.write_text('B = "2"\nC = "2"\n')
    assert load_config(["C=3"], [one, two]) == {"A": "1", "B": "2", "C": "3"}


def test_config_initrd_holds_one_file_per_key(tmp_path: Path) -> None:
    raw = config_initrd({"B": "two\n", "A": "one", "EMPTY": ""}, epoch=1234)
    assert len(raw) % 4 == 0
    entries = {e.name: e for e in parse_newc(raw)}
    assert list(entries) == [
        b".",
        b"pyimg",
        b"pyimg/config",
        b"pyimg/config/A",
        b"pyimg/config/B",
        b"pyimg/config/EMPTY",
    ]
    assert entries[b"pyimg/config"].mode == stat.S_IFDIR | 0o700
    assert entries[b"pyimg/config/A"].mode == stat.S_IFREG | 0o600
    assert entries[b"pyimg/config/B"].data == b"two\n" and entries[b"pyimg/config/EMPTY"].size == 0
    assert {e.mtime for e in entries.values()} == {1234} and {e.uid for e in entries.values()} == {0}
    assert (
        config_initrd({"A": "one", "B": "two\n", "EMPTY": ""}, epoch=1234) == raw
    )  # order-free, reproducible
    write_config_initrd(tmp_path / "config.img", {"B": "two\n", "A": "one", "EMPTY": ""}, epoch=1234)
    assert (tmp_path / "config.img").read_bytes() == raw
    with pytest.raises(BootError, match="not a valid name"):
        config_initrd({"no way": "x"})


def test_append_initrds_pads_each_part(tmp_path: Path) -> None:
    first = tmp_path / "boot.img"
    first.write_bytes(b"\x28\xb5\x2f\xfd" + b"x" * 5)  # 9 bytes, as a compressed archive may be
    size = append_initrds(tmp_path / "all.img", [first, config_initrd({"A": "1"})])
    data = (tmp_path / "all.img").read_bytes()
    assert size == len(data) and data[:12] == first.read_bytes() + bytes(3)
    assert data[12:18] == b"070701"
    with pytest.raises(BootError, match="cannot read the initrd"):
        append_initrds(tmp_path / "x.img", [tmp_path / "missing"])
    assert not (tmp_path / "x.img").exists()
