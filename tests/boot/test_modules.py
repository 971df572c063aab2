"""Module resolution: on the real Debian cloud kernel (no modules.dep in the
package), and on synthetic module trees for the corner cases."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyimg.boot.kernel import KernelFiles
from pyimg.boot.modules import ModuleTree, Resolution, module_from_file, read_modinfo, resolve_modules
from pyimg.errors import BootError

from ..oracles import require_tool
from .fakes import elf_with_section, fake_module, fake_tree

VIRTIO_BLK = [
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "virtio_blk",
]


def assert_loadable(tree: ModuleTree, resolution: Resolution) -> None:
    """Every module after all its depends= (what insmod needs) and its softdep pre:."""
    position = {name: i for i, name in enumerate(resolution.names)}
    assert len(position) == len(resolution.names), "a module twice"
    for module in resolution.modules:
        for dep in module.depends:
            assert dep in position, f"{module.name} needs {dep}, not resolved"
            assert position[dep] < position[module.name], f"{dep} must load before {module.name}"
        for dep in module.softdep_pre:
            names, builtin = tree.lookup(dep)
            assert builtin or all(position[n] < position[module.name] for n in names)


def test_debian_package_has_no_modules_dep(debian_kernel: KernelFiles) -> None:
    assert not (debian_kernel.modules / "modules.dep").exists()
    assert (debian_kernel.modules / "modules.builtin").exists()


def test_virtio_squashfs_network_chain_in_load_order(debian_kernel: KernelFiles) -> None:
    tree = ModuleTree.open(debian_kernel.modules)
    resolution = tree.resolve(["virtio_pci", "virtio-blk", "squashfs", "virtio_net"])
    assert_loadable(tree, resolution)
    assert resolution.names == [*VIRTIO_BLK, "squashfs", "failover", "net_failover", "virtio_net"]
    assert resolution.missing_softdeps == ()


def test_ext4_is_built_in_on_the_cloud_kernel(debian_kernel: KernelFiles) -> None:
    resolution = resolve_modules(debian_kernel.modules, ["ext4", "virtio_blk"])
    assert resolution.builtin == ("ext4",)
    assert resolution.names == ["virtio_ring", "virtio", "virtio_blk"]


def test_aliases_and_builtin_aliases(debian_kernel: KernelFiles) -> None:
    tree = ModuleTree.open(debian_kernel.modules)
    assert tree.lookup("fs-squashfs") == (["squashfs"], False)  # alias= of squashfs.ko
    assert tree.lookup("crc32c") == ([], True)  # crc32c_generic.alias=crc32c, built in
    resolution = tree.resolve(["dm-verity"])  # dm-verity needs dm-bufio and reed_solomon (brief §8)
    assert_loadable(tree, resolution)
    assert {"dm_mod", "dm_bufio", "reed_solomon", "dm_verity"} <= set(resolution.names)


def test_softdeps_on_the_real_kernel(debian_kernel: KernelFiles) -> None:
    tree = ModuleTree.open(debian_kernel.modules)
    resolution = tree.resolve(["xts"])  # softdep=pre: ecb
    assert_loadable(tree, resolution)
    assert resolution.names.index("ecb") < resolution.names.index("xts")


def test_reader_agrees_with_pyelftools_and_modinfo(debian_kernel: KernelFiles) -> None:
    """Our .modinfo reader against two other readers: pyelftools (a sample of all
    modules) and kmod's modinfo (depends= of the boot chain)."""
    tree = ModuleTree.open(debian_kernel.modules)
    sample = random.Random(7).sample(sorted(tree.all_files()), 40) + VIRTIO_BLK + ["squashfs", "virtio_net"]
    for name in sample:
        path = Path(tree.all_files()[name])
        with path.open("rb") as f:
            theirs = ELFFile(f).get_section_by_name(".modinfo").data()
        assert read_modinfo(path) == theirs, name
    modinfo = require_tool("modinfo")
    for name in [*VIRTIO_BLK, "squashfs", "virtio_net", "net_failover"]:
        out = subprocess.run(
            [modinfo, "-F", "depends", tree.all_files()[name]], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        want = [d.replace("-", "_") for d in out.stdout.strip().split(",") if d]
        assert list(tree.module(name).depends) == want, name


@pytest.mark.parametrize(("suffix", "tool"), [(".ko.xz", "xz"), (".ko.zst", "zstd")])
def test_compressed_modules(tmp_path: Path, debian_kernel: KernelFiles, suffix: str, tool: str) -> None:
    """A tree whose modules are compressed as kmod's install does (xz --check=crc32, zstd)."""
    real = ModuleTree.open(debian_kernel.modules)
    root = tmp_path / "lib/modules/6.1.0-57-cloud-amd64"
    compress = {
        "xz": [require_tool("xz"), "--check=crc32", "-c"],
        "zstd": [require_tool("zstd"), "-q", "-c"],
    }[tool]
    for name in [*VIRTIO_BLK, "squashfs"]:
        source = Path(real.all_files()[name])
        target = root / source.relative_to(real.root).parent / (source.name[:-3] + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run([*compress, str(source)], capture_output=True, check=True).stdout)
    shutil.copy(real.root / "modules.builtin", root)
    tree = ModuleTree.open(tmp_path)  # a root holding one lib/modules/VERSION
    resolution = tree.resolve(["virtio_pci", "virtio_blk", "squashfs"])
    assert resolution.names == [*VIRTIO_BLK, "squashfs"]
    for module in resolution.modules:
        assert module.path.name.endswith(suffix)
        assert module.read() == Path(real.all_files()[module.name]).read_bytes()


def test_softdep_order_and_missing_softdeps(tmp_path: Path) -> None:
    root = fake_tree(
        tmp_path,
        {
            "kernel/a.ko": fake_module("a", depends=["b"], softdeps=["pre: c-alias nowhere post: d"]),
            "kernel/b.ko": fake_module("b"),
            "kernel/c.ko": fake_module("c", aliases=["c-alias"]),
            "kernel/d.ko": fake_module("d", softdeps=["pre: a"]),  # a softdep cycle back to a
            "kernel/sub/e-dash.ko": fake_module("e_dash", depends=["b"]),
        },
    )
    tree = ModuleTree.open(root)
    resolution = tree.resolve(["a", "e-dash"])
    assert resolution.names == ["c", "b", "a", "d", "e_dash"]
    assert resolution.missing_softdeps == ("nowhere",)


def test_ignored_softdep_words_without_pre_or_post(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, {"kernel/cifs.ko": fake_module("cifs", softdeps=["gcm", "ccm"])})
    assert resolve_modules(root, ["cifs"]).names == ["cifs"]


def test_builtins_are_satisfied_without_loading(tmp_path: Path) -> None:
    root = fake_tree(
        tmp_path,
        {"kernel/a.ko": fake_module("a", softdeps=["pre: crc32c"])},
        builtin=["fs/ext4/ext4"],
        builtin_aliases={"crc32c": "crc32c_generic"},
    )
    resolution = resolve_modules(root, ["ext4", "a"])
    assert resolution.names == ["a"] and resolution.builtin == ("ext4", "crc32c")


def test_glob_aliases(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, {"kernel/vblk.ko": fake_module("vblk", aliases=["virtio:d00000002v*"])})
    assert resolve_modules(root, ["virtio:d00000002v00001af4"]).names == ["vblk"]


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, {"kernel/a.ko": fake_module("a")})
    with pytest.raises(BootError, match=r"no module 'nope' \(not a module file, not built in"):
        resolve_modules(root, ["nope"])


def test_an_unresolvable_dependency_names_the_chain(tmp_path: Path) -> None:
    root = fake_tree(
        tmp_path,
        {"kernel/a.ko": fake_module("a", depends=["b"]), "kernel/b.ko": fake_module("b", depends=["gone"])},
    )
    with pytest.raises(BootError) as err:
        resolve_modules(root, ["a"])
    assert "module 'b' depends on 'gone', which is not in the module tree (a -> b)" in str(err.value)


def test_not_a_module(tmp_path: Path) -> None:
    root = fake_tree(
        tmp_path,
        {"kernel/text.ko": b"not an ELF file", "kernel/bare.ko": elf_with_section(b".text", b"\x90" * 16)},
    )
    tree = ModuleTree.open(root)
    with pytest.raises(BootError, match="not a kernel module: not an ELF file"):
        tree.module("text")
    with pytest.raises(BootError, match=r"no \.modinfo section"):
        tree.module("bare")
    broken = tmp_path / "broken.ko.xz"
    broken.write_bytes(b"\xfd7zXZ\0garbage")
    with pytest.raises(BootError, match="cannot decompress"):
        module_from_file(broken)


@pytest.mark.parametrize("kind", ["missing", "empty", "two-versions"])
def test_bad_module_trees(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "modules"
    if kind == "empty":
        path.mkdir()
    elif kind == "two-versions":
        (path / "lib/modules/6.1.0-a").mkdir(parents=True)
        (path / "lib/modules/6.1.0-b").mkdir(parents=True)
    reason = {
        "missing": "no such module directory",
        "empty": "not a kernel module tree",
        "two-versions": "several",
    }
    with pytest.raises(BootError, match=reason[kind]):
        ModuleTree.open(path)


def test_modules_order_fast_path_and_what_it_does_not_list(tmp_path: Path) -> None:
    import lzma

    root = fake_tree(
        tmp_path,
        {
            "kernel/a.ko.xz": lzma.compress(fake_module("a", depends=["b"])),  # the order says a.ko
            "kernel/b.ko": fake_module("b"),
            "kernel/unlisted.ko": fake_module("unlisted"),
        },
    )
    (root / "modules.order").write_text("kernel/a.ko\nkernel/b.ko\n")
    tree = ModuleTree.open(root)
    assert tree.resolve(["a"]).names == ["b", "a"] and not tree._walked
    assert tree.resolve(["unlisted"]).names == ["unlisted"] and tree._walked
    (root / "updates").mkdir()
    (root / "updates/b.ko").write_bytes(fake_module("b", aliases=["newer"]))
    tree = ModuleTree.open(root)  # an updates/ directory: always walked, and it wins
    assert tree.module("b").path == root / "updates/b.ko"


def test_alias_index_is_cached_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import pyimg.boot.modules as modules

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    files = {f"kernel/m{i:03d}.ko": fake_module(f"m{i:03d}", aliases=[f"alias-{i}"]) for i in range(300)}
    root = fake_tree(tmp_path, files)
    assert ModuleTree.open(root).lookup("alias-7") == (["m007"], False)
    assert len(list((tmp_path / "cache/pyimg/module-aliases").glob("*.json"))) == 1

    def no_reading(path: Path) -> None:
        raise AssertionError(f"read {path}: the cached index should have answered")

    with monkeypatch.context() as m:
        m.setattr(modules, "module_from_file", no_reading)
        assert ModuleTree.open(root).lookup("alias-42") == (["m042"], False)
    (root / "kernel/m042.ko").write_bytes(fake_module("m042", aliases=["renamed"]))
    os.utime(root / "kernel/m042.ko", ns=(1, 1))
    tree = ModuleTree.open(root)  # a changed module: the key changes, the index is rebuilt
    assert tree.lookup("alias-42") == ([], False) and tree.lookup("renamed") == (["m042"], False)
