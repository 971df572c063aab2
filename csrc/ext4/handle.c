/* The ext4 handle: registration of inodes/entries/contents, the block
 * allocator and the layout pass. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "ext4_int.h"

/* One of each per inode, content and directory entry: 100k small files make
 * 100k of each, so their sizes are the handle's memory (see ext4_int.h). */
_Static_assert(sizeof(e4_inode) <= 64, "e4_inode grew past 64 bytes");
_Static_assert(sizeof(e4_content) <= 32, "e4_content grew past 32 bytes");
_Static_assert(sizeof(e4_dirent) <= 12, "e4_dirent grew past 12 bytes");

const e4_extra e4_no_extra = {.htree_levels = -1, .xblock = -1};

int e4_fail(pyimg_ext4 *h, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = pyimg_err_vset(&h->err, code, fmt, ap);
    va_end(ap);
    return rc;
}

int e4_grow(void **v, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 4;
    while (n < need) n *= 2;
    if (n > SIZE_MAX / elem) return -PYIMG_ENOMEM;
    void *p = realloc(*v, n * elem);
    if (!p) return -PYIMG_ENOMEM;
    *v = p;
    *cap = n;
    return 0;
}

/* Room for element n (0-based) of an inline-first small vector (e4_extbuf,
 * e4_runbuf): element 0 is inline; the second one moves both to a heap array
 * of 4, which then doubles each time it is full (so its capacity is implied by
 * n and need not be stored).  Returns the capacity to reallocate to, 0 when
 * there is room, SIZE_MAX when n cannot grow. */
static size_t spill_cap(uint32_t n) {
    if (n == UINT32_MAX) return SIZE_MAX;
    if (n == 1) return 4;
    if (n >= 4 && (n & (n - 1)) == 0) return (size_t)n * 2;
    return 0;
}

/* spill_cap's growth for either vector: returns the array to keep for element n
 * (NULL when out of memory) given `heap`, the current array (n > 1), and `one`,
 * the inline element (copied over when n == 1).  The caller stores the result in
 * its union itself, as a typed pointer, after the inline element was read. */
static void *spill_grow(void *heap, const void *one, size_t elem, uint32_t n) {
    size_t cap = spill_cap(n);
    if (cap == SIZE_MAX || cap > SIZE_MAX / elem) return NULL;
    void *p = realloc(heap, cap * elem);
    if (p && n == 1) memcpy(p, one, elem);
    return p;
}

static int ext_reserve(e4_extbuf *b, uint32_t n) {
    if (!spill_cap(n)) return 0;
    e4_extent *p = spill_grow(n > 1 ? b->v : NULL, &b->one, sizeof b->one, n);
    if (!p) return -PYIMG_ENOMEM; /* b unchanged: its old array is still freed */
    b->v = p;
    return 0;
}

static int run_reserve(e4_runbuf *b, uint32_t n) {
    if (!spill_cap(n)) return 0;
    e4_run *p = spill_grow(n > 1 ? b->v : NULL, &b->one, sizeof b->one, n);
    if (!p) return -PYIMG_ENOMEM;
    b->v = p;
    return 0;
}

void e4_ext_clear(e4_extbuf *b, uint32_t *n) {
    if (*n >= 2) free(b->v);
    memset(b, 0, sizeof *b);
    *n = 0;
}

static void runs_clear(e4_runbuf *b, uint32_t *n) {
    if (*n >= 2) free(b->v);
    memset(b, 0, sizeof *b);
    *n = 0;
}

/* Appends an extent, merging with the previous one when both are contiguous. */
int e4_ext_push(e4_extbuf *b, uint32_t *n, uint32_t lblk, uint64_t pblk, uint32_t len) {
    while (len) {
        if (*n) {
            e4_extent *last = (*n == 1 ? &b->one : b->v) + (*n - 1);
            if (last->lblk + last->len == lblk && last->pblk + last->len == pblk &&
                last->len < E4_MAX_EXT_LEN) {
                uint32_t add = E4_MAX_EXT_LEN - last->len;
                if (add > len) add = len;
                last->len += add;
                lblk += add;
                pblk += add;
                len -= add;
                continue;
            }
        }
        if (ext_reserve(b, *n)) return -PYIMG_ENOMEM;
        uint32_t take = len > E4_MAX_EXT_LEN ? E4_MAX_EXT_LEN : len;
        (*n == 0 ? &b->one : b->v)[*n] = (e4_extent){lblk, take, pblk};
        ++*n;
        lblk += take;
        pblk += take;
        len -= take;
    }
    return 0;
}

pyimg_ext4 *pyimg_ext4_new(uint32_t max_ino) {
    if (max_ino < E4_FIRST_INO || max_ino == UINT32_MAX) return NULL;
    pyimg_ext4 *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->max_ino = max_ino;
    h->inodes = calloc((size_t)max_ino + 1, sizeof *h->inodes);
    if (!h->inodes) {
        free(h);
        return NULL;
    }
    for (uint32_t i = 0; i <= max_ino; i++) h->inodes[i].content = -1;
    return h;
}

/* The extra part of `in`, created on first need; NULL when out of memory. */
e4_extra *e4_extra_get(e4_inode *in) {
    if (!in->x) {
        in->x = malloc(sizeof *in->x);
        if (in->x) *in->x = e4_no_extra;
    }
    return in->x;
}

static void reset_layout(pyimg_ext4 *h) {
    for (uint32_t i = 0; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        in->i_blocks = 0;
        e4_extra *x = in->x;
        if (!x) continue;
        e4_ext_clear(&x->own, &x->nown);
        free(x->tree);
        x->tree = NULL;
        x->ntree = 0;
        free(x->leaf_start);
        x->leaf_start = NULL;
        free(x->leaf_hash);
        x->leaf_hash = NULL;
        x->nleaves = 0;
        x->xblock = -1;
        x->htree_levels = -1;
        x->dir_blocks = 0;
        x->nx_inode = 0;
    }
    for (size_t c = 0; c < h->ncontents; c++) e4_ext_clear(&h->contents[c].ext, &h->contents[c].next);
    for (size_t x = 0; x < h->nxblocks; x++) free(h->xblocks[x].body);
    h->nxblocks = 0;
    free(h->bb_loc);
    free(h->ib_loc);
    free(h->it_loc);
    free(h->bmap);
    h->bb_loc = h->ib_loc = h->it_loc = NULL;
    h->bmap = NULL;
    h->bmap_bits = 0;
    h->laid_out = 0;
    if (h->max_ino >= E4_JOURNAL_INO) h->inodes[E4_JOURNAL_INO].used = 0;
}

void pyimg_ext4_free(pyimg_ext4 *h) {
    if (!h) return;
    reset_layout(h);
    for (uint32_t i = 0; i <= h->max_ino; i++) {
        e4_extra *x = h->inodes[i].x;
        if (!x) continue;
        free(x->symlink);
        free(x->dents);
        for (size_t k = 0; k < x->nx; k++) {
            free(x->xattrs[k].name);
            free(x->xattrs[k].value);
        }
        free(x->xattrs);
        free(x);
    }
    free(h->inodes);
    for (size_t c = 0; c < h->ncontents; c++) runs_clear(&h->contents[c].runs, &h->contents[c].nruns);
    free(h->contents);
    free(h->names);
    free(h->xblocks);
    free(h);
}

const char *pyimg_ext4_error(const pyimg_ext4 *h) { return h->err.msg; }

static e4_inode *get_inode(pyimg_ext4 *h, uint32_t ino) {
    if (ino == 0 || ino > h->max_ino) return NULL;
    return &h->inodes[ino];
}

int pyimg_ext4_set_inode(pyimg_ext4 *h, uint32_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                         int64_t mtime, uint32_t mtime_nsec, uint64_t size, uint32_t links,
                         uint32_t rdev_major, uint32_t rdev_minor, uint32_t parent) {
    e4_inode *in = get_inode(h, ino);
    if (!in) return e4_fail(h, PYIMG_EINVAL, "inode %u out of range", ino);
    if (links > 65000) return e4_fail(h, PYIMG_ELIMIT, "inode %u: %u links (ext4 allows 65000)", ino, links);
    if (mtime_nsec >= 1000000000u) return e4_fail(h, PYIMG_EINVAL, "inode %u: bad nanoseconds", ino);
    /* device numbers go to the extra part: only devices have non-zero ones */
    if (rdev_major || rdev_minor || in->x) {
        e4_extra *x = e4_extra_get(in);
        if (!x) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        x->rdev_major = rdev_major;
        x->rdev_minor = rdev_minor;
    }
    in->used = 1;
    in->mode = (uint16_t)mode;
    in->uid = uid;
    in->gid = gid;
    in->mtime = mtime;
    in->mtime_nsec = mtime_nsec;
    in->size = size;
    in->links = (uint16_t)links;
    in->parent = parent;
    return 0;
}

int pyimg_ext4_set_symlink(pyimg_ext4 *h, uint32_t ino, const uint8_t *target, size_t len) {
    e4_inode *in = get_inode(h, ino);
    if (!in) return e4_fail(h, PYIMG_EINVAL, "inode %u out of range", ino);
    if (len == 0 || len >= E4_BS) return e4_fail(h, PYIMG_ELIMIT, "symlink target of %zu bytes (1..4095 allowed)", len);
    e4_extra *x = e4_extra_get(in);
    if (!x) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    free(x->symlink);
    x->symlink_len = 0;
    x->symlink = malloc(len);
    if (!x->symlink) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    memcpy(x->symlink, target, len);
    x->symlink_len = (uint32_t)len;
    in->size = len;
    return 0;
}

static const struct {
    const char *prefix;
    uint8_t index;
} xattr_prefixes[] = {
    /* exact names first: the ACLs have their own index and an empty suffix */
    {"system.posix_acl_access", 2},
    {"system.posix_acl_default", 3},
    {"system.richacl", 8},
    {"user.", 1},
    {"trusted.", 4},
    {"security.", 6},
    {"system.", 7},
};

int pyimg_ext4_add_xattr(pyimg_ext4 *h, uint32_t ino, const uint8_t *name, size_t name_len,
                         const uint8_t *value, size_t value_len) {
    e4_inode *in = get_inode(h, ino);
    if (!in) return e4_fail(h, PYIMG_EINVAL, "inode %u out of range", ino);
    uint8_t index = 0;
    size_t skip = 0;
    for (size_t i = 0; i < sizeof xattr_prefixes / sizeof xattr_prefixes[0]; i++) {
        size_t pl = strlen(xattr_prefixes[i].prefix);
        int exact = xattr_prefixes[i].index == 2 || xattr_prefixes[i].index == 3 || xattr_prefixes[i].index == 8;
        if (exact ? (name_len == pl && !memcmp(name, xattr_prefixes[i].prefix, pl))
                  : (name_len > pl && !memcmp(name, xattr_prefixes[i].prefix, pl))) {
            index = xattr_prefixes[i].index;
            skip = pl;
            break;
        }
    }
    if (name_len - skip > 255) return e4_fail(h, PYIMG_ELIMIT, "xattr name longer than 255 bytes");
    if (value_len > E4_BS - 32 - 24 - 255) return e4_fail(h, PYIMG_ELIMIT, "xattr value of %zu bytes does not fit a block", value_len);
    e4_extra *ex = e4_extra_get(in);
    if (!ex || e4_grow((void **)&ex->xattrs, &ex->xcap, ex->nx + 1, sizeof *ex->xattrs))
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    e4_xattr *x = &ex->xattrs[ex->nx];
    x->index = index;
    x->name_len = (uint8_t)(name_len - skip);
    x->name = malloc(x->name_len + 1);
    x->value = malloc(value_len + 1);
    if (!x->name || !x->value) {
        free(x->name);
        free(x->value);
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    }
    memcpy(x->name, name + skip, x->name_len);
    if (value_len) memcpy(x->value, value, value_len);
    x->value_len = (uint32_t)value_len;
    ex->nx++;
    return 0;
}

int pyimg_ext4_add_dirent(pyimg_ext4 *h, uint32_t dir, const uint8_t *name, size_t name_len, uint32_t child) {
    e4_inode *in = get_inode(h, dir);
    if (!in || !get_inode(h, child)) return e4_fail(h, PYIMG_EINVAL, "inode out of range");
    if (name_len == 0 || name_len > 255) return e4_fail(h, PYIMG_ELIMIT, "file name of %zu bytes (1..255 allowed)", name_len);
    /* e4_dirent keeps 40 bits of arena offset: 1 TiB of names */
    if (h->nnames + name_len > (uint64_t)1 << 40) return e4_fail(h, PYIMG_ELIMIT, "more than 1 TiB of file names");
    if (h->nnames + name_len > h->names_cap) {
        /* doubling: the arena is one large block, its unused tail is never touched */
        uint64_t cap = h->names_cap ? h->names_cap : 65536;
        while (cap < h->nnames + name_len) cap *= 2;
        if (cap > SIZE_MAX) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        uint8_t *p = realloc(h->names, (size_t)cap);
        if (!p) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        h->names = p;
        h->names_cap = cap;
    }
    e4_extra *x = e4_extra_get(in);
    if (!x || e4_grow((void **)&x->dents, &x->dcap, x->ndents + 1, sizeof *x->dents))
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    e4_dirent *d = &x->dents[x->ndents++];
    d->ino = child;
    d->name_lo = (uint32_t)h->nnames;
    d->name_hi = (uint8_t)(h->nnames >> 32);
    d->len = (uint8_t)name_len;
    memcpy(h->names + h->nnames, name, name_len);
    h->nnames += name_len;
    return 0;
}

int pyimg_ext4_new_content(pyimg_ext4 *h) {
    if (h->ncontents >= INT32_MAX) return e4_fail(h, PYIMG_ELIMIT, "too many contents");
    if (e4_grow((void **)&h->contents, &h->ccap, h->ncontents + 1, sizeof *h->contents)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    memset(&h->contents[h->ncontents], 0, sizeof *h->contents);
    return (int)h->ncontents++;
}

int pyimg_ext4_content_run(pyimg_ext4 *h, uint32_t content, uint32_t lblk, uint32_t count) {
    if (content >= h->ncontents) return e4_fail(h, PYIMG_EINVAL, "content %u out of range", content);
    e4_content *c = &h->contents[content];
    if ((uint64_t)lblk + count > UINT32_MAX) return e4_fail(h, PYIMG_ELIMIT, "file too big for ext4");
    if (c->nruns) {
        const e4_run *last = &e4_run_v(&c->runs, c->nruns)[c->nruns - 1];
        if (last->lblk + last->count > lblk) return e4_fail(h, PYIMG_EINVAL, "content runs out of order");
    }
    if (run_reserve(&c->runs, c->nruns)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    (c->nruns == 0 ? &c->runs.one : c->runs.v)[c->nruns] = (e4_run){lblk, count};
    c->nruns++;
    return 0;
}

int pyimg_ext4_set_content(pyimg_ext4 *h, uint32_t ino, uint32_t content) {
    e4_inode *in = get_inode(h, ino);
    if (!in || content >= h->ncontents) return e4_fail(h, PYIMG_EINVAL, "inode or content out of range");
    in->content = (int32_t)content;
    return 0;
}

/* ---- bulk registration ---- */

int pyimg_ext4_set_inodes(pyimg_ext4 *h, size_t n, const uint32_t *inos, const uint32_t *modes,
                          const uint32_t *uids, const uint32_t *gids, const int64_t *mtimes,
                          const uint32_t *mtime_nsecs, const uint64_t *sizes, const uint32_t *links,
                          const uint32_t *rdev_majors, const uint32_t *rdev_minors, const uint32_t *parents,
                          size_t *failed) {
    for (size_t i = 0; i < n; i++) {
        int rc = pyimg_ext4_set_inode(h, inos[i], modes[i], uids[i], gids[i], mtimes[i], mtime_nsecs[i], sizes[i],
                                      links[i], rdev_majors[i], rdev_minors[i], parents[i]);
        if (rc < 0) {
            *failed = i;
            return rc;
        }
    }
    return 0;
}

int pyimg_ext4_add_dirents(pyimg_ext4 *h, size_t n, const uint32_t *dirs, const uint8_t *names,
                           const uint32_t *name_lens, const uint32_t *children, size_t *failed) {
    for (size_t i = 0; i < n; i++) {
        int rc = pyimg_ext4_add_dirent(h, dirs[i], names, name_lens[i], children[i]);
        if (rc < 0) {
            *failed = i;
            return rc;
        }
        names += name_lens[i];
    }
    return 0;
}

int pyimg_ext4_add_contents(pyimg_ext4 *h, size_t n, const uint8_t *keep, const uint32_t *nruns,
                            const uint32_t *run_first, const uint32_t *run_count, size_t *failed) {
    if (h->ncontents >= INT32_MAX) return e4_fail(h, PYIMG_ELIMIT, "too many contents");
    int first_id = (int)h->ncontents;
    /* the batch's new contents at once: one growth of the array, not several */
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) kept += keep[i] != 0;
    if (kept && h->ncontents + kept <= INT32_MAX &&
        e4_grow((void **)&h->contents, &h->ccap, h->ncontents + kept, sizeof *h->contents)) {
        *failed = 0;
        return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        if (keep[i]) {
            int id = pyimg_ext4_new_content(h);
            int rc = id;
            for (uint32_t k = 0; id >= 0 && k < nruns[i] && rc >= 0; k++)
                rc = pyimg_ext4_content_run(h, (uint32_t)id, run_first[k], run_count[k]);
            if (rc < 0) {
                *failed = i;
                return rc;
            }
        }
        run_first += nruns[i];
        run_count += nruns[i];
    }
    return first_id;
}

int pyimg_ext4_set_contents(pyimg_ext4 *h, size_t n, const uint32_t *inos, const uint32_t *contents,
                            size_t *failed) {
    for (size_t i = 0; i < n; i++) {
        int rc = pyimg_ext4_set_content(h, inos[i], contents[i]);
        if (rc < 0) {
            *failed = i;
            return rc;
        }
    }
    return 0;
}

/* ---- allocation ---- */

int e4_is_backup_group(uint64_t g) {
    if (g <= 1) return 1;
    for (uint64_t base = 3; base <= 7; base += 2) {
        uint64_t p = base;
        while (p < g) p *= base;
        if (p == g) return 1;
    }
    return 0;
}

static int mark(pyimg_ext4 *h, uint64_t start, uint64_t n) {
    if (start + n > h->bmap_bits) {
        uint64_t bits = h->bmap_bits ? h->bmap_bits : 65536;
        while (bits < start + n) bits *= 2;
        uint8_t *p = realloc(h->bmap, (size_t)(bits / 8));
        if (!p) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        memset(p + h->bmap_bits / 8, 0, (size_t)((bits - h->bmap_bits) / 8));
        h->bmap = p;
        h->bmap_bits = bits;
    }
    for (uint64_t b = start; b < start + n; b++) h->bmap[b / 8] |= (uint8_t)(1u << (b % 8));
    h->used += n;
    if (start + n > h->end) h->end = start + n;
    return 0;
}

/* The first free block at or after b: skips the superblock/GDT copy of backup groups. */
static uint64_t skip_reserved(const pyimg_ext4 *h, uint64_t b) {
    uint64_t g = b / h->g.blocks_per_group, off = b % h->g.blocks_per_group;
    if (e4_is_backup_group(g) && off < 1 + (uint64_t)h->gdt_blocks) return g * h->g.blocks_per_group + 1 + h->gdt_blocks;
    return b;
}

/* Up to `want` contiguous blocks at the cursor, never crossing a group end. */
int e4_alloc(pyimg_ext4 *h, uint32_t want, uint64_t *start, uint32_t *got) {
    h->cursor = skip_reserved(h, h->cursor);
    uint64_t room = h->g.blocks_per_group - h->cursor % h->g.blocks_per_group;
    uint32_t n = room < want ? (uint32_t)room : want;
    *start = h->cursor;
    *got = n;
    h->cursor += n;
    return mark(h, *start, n);
}

/* Exactly n contiguous blocks (n fits a group): may leave the rest of a group free. */
int e4_alloc_contig(pyimg_ext4 *h, uint32_t n, uint64_t *start) {
    h->cursor = skip_reserved(h, h->cursor);
    uint64_t room = h->g.blocks_per_group - h->cursor % h->g.blocks_per_group;
    if (room < n) h->cursor = skip_reserved(h, h->cursor + room);
    *start = h->cursor;
    h->cursor += n;
    return mark(h, *start, n);
}

int e4_alloc_extents(pyimg_ext4 *h, e4_extbuf *b, uint32_t *n, uint32_t lblk, uint32_t count) {
    while (count) {
        uint64_t start;
        uint32_t got;
        int rc = e4_alloc(h, count, &start, &got);
        if (rc) return rc;
        if (e4_ext_push(b, n, lblk, start, got)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        lblk += got;
        count -= got;
    }
    return 0;
}

static int alloc_tree(pyimg_ext4 *h, e4_inode *in, size_t nextents) {
    uint32_t n = e4_tree_blocks(nextents);
    if (!n) return 0;
    e4_extra *x = e4_extra_get(in);
    if (!x) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    x->tree = calloc(n, sizeof *x->tree);
    if (!x->tree) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t got;
        int rc = e4_alloc(h, 1, &x->tree[i], &got);
        if (rc) return rc;
    }
    x->ntree = n;
    in->i_blocks += n;
    return 0;
}

/* The data blocks of a content: the sum of its runs (not stored: it is cheap
 * to recount and would cost 8 bytes per content). */
static uint64_t content_blocks(const e4_content *ct) {
    const e4_run *runs = e4_run_v(&ct->runs, ct->nruns);
    uint64_t n = 0;
    for (uint32_t r = 0; r < ct->nruns; r++) n += runs[r].count;
    return n;
}

int pyimg_ext4_layout(pyimg_ext4 *h, const pyimg_ext4_geom *geom) {
    reset_layout(h);
    h->g = *geom;
    if (h->g.blocks_per_group != 32768 || h->g.inodes_per_group == 0 || h->g.inodes_per_group % 16 ||
        h->g.inodes_per_group > 32768 || h->g.blocks_count == 0)
        return e4_fail(h, PYIMG_EINVAL, "bad geometry");
    uint64_t groups = (h->g.blocks_count + h->g.blocks_per_group - 1) / h->g.blocks_per_group;
    if (groups * h->g.inodes_per_group > UINT32_MAX) return e4_fail(h, PYIMG_ELIMIT, "too many inodes");
    h->groups = (uint32_t)groups;
    if ((uint64_t)h->max_ino > groups * h->g.inodes_per_group)
        return e4_fail(h, PYIMG_ELIMIT, "%u inodes do not fit an inode table of %llu", h->max_ino,
                       (unsigned long long)(groups * h->g.inodes_per_group));
    int is64 = (h->g.feature_incompat & E4_INCOMPAT_64BIT) != 0;
    if (!is64 && h->g.blocks_count > UINT32_MAX) return e4_fail(h, PYIMG_ELIMIT, "more than 2^32 blocks need the 64bit feature");
    h->desc_size = is64 ? 64 : 32;
    h->gdt_blocks = (uint32_t)((groups * h->desc_size + E4_BS - 1) / E4_BS);
    h->itb = h->g.inodes_per_group * E4_INODE_SIZE / E4_BS;
    h->csum = (h->g.feature_ro_compat & E4_RO_COMPAT_METADATA_CSUM) != 0;
    int own_seed = (h->g.feature_incompat & E4_INCOMPAT_CSUM_SEED) != 0;
    h->csum_seed = pyimg_crc32c(~0u, own_seed ? h->g.csum_uuid : h->g.uuid, 16);
    h->cursor = h->end = h->used = h->data_blocks = 0;
    int rc;
    /* Superblock and descriptors of group 0 (the copies of other backup groups
     * are skipped by the allocator and marked at finalize). */
    if ((rc = mark(h, 0, 1 + (uint64_t)h->gdt_blocks))) return rc;
    h->cursor = 1 + (uint64_t)h->gdt_blocks;
    h->bb_loc = calloc(groups, sizeof(uint64_t));
    h->ib_loc = calloc(groups, sizeof(uint64_t));
    h->it_loc = calloc(groups, sizeof(uint64_t));
    if (!h->bb_loc || !h->ib_loc || !h->it_loc) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    /* flex_bg: all bitmaps, then all inode tables, packed at the start. */
    for (uint32_t g = 0; g < groups; g++)
        if ((rc = e4_alloc_contig(h, 1, &h->bb_loc[g]))) return rc;
    for (uint32_t g = 0; g < groups; g++)
        if ((rc = e4_alloc_contig(h, 1, &h->ib_loc[g]))) return rc;
    for (uint32_t g = 0; g < groups; g++)
        if ((rc = e4_alloc_contig(h, h->itb, &h->it_loc[g]))) return rc;
    /* the journal */
    if (h->g.journal_blocks) {
        if (h->max_ino < E4_JOURNAL_INO) return e4_fail(h, PYIMG_EINVAL, "no room for the journal inode");
        e4_inode *j = &h->inodes[E4_JOURNAL_INO];
        e4_extra *jx = e4_extra_get(j);
        if (!jx) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        j->used = 1;
        j->mode = S_IFREG | 0600;
        j->links = 1;
        j->size = (uint64_t)h->g.journal_blocks * E4_BS;
        j->mtime = h->g.epoch;
        if ((rc = e4_alloc_extents(h, &jx->own, &jx->nown, 0, h->g.journal_blocks))) return rc;
        j->i_blocks = h->g.journal_blocks;
    }
    /* directories, slow symlinks, xattr blocks, in inode order */
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISDIR(in->mode)) {
            e4_extra *x = e4_extra_get(in);
            if (!x) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
            if ((rc = e4_dir_plan(h, i))) return rc;
            if ((rc = e4_alloc_extents(h, &x->own, &x->nown, 0, x->dir_blocks))) return rc;
            in->i_blocks += x->dir_blocks;
            in->size = (uint64_t)x->dir_blocks * E4_BS;
        } else if (S_ISLNK(in->mode) && e4_x(in)->symlink_len >= 60) {
            if ((rc = e4_alloc_extents(h, &in->x->own, &in->x->nown, 0, 1))) return rc;
            in->i_blocks += 1;
        }
        if ((rc = e4_xattr_plan(h, i))) return rc;
    }
    /* file data, content by content: shared contents are stored once */
    for (size_t c = 0; c < h->ncontents; c++) {
        e4_content *ct = &h->contents[c];
        const e4_run *runs = e4_run_v(&ct->runs, ct->nruns);
        for (uint32_t r = 0; r < ct->nruns; r++)
            if ((rc = e4_alloc_extents(h, &ct->ext, &ct->next, runs[r].lblk, runs[r].count))) return rc;
        h->data_blocks += content_blocks(ct);
    }
    /* extent tree blocks of inodes with more than 4 extents */
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISREG(in->mode) && in->content >= 0) {
            e4_content *ct = &h->contents[in->content];
            in->i_blocks += content_blocks(ct);
            if ((rc = alloc_tree(h, in, ct->next))) return rc;
        } else if ((rc = alloc_tree(h, in, e4_x(in)->nown))) {
            return rc;
        }
    }
    h->laid_out = 1;
    return 0;
}

void pyimg_ext4_get_stats(const pyimg_ext4 *h, pyimg_ext4_stats *out) {
    memset(out, 0, sizeof *out);
    out->blocks_end = h->end;
    out->groups = h->groups;
    out->inodes_count = h->groups * h->g.inodes_per_group;
    out->data_blocks = h->data_blocks;
    uint64_t backups = 0;
    for (uint64_t g = 1; g < h->groups; g++)
        if (e4_is_backup_group(g)) backups += 1 + h->gdt_blocks;
    out->blocks_used = h->used + backups;
    out->free_blocks = h->g.blocks_count > out->blocks_used ? h->g.blocks_count - out->blocks_used : 0;
    out->free_inodes = out->inodes_count > h->max_ino ? out->inodes_count - h->max_ino : 0;
}
