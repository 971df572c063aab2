/* Hashed (dx) directories: the ext4 half_md4 name hash, then a root block
 * (fake "." and "..", dx_root_info, index entries) above leaf blocks holding
 * the entries sorted by hash; with more leaves than the root indexes, one
 * level of index nodes in between.  The root stores hash version 1
 * (half_md4) and the superblock sets EXT2_FLAGS_UNSIGNED_HASH, so names are
 * hashed as unsigned chars on every host. */
#include <stdlib.h>

#include "ext4_int.h"

#define ROTL(x, s) (((x) << (s)) | ((x) >> (32 - (s))))
#define F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define G(x, y, z) (((x) & (y)) + (((x) ^ (y)) & (z)))
#define H(x, y, z) ((x) ^ (y) ^ (z))
#define ROUND(f, a, b, c, d, x, s) (a += f(b, c, d) + (x), a = ROTL(a, s))
#define K2 013240474631u
#define K3 015666365641u

static void half_md4(uint32_t buf[4], const uint32_t in[8]) {
    uint32_t a = buf[0], b = buf[1], c = buf[2], d = buf[3];
    ROUND(F, a, b, c, d, in[0], 3);
    ROUND(F, d, a, b, c, in[1], 7);
    ROUND(F, c, d, a, b, in[2], 11);
    ROUND(F, b, c, d, a, in[3], 19);
    ROUND(F, a, b, c, d, in[4], 3);
    ROUND(F, d, a, b, c, in[5], 7);
    ROUND(F, c, d, a, b, in[6], 11);
    ROUND(F, b, c, d, a, in[7], 19);
    ROUND(G, a, b, c, d, in[1] + K2, 3);
    ROUND(G, d, a, b, c, in[3] + K2, 5);
    ROUND(G, c, d, a, b, in[5] + K2, 9);
    ROUND(G, b, c, d, a, in[7] + K2, 13);
    ROUND(G, a, b, c, d, in[0] + K2, 3);
    ROUND(G, d, a, b, c, in[2] + K2, 5);
    ROUND(G, c, d, a, b, in[4] + K2, 9);
    ROUND(G, b, c, d, a, in[6] + K2, 13);
    ROUND(H, a, b, c, d, in[3] + K3, 3);
    ROUND(H, d, a, b, c, in[7] + K3, 9);
    ROUND(H, c, d, a, b, in[2] + K3, 11);
    ROUND(H, b, c, d, a, in[6] + K3, 15);
    ROUND(H, a, b, c, d, in[1] + K3, 3);
    ROUND(H, d, a, b, c, in[5] + K3, 9);
    ROUND(H, c, d, a, b, in[0] + K3, 11);
    ROUND(H, b, c, d, a, in[4] + K3, 15);
    buf[0] += a;
    buf[1] += b;
    buf[2] += c;
    buf[3] += d;
}

/* str2hashbuf (unsigned variant): the name, padded with its length. */
static void str2hashbuf(const uint8_t *msg, size_t len, uint32_t *buf, int num) {
    uint32_t pad = (uint32_t)len | ((uint32_t)len << 8);
    pad |= pad << 16;
    uint32_t val = pad;
    if (len > (size_t)num * 4) len = (size_t)num * 4;
    for (size_t i = 0; i < len; i++) {
        val = msg[i] + (val << 8);
        if (i % 4 == 3) {
            *buf++ = val;
            val = pad;
            num--;
        }
    }
    if (--num >= 0) *buf++ = val;
    while (--num >= 0) *buf++ = pad;
}

uint32_t e4_dx_hash(const uint8_t *name, size_t len, const uint8_t seed[16], uint32_t *minor) {
    uint32_t buf[4] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u};
    int seeded = 0;
    for (int i = 0; i < 16; i++) seeded |= seed[i];
    if (seeded)
        for (int i = 0; i < 4; i++) buf[i] = get_le32(seed + 4 * i);
    uint32_t in[8];
    const uint8_t *p = name;
    size_t left = len;
    do { /* the kernel loops while len > 0; an empty name is never hashed */
        str2hashbuf(p, left, in, 8);
        half_md4(buf, in);
        if (left <= 32) break;
        left -= 32;
        p += 32;
    } while (1);
    uint32_t hash = buf[1] & ~1u;
    if (hash == (0x7fffffffu << 1)) hash = (0x7fffffffu - 1) << 1;
    if (minor) *minor = buf[2];
    return hash;
}

uint32_t pyimg_ext4_dirhash(const uint8_t *name, size_t len, const uint8_t seed[16]) {
    return e4_dx_hash(name, len, seed, NULL);
}

/* An entry with its sort key, for the plan only: the hashes are not kept per
 * entry (8 bytes each on every entry of the tree), only per leaf. */
typedef struct {
    uint32_t hash, minor;
    const uint8_t *name; /* in the arena, which does not move during the layout */
    e4_dirent d;
} keyed;

static int cmp_keyed(const void *a, const void *b) {
    const keyed *x = a, *y = b;
    if (x->hash != y->hash) return x->hash < y->hash ? -1 : 1;
    if (x->minor != y->minor) return x->minor < y->minor ? -1 : 1;
    size_t n = x->d.len < y->d.len ? x->d.len : y->d.len;
    int c = memcmp(x->name, y->name, n);
    if (c) return c;
    return (x->d.len > y->d.len) - (x->d.len < y->d.len);
}

static uint32_t root_limit(const pyimg_ext4 *h) {
    return (E4_BS - E4_DX_ROOT_ENTRIES - (h->csum ? E4_DX_TAIL_SIZE : 0)) / E4_DX_ENTRY_SIZE;
}
static uint32_t node_limit(const pyimg_ext4 *h) {
    return (E4_BS - E4_DX_NODE_ENTRIES - (h->csum ? E4_DX_TAIL_SIZE : 0)) / E4_DX_ENTRY_SIZE;
}

/* The index hash of the leaf starting at entry i (of the sorted keys): its
 * first name's hash, with the low bit set when that hash continues from the
 * previous leaf (a collision split); 0 for the first leaf. */
static uint32_t leaf_hash(const keyed *k, size_t i) {
    if (i == 0) return 0;
    return k[i].hash | (k[i - 1].hash == k[i].hash);
}

int e4_htree_plan(pyimg_ext4 *h, e4_extra *in) {
    keyed *k = malloc((in->ndents ? in->ndents : 1) * sizeof *k);
    if (!k) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    for (size_t i = 0; i < in->ndents; i++) {
        k[i].d = in->dents[i];
        k[i].name = e4_dirent_name(h, &in->dents[i]);
        k[i].hash = e4_dx_hash(k[i].name, k[i].d.len, h->g.hash_seed, &k[i].minor);
    }
    qsort(k, in->ndents, sizeof *k, cmp_keyed);
    for (size_t i = 0; i < in->ndents; i++) in->dents[i] = k[i].d;
    uint32_t room = e4_leaf_room(h);
    size_t cap = 16, n = 0;
    size_t *starts = malloc(cap * sizeof *starts);
    uint32_t *hashes = malloc(cap * sizeof *hashes);
    if (!starts || !hashes) {
        free(starts);
        free(hashes);
        free(k);
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    }
    uint32_t fill = room; /* forces a new leaf at the first entry */
    for (size_t i = 0; i < in->ndents; i++) {
        uint32_t r = e4_rec_len(in->dents[i].len);
        if (fill + r > room) {
            if (n + 2 > cap) {
                size_t *p = realloc(starts, 2 * cap * sizeof *starts);
                if (p) starts = p;
                uint32_t *q = p ? realloc(hashes, 2 * cap * sizeof *hashes) : NULL;
                if (q) hashes = q;
                if (!p || !q) {
                    free(starts);
                    free(hashes);
                    free(k);
                    return e4_fail(h, PYIMG_ENOMEM, "out of memory");
                }
                cap *= 2;
            }
            hashes[n] = leaf_hash(k, i);
            starts[n++] = i;
            fill = 0;
        }
        fill += r;
    }
    free(k);
    starts[n] = in->ndents;
    in->leaf_start = starts;
    in->leaf_hash = hashes;
    in->nleaves = (uint32_t)n;
    if (n <= root_limit(h)) {
        in->htree_levels = 0;
        in->dir_blocks = 1 + (uint32_t)n;
    } else {
        uint64_t nodes = (n + node_limit(h) - 1) / node_limit(h);
        if (nodes > root_limit(h)) return e4_fail(h, PYIMG_ELIMIT, "directory too large for a two-level htree");
        in->htree_levels = 1;
        in->dir_blocks = 1 + (uint32_t)nodes + (uint32_t)n;
    }
    return 0;
}

/* dx_tail checksum: over the header and the used entries, then dt_reserved
 * and a zero checksum. */
static void dx_csum(pyimg_ext4 *h, uint32_t ino, uint8_t *blk, uint32_t count_offset, uint32_t count, uint32_t limit) {
    if (!h->csum) return;
    uint8_t *tail = blk + count_offset + limit * E4_DX_ENTRY_SIZE;
    put_le32(tail + E4_DX_TAIL_RESERVED, 0);
    uint32_t c = pyimg_crc32c(e4_inode_seed(h, ino), blk, count_offset + count * E4_DX_ENTRY_SIZE);
    c = pyimg_crc32c(c, tail + E4_DX_TAIL_RESERVED, 4);
    uint8_t zero[4] = {0, 0, 0, 0};
    c = pyimg_crc32c(c, zero, 4); /* dt_checksum, as zero */
    put_le32(tail + E4_DX_TAIL_CHECKSUM, c);
}

/* Index entries at `p` (p points at limit/count): children [lo, hi) whose
 * blocks and hashes come from the arrays. */
static void put_entries(uint8_t *p, uint32_t limit, const uint32_t *hashes, const uint32_t *blocks, uint32_t n) {
    put_le16(p + E4_DX_LIMIT, (uint16_t)limit); /* entry 0 has no hash: count/limit take its place */
    put_le16(p + E4_DX_COUNT, (uint16_t)n);
    put_le32(p + E4_DX_BLOCK, blocks[0]);
    for (uint32_t i = 1; i < n; i++) {
        put_le32(p + E4_DX_ENTRY_SIZE * i + E4_DX_HASH, hashes[i]);
        put_le32(p + E4_DX_ENTRY_SIZE * i + E4_DX_BLOCK, blocks[i]);
    }
}


int e4_htree_write(pyimg_ext4 *h, uint32_t ino, uint8_t *blocks) {
    const e4_extra *in = h->inodes[ino].x;
    uint32_t nl = in->nleaves;
    uint32_t nodes = in->htree_levels == 1 ? in->dir_blocks - 1 - nl : 0;
    uint32_t first_leaf = 1 + nodes;
    const uint32_t *hashes = in->leaf_hash;
    uint32_t *lblks = malloc((size_t)(nl + 1) * sizeof *lblks);
    if (!lblks) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    for (uint32_t l = 0; l < nl; l++) {
        lblks[l] = first_leaf + l;
        e4_dir_leaf(h, ino, in->dents + in->leaf_start[l], in->leaf_start[l + 1] - in->leaf_start[l],
                    blocks + (size_t)lblks[l] * E4_BS, 0);
    }
    /* root block */
    uint8_t *root = blocks;
    e4_put_dots(h, ino, root, E4_BS - 12); /* ".." spans the block: old readers see no entries */
    put_le32(root + E4_DX_ROOT_RESERVED_ZERO, 0);
    root[E4_DX_ROOT_HASH_VERSION] = 1; /* half_md4 (unsigned by s_flags) */
    root[E4_DX_ROOT_INFO_LENGTH] = E4_DX_ROOT_ENTRIES - E4_DX_ROOT_INFO;
    root[E4_DX_ROOT_INDIRECT_LEVELS] = (uint8_t)in->htree_levels;
    root[E4_DX_ROOT_UNUSED_FLAGS] = 0;
    if (in->htree_levels == 0) {
        put_entries(root + E4_DX_ROOT_ENTRIES, root_limit(h), hashes, lblks, nl);
        dx_csum(h, ino, root, E4_DX_ROOT_ENTRIES, nl, root_limit(h));
    } else {
        uint32_t per = node_limit(h);
        uint32_t *nh = malloc((size_t)nodes * sizeof *nh), *nb = malloc((size_t)nodes * sizeof *nb);
        if (!nh || !nb) {
            free(nh);
            free(nb);
            free(lblks);
            return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        }
        for (uint32_t k = 0; k < nodes; k++) {
            uint32_t lo = k * per, cnt = nl - lo < per ? nl - lo : per;
            uint8_t *node = blocks + (size_t)(1 + k) * E4_BS;
            e4_put_dirent(node + E4_DX_NODE_FAKE, 0, NULL, 0, 0, E4_BS); /* fake dirent covering the block */
            put_entries(node + E4_DX_NODE_ENTRIES, per, hashes + lo, lblks + lo, cnt);
            dx_csum(h, ino, node, E4_DX_NODE_ENTRIES, cnt, per);
            nh[k] = hashes[lo];
            nb[k] = 1 + k;
        }
        put_entries(root + E4_DX_ROOT_ENTRIES, root_limit(h), nh, nb, nodes);
        dx_csum(h, ino, root, E4_DX_ROOT_ENTRIES, nodes, root_limit(h));
        free(nh);
        free(nb);
    }
    free(lblks);
    return 0;
}
