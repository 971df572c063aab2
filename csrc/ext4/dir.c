/* Linear directory blocks: "." and "..", then the entries, each 8 bytes of
 * header + the name padded to 4; the last entry of a block stretches to the
 * 12-byte checksum tail (metadata_csum) or to the block end. */
#include <stdlib.h>
#include <sys/stat.h>

#include "ext4_int.h"

uint8_t e4_filetype(uint16_t mode) {
    switch (mode & S_IFMT) {
    case S_IFREG: return 1;
    case S_IFDIR: return 2;
    case S_IFCHR: return 3;
    case S_IFBLK: return 4;
    case S_IFIFO: return 5;
    case S_IFSOCK: return 6;
    case S_IFLNK: return 7;
    default: return 0;
    }
}

uint32_t e4_rec_len(uint32_t name_len) { return (E4_DE_HEADER_SIZE + name_len + 3) & ~3u; }

uint32_t e4_leaf_room(const pyimg_ext4 *h) { return h->csum ? E4_BS - E4_DT_SIZE : E4_BS; }

/* Linear directories larger than a block (dir_index off): entries packed in
 * name order, block 0 starting with "." and ".."; leaf_start[] marks blocks. */
static int linear_plan(pyimg_ext4 *h, e4_extra *in) {
    uint32_t room = e4_leaf_room(h), fill = 24;
    size_t n = 1;
    for (size_t i = 0; i < in->ndents; i++) {
        uint32_t r = e4_rec_len(in->dents[i].len);
        if (fill + r > room) {
            n++;
            fill = 0;
        }
        fill += r;
    }
    in->leaf_start = malloc((n + 1) * sizeof *in->leaf_start);
    if (!in->leaf_start) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    fill = 24;
    n = 0;
    in->leaf_start[n++] = 0;
    for (size_t i = 0; i < in->ndents; i++) {
        uint32_t r = e4_rec_len(in->dents[i].len);
        if (fill + r > room) {
            in->leaf_start[n++] = i;
            fill = 0;
        }
        fill += r;
    }
    in->leaf_start[n] = in->ndents;
    in->nleaves = (uint32_t)n;
    in->dir_blocks = (uint32_t)n;
    in->htree_levels = -1;
    return 0;
}

/* The caller created the directory's extra part (it holds the results). */
int e4_dir_plan(pyimg_ext4 *h, uint32_t ino) {
    e4_extra *in = h->inodes[ino].x;
    uint32_t need = 12 + 12; /* "." and ".." */
    for (size_t i = 0; i < in->ndents; i++) need += e4_rec_len(in->dents[i].len);
    if (need <= e4_leaf_room(h)) {
        in->dir_blocks = 1;
        in->htree_levels = -1;
        return 0;
    }
    if (!(h->g.feature_compat & E4_COMPAT_DIR_INDEX)) return linear_plan(h, in);
    return e4_htree_plan(h, in);
}

/* The checksum tail of a leaf block: crc32c over everything before it. */
void e4_dirblock_tail(pyimg_ext4 *h, uint32_t ino, uint8_t *blk) {
    if (!h->csum) return;
    uint8_t *t = blk + E4_BS - E4_DT_SIZE;
    put_le32(t + E4_DT_RESERVED_ZERO1, 0);
    put_le16(t + E4_DT_REC_LEN, E4_DT_SIZE);
    t[E4_DT_RESERVED_ZERO2] = 0;
    t[E4_DT_RESERVED_FT] = E4_DT_RESERVED_FT_VALUE;
    put_le32(t + E4_DT_CHECKSUM, pyimg_crc32c(e4_inode_seed(h, ino), blk, E4_BS - E4_DT_SIZE));
}

uint32_t e4_put_dirent(uint8_t *p, uint32_t ino, const uint8_t *name, uint32_t len, uint8_t type, uint32_t rlen) {
    put_le32(p + E4_DE_INODE, ino);
    put_le16(p + E4_DE_REC_LEN, (uint16_t)rlen);
    p[E4_DE_NAME_LEN] = (uint8_t)len;
    p[E4_DE_FILE_TYPE] = type;
    if (len) memcpy(p + E4_DE_NAME, name, len);
    return rlen;
}

uint32_t e4_put_dots(pyimg_ext4 *h, uint32_t ino, uint8_t *blk, uint32_t dotdot_rec_len) {
    uint8_t dt = (h->g.feature_incompat & E4_INCOMPAT_FILETYPE) ? 2 : 0;
    e4_put_dirent(blk, ino, (const uint8_t *)".", 1, dt, 12);
    e4_put_dirent(blk + 12, h->inodes[ino].parent, (const uint8_t *)"..", 2, dt, dotdot_rec_len);
    return 24;
}

uint8_t e4_dirent_type(const pyimg_ext4 *h, uint32_t ino) {
    if (!(h->g.feature_incompat & E4_INCOMPAT_FILETYPE)) return 0;
    return e4_filetype(h->inodes[ino].mode);
}

/* Packs entries [lo, hi) of `in` into one leaf block (blk zeroed by the caller). */
void e4_dir_leaf(pyimg_ext4 *h, uint32_t ino, const e4_dirent *d, size_t n, uint8_t *blk, uint32_t pos) {
    uint32_t room = e4_leaf_room(h);
    uint32_t last = pos;
    for (size_t i = 0; i < n; i++) {
        last = pos;
        pos += e4_put_dirent(blk + pos, d[i].ino, e4_dirent_name(h, &d[i]), d[i].len, e4_dirent_type(h, d[i].ino),
                          e4_rec_len(d[i].len));
    }
    if (n == 0 && pos == 0) {
        e4_put_dirent(blk, 0, NULL, 0, 0, room); /* an empty block: one unused entry */
    } else {
        put_le16(blk + last + E4_DE_REC_LEN, (uint16_t)(room - last)); /* the last entry takes the rest */
    }
    e4_dirblock_tail(h, ino, blk);
}

static uint64_t lblk_to_pblk(const e4_extra *x, uint32_t lblk) {
    const e4_extent *v = e4_ext_v(&x->own, x->nown);
    for (uint32_t i = 0; i < x->nown; i++)
        if (lblk >= v[i].lblk && lblk < v[i].lblk + v[i].len) return v[i].pblk + (lblk - v[i].lblk);
    return 0;
}

int e4_dir_write(pyimg_ext4 *h, uint32_t ino, const pyimg_out *out) {
    const e4_extra *in = h->inodes[ino].x; /* every directory has one after the layout */
    uint8_t *blocks = calloc(in->dir_blocks, E4_BS);
    if (!blocks) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    int rc = 0;
    if (in->htree_levels < 0) {
        if (in->ndents == 0) {
            e4_put_dots(h, ino, blocks, e4_leaf_room(h) - 12); /* ".." takes the rest */
            e4_dirblock_tail(h, ino, blocks);
        } else if (in->dir_blocks == 1) {
            e4_dir_leaf(h, ino, in->dents, in->ndents, blocks, e4_put_dots(h, ino, blocks, 12));
        } else {
            uint32_t dots = e4_put_dots(h, ino, blocks, 12);
            for (uint32_t b = 0; b < in->nleaves; b++)
                e4_dir_leaf(h, ino, in->dents + in->leaf_start[b], in->leaf_start[b + 1] - in->leaf_start[b],
                            blocks + (size_t)b * E4_BS, b == 0 ? dots : 0);
        }
    } else {
        rc = e4_htree_write(h, ino, blocks);
    }
    for (uint32_t b = 0; rc == 0 && b < in->dir_blocks; b++)
        rc = e4_pwrite(h, out, blocks + (size_t)b * E4_BS, E4_BS, lblk_to_pblk(in, b) * E4_BS);
    free(blocks);
    return rc;
}
