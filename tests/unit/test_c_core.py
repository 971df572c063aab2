"""The C core's building blocks against independent references."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from pyimg._ffi import ffi, lib
from pyimg.content import C_HASH_MAX, read_batch
from pyimg.errors import SourceError
from pyimg.tree import DataRef

SIZES = [
    0,
    1,
    63,
    64,
    65,
    1023,
    1024,
    1025,
    2048,
    2049,
    3072,
    4095,
    4096,
    4097,
    8192,
    9000,
    65536,
    131073,
    1 << 20,
]


@pytest.mark.parametrize("size", SIZES)
def test_blake3_in_c_matches_the_blake3_package(size: int) -> None:
    data = random.Random(size).randbytes(size)
    out = ffi.new("uint8_t[32]")
    lib.pyimg_blake3(data, len(data), out)
    assert bytes(out) == blake3.blake3(data).digest()


def test_blake3_many_matches_the_blake3_package() -> None:
    # Inputs pooled into SIMD lanes across inputs: every size class around chunk
    # (1 KiB) and lane-group (8 chunks) boundaries, in one batch and in odd order.
    rng = random.Random(7)
    sizes = [*SIZES, 8 * 1024 - 1, 8 * 1024 + 1, 17 * 1024, 33 * 1024 + 5]
    sizes += [rng.randrange(20000) for _ in range(300)]
    rng.shuffle(sizes)
    data = rng.randbytes(sum(sizes))
    lens = ffi.new("uint64_t[]", sizes)
    out = ffi.new("uint8_t[]", 32 * len(sizes))
    lib.pyimg_blake3_many(len(sizes), data, lens, out)
    at = 0
    for i, size in enumerate(sizes):
        assert bytes(out[32 * i : 32 * i + 32]) == blake3.blake3(data[at : at + size]).digest(), size
        at += size


def test_crc32c_check_value() -> None:
    # The CRC-32C check value of "123456789" (RFC 3720 appendix B.4).
    assert lib.pyimg_crc32c(0xFFFFFFFF, b"123456789", 9) ^ 0xFFFFFFFF == 0xE3069283


def _ref(path: Path) -> DataRef:
    st = path.stat()
    return DataRef.at(str(path), 0, st.st_size, (st.st_size, st.st_mtime_ns))


def test_read_batch_reads_and_hashes(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([0, 5, 4096, C_HASH_MAX, C_HASH_MAX + 1, 300_000]):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        files.append(p)
    buffer, digests = read_batch([_ref(p) for p in files])
    assert bytes(buffer) == b"".join(p.read_bytes() for p in files)
    assert digests == [blake3.blake3(p.read_bytes()).digest() for p in files]


def test_read_batch_reads_a_range_of_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "archive"
    p.write_bytes(b"header" + b"payload" + b"trailer")
    buffer, digests = read_batch([DataRef.at(str(p), 6, 7, None)])
    assert bytes(buffer) == b"payload" and digests == [blake3.blake3(b"payload").digest()]


def test_read_batch_names_the_failing_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"x")
    changed = tmp_path / "changed"
    changed.write_bytes(b"y")
    refs = [_ref(good), _ref(changed), DataRef.at(str(tmp_path / "gone"), 0, 1, (1, 0))]
    os.utime(changed, ns=(0, 42))
    with pytest.raises(SourceError) as err:
        read_batch(refs)
    assert err.value.path == str(changed) and "changed while" in err.value.reason
    with pytest.raises(SourceError) as err:
        read_batch(refs[2:])
    assert err.value.path == str(tmp_path / "gone") and "No such file" in err.value.reason


def test_metadata_stream_references_are_final_when_written() -> None:
    """A reference taken before appending points at the appended bytes, even across
    8 KiB block boundaries and with compression (here: a fake that halves)."""
    meta = lib.pyimg_sqfs_meta_new(ffi.NULL, ffi.NULL)  # no compressor: stored raw
    try:
        refs = []
        for i in range(3000):
            refs.append(lib.pyimg_sqfs_meta_ref(meta))
            lib.pyimg_sqfs_meta_append(meta, b"%05d" % i, 5)
        assert lib.pyimg_sqfs_meta_finish(meta) == 0
        data = bytes(ffi.buffer(lib.pyimg_sqfs_meta_data(meta), lib.pyimg_sqfs_meta_size(meta)))
        # Each block: 2-byte header (size | 0x8000 = raw) and up to 8192 bytes.
        for i in (0, 1637, 1638, 2999):
            block, offset = refs[i] >> 16, refs[i] & 0xFFFF
            header = int.from_bytes(data[block : block + 2], "little")
            assert header & 0x8000
            payload = data[block + 2 : block + 2 + (header & 0x7FFF)]
            got = payload[offset : offset + 5]
            if len(got) < 5:  # the value continues in the next block
                nxt = block + 2 + (header & 0x7FFF)
                got += data[nxt + 2 : nxt + 2 + 5 - len(got)]
            assert got == b"%05d" % i
    finally:
        lib.pyimg_sqfs_meta_free(meta)


def _packer_blocks(block_size: int, files: list[bytes], blind: bool, tail: bytes) -> list[dict[str, bytes]]:
    """Pack `files` as one small batch (blind: their digests only), then `tail` as a
    larger file's tail; every closed block with its member records and blind ranges."""
    packer = ffi.gc(lib.pyimg_sqfs_packer_new(block_size), lib.pyimg_sqfs_packer_free)
    n = len(files)
    digests = bytearray(b"".join(blake3.blake3(f).digest() for f in files))
    sizes = ffi.new("uint64_t[]", [len(f) for f in files])
    index, offset, unique = ffi.new("uint32_t[]", n), ffi.new("uint32_t[]", n), ffi.new("uint64_t *")
    data = ffi.NULL if blind else ffi.from_buffer(b"".join(files))
    digests_c = ffi.from_buffer("uint8_t[]", digests)
    assert (
        lib.pyimg_sqfs_packer_add_small(packer, 0, n, sizes, data, digests_c, 1, index, offset, unique) == 0
    )
    where = ffi.new("uint32_t[2]")
    key = blake3.blake3(tail).digest()
    assert lib.pyimg_sqfs_packer_add_tail(packer, tail, len(tail), key, 1, where, where + 1) == 0
    assert lib.pyimg_sqfs_packer_close_block(packer) == 0
    out = []
    members, blinds, lens, size = (
        ffi.new("uint8_t *[1]"),
        ffi.new("uint8_t *[1]"),
        ffi.new("size_t[2]"),
        ffi.new("size_t *"),
    )
    for i in range(lib.pyimg_sqfs_packer_pending(packer)):
        keyed = lib.pyimg_sqfs_packer_members(packer, i, members, lens, blinds, lens + 1)
        assert keyed == 1
        block = {
            "members": bytes(ffi.buffer(members[0], lens[0])),
            "blind": bytes(ffi.buffer(blinds[0], lens[1])) if lens[1] else b"",
        }
        raw = ffi.gc(lib.pyimg_sqfs_packer_take(packer, i, size), lib.pyimg_free)
        block["raw"] = bytes(ffi.buffer(raw, size[0]))
        out.append(block)
    lib.pyimg_sqfs_packer_clear_pending(packer)
    return out


def test_fragment_members_name_the_block_bytes_read_or_blind() -> None:
    """The packer lists each block's members (digest, length u32 LE; frag.c) in the
    order they were appended; packing by digests alone ("blind") gives the same places
    and records, the ranges zeroed and listed as (file, offset, length) little-endian."""
    import struct

    rng = random.Random(11)
    files = [rng.randbytes(rng.randrange(1, 1500)) for _ in range(12)]
    files[7] = files[2]  # a duplicate: stored once, not a member twice
    tail = b"the tail of a larger file"
    read = _packer_blocks(4096, files, False, tail)
    blind = _packer_blocks(4096, files, True, tail)
    assert len(read) == len(blind) > 1
    seen = 0
    for r, b in zip(read, blind, strict=True):
        assert r["members"] == b["members"] and r["blind"] == b""
        records = [r["members"][k : k + 36] for k in range(0, len(r["members"]), 36)]
        expect = b""
        for rec in records:
            digest, length = rec[:32], struct.unpack("<I", rec[32:])[0]
            member = (
                tail
                if digest == blake3.blake3(tail).digest()
                else files[next(i for i, f in enumerate(files) if blake3.blake3(f).digest() == digest)]
            )
            assert len(member) == length
            expect += member
        assert r["raw"] == expect  # the records determine the block's bytes
        for file, offset, length in struct.iter_unpack("<QII", b["blind"]):
            assert b["raw"][offset : offset + length] == bytes(length)
            assert r["raw"][offset : offset + length] == files[file]
            seen += 1
    assert seen == len(files) - 1  # every small file but the duplicate, once
