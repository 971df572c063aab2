"""Synthetic inputs for the boot tests: minimal ELF "modules" with a chosen
.modinfo, module trees made of them, and fake bzImages."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path


def elf_with_section(name: bytes, content: bytes) -> bytes:
    """A minimal ELF64 little-endian relocatable file: a null section, the named
    section and the section name table (what a .ko is, minus the code)."""
    shstrtab = b"\0" + name + b"\0.shstrtab\0"
    header_size, entry = 64, 64
    content_at = header_size
    strtab_at = content_at + len(content)
    shoff = (strtab_at + len(shstrtab) + 7) // 8 * 8
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, header_size, 0, 0, entry, 3, 2)
    body = content + shstrtab
    body += bytes(shoff - header_size - len(body))
    sections = bytes(entry)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, content_at, len(content), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 1 + len(name) + 1, 3, 0, 0, strtab_at, len(shstrtab), 0, 0, 1, 0)
    return header + body + sections


def fake_module(
    name: str,
    *,
    depends: Sequence[str] = (),
    softdeps: Iterable[str] = (),
    aliases: Iterable[str] = (),
    vermagic: str = "6.1.0-test SMP mod_unload",
) -> bytes:
    items = [f"alias={a}" for a in aliases] + [f"softdep={s}" for s in softdeps]
    items += [f"depends={','.join(depends)}", f"name={name}", f"vermagic={vermagic}"]
    return elf_with_section(b".modinfo", b"".join(i.encode() + b"\0" for i in items))


def fake_tree(
    root: Path,
    modules: dict[str, bytes],
    builtin: Sequence[str] = (),
    builtin_aliases: dict[str, str] | None = None,
    version: str = "6.1.0-test",
) -> Path:
    """lib/modules/VERSION under root with these module files (relative path -> bytes)."""
    tree = root / "lib" / "modules" / version
    for rel, data in modules.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    info = b"".join(f"{mod}.alias={alias}\0".encode() for alias, mod in (builtin_aliases or {}).items())
    (tree / "modules.builtin.modinfo").write_bytes(info)
    return tree


def fake_bzimage(
    path: Path, release: str = "6.1.0-test", *, magic: bytes = b"HdrS", loadflags: int = 1
) -> Path:
    data = bytearray(0x1000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = magic
    data[0x206:0x208] = struct.pack("<H", 0x020F)
    data[0x211] = loadflags
    banner = f"{release} (test@example) #1 SMP".encode() + b"\0"
    data[0x800 : 0x800 + len(banner)] = banner
    data[0x20E:0x210] = struct.pack("<H", 0x800 - 0x200)
    path.write_bytes(bytes(data))
    return path
