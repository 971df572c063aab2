"""Extended attributes: which names an image can hold, and POSIX ACLs.

Sources keep every xattr they find (directories: every name listxattr gives; tar
archives: every pax xattr record); the formats decide, and refuse by name what
they cannot hold — nothing is dropped silently.  What Linux itself can read back
is the common limit of both formats: a name in one of its namespaces (user.,
trusted., security., system.), with a non-empty part after the prefix, at most
XATTR_NAME_MAX (255) bytes in all, a value of at most XATTR_SIZE_MAX (64 KiB).

POSIX ACLs are the xattrs system.posix_acl_access and system.posix_acl_default,
whose value (the "xattr form", also what tar's SCHILY.xattr records hold) is
little-endian: a u32 version 2, then 8-byte entries (u16 tag, u16 perm, u32 id;
the id is 0xFFFFFFFF for the entries without one).  ext4 stores them in its own
form (fs/ext4/acl.h: version 1; USER_OBJ, GROUP_OBJ, MASK and OTHER entries of 4
bytes, without the id).  squashfs cannot hold them at all.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_NAMES = (ACL_ACCESS, ACL_DEFAULT)

NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
XATTR_NAME_MAX = 255  # Linux: longer names cannot be read back (getxattr: ERANGE)
XATTR_SIZE_MAX = 65536  # Linux: the largest value getxattr returns

# ACL entry tags (include/uapi/linux/posix_acl.h) and the order the kernel wants them in.
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_WITH_ID = (USER, GROUP)
_TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
NO_ID = 0xFFFFFFFF

AclEntry = tuple[int, int, int]  # (tag, perm, id)


class AclError(ValueError):
    """A malformed ACL; the message says what is wrong (the caller adds the path)."""


def name_problem(name: bytes) -> str | None:
    """Why Linux could not read this xattr back from any image, if it could not."""
    shown = name.decode("utf-8", "backslashreplace")
    prefix = next((p for p in NAMESPACES if name.startswith(p)), None)
    if prefix is None:
        return f"xattr {shown!r} is in no namespace Linux knows (user., trusted., security., system.)"
    if len(name) == len(prefix):
        return f"xattr {shown!r} has an empty name after its namespace prefix"
    if len(name) > XATTR_NAME_MAX:
        return f"xattr name of {len(name)} bytes (Linux reads at most {XATTR_NAME_MAX})"
    if b"\0" in name:
        return f"xattr {shown!r} has a NUL byte in its name"
    return None


def value_problem(name: bytes, value: bytes) -> str | None:
    if len(value) > XATTR_SIZE_MAX:
        shown = name.decode("utf-8", "backslashreplace")
        return f"xattr {shown!r} value of {len(value)} bytes (Linux reads at most {XATTR_SIZE_MAX})"
    return None


def acl_names(xattrs: Mapping[bytes, bytes]) -> list[bytes]:
    return [name for name in ACL_NAMES if name in xattrs]


def parse_acl(value: bytes) -> list[AclEntry]:
    """The entries of an ACL in xattr form, checked as the kernel checks them
    (posix_acl_valid): known tags in order, one USER_OBJ, GROUP_OBJ and OTHER, a
    MASK when there are USER or GROUP entries, ids unique and ascending."""
    if len(value) < 4 or (len(value) - 4) % 8:
        raise AclError(f"POSIX ACL xattr of {len(value)} bytes (4 + 8 per entry expected)")
    (version,) = struct.unpack_from("<I", value)
    if version != 2:
        raise AclError(f"POSIX ACL xattr version {version} (2 expected)")
    entries = [struct.unpack_from("<HHI", value, pos) for pos in range(4, len(value), 8)]
    check_acl(entries)
    return entries


def check_acl(entries: list[AclEntry]) -> None:
    counts = dict.fromkeys(_TAGS, 0)
    last: tuple[int, int] = (-1, -1)
    for tag, perm, ident in entries:
        if tag not in counts:
            raise AclError(f"POSIX ACL entry with unknown tag {tag:#x}")
        if perm & ~7:
            raise AclError(f"POSIX ACL entry with permission bits {perm:#o} (rwx only)")
        key = (_TAGS.index(tag), ident if tag in _WITH_ID else -1)
        if key <= last:
            raise AclError("POSIX ACL entries out of order or repeated")
        last = key
        counts[tag] += 1
    if counts[USER_OBJ] != 1 or counts[GROUP_OBJ] != 1 or counts[OTHER] != 1:
        raise AclError("POSIX ACL without exactly one user::, group:: and other:: entry")
    if (counts[USER] or counts[GROUP]) and not counts[MASK]:
        raise AclError("POSIX ACL with named user or group entries but no mask:: entry")


def acl_xattr(entries: Iterable[AclEntry]) -> bytes:
    """The xattr form of these entries (sorted as the kernel wants them)."""
    ordered = sorted(entries, key=lambda e: (_TAGS.index(e[0]) if e[0] in _TAGS else 99, e[2]))
    check_acl(ordered)
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in ordered)


def map_acl_ids(value: bytes, uid_map: Mapping[int, int], gid_map: Mapping[int, int]) -> bytes:
    """An ACL (xattr form) with its named user and group entries renamed by the id
    maps, as the owners are (--uid-map/--gid-map), re-sorted.  Not validated here: a
    value that was malformed stays as it was, and two ids mapped onto one make a
    repeated entry, which the format's check refuses by path like any malformed ACL."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return value
    entries = [struct.unpack_from("<HHI", value, pos) for pos in range(4, len(value), 8)]
    mapped = [
        (
            tag,
            perm,
            uid_map.get(ident, ident)
            if tag == USER
            else gid_map.get(ident, ident)
            if tag == GROUP
            else ident,
        )
        for tag, perm, ident in entries
    ]
    if mapped == entries:
        return value
    mapped.sort(key=lambda e: (_TAGS.index(e[0]) if e[0] in _TAGS else 99, e[2] if e[0] in _WITH_ID else -1))
    return value[:4] + b"".join(struct.pack("<HHI", *entry) for entry in mapped)


def acl_to_ext4(value: bytes) -> bytes:
    """An ACL from its xattr form to ext4's on-disk form (fs/ext4/acl.c)."""
    out = bytearray(struct.pack("<I", 1))
    for tag, perm, ident in parse_acl(value):
        out += struct.pack("<HHI", tag, perm, ident) if tag in _WITH_ID else struct.pack("<HH", tag, perm)
    return bytes(out)


def mode_acl(mode: int) -> bytes:
    """The minimal access ACL equal to a file mode (user::, group::, other::)."""
    return acl_xattr(
        [(USER_OBJ, mode >> 6 & 7, NO_ID), (GROUP_OBJ, mode >> 3 & 7, NO_ID), (OTHER, mode & 7, NO_ID)]
    )


_TEXT_TAGS = {"user": (USER_OBJ, USER), "u": (USER_OBJ, USER), "group": (GROUP_OBJ, GROUP),
              "g": (GROUP_OBJ, GROUP), "mask": (MASK, MASK), "m": (MASK, MASK),
              "other": (OTHER, OTHER), "o": (OTHER, OTHER)}  # fmt: skip


def acl_from_text(text: str) -> bytes:
    """The xattr form of an ACL in the long text form tar's SCHILY.acl.* records
    hold ("user::rw-\\nuser:1000:r--\\n..."; star appends the numeric id as a 4th
    field: "user:alice:r--:1000").  A user or group given by name only is refused:
    resolving it through the build host's user database would make the image
    depend on the host."""
    entries: list[AclEntry] = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if fields[0] in ("default", "d") and len(fields) > 3:  # getfacl's spelling of a default ACL
            fields = fields[1:]
        if len(fields) not in (3, 4) or fields[0] not in _TEXT_TAGS:
            raise AclError(f"bad ACL entry {line!r}")
        obj_tag, named_tag = _TEXT_TAGS[fields[0]]
        qualifier, perms = fields[1], fields[2]
        if len(fields) == 4:
            qualifier = fields[3]  # star: the numeric id after the name
        perm = 0
        for bit, char in ((4, "r"), (2, "w"), (1, "x")):
            if char in perms:
                perm |= bit
        if perms.strip("rwx-") or len(perms) > 3:
            raise AclError(f"bad permissions in ACL entry {line!r}")
        if not qualifier:
            entries.append((obj_tag, perm, NO_ID))
            continue
        if obj_tag in (MASK, OTHER):
            raise AclError(f"bad ACL entry {line!r}")
        if not qualifier.isdigit() or int(qualifier) >= NO_ID:
            raise AclError(
                f"ACL entry {line!r} names a user or group by name only; pyimg does not look names up "
                "in the build host's user database (create the archive with `tar --acls --xattrs`, "
                "which also records the numeric form)"
            )
        entries.append((named_tag, perm, int(qualifier)))
    return acl_xattr(entries)


def xattr_problem(name: bytes, value: bytes, *, fmt: str, acls: bool) -> str | None:
    """Why format `fmt` cannot hold this xattr, if it cannot.  `acls`: whether the
    format stores POSIX ACLs (their values are then checked as well)."""
    problem = name_problem(name) or value_problem(name, value)
    if problem is not None:
        return problem
    shown = name.decode("utf-8", "backslashreplace")
    if name in ACL_NAMES:
        if not acls:
            return (
                f"POSIX ACL ({shown}): {fmt} cannot hold ACLs; "
                "drop_acls (--drop-acls) builds without them, reporting the paths"
            )
        try:
            parse_acl(value)
        except AclError as exc:
            return f"{shown}: {exc}"
        return None
    if name.startswith(b"system."):
        if acls:
            return f"xattr {shown!r}: {fmt} images hold no system.* xattrs other than POSIX ACLs"
        return f"xattr {shown!r}: {fmt} holds only user., trusted. and security. xattrs"
    return None


def suspect_names(xattr_maps: Iterable[Mapping[bytes, bytes]]) -> bool:
    """Whether any xattr of these may fail xattr_problem: one pass over the distinct
    names (most trees have a handful), so the common case needs no per-inode check."""
    names: set[bytes] = set()
    big = False
    for xattrs in xattr_maps:
        if xattrs:
            names.update(xattrs)
            big = big or max(map(len, xattrs.values())) > XATTR_SIZE_MAX
    return big or any(name.startswith(b"system.") or name_problem(name) is not None for name in names)
