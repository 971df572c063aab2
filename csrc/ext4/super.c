/* Superblock (and its sparse_super backups), group descriptors, block and
 * inode bitmaps, the jbd2 journal superblock, and finalize, which writes all
 * the metadata the layout planned. */
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ext4_int.h"

#define SB_SIZE 1024u
#define GD_SIZE_64 64u
_Static_assert(SB_SIZE == 1024, "superblock size");
_Static_assert(GD_SIZE_64 == 64, "group descriptor size");

int e4_pwrite(pyimg_ext4 *h, int fd, const void *buf, size_t len, uint64_t off) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return e4_fail(h, n < 0 && errno == ENOSPC ? PYIMG_ENOSPC : PYIMG_EIO, "writing the image: %s", n < 0 ? strerror(errno) : "short write");
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static void encode_super(const pyimg_ext4 *h, uint8_t *sb, uint32_t group, const pyimg_ext4_stats *st) {
    const pyimg_ext4_geom *g = &h->g;
    memset(sb, 0, SB_SIZE);
    uint32_t t = (uint32_t)g->epoch;
    put_le32(sb + 0, st->inodes_count);
    put_le32(sb + 4, (uint32_t)g->blocks_count);
    put_le32(sb + 8, 0); /* reserved for root: none in an image */
    put_le32(sb + 12, (uint32_t)st->free_blocks);
    put_le32(sb + 16, (uint32_t)st->free_inodes);
    put_le32(sb + 20, 0);  /* first data block (4 KiB blocks) */
    put_le32(sb + 24, 2);  /* log2(4096) - 10 */
    put_le32(sb + 28, 2);  /* cluster size = block size */
    put_le32(sb + 32, g->blocks_per_group);
    put_le32(sb + 36, g->blocks_per_group);
    put_le32(sb + 40, g->inodes_per_group);
    put_le32(sb + 44, t);  /* s_mtime */
    put_le32(sb + 48, t);  /* s_wtime */
    put_le16(sb + 52, 0);  /* s_mnt_count */
    put_le16(sb + 54, 0xFFFF); /* s_max_mnt_count: -1, no forced checks */
    put_le16(sb + 56, 0xEF53);
    put_le16(sb + 58, 1);  /* state: clean */
    put_le16(sb + 60, 1);  /* errors: continue */
    put_le32(sb + 64, t);  /* s_lastcheck */
    put_le32(sb + 76, 1);  /* dynamic revision */
    put_le32(sb + 84, E4_FIRST_INO);
    put_le16(sb + 88, E4_INODE_SIZE);
    put_le16(sb + 90, (uint16_t)group);
    put_le32(sb + 92, g->feature_compat);
    put_le32(sb + 96, g->feature_incompat);
    put_le32(sb + 100, g->feature_ro_compat);
    memcpy(sb + 104, g->uuid, 16);
    memcpy(sb + 120, g->label, 16);
    if (g->journal_blocks) put_le32(sb + 224, E4_JOURNAL_INO);
    memcpy(sb + 236, g->hash_seed, 16);
    sb[252] = 1; /* s_def_hash_version: half_md4 */
    sb[253] = g->journal_blocks ? 1 : 0; /* s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS */
    put_le16(sb + 254, (g->feature_incompat & E4_INCOMPAT_64BIT) ? GD_SIZE_64 : 0);
    put_le32(sb + 256, 0x000C); /* default mount options: user_xattr, acl */
    put_le32(sb + 264, t);      /* s_mkfs_time */
    /* bits 32..39 of those times (after 2106): s_wtime_hi, s_mtime_hi, s_mkfs_time_hi,
     * s_lastcheck_hi (the epoch is never negative: the options refuse it) */
    uint8_t t_hi = (uint8_t)((uint64_t)g->epoch >> 32);
    sb[0x274] = t_hi;
    sb[0x275] = t_hi;
    sb[0x276] = t_hi;
    sb[0x277] = t_hi;
    put_le32(sb + 336, (uint32_t)(g->blocks_count >> 32));
    put_le32(sb + 344, (uint32_t)(st->free_blocks >> 32));
    put_le16(sb + 348, E4_EXTRA_ISIZE); /* s_min_extra_isize */
    put_le16(sb + 350, E4_EXTRA_ISIZE); /* s_want_extra_isize */
    put_le32(sb + 352, 0x0002);         /* s_flags: EXT2_FLAGS_UNSIGNED_HASH */
    sb[372] = (uint8_t)g->log_groups_per_flex;
    if (h->csum) sb[373] = 1; /* s_checksum_type: crc32c */
    /* s_jnl_blocks: a copy of the journal inode's i_block, i_size_high, i_size */
    if (g->journal_blocks) {
        uint64_t size = (uint64_t)g->journal_blocks * E4_BS;
        memcpy(sb + 268, h->jnl_iblock, 60);
        put_le32(sb + 268 + 60, (uint32_t)(size >> 32));
        put_le32(sb + 268 + 64, (uint32_t)size);
    }
    if (h->csum) put_le32(sb + 1020, pyimg_crc32c(~0u, sb, 1020));
}

static void encode_desc(const pyimg_ext4 *h, uint8_t *d, uint32_t group, uint32_t free_blocks, uint32_t free_inodes,
                        uint32_t dirs, uint32_t bb_csum, uint32_t ib_csum) {
    memset(d, 0, h->desc_size);
    uint32_t unused = h->csum ? free_inodes : 0; /* the used inodes are a prefix of every group */
    put_le32(d + 0, (uint32_t)h->bb_loc[group]);
    put_le32(d + 4, (uint32_t)h->ib_loc[group]);
    put_le32(d + 8, (uint32_t)h->it_loc[group]);
    put_le16(d + 12, (uint16_t)free_blocks);
    put_le16(d + 14, (uint16_t)free_inodes);
    put_le16(d + 16, (uint16_t)dirs);
    put_le16(d + 18, h->csum ? 0x0004 : 0); /* EXT4_BG_INODE_ZEROED: tables are written whole */
    put_le16(d + 24, h->csum ? (uint16_t)bb_csum : 0);
    put_le16(d + 26, h->csum ? (uint16_t)ib_csum : 0);
    put_le16(d + 28, (uint16_t)unused);
    if (h->desc_size == GD_SIZE_64) {
        put_le32(d + 32, (uint32_t)(h->bb_loc[group] >> 32));
        put_le32(d + 36, (uint32_t)(h->ib_loc[group] >> 32));
        put_le32(d + 40, (uint32_t)(h->it_loc[group] >> 32));
        put_le16(d + 44, (uint16_t)(free_blocks >> 16));
        put_le16(d + 46, (uint16_t)(free_inodes >> 16));
        put_le16(d + 48, (uint16_t)(dirs >> 16));
        put_le16(d + 50, (uint16_t)(unused >> 16));
        if (h->csum) {
            put_le16(d + 56, (uint16_t)(bb_csum >> 16));
            put_le16(d + 58, (uint16_t)(ib_csum >> 16));
        }
    }
    if (h->csum) {
        uint8_t b[4];
        put_le32(b, group);
        uint32_t c = pyimg_crc32c(h->csum_seed, b, 4);
        c = pyimg_crc32c(c, d, h->desc_size);
        put_le16(d + 30, (uint16_t)c);
    }
}

static int test_bit(const pyimg_ext4 *h, uint64_t b) {
    return b < h->bmap_bits && (h->bmap[b / 8] >> (b % 8)) & 1;
}

static int write_inode_table(pyimg_ext4 *h, int fd, uint32_t group, uint8_t *table, uint8_t *treebuf, size_t treecap) {
    uint32_t ipg = h->g.inodes_per_group;
    memset(table, 0, (size_t)h->itb * E4_BS);
    for (uint32_t k = 0; k < ipg; k++) {
        uint64_t ino = (uint64_t)group * ipg + k + 1;
        if (ino > h->max_ino) break;
        const e4_inode *in = &h->inodes[ino];
        const e4_extra *x = e4_x(in);
        uint8_t *raw = table + (size_t)k * E4_INODE_SIZE;
        e4_encode_inode(h, (uint32_t)ino, raw);
        if (!in->used) continue;
        if (get_le32(raw + 32) & E4_EXTENTS_FL) {
            if ((size_t)x->ntree > treecap) return e4_fail(h, PYIMG_EINVAL, "extent tree buffer too small");
            memset(treebuf, 0, (size_t)x->ntree * E4_BS);
            int rc = e4_encode_extents(h, (uint32_t)ino, raw + 40, treebuf);
            if (rc) return rc;
            if (ino == E4_JOURNAL_INO) memcpy(h->jnl_iblock, raw + 40, 60);
            for (uint32_t t = 0; t < x->ntree; t++) {
                rc = e4_pwrite(h, fd, treebuf + (size_t)t * E4_BS, E4_BS, x->tree[t] * E4_BS);
                if (rc) return rc;
            }
        }
        e4_inode_finish(h, (uint32_t)ino, raw);
    }
    return e4_pwrite(h, fd, table, (size_t)h->itb * E4_BS, h->it_loc[group] * E4_BS);
}

static int write_journal(pyimg_ext4 *h, int fd) {
    uint8_t jsb[1024];
    memset(jsb, 0, sizeof jsb);
    /* jbd2 is big-endian */
    uint32_t v[] = {0xC03B3998u, 4 /* superblock v2 */, 0, E4_BS, h->g.journal_blocks, 1 /* s_first */, 1 /* s_sequence */};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        jsb[4 * i] = (uint8_t)(v[i] >> 24);
        jsb[4 * i + 1] = (uint8_t)(v[i] >> 16);
        jsb[4 * i + 2] = (uint8_t)(v[i] >> 8);
        jsb[4 * i + 3] = (uint8_t)v[i];
    }
    memcpy(jsb + 0x30, h->g.uuid, 16);
    jsb[0x43] = 1; /* s_nr_users = 1 (big-endian) */
    const e4_extra *j = h->inodes[E4_JOURNAL_INO].x; /* created by the layout */
    return e4_pwrite(h, fd, jsb, sizeof jsb, e4_ext_v(&j->own, j->nown)[0].pblk * E4_BS);
}

int pyimg_ext4_finalize(pyimg_ext4 *h, int fd) {
    if (!h->laid_out) return e4_fail(h, PYIMG_EINVAL, "finalize before layout");
    if (h->end > h->g.blocks_count)
        return e4_fail(h, PYIMG_ENOSPC, "the tree needs %llu blocks, the image has %llu",
                       (unsigned long long)h->end, (unsigned long long)h->g.blocks_count);
    pyimg_ext4_stats st;
    pyimg_ext4_get_stats(h, &st);
    int rc = 0;
    uint32_t bpg = h->g.blocks_per_group, ipg = h->g.inodes_per_group;
    uint8_t *gdt = calloc(h->gdt_blocks, E4_BS);
    uint8_t *bmp = malloc(E4_BS);
    uint8_t *table = malloc((size_t)h->itb * E4_BS);
    size_t treecap = 0;
    for (uint32_t i = 1; i <= h->max_ino; i++)
        if (e4_x(&h->inodes[i])->ntree > treecap) treecap = e4_x(&h->inodes[i])->ntree;
    uint8_t *treebuf = malloc((treecap ? treecap : 1) * E4_BS);
    uint8_t sb[SB_SIZE];
    if (!gdt || !bmp || !table || !treebuf) {
        rc = e4_fail(h, PYIMG_ENOMEM, "out of memory");
        goto out;
    }
    for (uint32_t g = 0; g < h->groups; g++) {
        uint64_t first = (uint64_t)g * bpg;
        uint64_t last = first + bpg; /* exclusive */
        uint32_t free_blocks = 0;
        memset(bmp, 0, E4_BS);
        int backup = e4_is_backup_group(g);
        for (uint64_t b = first; b < last; b++) {
            int used = b >= h->g.blocks_count /* past the end: padding bits set */
                       || test_bit(h, b) || (backup && b - first < 1 + (uint64_t)h->gdt_blocks);
            if (used) bmp[(b - first) / 8] |= (uint8_t)(1u << ((b - first) % 8));
            else free_blocks++;
        }
        uint32_t bb_csum = pyimg_crc32c(h->csum_seed, bmp, bpg / 8);
        if ((rc = e4_pwrite(h, fd, bmp, E4_BS, h->bb_loc[g] * E4_BS))) goto out;
        /* inode bitmap: inodes 1..max_ino are in use; bits past ipg are padding (set) */
        memset(bmp, 0, E4_BS);
        uint32_t used_inodes = 0, dirs = 0;
        for (uint32_t k = 0; k < ipg; k++) {
            uint64_t ino = (uint64_t)g * ipg + k + 1;
            if (ino > h->max_ino) break;
            bmp[k / 8] |= (uint8_t)(1u << (k % 8));
            used_inodes++;
            if (h->inodes[ino].used && S_ISDIR(h->inodes[ino].mode)) dirs++;
        }
        for (uint32_t k = ipg; k < E4_BS * 8; k++) bmp[k / 8] |= (uint8_t)(1u << (k % 8));
        uint32_t ib_csum = pyimg_crc32c(h->csum_seed, bmp, ipg / 8);
        if ((rc = e4_pwrite(h, fd, bmp, E4_BS, h->ib_loc[g] * E4_BS))) goto out;
        encode_desc(h, gdt + (size_t)g * h->desc_size, g, free_blocks, ipg - used_inodes, dirs, bb_csum, ib_csum);
        if ((rc = write_inode_table(h, fd, g, table, treebuf, treecap))) goto out;
    }
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISDIR(in->mode)) {
            if ((rc = e4_dir_write(h, i, fd))) goto out;
        } else if (S_ISLNK(in->mode) && e4_x(in)->symlink_len >= 60) {
            const e4_extra *x = in->x;
            memset(table, 0, E4_BS);
            memcpy(table, x->symlink, x->symlink_len);
            if ((rc = e4_pwrite(h, fd, table, E4_BS, e4_ext_v(&x->own, x->nown)[0].pblk * E4_BS))) goto out;
        }
    }
    if ((rc = e4_xattr_write_blocks(h, fd))) goto out;
    if (h->g.journal_blocks && (rc = write_journal(h, fd))) goto out;
    /* superblock + descriptors in group 0 and every backup group */
    for (uint32_t g = 0; g < h->groups; g++) {
        if (!e4_is_backup_group(g)) continue;
        uint64_t base = (uint64_t)g * bpg * E4_BS;
        encode_super(h, sb, g, &st);
        if ((rc = e4_pwrite(h, fd, sb, SB_SIZE, g == 0 ? 1024 : base))) goto out;
        if ((rc = e4_pwrite(h, fd, gdt, (size_t)h->gdt_blocks * E4_BS, base + E4_BS))) goto out;
    }
    if (ftruncate(fd, (off_t)(h->g.blocks_count * E4_BS)) != 0) rc = e4_fail(h, PYIMG_EIO, "sizing the image: %s", strerror(errno));
out:
    free(gdt);
    free(bmp);
    free(table);
    free(treebuf);
    return rc;
}
