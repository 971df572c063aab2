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
from collections.abc import Callable
from pathlib import Path

from .oracles import ACL_XATTRS, content_item, require_tool, xattr_item

PATH_MAX = 4096  # Linux refuses longer paths whole (ENAMETOOLONG)

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


# The longest image path given to one debugfs command: it reads each line of its
# command file into a BUFSIZ (8 KiB) buffer, and a longer line is cut in two.
_COMMAND_PATH_MAX = 2048

Command = Callable[[str], str]  # the command for an image path (quoted)


def _at(path: str, command: Command) -> list[str]:
    """The debugfs commands that run command(path) for the image path `path` ("/a/b"):
    that one command when the path is short; else `cd` down to its directory a piece
    (whole components, shorter than _COMMAND_PATH_MAX) at a time, the command on the
    last name, and `cd /` back."""
    if len(path.encode("utf-8", "surrogateescape")) < _COMMAND_PATH_MAX:
        return [command(_quote(path))]
    parent, _, name = path.rpartition("/")
    steps, piece = ["cd /"], ""
    for part in parent.split("/"):
        if not part:
            continue
        if piece and len(f"{piece}/{part}".encode("utf-8", "surrogateescape")) >= _COMMAND_PATH_MAX:
            steps.append(f"cd {_quote(piece)}")
            piece = ""
        piece = f"{piece}/{part}" if piece else part
    if piece:
        steps.append(f"cd {_quote(piece)}")
    return [*steps, command(_quote(name)), "cd /"]


def _debugfs_at(image: Path, queries: list[tuple[str, Command]], workdir: Path) -> list[str]:
    """Run command(path) for every (path, command) in one debugfs session (paths of
    any length, see _at); the output of each."""
    commands: list[str] = []
    answer_at = []
    for path, command in queries:
        steps = _at(path, command)
        answer_at.append(len(commands) + (0 if len(steps) == 1 else len(steps) - 2))
        commands += steps
    outputs = _debugfs(image, commands, workdir)
    return [outputs[i][1] for i in answer_at]


def _list_paths(image: Path, workdir: Path) -> list[str]:
    """Every path in the image, walking directories with `ls -p`, one level per session."""
    paths: list[str] = []
    level = [""]
    while level:
        answers = _debugfs_at(image, [("/" + d, lambda q: f"ls -p {q}") for d in level], workdir)
        next_level = []
        for directory, body in zip(level, answers, strict=True):
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
    queries: list[tuple[str, Command]] = []
    for i, (path, _, name) in enumerate(wanted):
        out = _quote(str(workdir / f"xattr-{i}"))
        queries.append(("/" + path, lambda q, out=out, name=name: f"ea_get -r -f {out} {q} {_quote(name)}"))
    _debugfs_at(image, queries, workdir)
    for i, (_, xattrs, name) in enumerate(wanted):
        xattrs[name] = (workdir / f"xattr-{i}").read_bytes()


def _kind(stat_output: str) -> int:
    """The file type (S_IFREG...) in the output of debugfs's `stat`."""
    found = re.search(r"Type: ([\w ]+?)\s+Mode:", stat_output)
    assert found is not None, stat_output[:300]
    return TYPES[found.group(1)]


def snapshot_image(
    image: Path, workdir: Path, *, owners: bool = True, acls: bool = False, hash_content: bool = False
) -> dict[str, tuple[object, ...]]:
    """oracles.snapshot() of the image, as e2fsprogs reads it (the same options).
    Paths of any length: rdump cannot create what lies deeper than PATH_MAX below
    its target, so each file and symlink whose dumped path would be that long is
    dumped on its own (`rdump NAME DIR` from its directory, see _at)."""
    e2fsck_clean(image)
    dump = workdir / "rdump"
    dump.mkdir()
    _debugfs(image, [f"rdump / {dump}"], workdir)  # what it cannot create, it reports and skips
    paths = [p for p in _list_paths(image, workdir) if p != "lost+found" and not p.startswith("lost+found/")]
    stats = _debugfs_at(image, [("/" + p, lambda q: f"stat {q}") for p in ["", *paths]], workdir)
    local_of = {p: dump / p for p in paths}
    deep = [
        p
        for p, body in zip(paths, stats[1:], strict=True)
        if _kind(body) in (stat.S_IFREG, stat.S_IFLNK) and len(os.fsencode(local_of[p])) >= PATH_MAX
    ]
    for i, path in enumerate(deep):
        (workdir / f"deep-{i}").mkdir()
        local_of[path] = workdir / f"deep-{i}" / os.path.basename(path)
    into = {path: _quote(str(workdir / f"deep-{i}")) for i, path in enumerate(deep)}
    _debugfs_at(image, [("/" + p, lambda q, to=into[p]: f"rdump {q} {to}") for p in deep], workdir)
    inode_paths: dict[int, list[str]] = {}
    parsed = {}
    for path, body in zip([".", *paths], stats, strict=True):
        ino = int(re.search(r"Inode: (\d+)", body).group(1))  # type: ignore[union-attr]
        kind = _kind(body)
        mode = int(re.search(r"Mode:\s+(\d+)", body).group(1), 8) & 0o7777  # type: ignore[union-attr]
        uid, gid = map(int, re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", body).groups())  # type: ignore[union-attr]
        mtime = int(re.search(r"mtime: 0x([0-9a-f]+)", body).group(1), 16)  # type: ignore[union-attr]
        links = int(re.search(r"Links: (\d+)", body).group(1))  # type: ignore[union-attr]
        item: list[object] = [kind, mode, mtime]
        if owners:
            item += [uid, gid]
        local = local_of.get(path, dump)
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
