/* Extended attributes: entries sorted by (index, name length, name); as many
 * as fit go into the inode body after the extra fields (magic + entries +
 * values, offsets relative to the first entry), the rest into one external
 * block (32-byte header, entries, values from the end).  Identical blocks are
 * stored once with a reference count (at most 1024 users, as the kernel). */
#include <stdlib.h>

#include "ext4_int.h"

#define XBLOCK_REFCOUNT_MAX 1024u
#define IBODY_START E4_I_EXTRA_END                                         /* magic here */
#define IBODY_ROOM (E4_INODE_SIZE - IBODY_START - E4_XATTR_IBODY_HEADER_SIZE) /* after the magic */

static uint32_t pad4(uint32_t n) { return (n + 3) & ~3u; }
static uint32_t entry_size(const e4_xattr *x) { return pad4(E4_XE_HEADER_SIZE + x->name_len); }

static int cmp_xattr(const void *a, const void *b) {
    const e4_xattr *x = a, *y = b;
    if (x->index != y->index) return x->index < y->index ? -1 : 1;
    if (x->name_len != y->name_len) return x->name_len < y->name_len ? -1 : 1;
    return memcmp(x->name, y->name, x->name_len);
}

static uint32_t entry_hash(const e4_xattr *x) {
    uint32_t hash = 0;
    for (uint32_t i = 0; i < x->name_len; i++) hash = (hash << 5) ^ (hash >> 27) ^ x->name[i];
    uint8_t w[4];
    for (uint32_t off = 0; off < x->value_len; off += 4) {
        memset(w, 0, 4);
        memcpy(w, x->value + off, x->value_len - off < 4 ? x->value_len - off : 4);
        hash = (hash << 16) ^ (hash >> 16) ^ get_le32(w);
    }
    return hash;
}

/* Encodes entries [lo, hi) into `region` of `size` bytes; entries start at
 * `first`, value offsets count from `base`.  Returns the block hash. */
static uint32_t encode(const e4_xattr *xs, size_t lo, size_t hi, uint8_t *region, uint32_t size, uint32_t first,
                       uint32_t base, int with_hash) {
    uint32_t pos = first, vend = size, bhash = 0;
    for (size_t i = lo; i < hi; i++) {
        const e4_xattr *x = &xs[i];
        vend -= pad4(x->value_len);
        uint8_t *e = region + pos;
        uint32_t hash = with_hash ? entry_hash(x) : 0;
        e[E4_XE_NAME_LEN] = x->name_len;
        e[E4_XE_NAME_INDEX] = x->index;
        put_le16(e + E4_XE_VALUE_OFFS, (uint16_t)(x->value_len ? vend - base : 0));
        put_le32(e + E4_XE_VALUE_INUM, 0);
        put_le32(e + E4_XE_VALUE_SIZE, x->value_len);
        put_le32(e + E4_XE_HASH, hash);
        memcpy(e + E4_XE_NAME, x->name, x->name_len);
        if (x->value_len) memcpy(region + vend, x->value, x->value_len);
        pos += entry_size(x);
        bhash = (bhash << 16) ^ (bhash >> 16) ^ hash;
    }
    return bhash; /* the 4 zero bytes ending the entries are already there */
}

int e4_xattr_plan(pyimg_ext4 *h, uint32_t ino) {
    e4_inode *core = &h->inodes[ino];
    e4_extra *in = core->x;
    if (!in || !in->nx) return 0;
    qsort(in->xattrs, in->nx, sizeof *in->xattrs, cmp_xattr);
    uint32_t used = 4; /* end marker */
    size_t k = 0;
    while (k < in->nx && used + entry_size(&in->xattrs[k]) + pad4(in->xattrs[k].value_len) <= IBODY_ROOM) {
        used += entry_size(&in->xattrs[k]) + pad4(in->xattrs[k].value_len);
        k++;
    }
    in->nx_inode = k;
    if (k == in->nx) return 0;
    if (!(h->g.feature_compat & E4_COMPAT_EXT_ATTR)) return e4_fail(h, PYIMG_ELIMIT, "inode %u: xattrs need an xattr block but ext_attr is off", ino);
    used = E4_XH_SIZE + 4; /* the header, the entries' 4-byte end marker */
    for (size_t i = k; i < in->nx; i++) used += entry_size(&in->xattrs[i]) + pad4(in->xattrs[i].value_len);
    if (used > E4_BS) return e4_fail(h, PYIMG_ELIMIT, "inode %u: xattrs need %u bytes, more than one block", ino, used);
    uint8_t *body = calloc(1, E4_BS);
    if (!body) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    uint32_t bhash = encode(in->xattrs, k, in->nx, body, E4_BS, E4_XH_SIZE, 0, 1);
    put_le32(body + E4_XH_MAGIC, E4_XATTR_MAGIC);
    put_le32(body + E4_XH_BLOCKS, 1);
    put_le32(body + E4_XH_HASH, bhash);
    uint32_t crc = pyimg_crc32c(0, body, E4_BS);
    /* share an identical block (linear scan over same-crc candidates is fine:
     * xattr blocks are few and mostly identical) */
    for (size_t x = h->nxblocks; x-- > 0;) {
        e4_xblock *xb = &h->xblocks[x];
        if (xb->crc == crc && xb->refcount < XBLOCK_REFCOUNT_MAX && !memcmp(xb->body, body, E4_BS)) {
            xb->refcount++;
            in->xblock = (int64_t)x;
            core->i_blocks += 1;
            free(body);
            return 0;
        }
    }
    if (e4_grow((void **)&h->xblocks, &h->xbcap, h->nxblocks + 1, sizeof *h->xblocks)) {
        free(body);
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    }
    e4_xblock *xb = &h->xblocks[h->nxblocks];
    xb->body = body;
    xb->crc = crc;
    xb->refcount = 1;
    uint32_t got;
    int rc = e4_alloc(h, 1, &xb->pblk, &got);
    if (rc) {
        free(body);
        return rc;
    }
    in->xblock = (int64_t)h->nxblocks++;
    core->i_blocks += 1;
    return 0;
}

void e4_xattr_inode_body(const pyimg_ext4 *h, const e4_inode *core, uint8_t *raw) {
    (void)h;
    const e4_extra *in = e4_x(core);
    if (!in->nx_inode) return;
    put_le32(raw + IBODY_START, E4_XATTR_MAGIC);
    /* entries right after the magic, value offsets relative to the first entry */
    encode(in->xattrs, 0, in->nx_inode, raw + IBODY_START + E4_XATTR_IBODY_HEADER_SIZE, IBODY_ROOM, 0, 0, 1);
}

int e4_xattr_write_blocks(pyimg_ext4 *h, const pyimg_out *out) {
    for (size_t x = 0; x < h->nxblocks; x++) {
        e4_xblock *xb = &h->xblocks[x];
        put_le32(xb->body + E4_XH_REFCOUNT, xb->refcount);
        put_le32(xb->body + E4_XH_CHECKSUM, 0);
        if (h->csum) {
            uint8_t b[8];
            put_le64(b, xb->pblk);
            uint32_t c = pyimg_crc32c(h->csum_seed, b, 8);
            put_le32(xb->body + E4_XH_CHECKSUM, pyimg_crc32c(c, xb->body, E4_BS));
        }
        int rc = e4_pwrite(h, out, xb->body, E4_BS, xb->pblk * E4_BS);
        if (rc) return rc;
    }
    return 0;
}
