/* The ext4 handle: registration of inodes/entries/contents, the block
 * allocator and the layout pass. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "ext4_int.h"

int e4_fail(pyimg_ext4 *h, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->err, sizeof h->err, fmt, ap);
    va_end(ap);
    return -code;
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

/* Appends an extent, merging with the previous one when both are contiguous. */
int e4_ext_push(e4_extents *e, uint32_t lblk, uint64_t pblk, uint32_t len) {
    while (len) {
        if (e->n) {
            e4_extent *last = &e->v[e->n - 1];
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
        if (e4_grow((void **)&e->v, &e->cap, e->n + 1, sizeof *e->v)) return -PYIMG_ENOMEM;
        uint32_t take = len > E4_MAX_EXT_LEN ? E4_MAX_EXT_LEN : len;
        e->v[e->n++] = (e4_extent){lblk, take, pblk};
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
    for (uint32_t i = 0; i <= max_ino; i++) {
        h->inodes[i].content = -1;
        h->inodes[i].xblock = -1;
        h->inodes[i].htree_levels = -1;
    }
    return h;
}

static void reset_layout(pyimg_ext4 *h) {
    for (uint32_t i = 0; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        free(in->own.v);
        in->own = (e4_extents){0};
        free(in->tree);
        in->tree = NULL;
        in->ntree = 0;
        free(in->leaf_start);
        in->leaf_start = NULL;
        in->nleaves = 0;
        in->xblock = -1;
        in->htree_levels = -1;
        in->dir_blocks = 0;
        in->i_blocks = 0;
        in->nx_inode = 0;
    }
    for (size_t c = 0; c < h->ncontents; c++) {
        free(h->contents[c].ext.v);
        h->contents[c].ext = (e4_extents){0};
        h->contents[c].blocks = 0;
    }
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
        e4_inode *in = &h->inodes[i];
        free(in->symlink);
        for (size_t d = 0; d < in->ndents; d++) free(in->dents[d].name);
        free(in->dents);
        for (size_t x = 0; x < in->nx; x++) {
            free(in->xattrs[x].name);
            free(in->xattrs[x].value);
        }
        free(in->xattrs);
    }
    free(h->inodes);
    for (size_t c = 0; c < h->ncontents; c++) free(h->contents[c].runs);
    free(h->contents);
    free(h->xblocks);
    free(h);
}

const char *pyimg_ext4_error(const pyimg_ext4 *h) { return h->err; }

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
    in->used = 1;
    in->mode = (uint16_t)mode;
    in->uid = uid;
    in->gid = gid;
    in->mtime = mtime;
    in->mtime_nsec = mtime_nsec;
    in->size = size;
    in->links = links;
    in->rdev_major = rdev_major;
    in->rdev_minor = rdev_minor;
    in->parent = parent;
    return 0;
}

int pyimg_ext4_set_symlink(pyimg_ext4 *h, uint32_t ino, const uint8_t *target, size_t len) {
    e4_inode *in = get_inode(h, ino);
    if (!in) return e4_fail(h, PYIMG_EINVAL, "inode %u out of range", ino);
    if (len == 0 || len >= E4_BS) return e4_fail(h, PYIMG_ELIMIT, "symlink target of %zu bytes (1..4095 allowed)", len);
    free(in->symlink);
    in->symlink = malloc(len);
    if (!in->symlink) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    memcpy(in->symlink, target, len);
    in->symlink_len = (uint32_t)len;
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
    if (e4_grow((void **)&in->xattrs, &in->xcap, in->nx + 1, sizeof *in->xattrs)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    e4_xattr *x = &in->xattrs[in->nx];
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
    in->nx++;
    return 0;
}

int pyimg_ext4_add_dirent(pyimg_ext4 *h, uint32_t dir, const uint8_t *name, size_t name_len, uint32_t child) {
    e4_inode *in = get_inode(h, dir);
    if (!in || !get_inode(h, child)) return e4_fail(h, PYIMG_EINVAL, "inode out of range");
    if (name_len == 0 || name_len > 255) return e4_fail(h, PYIMG_ELIMIT, "file name of %zu bytes (1..255 allowed)", name_len);
    if (e4_grow((void **)&in->dents, &in->dcap, in->ndents + 1, sizeof *in->dents)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    e4_dirent *d = &in->dents[in->ndents];
    d->name = malloc(name_len);
    if (!d->name) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    memcpy(d->name, name, name_len);
    d->len = (uint16_t)name_len;
    d->ino = child;
    d->hash = d->minor = 0;
    in->ndents++;
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
    if (c->nruns && c->runs[c->nruns - 1].lblk + c->runs[c->nruns - 1].count > lblk)
        return e4_fail(h, PYIMG_EINVAL, "content runs out of order");
    if (e4_grow((void **)&c->runs, &c->cap, c->nruns + 1, sizeof *c->runs)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    c->runs[c->nruns++] = (e4_run){lblk, count};
    return 0;
}

int pyimg_ext4_set_content(pyimg_ext4 *h, uint32_t ino, uint32_t content) {
    e4_inode *in = get_inode(h, ino);
    if (!in || content >= h->ncontents) return e4_fail(h, PYIMG_EINVAL, "inode or content out of range");
    in->content = content;
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

int e4_alloc_extents(pyimg_ext4 *h, e4_extents *e, uint32_t lblk, uint32_t count) {
    while (count) {
        uint64_t start;
        uint32_t got;
        int rc = e4_alloc(h, count, &start, &got);
        if (rc) return rc;
        if (e4_ext_push(e, lblk, start, got)) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
        lblk += got;
        count -= got;
    }
    return 0;
}

static int alloc_tree(pyimg_ext4 *h, e4_inode *in, size_t nextents) {
    uint32_t n = e4_tree_blocks(nextents);
    if (!n) return 0;
    in->tree = calloc(n, sizeof *in->tree);
    if (!in->tree) return e4_fail(h, PYIMG_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t got;
        int rc = e4_alloc(h, 1, &in->tree[i], &got);
        if (rc) return rc;
    }
    in->ntree = n;
    in->i_blocks += n;
    return 0;
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
    h->csum_seed = pyimg_crc32c(~0u, h->g.uuid, 16);
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
        j->used = 1;
        j->mode = S_IFREG | 0600;
        j->links = 1;
        j->size = (uint64_t)h->g.journal_blocks * E4_BS;
        j->mtime = h->g.epoch;
        if ((rc = e4_alloc_extents(h, &j->own, 0, h->g.journal_blocks))) return rc;
        j->i_blocks = h->g.journal_blocks;
    }
    /* directories, slow symlinks, xattr blocks, in inode order */
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISDIR(in->mode)) {
            if ((rc = e4_dir_plan(h, i))) return rc;
            if ((rc = e4_alloc_extents(h, &in->own, 0, in->dir_blocks))) return rc;
            in->i_blocks += in->dir_blocks;
            in->size = (uint64_t)in->dir_blocks * E4_BS;
        } else if (S_ISLNK(in->mode) && in->symlink_len >= 60) {
            if ((rc = e4_alloc_extents(h, &in->own, 0, 1))) return rc;
            in->i_blocks += 1;
        }
        if ((rc = e4_xattr_plan(h, i))) return rc;
    }
    /* file data, content by content: shared contents are stored once */
    for (size_t c = 0; c < h->ncontents; c++) {
        e4_content *ct = &h->contents[c];
        for (size_t r = 0; r < ct->nruns; r++) {
            if ((rc = e4_alloc_extents(h, &ct->ext, ct->runs[r].lblk, ct->runs[r].count))) return rc;
            ct->blocks += ct->runs[r].count;
        }
        h->data_blocks += ct->blocks;
    }
    /* extent tree blocks of inodes with more than 4 extents */
    for (uint32_t i = 1; i <= h->max_ino; i++) {
        e4_inode *in = &h->inodes[i];
        if (!in->used) continue;
        if (S_ISREG(in->mode) && in->content >= 0) {
            e4_content *ct = &h->contents[in->content];
            in->i_blocks += ct->blocks;
            if ((rc = alloc_tree(h, in, ct->ext.n))) return rc;
        } else if ((rc = alloc_tree(h, in, in->own.n))) {
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
