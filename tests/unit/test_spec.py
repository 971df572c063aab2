"""The TOML spec, the option parsers, and CLI values merged over a spec."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from pyimg.errors import SpecError
from pyimg.formats.ext4_options import Ext4Options
from pyimg.formats.squashfs_options import Compression, SquashfsOptions
from pyimg.options import BuildOptions, SourceSpec
from pyimg.spec import (
    load_options,
    load_spec,
    merge_options,
    options_from_spec,
    parse_block_size,
    parse_compression,
    parse_ext4_size,
    parse_journal,
    parse_owner,
    parse_size,
)

FULL_SPEC = """
output = "image.sqfs"
format = "squashfs"
jobs = 4
manifest = "image.manifest.json"

[[source]]
path = "rootfs"
dest = "/"

[[source]]
path = "extra/motd"
kind = "file"
dest = "/etc/motd"
mode = 0o644
uid = 0
gid = 0

[[source]]
path = "/abs/layer.tar.zst"
kind = "tar"
dest = "/opt"

[policy]
owner = "root"
uid_map = { 1000 = 0 }
gid_map = { "1000" = 100 }
epoch = 1700000000
exclude = ["*.pyc", "/var/cache/*"]

[squashfs]
compression = "zstd:15"
block_size = "128K"
fragments = true
dedup = false

[ext4]
size = "2G"
headroom = 10
journal = "64M"
features = ["-metadata_csum", "+huge_file", "dir_index"]
uuid = "12345678-1234-5678-1234-567812345678"
dedup = true
label = "root"
"""


def write(fs: FakeFilesystem, text: str, path: str = "/work/spec/image.toml") -> str:
    fs.create_file(path, contents=text)
    return path


def test_full_spec(fs: FakeFilesystem) -> None:
    options = load_options(write(fs, FULL_SPEC))
    assert options.output == "/work/spec/image.sqfs"  # relative to the spec's directory
    assert options.manifest == "/work/spec/image.manifest.json"
    assert (options.format, options.jobs) == ("squashfs", 4)
    rootfs, motd, layer = options.sources
    assert rootfs == SourceSpec("/work/spec/rootfs", "auto", b"")
    assert motd == SourceSpec("/work/spec/extra/motd", "file", b"etc/motd", 0o644, 0, 0)
    assert (layer.path, layer.kind, layer.dest) == ("/abs/layer.tar.zst", "tar", b"opt")
    policy = options.policy
    assert policy.owner == "root"
    assert policy.uid_map == ((1000, 0),) and policy.gid_map == ((1000, 100),)
    assert policy.epoch == 1_700_000_000
    assert policy.excludes == ("*.pyc", "/var/cache/*")
    sq = options.settings(SquashfsOptions)
    assert (sq.compression.name, sq.compression.level, sq.block_size, sq.fragments, sq.dedup) == (
        "zstd",
        15,
        131072,
        True,
        False,
    )
    e = options.settings(Ext4Options)
    assert (e.size, e.headroom, e.journal) == (2 << 30, 10, 64 << 20)
    assert e.features == ("-metadata_csum", "+huge_file", "+dir_index")
    assert (e.uuid, e.dedup, e.label) == ("12345678-1234-5678-1234-567812345678", True, "root")


def test_minimal_spec_defaults() -> None:
    options = options_from_spec({"source": [{"path": "r"}]}, "/base")
    assert options.output == ""  # the CLI must give it
    assert options.sources == (SourceSpec("/base/r"),)
    assert options.policy.owner == "auto" and options.policy.epoch is None
    assert options.settings(SquashfsOptions).compression.level is None
    assert options.settings(Ext4Options).size is None
    assert options.jobs >= 1


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"outptu": "x"}, "'outptu'"),
        ({"source": [{"path": "r", "dst": "/"}]}, "'source[0].dst'"),
        ({"policy": {"owners": "root"}}, "'policy.owners'"),
        ({"squashfs": {"compresion": "gzip"}}, "'squashfs.compresion'"),
        ({"ext4": {"journal_size": "1M"}}, "'ext4.journal_size'"),
    ],
)
def test_unknown_keys(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(SpecError) as info:
        options_from_spec(spec, "/b")
    assert f"unknown key {key}" in info.value.reason


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"jobs": "4"}, ["jobs", "expected an integer", "a string"]),
        ({"jobs": 0}, ["jobs", "at least 1"]),
        ({"jobs": True}, ["jobs", "a boolean"]),
        ({"format": "btrfs"}, ["format", "btrfs"]),
        ({"output": 5}, ["output", "expected a string"]),
        ({"source": {"path": "x"}}, ["source", "expected a list"]),
        ({"source": [{"dest": "/"}]}, ["source[0]", "path"]),
        ({"source": [{"path": "x", "kind": "zip"}]}, ["source[0].kind", "zip"]),
        ({"source": [{"path": "x", "mode": "0644"}]}, ["source[0].mode", "expected an integer"]),
        ({"source": [{"path": "x", "mode": 0o17777}]}, ["source[0].mode", "permission"]),
        ({"source": [{"path": "x", "kind": "dir", "mode": 0o644}]}, ["single-file"]),
        ({"source": [{"path": "x", "uid": -1}]}, ["source[0].uid", "out of range"]),
        ({"source": [{"path": "x", "dest": "/a/../../b"}]}, ["source[0].dest", "escapes"]),
        ({"policy": {"owner": "nobody"}}, ["policy.owner", "nobody"]),
        ({"policy": {"uid_map": {"root": 0}}}, ["policy.uid_map", "root"]),
        ({"policy": {"uid_map": {"1000": "0"}}}, ["policy.uid_map.1000", "expected an integer"]),
        ({"policy": {"uid_map": [1, 2]}}, ["policy.uid_map", "expected a table"]),
        ({"policy": {"epoch": -1}}, ["policy.epoch", "negative"]),
        ({"policy": {"epoch": 1.5}}, ["policy.epoch", "expected an integer"]),
        ({"policy": {"exclude": "*.pyc"}}, ["policy.exclude", "list"]),
        ({"policy": {"exclude": [""]}}, ["policy.exclude[0]", "empty"]),
        ({"squashfs": {"compression": "lz4"}}, ["squashfs.compression", "lz4"]),
        ({"squashfs": {"compression": "gzip:10"}}, ["squashfs.compression", "out of range"]),
        ({"squashfs": {"block_size": "100K"}}, ["squashfs.block_size", "power of two"]),
        ({"squashfs": {"block_size": "2M"}}, ["squashfs.block_size", "4K to 1M"]),
        ({"squashfs": {"fragments": "yes"}}, ["squashfs.fragments", "expected a boolean"]),
        ({"ext4": {"size": "big"}}, ["ext4.size", "big"]),
        ({"ext4": {"headroom": -5}}, ["ext4.headroom"]),
        ({"ext4": {"features": ["metadata csum"]}}, ["ext4.features[0]"]),
        ({"ext4": {"uuid": "not-a-uuid"}}, ["ext4.uuid"]),
        ({"ext4": {"label": "x" * 17}}, ["ext4.label", "16 bytes"]),
        ({"ext4": {"journal": "0"}}, ["ext4.journal", "positive"]),
        ({"ext4": []}, ["ext4", "expected a table"]),
    ],
)
def test_invalid_values(spec: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        options_from_spec(spec, "/b", origin="/b/spec.toml")
    for word in words:
        assert word in info.value.reason, info.value.reason
    assert info.value.path == "/b/spec.toml"


def test_load_spec_errors(fs: FakeFilesystem) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("/missing.toml")
    assert info.value.path == "/missing.toml" and "no such" in info.value.reason
    path = write(fs, 'output = "x"\n[policy\n', "/bad.toml")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.path == "/bad.toml" and "invalid TOML" in info.value.reason
    path = write(fs, "outptu = 1\n", "/unknown.toml")
    with pytest.raises(SpecError) as info:
        load_options(path)
    assert info.value.path == "/unknown.toml" and "'outptu'" in info.value.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        (4096, 4096),
        ("128K", 128 << 10),
        ("128k", 128 << 10),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("1MB", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("512B", 512),
        (" 64 M ", 64 << 20),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1", "12Q", "1 M B", "0x10", True, -3, 2.0])
def test_parse_size_invalid(text: Any) -> None:
    with pytest.raises(SpecError, match="size"):
        parse_size(text)


def test_parse_block_size() -> None:
    assert parse_block_size("4K") == 4096 and parse_block_size("1M") == 1 << 20
    for bad in ("2K", "3K", "2M", 0, 65537):
        with pytest.raises(SpecError, match="power of two"):
            parse_block_size(bad)


def test_parse_compression() -> None:
    assert parse_compression("zstd:19") == Compression("zstd", 19)
    assert parse_compression("gzip") == Compression("gzip", None)
    assert parse_compression("gzip:9") == Compression("gzip", 9)
    assert parse_compression("xz") == Compression("xz", None)
    assert str(parse_compression("xz:0")) == "xz:0"
    for bad, word in [
        ("zstd:23", "out of range"),
        ("zstd:x", "invalid zstd level"),
        ("lzo", "unknown"),
        ("", "unknown"),
    ]:
        with pytest.raises(SpecError, match=word):
            parse_compression(bad)


def test_parse_owner() -> None:
    assert [parse_owner(v) for v in ("auto", "preserve", "root", "1000:100", " 0:0 ")] == [
        "auto",
        "preserve",
        "root",
        "1000:100",
        "0:0",
    ]
    for bad in ("user", "1000", "1000:", ":5", "-1:0", "1:2:3", "4294967296:0"):
        with pytest.raises(SpecError):
            parse_owner(bad)


def test_journal_and_ext4_size() -> None:
    assert parse_journal(False) is None and parse_journal(True) == 0 and parse_journal("64M") == 64 << 20
    assert parse_ext4_size("auto") is None and parse_ext4_size("1G") == 1 << 30
    with pytest.raises(SpecError):
        parse_ext4_size("0")


# ----------------------------------------------------------------------------- merge


def test_merge_cli_over_spec() -> None:
    base = options_from_spec(
        {
            "output": "spec.img",
            "source": [{"path": "rootfs"}],
            "policy": {"uid_map": {"1000": 0, "7": 7}, "exclude": ["*.pyc"]},
            "squashfs": {"compression": "zstd:15", "block_size": "64K"},
            "ext4": {"features": ["-metadata_csum"]},
        },
        "/b",
    )
    merged = merge_options(
        base,
        output="cli.img",
        sources=[SourceSpec("/cli/extra")],
        uid_map={"1000": 5},
        exclude=["/tmp/*"],
        epoch=42,
        owner="1:2",
        dedup=False,
        journal="yes",
        features=["+huge_file"],
        jobs=1,
        format="ext4",
        size="auto",
    )
    assert merged.output == "cli.img"
    assert [s.path for s in merged.sources] == ["/b/rootfs", "/cli/extra"]  # CLI sources overlay
    sq = merged.settings(SquashfsOptions)  # the spec's table stays; the CLI's values are for ext4
    assert (str(sq.compression), sq.block_size) == ("zstd:15", 64 << 10)
    assert merged.policy.uid_map == ((7, 7), (1000, 5))
    assert merged.policy.excludes == ("*.pyc", "/tmp/*")
    assert (merged.policy.epoch, merged.policy.owner) == (42, "1:2")
    e = merged.settings(Ext4Options)
    assert e.dedup is False and sq.dedup is True
    assert e.journal == 0 and e.features == ("-metadata_csum", "+huge_file")
    assert (merged.jobs, merged.format, e.size) == (1, "ext4", None)


def test_merge_refuses_an_option_of_another_format() -> None:
    with pytest.raises(SpecError, match="compression: does nothing for format ext4"):
        merge_options(None, sources=[SourceSpec("/r")], output="/o", format="ext4", compression="gzip")
    with pytest.raises(SpecError, match="journal: does nothing for format squashfs"):
        merge_options(None, sources=[SourceSpec("/r")], output="/o", journal="yes")
    with pytest.raises(SpecError, match="unknown option 'compresion'"):
        merge_options(None, sources=[SourceSpec("/r")], output="/o", compresion="gzip")
    gz = merge_options(None, sources=[SourceSpec("/r")], output="/o", compression="gzip")
    assert gz.settings(SquashfsOptions).compression == Compression("gzip", None)


def test_merge_without_spec_and_nothing_given() -> None:
    options = merge_options(None, sources=[SourceSpec("/r")], output="/o.img")
    assert options == BuildOptions(sources=(SourceSpec("/r"),), output="/o.img", jobs=options.jobs)
    assert merge_options(options) == options  # None everywhere: unchanged
    with pytest.raises(SpecError, match="no output"):
        merge_options(None, sources=[SourceSpec("/r")])
    with pytest.raises(SpecError, match="no source"):
        merge_options(None, output="/o")


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ({"compression": "zstd:99"}, "compression"),
        ({"block_size": "3K"}, "block_size"),
        ({"owner": "bob"}, "owner"),
        ({"epoch": -1}, "epoch"),
        ({"jobs": 0}, "jobs"),
        ({"format": "fat"}, "format"),
        ({"journal": "maybe"}, "journal"),
        ({"uuid": "xyz"}, "uuid"),
    ],
)
def test_merge_validates_cli_values(override: dict[str, Any], word: str) -> None:
    with pytest.raises(SpecError, match=word):
        merge_options(None, sources=[SourceSpec("/r")], output="/o", **override)


def test_relative_paths_follow_the_spec_not_the_cwd(fs: FakeFilesystem) -> None:
    fs.create_dir("/elsewhere")
    os.chdir("/elsewhere")
    options = load_options(
        write(fs, 'output = "../out/x.img"\n[[source]]\npath = "sub/root"\n', "/a/b/s.toml")
    )
    assert os.path.normpath(options.output) == "/a/out/x.img"
    assert options.sources[0].path == "/a/b/sub/root"
