"""What an ext4 image holds, as e2fsprogs reads it: `e2fsck -fn` must pass, `debugfs`
lists every directory (`ls -p`), dumps the content (`rdump`) and reports each
inode (`stat`: type, mode with setuid/sticky, owner, mtime, links, device, xattrs).
The result has the shape of oracles.snapshot(), so a source tree and an image
compare with one `==`."""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
from pathlib import Path

from .oracles import ACL_XATTRS, content_item, require_tool, xattr_item

TYPES = {
    "regular": stat.S_IFREG,
    "directory": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "character special": stat.S_IFCHR,
    "block special": stat.S_IFBLK,
    "FIFO": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}


def e2fsck_clean(image: Path) -> str:
    """Assert `e2fsck -fn` (no host config) finds nothing to fix; return its output."""
    tool = require_tool("e2fsck")
    proc = subprocess.run(
        [tool, "-fn", str(image)],
        capture_output=True,
        text=True,
        env={**os.environ, "E2FSCK_CONFIG": "/dev/null"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"e2fsck -fn {image} exited {proc.returncode}:\n{output}"
    return output


def _debugfs(image: Path, commands: list[str], workdir: Path) -> list[tuple[str, str]]:
    """Run commands in one debugfs session; (command, its output) for each."""
    tool = require_tool("debugfs")
    script = workdir / "debugfs-commands"
    # Names are bytes, not always UTF-8: they pass through as surrogate escapes, as in
    # os.fsdecode, so that paths compare with oracles.snapshot()'s.
    script.write_bytes("".join(c + "\n" for c in commands).encode("utf-8", "surrogateescape"))
    proc = subprocess.run(
        [tool, "-f", str(script), str(image)], capture_output=True, text=True, errors="surrogateescape"
    )
    assert proc.returncode == 0, proc.stderr
    chunks = re.split(r"^debugfs: ", proc.stdout, flags=re.M)[1:]
    out = []
    for chunk in chunks:
        command, _, body = chunk.partition("\n")
        out.append((command, body))
    assert len(out) == len(commands), f"debugfs answered {len(out)} of {len(commands)} commands"
    return out


def _quote(path: str) -> str:
    """An argument as debugfs's parser (libss) reads it: inside double quotes a
    backslash is an ordinary byte and a quote is written twice."""
    return '"' + path.replace('"', '""') + '"'


def _list_paths(image: Path, workdir: Path) -> list[str]:
    """Every path in the image, walking directories with `ls -p`, one level per session."""
    paths: list[str] = []
    level = [""]
    while level:
        answers = _debugfs(image, [f"ls -p {_quote('/' + d)}" for d in level], workdir)
        next_level = []
        for directory, (_, body) in zip(level, answers, strict=True):
            for line in body.splitlines():
                fields = line.split("/")
                if len(fields) < 7:
                    continue
                mode, name = int(fields[2], 8), "/".join(fields[5:-2])
                if name in (".", ".."):
                    continue
                path = f"{directory}/{name}" if directory else name
                paths.append(path)
                if stat.S_ISDIR(mode):
                    next_level.append(path)
        level = next_level
    return paths


def decode_ext4_acl(raw: bytes) -> list[tuple[int, int, int]]:
    """fs/ext4/acl.c's format, read here without pyimg: version 1, 4-byte entries
    for USER_OBJ/GROUP_OBJ/MASK/OTHER, 8-byte ones (with the id) for USER/GROUP;
    the entries as oracles.decode_xattr_acl gives them (id 0xFFFFFFFF when none)."""
    assert struct.unpack_from("<I", raw)[0] == 1
    pos, out = 4, []
    while pos < len(raw):
        tag, perm = struct.unpack_from("<HH", raw, pos)
        if tag in (2, 8):
            out.append((tag, perm, struct.unpack_from("<I", raw, pos + 4)[0]))
            pos += 8
        else:
            assert tag in (1, 4, 0x10, 0x20), tag
            out.append((tag, perm, 0xFFFFFFFF))
            pos += 4
    assert pos == len(raw)
    return out


def _xattrs(body: str, *, acls: bool = False) -> dict[str, bytes | None]:
    """The xattrs `stat` shows (raw: an ACL in ext4's own form).  debugfs prints a
    name that is not ASCII as hex bytes, leaves out values of 40 bytes or more and
    escapes quotes in printable ones: those values are None here (read with
    `ea_get`, see _fill_long_values).  system.* is left out, but for the POSIX ACLs
    with acls=True."""
    found: dict[str, bytes | None] = {}
    lines = body.split("Extended attributes:\n", 1)
    if len(lines) < 2:
        return found
    for line in lines[1].splitlines():
        m = re.match(r"^  (\S+|(?:[0-9a-f]{2} )+) \((\d+)\)(?: = (.*))?$", line)
        if not m:
            break
        name, size, value = m.group(1), int(m.group(2)), m.group(3)
        if name.endswith(" "):  # hex bytes
            name = bytes.fromhex(name).decode("utf-8", "surrogateescape")
        raw: bytes | None
        if value is None or (value.startswith('"') and "\\" in value):
            # Left out, or printed with escapes (a value holding '"' or '\\'): ask ea_get.
            raw = None if size else b""
        elif value.startswith('"'):
            raw = value[1:-1].encode("latin-1")
        else:
            raw = bytes.fromhex(value.replace(" ", ""))
        assert raw is None or len(raw) == size, f"{name}: {value!r}"
        if not name.startswith("system.") or (acls and name in ACL_XATTRS):
            found[name] = raw
    return dict(sorted(found.items()))


def _fill_long_values(image: Path, items: dict[str, list[object]], workdir: Path) -> None:
    """Read the values `stat` left out (None) with `ea_get -f FILE`, in one session
    (`-r`: raw, an ACL in ext4's form as `stat` shows it, not translated)."""
    wanted = [
        (path, xattrs, name)
        for path, item in items.items()
        if isinstance(xattrs := item[-1], dict)
        for name, value in xattrs.items()
        if value is None
    ]
    if not wanted:
        return
    commands = []
    for i, (path, _, name) in enumerate(wanted):
        out = _quote(str(workdir / f"xattr-{i}"))
        commands.append(f"ea_get -r -f {out} {_quote('/' + path)} {_quote(name)}")
    _debugfs(image, commands, workdir)
    for i, (_, xattrs, name) in enumerate(wanted):
        xattrs[name] = (workdir / f"xattr-{i}").read_bytes()


def snapshot_image(
    image: Path, workdir: Path, *, owners: bool = True, acls: bool = False, hash_content: bool = False
) -> dict[str, tuple[object, ...]]:
    """oracles.snapshot() of the image, as e2fsprogs reads it (the same options)."""
    e2fsck_clean(image)
    dump = workdir / "rdump"
    dump.mkdir()
    _debugfs(image, [f"rdump / {dump}"], workdir)
    paths = [p for p in _list_paths(image, workdir) if p != "lost+found" and not p.startswith("lost+found/")]
    stats = _debugfs(image, [f"stat {_quote('/' + p)}" for p in ["", *paths]], workdir)
    inode_paths: dict[int, list[str]] = {}
    parsed = {}
    for path, (_, body) in zip([".", *paths], stats, strict=True):
        ino = int(re.search(r"Inode: (\d+)", body).group(1))  # type: ignore[union-attr]
        kind = TYPES[re.search(r"Type: ([\w ]+?)\s+Mode:", body).group(1)]  # type: ignore[union-attr]
        mode = int(re.search(r"Mode:\s+(\d+)", body).group(1), 8) & 0o7777  # type: ignore[union-attr]
        uid, gid = map(int, re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", body).groups())  # type: ignore[union-attr]
        mtime = int(re.search(r"mtime: 0x([0-9a-f]+)", body).group(1), 16)  # type: ignore[union-attr]
        links = int(re.search(r"Links: (\d+)", body).group(1))  # type: ignore[union-attr]
        item: list[object] = [kind, mode, mtime]
        if owners:
            item += [uid, gid]
        local = dump / path if path != "." else dump
        if kind == stat.S_IFREG:
            item.append(content_item(local.read_bytes(), hash_content=hash_content))
            if links > 1:
                inode_paths.setdefault(ino, []).append(path)
                item.append(("group", ino))
        elif kind == stat.S_IFLNK:
            item.append(os.readlink(local))
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            dev = re.search(r"Device major/minor number: (\d+):(\d+)", body)
            item.append((int(dev.group(1)), int(dev.group(2))))  # type: ignore[union-attr]
        if kind != stat.S_IFLNK:
            item.append(_xattrs(body, acls=acls))
        parsed[path] = item
    _fill_long_values(image, parsed, workdir)
    for item in parsed.values():
        if isinstance(xattrs := item[-1], dict) and any(n in ACL_XATTRS for n in xattrs):
            item[-1] = {n: xattr_item(n, v, decode_acl=decode_ext4_acl) for n, v in xattrs.items()}
    return {
        path: tuple(
            ("group", min(inode_paths[x[1]])) if isinstance(x, tuple) and x[0] == "group" else x for x in item
        )
        for path, item in parsed.items()
    }
