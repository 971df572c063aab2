/* Superblock (and its sparse_super backups), group descriptors, block and
 * inode bitmaps, the jbd2 journal superblock, and finalize, which writes all
 * the metadata the layout planned. */
#include <stdlib.h>
#include <sys/stat.h>

#include "ext4_int.h"


int e4_pwrite(pyimg_ext4 *h, const pyimg_out *out, const void *buf, size_t len, uint64_t off) {
    return pyimg_out_write(out, buf, len, off, &h->err);
}

static void encode_super(const pyimg_ext4 *h, uint8_t *sb, uint32_t group, const pyimg_ext4_stats *st) {
    const pyimg_ext4_geom *g = &h->g;
    memset(sb, 0, E4_SB_SIZE);
    uint32_t t = (uint32_t)g->epoch;
    put_le32(sb + E4_SB_INODES_COUNT, st->inodes_count);
    put_le32(sb + E4_SB_BLOCKS_COUNT_LO, (uint32_t)g->blocks_count);
    put_le32(sb + E4_SB_R_BLOCKS_COUNT_LO, 0); /* reserved for root: none in an image */
    put_le32(sb + E4_SB_FREE_BLOCKS_LO, (uint32_t)st->free_blocks);
    put_le32(sb + E4_SB_FREE_INODES, (uint32_t)st->free_inodes);
    put_le32(sb + E4_SB_FIRST_DATA_BLOCK, 0); /* 0 with 4 KiB blocks */
    put_le32(sb + E4_SB_LOG_BLOCK_SIZE, 2);   /* log2(4096) - 10 */
    put_le32(sb + E4_SB_LOG_CLUSTER_SIZE, 2); /* cluster size = block size */
    put_le32(sb + E4_SB_BLOCKS_PER_GROUP, g->blocks_per_group);
    put_le32(sb + E4_SB_CLUSTERS_PER_GROUP, g->blocks_per_group);
    put_le32(sb + E4_SB_INODES_PER_GROUP, g->inodes_per_group);
    put_le32(sb + E4_SB_MTIME, t);
    put_le32(sb + E4_SB_WTIME, t);
    put_le16(sb + E4_SB_MNT_COUNT, 0);
    put_le16(sb + E4_SB_MAX_MNT_COUNT, 0xFFFF); /* -1: no forced checks */
    put_le16(sb + E4_SB_MAGIC, E4_SUPER_MAGIC);
    put_le16(sb + E4_SB_STATE, 1);  /* clean */
    put_le16(sb + E4_SB_ERRORS, 1); /* continue */
    put_le32(sb + E4_SB_LASTCHECK, t);
    put_le32(sb + E4_SB_REV_LEVEL, 1); /* dynamic: the fields from s_first_ino on are valid */
    put_le32(sb + E4_SB_FIRST_INO, E4_FIRST_INO);
    put_le16(sb + E4_SB_INODE_SIZE, E4_INODE_SIZE);
    put_le16(sb + E4_SB_BLOCK_GROUP_NR, (uint16_t)group);
    put_le32(sb + E4_SB_FEATURE_COMPAT, g->feature_compat);
    put_le32(sb + E4_SB_FEATURE_INCOMPAT, g->feature_incompat);
    put_le32(sb + E4_SB_FEATURE_RO_COMPAT, g->feature_ro_compat);
    memcpy(sb + E4_SB_UUID, g->uuid, 16);
    memcpy(sb + E4_SB_VOLUME_NAME, g->label, 16);
    if (g->journal_blocks) put_le32(sb + E4_SB_JOURNAL_INUM, E4_JOURNAL_INO);
    memcpy(sb + E4_SB_HASH_SEED, g->hash_seed, 16);
    if (g->feature_incompat & E4_INCOMPAT_CSUM_SEED) put_le32(sb + E4_SB_CHECKSUM_SEED, h->csum_seed);
    sb[E4_SB_DEF_HASH_VERSION] = 1; /* half_md4 */
    sb[E4_SB_JNL_BACKUP_TYPE] = g->journal_blocks ? 1 : 0; /* EXT3_JNL_BACKUP_BLOCKS */
    put_le16(sb + E4_SB_DESC_SIZE, (g->feature_incompat & E4_INCOMPAT_64BIT) ? E4_GD_SIZE_64 : 0);
    put_le32(sb + E4_SB_DEFAULT_MOUNT_OPTS, 0x000C); /* user_xattr, acl */
    put_le32(sb + E4_SB_MKFS_TIME, t);
    /* bits 32..39 of those times (after 2106); the epoch is never negative: the
     * options refuse it */
    uint8_t t_hi = (uint8_t)((uint64_t)g->epoch >> 32);
    sb[E4_SB_WTIME_HI] = t_hi;
    sb[E4_SB_MTIME_HI] = t_hi;
    sb[E4_SB_MKFS_TIME_HI] = t_hi;
    sb[E4_SB_LASTCHECK_HI] = t_hi;
    put_le32(sb + E4_SB_BLOCKS_COUNT_HI, (uint32_t)(g->blocks_count >> 32));
    put_le32(sb + E4_SB_FREE_BLOCKS_HI, (uint32_t)(st->free_blocks >> 32));
    put_le16(sb + E4_SB_MIN_EXTRA_ISIZE, E4_EXTRA_ISIZE);
    put_le16(sb + E4_SB_WANT_EXTRA_ISIZE, E4_EXTRA_ISIZE);
    put_le32(sb + E4_SB_FLAGS, 0x0002); /* EXT2_FLAGS_UNSIGNED_HASH */
    sb[E4_SB_LOG_GROUPS_PER_FLEX] = (uint8_t)g->log_groups_per_flex;
    if (h->csum) sb[E4_SB_CHECKSUM_TYPE] = 1; /* crc32c */
    /* s_jnl_blocks: a copy of the journal inode's i_block, i_size_high, i_size */
    if (g->journal_blocks) {
        uint64_t size = (uint64_t)g->journal_blocks * E4_BS;
        memcpy(sb + E4_SB_JNL_BLOCKS, h->jnl_iblock, 60);
        put_le32(sb + E4_SB_JNL_BLOCKS + 15 * 4, (uint32_t)(size >> 32));
        put_le32(sb + E4_SB_JNL_BLOCKS + 16 * 4, (uint32_t)size);
    }
    if (h->csum) put_le32(sb + E4_SB_CHECKSUM, pyimg_crc32c(~0u, sb, E4_SB_CHECKSUM));
}

static void encode_desc(const pyimg_ext4 *h, uint8_t *d, uint32_t group, uint32_t free_blocks, uint32_t free_inodes,
                        uint32_t dirs, uint32_t bb_csum, uint32_t ib_csum, uint16_t flags) {
    memset(d, 0, h->desc_size);
    uint32_t unused = h->csum ? free_inodes : 0; /* the used inodes are a prefix of every group */
    put_le32(d + E4_GD_BLOCK_BITMAP_LO, (uint32_t)h->bb_loc[group]);
    put_le32(d + E4_GD_INODE_BITMAP_LO, (uint32_t)h->ib_loc[group]);
    put_le32(d + E4_GD_INODE_TABLE_LO, (uint32_t)h->it_loc[group]);
    put_le16(d + E4_GD_FREE_BLOCKS_LO, (uint16_t)free_blocks);
    put_le16(d + E4_GD_FREE_INODES_LO, (uint16_t)free_inodes);
    put_le16(d + E4_GD_USED_DIRS_LO, (uint16_t)dirs);
    put_le16(d + E4_GD_FLAGS, flags);
    put_le16(d + E4_GD_BLOCK_BITMAP_CSUM_LO, h->csum ? (uint16_t)bb_csum : 0);
    put_le16(d + E4_GD_INODE_BITMAP_CSUM_LO, h->csum ? (uint16_t)ib_csum : 0);
    put_le16(d + E4_GD_ITABLE_UNUSED_LO, (uint16_t)unused);
    if (h->desc_size == E4_GD_SIZE_64) {
        put_le32(d + E4_GD_BLOCK_BITMAP_HI, (uint32_t)(h->bb_loc[group] >> 32));
        put_le32(d + E4_GD_INODE_BITMAP_HI, (uint32_t)(h->ib_loc[group] >> 32));
        put_le32(d + E4_GD_INODE_TABLE_HI, (uint32_t)(h->it_loc[group] >> 32));
        put_le16(d + E4_GD_FREE_BLOCKS_HI, (uint16_t)(free_blocks >> 16));
        put_le16(d + E4_GD_FREE_INODES_HI, (uint16_t)(free_inodes >> 16));
        put_le16(d + E4_GD_USED_DIRS_HI, (uint16_t)(dirs >> 16));
        put_le16(d + E4_GD_ITABLE_UNUSED_HI, (uint16_t)(unused >> 16));
        if (h->csum) {
            put_le16(d + E4_GD_BLOCK_BITMAP_CSUM_HI, (uint16_t)(bb_csum >> 16));
            put_le16(d + E4_GD_INODE_BITMAP_CSUM_HI, (uint16_t)(ib_csum >> 16));
        }
    }
    if (h->csum) {
        uint8_t b[4];
        put_le32(b, group);
        uint32_t c = pyimg_crc32c(h->csum_seed, b, 4);
        c = pyimg_crc32c(c, d, h->desc_size);
        put_le16(d + E4_GD_CHECKSUM, (uint16_t)c);
    }
}

static int test_bit(const pyimg_ext4 *h, uint64_t b) {
    return b < h->bmap_bits && (h->bmap[b / 8] >> (b % 8)) & 1;
}

/* Only the part of a group's inode table that holds inode numbers up to max_ino is
 * encoded and written: the rest is zeros, and the region starts as zeros (a new file's
 * holes), so it is left as holes.  The bytes are the same; an image with an explicit
 * --size of 1 TiB then costs its bitmaps, not 16 GiB of zero inode tables. */
static int write_inode_table(pyimg_ext4 *h, const pyimg_out *out, uint32_t group, uint8_t *table, uint8_t *treebuf, size_t treecap) {
    uint32_t ipg = h->g.inodes_per_group;
    uint64_t first = (uint64_t)group * ipg; /* inodes before this group */
    if (first >= h->max_ino) return 0;      /* none of this group's inodes exist */
    uint64_t count = h->max_ino - first < ipg ? h->max_ino - first : ipg;
    size_t blocks = (size_t)((count * E4_INODE_SIZE + E4_BS - 1) / E4_BS);
    memset(table, 0, blocks * E4_BS);
    for (uint32_t k = 0; k < count; k++) {
        uint64_t ino = first + k + 1;
        const e4_inode *in = &h->inodes[ino];
        const e4_extra *x = e4_x(in);
        uint8_t *raw = table + (size_t)k * E4_INODE_SIZE;
        e4_encode_inode(h, (uint32_t)ino, raw);
        if (!in->used) continue;
        if (get_le32(raw + E4_I_FLAGS) & E4_EXTENTS_FL) {
            if ((size_t)x->ntree > treecap) return e4_fail(h, PYIMG_EINVAL, "extent tree buffer too small");
            memset(treebuf, 0, (size_t)x->ntree * E4_BS);
            int rc = e4_encode_extents(h, (uint32_t)ino, raw + E4_I_BLOCK, treebuf);
            if (rc) return rc;
            if (ino == E4_JOURNAL_INO) memcpy(h->jnl_iblock, raw + E4_I_BLOCK, 60);
            for (uint32_t t = 0; t < x->ntree; t++) {
                rc = e4_pwrite(h, out, treebuf + (size_t)t * E4_BS, E4_BS, x->tree[t] * E4_BS);
                if (rc) return rc;
            }
        }
        e4_inode_finish(h, (uint32_t)ino, raw);
    }
    return e4_pwrite(h, out, table, blocks * E4_BS, h->it_loc[group] * E4_BS);
}

static int write_journal(pyimg_ext4 *h, const pyimg_out *out) {
    uint8_t jsb[JBD2_SB_SIZE];
    memset(jsb, 0, sizeof jsb);
    /* an empty journal (s_start 0): nothing to replay */
    put_be32(jsb + JBD2_H_MAGIC, JBD2_MAGIC);
    put_be32(jsb + JBD2_H_BLOCKTYPE, 4); /* superblock v2 */
    put_be32(jsb + JBD2_H_SEQUENCE, 0);
    put_be32(jsb + JBD2_SB_BLOCKSIZE, E4_BS);
    put_be32(jsb + JBD2_SB_MAXLEN, h->g.journal_blocks);
    put_be32(jsb + JBD2_SB_FIRST, 1);
    put_be32(jsb + JBD2_SB_SEQUENCE, 1);
    memcpy(jsb + JBD2_SB_UUID, h->g.uuid, 16);
    put_be32(jsb + JBD2_SB_NR_USERS, 1);
    const e4_extra *j = h->inodes[E4_JOURNAL_INO].x; /* created by the layout */
    return e4_pwrite(h, out, jsb, sizeof jsb, e4_ext_v(&j->own, j->nown)[0].pblk * E4_BS);
}

int pyimg_ext4_finalize(pyimg_ext4 *h, const pyimg_out *out) {
    if (!h->laid_out) return e4_fail(h, PYIMG_EINVAL, "finalize before layout");
    if (h->end > h->g.blocks_count)
        return e4_fail(h, PYIMG_ENOSPC, "the tree needs %llu blocks, the image has %llu",
                       (unsigned long long)h->end, (unsigned long long)h->g.blocks_count);
    /* the whole image must fit its region, its holes at the end included */
    int rc = pyimg_out_check(out, 0, h->g.blocks_count * E4_BS, &h->err);
    if (rc) return rc;
    pyimg_ext4_stats st;
    pyimg_ext4_get_stats(h, &st);
    uint32_t bpg = h->g.blocks_per_group, ipg = h->g.inodes_per_group;
    uint8_t *gdt = calloc(h->gdt_blocks, E4_BS);
    uint8_t *bmp = malloc(E4_BS);
    uint8_t *table = malloc((size_t)h->itb * E4_BS);
    size_t treecap = 0;
    for (uint32_t i = 1; i <= h->max_ino; i++)
        if (e4_x(&h->inodes[i])->ntree > treecap) treecap = e4_x(&h->inodes[i])->ntree;
    uint8_t *treebuf = malloc((treecap ? treecap : 1) * E4_BS);
    uint8_t sb[E4_SB_SIZE];
    if (!gdt || !bmp || !table || !treebuf) {
        rc = e4_fail(h, PYIMG_ENOMEM, "out of memory");
        goto done;
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
        /* A bitmap of zeros is left unwritten: the region starts as zeros (the same
         * bytes, as a hole: most groups of a large --size image are empty). */
        if (!pyimg_all_zero(bmp, E4_BS) && (rc = e4_pwrite(h, out, bmp, E4_BS, h->bb_loc[g] * E4_BS))) goto done;
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
        uint16_t flags = h->csum ? 0x0004 : 0; /* EXT4_BG_INODE_ZEROED: the table reads as zeros past its inodes */
        uint32_t ib_csum = 0;
        if (h->csum && !used_inodes) {
            /* EXT4_BG_INODE_UNINIT: a group without inodes in use has no inode bitmap
             * on disk (kernel and e2fsck take it as zeros), so it is not written: its
             * padding bits would make it the one non-zero block of an empty group. */
            flags |= 0x0001;
        } else {
            for (uint32_t k = ipg; k < E4_BS * 8; k++) bmp[k / 8] |= (uint8_t)(1u << (k % 8));
            ib_csum = pyimg_crc32c(h->csum_seed, bmp, ipg / 8);
            if ((rc = e4_pwrite(h, out, bmp, E4_BS, h->ib_loc[g] * E4_BS))) goto done;
        }
        encode_desc(h, gdt + (size_t)g * h->desc_size, g, free_blocks, ipg - used_inodes, dirs, bb_csum, ib_csum,
                    flags);
        if ((rc = write_inode_table(h, out, g, table, treebuf, treecap))) goto done;
    }
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISDIR(in->mode)) {
            if ((rc = e4_dir_write(h, i, out))) goto done;
        } else if (S_ISLNK(in->mode) && e4_x(in)->symlink_len >= 60) {
            const e4_extra *x = in->x;
            memset(table, 0, E4_BS);
            memcpy(table, x->symlink, x->symlink_len);
            if ((rc = e4_pwrite(h, out, table, E4_BS, e4_ext_v(&x->own, x->nown)[0].pblk * E4_BS))) goto done;
        }
    }
    if ((rc = e4_xattr_write_blocks(h, out))) goto done;
    if (h->g.journal_blocks && (rc = write_journal(h, out))) goto done;
    /* superblock + descriptors in group 0 and every backup group */
    for (uint32_t g = 0; g < h->groups; g++) {
        if (!e4_is_backup_group(g)) continue;
        uint64_t base = (uint64_t)g * bpg * E4_BS;
        encode_super(h, sb, g, &st);
        if ((rc = e4_pwrite(h, out, sb, E4_SB_SIZE, g == 0 ? 1024 : base))) goto done;
        if ((rc = e4_pwrite(h, out, gdt, (size_t)h->gdt_blocks * E4_BS, base + E4_BS))) goto done;
    }
done:
    free(gdt);
    free(bmp);
    free(table);
    free(treebuf);
    return rc;
}
