/* 256-byte inodes: the 128-byte base, 32 bytes of extra fields (nanosecond
 * times, creation time, checksum high half) and in-inode xattrs after them. */
#include <sys/stat.h>

#include "ext4_int.h"

/* The extra fields pyimg writes are exactly what i_extra_isize claims, and the
 * in-inode xattrs that follow them fit the inode. */
_Static_assert(E4_I_GOOD_OLD_SIZE + E4_EXTRA_ISIZE == E4_I_EXTRA_END, "i_extra_isize covers the extra fields");
_Static_assert(E4_I_EXTRA_END < E4_INODE_SIZE, "room for in-inode xattrs");

/* Per-inode checksum seed: crc32c(fs seed, inode number, generation 0). */
uint32_t e4_inode_seed(const pyimg_ext4 *h, uint32_t ino) {
    uint8_t b[4];
    put_le32(b, ino);
    uint32_t c = pyimg_crc32c(h->csum_seed, b, 4);
    put_le32(b, 0);
    return pyimg_crc32c(c, b, 4);
}

/* Seconds beyond 32 bits go to the two epoch bits of the *_extra field. */
static uint32_t time_extra(int64_t sec, uint32_t nsec) {
    uint32_t epoch = (uint32_t)(((uint64_t)(sec - (int64_t)(int32_t)(uint32_t)sec) >> 32) & 3u);
    return (nsec << 2) | epoch;
}

static void put_devices(uint8_t *i_block, uint32_t major, uint32_t minor) {
    if (major < 256 && minor < 256) {
        put_le32(i_block, (major << 8) | minor); /* old encoding */
    } else {
        put_le32(i_block + 4, (minor & 0xffu) | (major << 8) | ((minor & ~0xffu) << 12));
    }
}

void e4_encode_inode(pyimg_ext4 *h, uint32_t ino, uint8_t *raw) {
    const e4_inode *in = &h->inodes[ino];
    const e4_extra *x = e4_x(in);
    memset(raw, 0, E4_INODE_SIZE);
    if (!in->used) return; /* reserved inodes stay zero: all-zero inodes pass the checksum check */
    uint32_t t = (uint32_t)in->mtime;
    uint32_t tx = time_extra(in->mtime, in->mtime_nsec);
    uint32_t flags = 0;
    put_le16(raw + E4_I_MODE, in->mode);
    put_le16(raw + E4_I_UID, (uint16_t)in->uid);
    put_le32(raw + E4_I_SIZE_LO, (uint32_t)in->size);
    put_le32(raw + E4_I_ATIME, t);
    put_le32(raw + E4_I_CTIME, t);
    put_le32(raw + E4_I_MTIME, t);
    put_le16(raw + E4_I_GID, (uint16_t)in->gid);
    put_le16(raw + E4_I_LINKS_COUNT, in->links);
    uint64_t sectors = in->i_blocks * (E4_BS / 512);
    put_le32(raw + E4_I_BLOCKS_LO, (uint32_t)sectors);
    uint8_t *i_block = raw + E4_I_BLOCK;
    if (S_ISLNK(in->mode) && x->symlink_len < 60) {
        if (x->symlink_len) memcpy(i_block, x->symlink, x->symlink_len); /* fast symlink */
    } else if (S_ISCHR(in->mode) || S_ISBLK(in->mode)) {
        put_devices(i_block, x->rdev_major, x->rdev_minor);
    } else if (S_ISREG(in->mode) || S_ISDIR(in->mode) || S_ISLNK(in->mode)) {
        flags |= E4_EXTENTS_FL;
        /* tree blocks are encoded and written by the caller (finalize) */
    }
    if (S_ISDIR(in->mode) && x->htree_levels >= 0) flags |= E4_INDEX_FL;
    put_le32(raw + E4_I_FLAGS, flags);
    put_le32(raw + E4_I_GENERATION, 0);
    if (x->xblock >= 0) {
        uint64_t b = h->xblocks[x->xblock].pblk;
        put_le32(raw + E4_I_FILE_ACL_LO, (uint32_t)b);
        put_le16(raw + E4_I_FILE_ACL_HIGH, (uint16_t)(b >> 32));
    }
    put_le32(raw + E4_I_SIZE_HIGH, (uint32_t)(in->size >> 32));
    put_le16(raw + E4_I_BLOCKS_HIGH, (uint16_t)(sectors >> 32));
    put_le16(raw + E4_I_UID_HIGH, (uint16_t)(in->uid >> 16));
    put_le16(raw + E4_I_GID_HIGH, (uint16_t)(in->gid >> 16));
    put_le16(raw + E4_I_EXTRA_ISIZE, E4_EXTRA_ISIZE);
    put_le32(raw + E4_I_CTIME_EXTRA, tx);
    put_le32(raw + E4_I_MTIME_EXTRA, tx);
    put_le32(raw + E4_I_ATIME_EXTRA, tx);
    put_le32(raw + E4_I_CRTIME, t);
    put_le32(raw + E4_I_CRTIME_EXTRA, tx);
    e4_xattr_inode_body(h, in, raw);
}

/* Checksum over the whole inode with both checksum fields zero (they are). */
static void inode_csum(const pyimg_ext4 *h, uint32_t ino, uint8_t *raw) {
    uint32_t c = pyimg_crc32c(e4_inode_seed(h, ino), raw, E4_INODE_SIZE);
    put_le16(raw + E4_I_CHECKSUM_LO, (uint16_t)c);
    put_le16(raw + E4_I_CHECKSUM_HI, (uint16_t)(c >> 16));
}

void e4_inode_finish(const pyimg_ext4 *h, uint32_t ino, uint8_t *raw) {
    if (h->csum && h->inodes[ino].used) inode_csum(h, ino, raw);
}
