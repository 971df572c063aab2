"""The format contract: one declaration per option drives spec, CLI, API and manifest;
writers write into regions; a build returns a typed artifact."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyimg
from pyimg import formats
from pyimg.errors import OutputError, SpecError
from pyimg.formats import FORMATS, FormatSpec, all_settings, register
from pyimg.formats.ext4 import Ext4Facts
from pyimg.formats.squashfs import SquashfsFacts
from pyimg.options import SourceSpec
from pyimg.region import Region
from pyimg.settings import record, setting
from pyimg.spec import merge_options, options_from_spec
from tests.oracles import run_cli


@dataclasses.dataclass(frozen=True, slots=True)
class ToyOptions:
    width: int = setting(8, "Toy width.", lambda v, k: int(v))
    shiny: bool = setting(False, "Toy shine.", flag=True)


@pytest.fixture
def toy_format() -> Iterator[None]:
    register(FormatSpec("toy", "archive", "a test format", ToyOptions, "nowhere:Toy", "application/x-toy"))
    try:
        yield
    finally:
        del FORMATS["toy"]


def test_one_declaration_drives_spec_merge_and_record(toy_format: None) -> None:
    base = options_from_spec({"format": "toy", "source": [{"path": "r"}], "toy": {"width": 3}}, "/b")
    assert base.settings(ToyOptions).width == 3
    merged = merge_options(base, output="/o", shiny=True)
    assert merged.settings(ToyOptions) == ToyOptions(3, True)
    assert record(merged.settings(ToyOptions)) == {"width": 3, "shiny": True}
    assert [fmt for fmt, _ in all_settings()["width"]] == ["toy"]
    with pytest.raises(SpecError, match=r"unknown key 'toy\.depth'"):
        options_from_spec({"source": [{"path": "r"}], "toy": {"depth": 1}}, "/b")
    with pytest.raises(SpecError, match="width: does nothing for format squashfs"):
        merge_options(None, sources=[SourceSpec("/r")], output="/o", width=2)


def test_a_shared_flag_must_have_one_shape() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Clash:
        dedup: str = setting("x", "not a flag", lambda v, k: v)

    with pytest.raises(ValueError, match="share a flag"):
        register(FormatSpec("clash", "archive", "", Clash, "nowhere:X", "application/x"))
    assert "clash" not in FORMATS


def test_every_registered_format_has_its_writer() -> None:
    for spec in formats.FORMATS.values():
        writer = spec.load_writer()
        assert writer.name == spec.name


def test_region_refuses_writes_past_its_limit(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"A" * 32)
        region = Region(fd, 8, 16)
        region.pwrite(b"xy", 0)
        region.sub(10, 6).pwrite(b"zz", 4)
        with pytest.raises(OutputError, match="more than its region holds"):
            region.pwrite(b"0123456789", 10)
        with pytest.raises(OutputError):
            region.sub(12, 8)
        with pytest.raises(OutputError, match="outside its region"):
            region.pwrite(b"XXXX", -4)  # would land before the region's start
        with pytest.raises(OutputError, match="starts before"):
            region.sub(-8)
        assert os.pread(fd, 32, 0) == b"A" * 8 + b"xy" + b"A" * 12 + b"zz" + b"A" * 8
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_build_returns_a_typed_artifact(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"hello")
    out = tmp_path / f"img.{fmt}"
    result = pyimg.build([str(tmp_path / "src")], str(out), format=fmt, epoch=0, jobs=1)
    artifact = result.artifact
    assert (artifact.format, artifact.path, artifact.offset) == (fmt, str(out), 0)
    assert artifact.size == out.stat().st_size == result.image_size
    assert artifact.blake3 == pyimg.digest(str(out)).blake3
    assert artifact.media_type == FORMATS[fmt].media_type
    assert isinstance(artifact.facts, SquashfsFacts if fmt == "squashfs" else Ext4Facts)
    if fmt == "ext4":
        assert artifact.facts.uuid == result.manifest["format_details"]["uuid"]


def test_cli_json_carries_the_artifact_and_refuses_foreign_options(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    out = tmp_path / "img.ext4"
    proc = run_cli(
        "build", str(tmp_path / "src"), "-o", str(out), "--format", "ext4", "--json", "--epoch", "0"
    )
    assert proc.returncode == 0, proc.stderr
    artifact = json.loads(proc.stdout)["artifact"]
    assert artifact["format"] == "ext4" and artifact["sha256"] and artifact["facts"]["uuid"]
    bad = run_cli(
        "build", str(tmp_path / "src"), "-o", str(out) + "2", "--format", "ext4", "--compression", "xz"
    )
    assert bad.returncode == 2 and "compression: does nothing for format ext4" in bad.stderr
    assert not os.path.exists(str(out) + "2")
