"""ext4 images built from real directories through the public API and CLI, checked
by e2fsprogs: `e2fsck -fn` passes and debugfs shows exactly the source tree."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sysconfig
from pathlib import Path

import blake3
import pytest

import pyimg

from ..ext4_oracle import e2fsck_clean, snapshot_image
from ..oracles import assert_same_snapshot, fix_mtimes, make_varied_tree, run_cli, snapshot


def build(
    tmp_path: Path, source: Path, name: str = "img.ext4", **options: object
) -> tuple[Path, pyimg.BuildResult]:
    out = tmp_path / name
    options.setdefault("owner", "preserve")
    result = pyimg.build([str(source)], str(out), format="ext4", **options)  # type: ignore[arg-type]
    return out, result


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_varied_tree(tmp_path_factory.mktemp("varied") / "root")


def assert_image_is(source: Path, image: Path, workdir: Path, skip_parts: set[str] = frozenset()) -> None:
    want = snapshot(source, skip_parts=skip_parts)
    got = snapshot_image(image, workdir)
    assert sorted(want) == sorted(got), (sorted(set(want) ^ set(got)))[:10]
    bad = [p for p in want if want[p] != got[p]]
    assert not bad, f"{len(bad)} differ, e.g. {bad[0]}: {str(want[bad[0]])[:200]} != {str(got[bad[0]])[:200]}"


@pytest.mark.parametrize(
    "options",
    [{}, {"features": ["-metadata_csum", "-64bit"]}, {"journal": True}, {"dedup": False}],
    ids=["default", "old-bootloader-features", "journal", "no-dedup"],
)
def test_round_trip_varied_tree(tmp_path: Path, varied: Path, options: dict[str, object]) -> None:
    image, result = build(tmp_path, varied, **options)
    assert_image_is(varied, image, tmp_path)
    if options.get("dedup", True) and "journal" not in options:
        assert result.dedup_saved >= 300_000  # srv/dup.dat shares srv/a.dat's blocks


def test_real_tree_round_trip(tmp_path: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    image, result = build(tmp_path, stdlib, exclude=["site-packages", "__pycache__"])
    assert result.entries > 1000
    assert_image_is(stdlib, image, tmp_path, skip_parts={"site-packages", "__pycache__"})


def test_oracle_reads_awkward_names_and_acls(tmp_path: Path) -> None:
    """The debugfs oracle itself: names with a backslash (systemd's "\\x2d" unit
    names) and a double quote reach debugfs as they are (libss quoting), and an ACL
    too long for `stat` to print is read raw (`ea_get -r`) and decoded from ext4's
    form like a short one."""
    src = tmp_path / "src"
    (src / 'dir "quoted"').mkdir(parents=True)
    (src / "system-systemd\\x2dcryptsetup.slice").write_bytes(b"[Unit]\n")
    (src / 'dir "quoted"/back\\slash').write_bytes(b"x")
    named = [(0x02, 4, uid) for uid in (1000, 1001, 1002)]  # 44 bytes in ext4's form
    none = 0xFFFFFFFF
    entries = [(0x01, 6, none), *named, (0x04, 4, none), (0x10, 4, none), (0x20, 4, none)]
    long_acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(src / 'dir "quoted"/back\\slash', "system.posix_acl_access", long_acl)
    os.setxattr(src / 'dir "quoted"', "user.quoted", b'say "hi"')
    fix_mtimes(src)
    image, _ = build(tmp_path, src)
    want = snapshot(src, acls=True)
    assert want['dir "quoted"/back\\slash'][-1] == {"system.posix_acl_access": ("acl", tuple(entries))}
    (tmp_path / "debugfs").mkdir()
    assert_same_snapshot(want, snapshot_image(image, tmp_path / "debugfs", acls=True))


@pytest.mark.slow
def test_100k_small_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for d in range(100):
        sub = src / f"d{d:03d}"
        sub.mkdir()
        for f in range(1000):
            (sub / f"f{f:04d}").write_bytes(b"%d/%d\n" % (d, f) * (1 + f % 50))
    image, result = build(tmp_path, src, owner="root")
    assert result.entries == 100_101
    e2fsck_clean(image)
    dump = tmp_path / "dump"
    proc = subprocess.run(["debugfs", "-R", f"rdump /d042 {dump.parent}", str(image)], capture_output=True)
    assert proc.returncode == 0
    assert sorted(os.listdir(tmp_path / "d042")) == sorted(os.listdir(src / "d042"))
    assert (tmp_path / "d042/f0999").read_bytes() == (src / "d042/f0999").read_bytes()


def test_same_bytes_across_runs_jobs_order_and_umask(tmp_path: Path) -> None:
    def create(root: Path, order: list[int]) -> None:
        root.mkdir()
        for i in order:
            d = root / f"d{i % 7}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_bytes(b"x%d\n" % i * (i * 37 % 3000))
            os.chmod(d / f"f{i}", 0o644)
            os.chmod(d, 0o755)
        os.chmod(root, 0o755)
        fix_mtimes(root)

    order = list(range(400))
    create(tmp_path / "a", order)
    random.Random(3).shuffle(order)
    create(tmp_path / "b", order)
    digests = {build(tmp_path, tmp_path / "a", name=f"a{j}.ext4", jobs=j)[1].digest for j in (1, 4)}
    digests.add(build(tmp_path, tmp_path / "b", name="b.ext4")[1].digest)
    old = os.umask(0o077)
    try:
        digests.add(build(tmp_path, tmp_path / "a", name="u.ext4")[1].digest)
    finally:
        os.umask(old)
    assert len(digests) == 1


def test_source_date_epoch(tmp_path: Path, varied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1500000000")
    image, result = build(tmp_path, varied)
    assert build(tmp_path, varied, name="again.ext4")[1].digest == result.digest
    got = snapshot_image(image, tmp_path)
    assert max(int(item[2]) for item in got.values()) <= 1500000000  # type: ignore[call-overload]


GOLDEN = Path(__file__).parent.parent / "golden" / "ext4_trees.txt"


def test_golden_digests(tmp_path: Path) -> None:
    from .test_squashfs import _golden_trees

    expected = dict(line.split() for line in GOLDEN.read_text().splitlines() if line.strip())
    got = {}
    for name, tree in _golden_trees(tmp_path / "trees").items():
        image = tmp_path / f"{name}.ext4"
        pyimg.build([str(tree)], str(image), format="ext4", owner="root", epoch=1700000000)
        got[name] = blake3.blake3(image.read_bytes()).hexdigest()  # the bytes, not the image digest
    assert got == expected, (
        "golden digests changed: the on-disk output changed (update tests/golden only on purpose)"
    )


def test_cli_summary_reports_dedup(tmp_path: Path, varied: Path) -> None:
    out = tmp_path / "cli.ext4"
    build = ("build", str(varied), "-o", str(out), "--format", "ext4")
    proc = run_cli(*build, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "ext4" and summary["dedup_saved"] >= 300_000
    e2fsck_clean(out)
    human = run_cli(*build, "--journal")
    # With a journal the image is for read-write use: no dedup, no saving reported.
    assert human.returncode == 0 and "dedup saved" not in human.stdout


def test_size_too_small_is_refused(tmp_path: Path, varied: Path) -> None:
    out = tmp_path / "small.ext4"
    with pytest.raises(pyimg.LimitError) as err:
        pyimg.build([str(varied)], str(out), format="ext4", size="1M")
    assert "1M" in str(err.value) or "1048576" in str(err.value)
    assert not out.exists()
