/* Extent trees: up to 4 extents live in i_block; more get leaf blocks of 340
 * extents and, above them, index blocks of 340 entries, until the top level
 * has at most 4 entries, which i_block holds. */
#include <stdlib.h>
#include <sys/stat.h>

#include "ext4_int.h"


/* Tree blocks needed for n extents (0 when i_block holds them all). */
uint32_t e4_tree_blocks(size_t n) {
    uint32_t total = 0;
    while (n > 4) {
        n = (n + E4_EXT_PER_BLOCK - 1) / E4_EXT_PER_BLOCK;
        total += (uint32_t)n;
    }
    return total;
}

static void put_header(uint8_t *p, uint16_t entries, uint16_t max, uint16_t depth) {
    put_le16(p + E4_EH_MAGIC, E4_EXT_MAGIC);
    put_le16(p + E4_EH_ENTRIES, entries);
    put_le16(p + E4_EH_MAX, max);
    put_le16(p + E4_EH_DEPTH, depth);
    put_le32(p + E4_EH_GENERATION, 0);
}

static void put_extent(uint8_t *p, const e4_extent *e) {
    put_le32(p + E4_EE_BLOCK, e->lblk);
    put_le16(p + E4_EE_LEN, (uint16_t)e->len);
    put_le16(p + E4_EE_START_HI, (uint16_t)(e->pblk >> 32));
    put_le32(p + E4_EE_START_LO, (uint32_t)e->pblk);
}

static void put_index(uint8_t *p, uint32_t lblk, uint64_t pblk) {
    put_le32(p + E4_EI_BLOCK, lblk);
    put_le32(p + E4_EI_LEAF_LO, (uint32_t)pblk);
    put_le16(p + E4_EI_LEAF_HI, (uint16_t)(pblk >> 32));
    put_le16(p + E4_EI_UNUSED, 0);
}

static void block_tail(pyimg_ext4 *h, uint32_t ino, uint8_t *blk) {
    /* ext4_extent_tail right after the 340 slots: crc32c over the block before it */
    uint32_t end = E4_EH_SIZE + E4_EXT_PER_BLOCK * E4_EE_SIZE;
    if (h->csum) put_le32(blk + end, pyimg_crc32c(e4_inode_seed(h, ino), blk, end));
}

/* Encodes the extents of `ino` into i_block and, when it needs a tree, into
 * `blocks` (ntree * 4096 bytes, zeroed by the caller, written at x->tree[]). */
int e4_encode_extents(pyimg_ext4 *h, uint32_t ino, uint8_t i_block[60], uint8_t *blocks) {
    const e4_inode *in = &h->inodes[ino];
    const e4_extra *x = e4_x(in);
    const e4_extent *ev;
    size_t n;
    if (S_ISREG(in->mode) && in->content >= 0) {
        const e4_content *ct = &h->contents[in->content];
        ev = e4_ext_v(&ct->ext, ct->next);
        n = ct->next;
    } else {
        ev = e4_ext_v(&x->own, x->nown);
        n = x->nown;
    }
    if (n <= 4) {
        put_header(i_block, (uint16_t)n, 4, 0);
        for (size_t i = 0; i < n; i++) put_extent(i_block + E4_EH_SIZE + E4_EE_SIZE * i, &ev[i]);
        return 0;
    }
    /* level 0: leaves */
    size_t nodes = (n + E4_EXT_PER_BLOCK - 1) / E4_EXT_PER_BLOCK;
    uint32_t *first = malloc(nodes * sizeof *first); /* first logical block of each node */
    uint64_t *where = malloc(nodes * sizeof *where);
    if (!first || !where) {
        free(first);
        free(where);
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    }
    size_t used = 0; /* tree blocks consumed */
    for (size_t b = 0; b < nodes; b++) {
        uint8_t *blk = blocks + (used + b) * E4_BS;
        size_t lo = b * E4_EXT_PER_BLOCK, cnt = n - lo < E4_EXT_PER_BLOCK ? n - lo : E4_EXT_PER_BLOCK;
        put_header(blk, (uint16_t)cnt, E4_EXT_PER_BLOCK, 0);
        for (size_t i = 0; i < cnt; i++) put_extent(blk + E4_EH_SIZE + E4_EE_SIZE * i, &ev[lo + i]);
        block_tail(h, ino, blk);
        first[b] = ev[lo].lblk;
        where[b] = x->tree[used + b];
    }
    used += nodes;
    uint16_t depth = 1;
    while (nodes > 4) {
        size_t up = (nodes + E4_EXT_PER_BLOCK - 1) / E4_EXT_PER_BLOCK;
        for (size_t b = 0; b < up; b++) {
            uint8_t *blk = blocks + (used + b) * E4_BS;
            size_t lo = b * E4_EXT_PER_BLOCK, cnt = nodes - lo < E4_EXT_PER_BLOCK ? nodes - lo : E4_EXT_PER_BLOCK;
            put_header(blk, (uint16_t)cnt, E4_EXT_PER_BLOCK, depth);
            for (size_t i = 0; i < cnt; i++) put_index(blk + E4_EH_SIZE + E4_EI_SIZE * i, first[lo + i], where[lo + i]);
            block_tail(h, ino, blk);
            /* compacting in place is safe: entry b is read from index >= b */
            first[b] = first[lo];
            where[b] = x->tree[used + b];
        }
        used += up;
        nodes = up;
        depth++;
    }
    put_header(i_block, (uint16_t)nodes, 4, depth);
    for (size_t i = 0; i < nodes; i++) put_index(i_block + E4_EH_SIZE + E4_EI_SIZE * i, first[i], where[i]);
    free(first);
    free(where);
    return 0;
}
