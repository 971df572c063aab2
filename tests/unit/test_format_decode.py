"""The on-disk structures, decoded with Python's struct alone, independently of the C
encoders and of csrc/*/*_format.h: offsets and constants here come from the format
documents (squashfs-tools-ng doc/format.adoc; the kernel's ext4 documentation and
e2fsprogs' ext2_fs.h), so a wrong offset in C shows as a wrong value here."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from pathlib import Path

import zstandard

import pyimg

EPOCH = 1_700_000_000
UID, GID = 1234, 5678
SMALL = b"a small file\n"
BIG = bytes(range(256)) * 800  # 204800 bytes: one full 128 KiB block and a tail
TARGET = b"dir/big"


def _source(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "small").write_bytes(SMALL)
    (root / "small").chmod(0o640)
    (root / "dir" / "big").write_bytes(BIG)
    (root / "link").symlink_to(TARGET.decode())
    for directory in (root, root / "dir", root / "dir" / "sub"):
        directory.chmod(0o755)  # whatever the umask
    for path in root.rglob("*"):
        os.utime(path, ns=(EPOCH * 10**9, EPOCH * 10**9), follow_symlinks=False)
    os.utime(root, ns=(EPOCH * 10**9, EPOCH * 10**9))
    return root


# ---- squashfs -------------------------------------------------------------------------


class _Meta:
    """A metadata table (inode or directory table): its blocks decompressed and joined,
    with where each block (by its offset in the table) starts in the joined bytes."""

    def __init__(self, image: bytes, start: int, end: int) -> None:
        self.data = bytearray()
        self.at: dict[int, int] = {}
        pos = start
        while pos < end:
            (header,) = struct.unpack_from("<H", image, pos)
            size = header & 0x7FFF
            payload = image[pos + 2 : pos + 2 + size]
            self.at[pos - start] = len(self.data)
            if header & 0x8000:  # stored raw
                self.data += payload
            else:
                self.data += zstandard.ZstdDecompressor().decompress(payload, max_output_size=8192)
            pos += 2 + size

    def ref(self, block: int, offset: int) -> int:
        return self.at[block] + offset


def _sqfs_inode(inodes: _Meta, ref: int) -> dict[str, object]:
    pos = inodes.ref(ref >> 16, ref & 0xFFFF)
    kind, perms, uid_idx, gid_idx, mtime, number = struct.unpack_from("<HHHHII", inodes.data, pos)
    out: dict[str, object] = dict(
        type=kind, perms=perms, uid_idx=uid_idx, gid_idx=gid_idx, mtime=mtime, ino=number
    )
    body = pos + 16
    if kind == 1:  # basic directory
        block, nlink, size, offset, parent = struct.unpack_from("<IIHHI", inodes.data, body)
        out.update(block=block, nlink=nlink, size=size, offset=offset, parent=parent)
    elif kind == 2:  # basic file
        start, frag, frag_offset, size = struct.unpack_from("<IIII", inodes.data, body)
        out.update(blocks_start=start, frag=frag, frag_offset=frag_offset, size=size)
        out["block_sizes"] = struct.unpack_from(f"<{size // (128 * 1024)}I", inodes.data, body + 16)
    elif kind == 3:  # basic symlink
        nlink, length = struct.unpack_from("<II", inodes.data, body)
        out.update(nlink=nlink, target=bytes(inodes.data[body + 8 : body + 8 + length]))
    return out


def _sqfs_listing(dirs: _Meta, inode: dict[str, object]) -> dict[bytes, int]:
    """name -> inode reference, from a directory's listing."""
    pos = dirs.ref(int(inode["block"]), int(inode["offset"]))  # type: ignore[call-overload]
    end = pos + int(inode["size"]) - 3  # type: ignore[call-overload]
    refs: dict[bytes, int] = {}
    while pos < end:
        count, start, _base = struct.unpack_from("<III", dirs.data, pos)
        pos += 12
        for _ in range(count + 1):
            offset, _delta, _kind, name_size = struct.unpack_from("<HhHH", dirs.data, pos)
            name = bytes(dirs.data[pos + 8 : pos + 8 + name_size + 1])
            refs[name] = start << 16 | offset
            pos += 8 + name_size + 1
    return refs


def _sqfs_table(image: bytes, at: int, count: int, entry: int) -> bytes:
    """A lookup table (ids, fragments): u64 pointers to metadata blocks of entries."""
    out = bytearray()
    for i in range(-(-count * entry // 8192)):
        (block,) = struct.unpack_from("<Q", image, at + 8 * i)
        meta = _Meta(image, block, block + 1)  # one block from there
        out += meta.data
    return bytes(out[: count * entry])


def _sqfs_block(image: bytes, start: int, word: int) -> bytes:
    size = word & ~(1 << 24)
    data = image[start : start + size]
    return (
        data if word & (1 << 24) else zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 20)
    )


def test_squashfs_decodes(tmp_path: Path) -> None:
    out = tmp_path / "img.sqfs"
    pyimg.build(
        [str(_source(tmp_path / "src"))], str(out), format="squashfs", epoch=EPOCH, owner=f"{UID}:{GID}"
    )
    image = out.read_bytes()
    sb = struct.unpack_from("<IIIIIHHHHHHQQQQQQQQ", image, 0)
    (magic, inodes_n, mod_time, block_size, frag_count, compressor, block_log, _flags, id_count, major,
     minor, root_ref, bytes_used, id_table, xattr_table, inode_table, dir_table, frag_table,
     export_table) = sb  # fmt: skip
    assert magic == 0x73717368 and (major, minor) == (4, 0)
    assert inodes_n == 6  # /, small, dir, dir/big, dir/sub, link
    assert mod_time == EPOCH and block_size == 128 * 1024 and block_log == 17
    assert compressor == 6  # zstd
    assert id_count == 2 and frag_count >= 1
    assert xattr_table == 0xFFFFFFFFFFFFFFFF  # no xattrs
    assert 96 <= inode_table < dir_table < frag_table < export_table < id_table < bytes_used
    assert bytes_used <= len(image) and len(image) % 4096 == 0 and len(image) - bytes_used < 4096

    inodes, dirs = _Meta(image, inode_table, dir_table), _Meta(image, dir_table, frag_table)
    ids = struct.unpack(f"<{id_count}I", _sqfs_table(image, id_table, id_count, 4))
    frags = [
        struct.unpack_from("<QII", e, 0) for e in _chunks(_sqfs_table(image, frag_table, frag_count, 16), 16)
    ]

    root = _sqfs_inode(inodes, root_ref)
    assert root["type"] == 1 and root["perms"] == 0o755 and root["mtime"] == EPOCH
    assert root["nlink"] == 3 and root["parent"] == inodes_n + 1  # ".." of the root: one past the last inode
    assert (ids[int(root["uid_idx"])], ids[int(root["gid_idx"])]) == (UID, GID)  # type: ignore[call-overload]
    top = _sqfs_listing(dirs, root)
    assert sorted(top) == [b"dir", b"link", b"small"]

    small = _sqfs_inode(inodes, top[b"small"])
    assert small["type"] == 2 and small["perms"] == 0o640 and small["size"] == len(SMALL)
    assert small["block_sizes"] == () and small["frag"] != 0xFFFFFFFF
    start, word, _ = frags[int(small["frag"])]  # type: ignore[call-overload]
    offset = int(small["frag_offset"])  # type: ignore[call-overload]
    assert _sqfs_block(image, start, word)[offset : offset + len(SMALL)] == SMALL

    link = _sqfs_inode(inodes, top[b"link"])
    assert link["type"] == 3 and link["target"] == TARGET and link["nlink"] == 1

    sub = _sqfs_inode(inodes, top[b"dir"])
    assert sub["type"] == 1 and sub["nlink"] == 3 and sub["parent"] == root["ino"]
    big = _sqfs_inode(inodes, _sqfs_listing(dirs, sub)[b"big"])
    assert big["size"] == len(BIG) and len(big["block_sizes"]) == 1  # type: ignore[arg-type]
    first = _sqfs_block(image, int(big["blocks_start"]), big["block_sizes"][0])  # type: ignore[call-overload, index]
    start, word, _ = frags[int(big["frag"])]  # type: ignore[call-overload]
    offset = int(big["frag_offset"])  # type: ignore[call-overload]
    tail = _sqfs_block(image, start, word)[offset : offset + len(BIG) - block_size]
    assert first + tail == BIG


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# ---- ext4 -----------------------------------------------------------------------------

BLOCK = 4096
COMPAT = 0x0008 | 0x0020  # ext_attr, dir_index


def _crc32c(crc: int, data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected 0x82F63B78) as ext4 uses it: no final inversion."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


INCOMPAT = 0x0002 | 0x0040 | 0x0080 | 0x0200 | 0x2000  # filetype, extents, 64bit, flex_bg, csum_seed
RO_COMPAT = 0x0001 | 0x0002 | 0x0008 | 0x0020 | 0x0040 | 0x0400  # sparse_super ... metadata_csum
EXTENTS_FL = 0x80000
UUID = "2f1a6c1e-8d6b-4c4e-9a53-5f0f6d1e2a77"


def _e4_inode(image: bytes, table: int, ino: int, ipg: int) -> dict[str, object]:
    assert ino <= ipg  # group 0's table, which this test's tree fits in
    pos = table * BLOCK + (ino - 1) * 256
    mode, uid, size_lo, atime, ctime, mtime, _dtime, gid, links, _sectors, flags = struct.unpack_from(
        "<HHIIIIIHHII", image, pos
    )
    (size_hi,) = struct.unpack_from("<I", image, pos + 0x6C)
    uid_hi, gid_hi = struct.unpack_from("<HH", image, pos + 0x78)
    (extra_isize,) = struct.unpack_from("<H", image, pos + 0x80)
    magic, entries, _max, depth = struct.unpack_from("<HHHH", image, pos + 0x28)
    extents = [struct.unpack_from("<IHHI", image, pos + 0x28 + 12 * (1 + i)) for i in range(entries)]
    return dict(
        mode=mode, uid=uid | uid_hi << 16, gid=gid | gid_hi << 16, size=size_lo | size_hi << 32, links=links,
        times=(atime, ctime, mtime), flags=flags, extra_isize=extra_isize, eh_magic=magic, depth=depth,
        extents=[(lblk, length, hi << 32 | lo) for lblk, length, hi, lo in extents],
    )  # fmt: skip


def _e4_data(image: bytes, inode: dict[str, object]) -> bytes:
    out = bytearray()
    for lblk, length, start in inode["extents"]:  # type: ignore[attr-defined]
        assert lblk * BLOCK == len(out)
        out += image[start * BLOCK : (start + length) * BLOCK]
    return bytes(out[: int(inode["size"])])  # type: ignore[call-overload]


def _e4_entries(block: bytes) -> dict[bytes, tuple[int, int]]:
    """name -> (inode, file type) of a linear directory block."""
    out: dict[bytes, tuple[int, int]] = {}
    pos = 0
    while pos < BLOCK:
        ino, rec_len, name_len, kind = struct.unpack_from("<IHBB", block, pos)
        if ino:
            out[block[pos + 8 : pos + 8 + name_len]] = (ino, kind)
        pos += rec_len
    return out


def test_ext4_decodes(tmp_path: Path) -> None:
    out = tmp_path / "img.ext4"
    pyimg.build([str(_source(tmp_path / "src"))], str(out), format="ext4", epoch=EPOCH, owner=f"{UID}:{GID}",
                uuid=UUID, label="decoded")  # fmt: skip
    image = out.read_bytes()
    sb = 1024
    (inodes_count, blocks_lo, r_blocks, free_blocks_lo, free_inodes, first_data_block, log_block,
     _log_cluster, bpg, _cpg, ipg, mtime, wtime) = struct.unpack_from("<13I", image, sb)  # fmt: skip
    _mnt, _max_mnt, magic, state, _errors, _minor = struct.unpack_from("<HhHHHH", image, sb + 0x34)
    lastcheck, _interval, creator_os, rev = struct.unpack_from("<4I", image, sb + 0x40)
    (first_ino,) = struct.unpack_from("<I", image, sb + 0x54)
    inode_size, group_nr = struct.unpack_from("<HH", image, sb + 0x58)
    compat, incompat, ro_compat = struct.unpack_from("<III", image, sb + 0x5C)
    volume_uuid, volume_name = image[sb + 0x68 : sb + 0x78], image[sb + 0x78 : sb + 0x88]
    (desc_size,) = struct.unpack_from("<H", image, sb + 0xFE)
    (mkfs_time,) = struct.unpack_from("<I", image, sb + 0x108)
    (blocks_hi,) = struct.unpack_from("<I", image, sb + 0x150)
    assert magic == 0xEF53 and state == 1 and rev == 1 and creator_os == 0
    assert (blocks_lo | blocks_hi << 32) * BLOCK == len(image)
    assert log_block == 2 and first_data_block == 0 and bpg == 32768 and r_blocks == 0
    groups = -(-(blocks_lo | blocks_hi << 32) // bpg)
    assert inodes_count == groups * ipg
    assert first_ino == 11 and inode_size == 256 and group_nr == 0 and desc_size == 64
    # used: the reserved inodes 1..10, lost+found (11) and the tree's five entries but the root
    assert free_inodes == inodes_count - 16
    assert free_blocks_lo < blocks_lo
    assert (compat, incompat, ro_compat) == (COMPAT, INCOMPAT, RO_COMPAT)
    assert uuid.UUID(bytes=volume_uuid) == uuid.UUID(UUID)
    # metadata_csum_seed: s_checksum_seed = crc32c(~0, the original UUID), here the given one
    (checksum_seed,) = struct.unpack_from("<I", image, sb + 0x270)
    assert checksum_seed == _crc32c(0xFFFFFFFF, volume_uuid)
    assert volume_name == b"decoded".ljust(16, b"\0")
    assert mtime == wtime == lastcheck == mkfs_time == EPOCH

    # group descriptor 0, in the block after the superblock's
    gd = BLOCK
    bbitmap, ibitmap, itable = struct.unpack_from("<III", image, gd)
    gd_free_blocks, gd_free_inodes, gd_dirs, _bg_flags = struct.unpack_from("<HHHH", image, gd + 0x0C)
    (itable_hi,) = struct.unpack_from("<I", image, gd + 0x28)
    itable |= itable_hi << 32
    assert 0 < bbitmap < ibitmap < itable < blocks_lo
    assert gd_free_inodes == ipg - 16 and gd_dirs == 4  # /, lost+found, dir, dir/sub
    assert gd_free_blocks <= free_blocks_lo

    root = _e4_inode(image, itable, 2, ipg)
    assert stat.S_ISDIR(int(root["mode"])) and stat.S_IMODE(int(root["mode"])) == 0o755  # type: ignore[call-overload]
    assert (root["uid"], root["gid"]) == (UID, GID) and root["links"] == 4  # ., .., dir/.., lost+found/..
    assert root["times"] == (EPOCH, EPOCH, EPOCH) and root["extra_isize"] == 32
    assert root["flags"] & EXTENTS_FL and root["eh_magic"] == 0xF30A and root["depth"] == 0  # type: ignore[operator]
    assert root["size"] == BLOCK
    entries = _e4_entries(_e4_data(image, root))
    assert sorted(entries) == [b".", b"..", b"dir", b"link", b"lost+found", b"small"]
    assert entries[b"."] == (2, 2) and entries[b".."] == (2, 2) and entries[b"lost+found"] == (11, 2)
    assert entries[b"small"][1] == 1 and entries[b"link"][1] == 7 and entries[b"dir"][1] == 2

    small = _e4_inode(image, itable, entries[b"small"][0], ipg)
    assert small["mode"] == stat.S_IFREG | 0o640 and small["size"] == len(SMALL) and small["links"] == 1
    assert (small["uid"], small["gid"]) == (UID, GID) and small["times"] == (EPOCH, EPOCH, EPOCH)
    assert small["flags"] & EXTENTS_FL and small["eh_magic"] == 0xF30A  # type: ignore[operator]
    assert len(small["extents"]) == 1 and _e4_data(image, small) == SMALL  # type: ignore[arg-type]

    link = _e4_inode(image, itable, entries[b"link"][0], ipg)
    assert stat.S_ISLNK(int(link["mode"])) and link["size"] == len(TARGET)  # type: ignore[call-overload]
    pos = itable * BLOCK + (entries[b"link"][0] - 1) * 256 + 0x28
    assert image[pos : pos + len(TARGET)] == TARGET  # a fast symlink: the target in i_block

    sub = _e4_inode(image, itable, entries[b"dir"][0], ipg)
    big_ino = _e4_entries(_e4_data(image, sub))[b"big"][0]
    big = _e4_inode(image, itable, big_ino, ipg)
    assert big["size"] == len(BIG) and _e4_data(image, big) == BIG
