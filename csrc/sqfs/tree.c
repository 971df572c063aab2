/* Encodes every inode and directory of a tree in one call.
 *
 * Why: one cffi call per inode (and the arrays built for each directory) cost
 * about 3 us per entry in Python; a tree of 100k entries is described once as
 * columns instead (pyimg_sqfs_tree) and walked here.
 *
 * Order: post-order over the tree (children in name order, then their
 * directory), so that each directory's listing can name the references of its
 * children.  A hard-linked inode is encoded at its first path in that order.
 */
#include <stdlib.h>

#include "sqfs.h"

typedef struct {
    const pyimg_sqfs_tree *t;
    uint32_t *child_start; /* CSR: children of node i are child_list[child_start[i] .. child_start[i+1]) */
    uint32_t *child_list;
    uint8_t *emitted; /* per inode */
    /* Scratch arrays for one directory listing, sized for the largest directory. */
    uint32_t *name_ends;
    uint64_t *refs;
    uint32_t *inos;
    uint16_t *types;
    uint8_t *names;
} walk;

static void walk_free(walk *k) {
    free(k->child_start);
    free(k->child_list);
    free(k->emitted);
    free(k->name_ends);
    free(k->refs);
    free(k->inos);
    free(k->types);
    free(k->names);
}

/* Children lists from the parent column: nodes come in tree order, so each
 * node's children appear in name order already. */
static int build_children(walk *k) {
    const pyimg_sqfs_tree *t = k->t;
    size_t n = t->node_count;
    k->child_start = calloc(n + 1, sizeof *k->child_start);
    k->child_list = malloc((n ? n : 1) * sizeof *k->child_list);
    if (!k->child_start || !k->child_list) return -PYIMG_ENOMEM;
    for (size_t i = 1; i < n; i++) {
        if (t->node_parent[i] >= i) return -PYIMG_EINVAL; /* a parent precedes its children */
        k->child_start[t->node_parent[i] + 1]++;
    }
    for (size_t i = 0; i < n; i++) k->child_start[i + 1] += k->child_start[i];
    uint32_t *fill = malloc((n ? n : 1) * sizeof *fill);
    if (!fill) return -PYIMG_ENOMEM;
    memcpy(fill, k->child_start, n * sizeof *fill);
    for (size_t i = 1; i < n; i++) k->child_list[fill[t->node_parent[i]]++] = (uint32_t)i;
    free(fill);
    return 0;
}

static int alloc_scratch(walk *k) {
    const pyimg_sqfs_tree *t = k->t;
    size_t most = 1, longest = 1;
    for (size_t i = 0; i < t->node_count; i++) {
        size_t count = k->child_start[i + 1] - k->child_start[i];
        if (count > most) most = count;
    }
    for (size_t i = 0; i < t->node_count; i++) {
        size_t bytes = 0;
        for (uint32_t c = k->child_start[i]; c < k->child_start[i + 1]; c++) {
            uint32_t child = k->child_list[c];
            bytes += t->name_ends[child] - (child ? t->name_ends[child - 1] : 0);
        }
        if (bytes > longest) longest = bytes;
    }
    k->emitted = calloc(t->inode_count ? t->inode_count : 1, 1);
    k->name_ends = malloc(most * sizeof *k->name_ends);
    k->refs = malloc(most * sizeof *k->refs);
    k->inos = malloc(most * sizeof *k->inos);
    k->types = malloc(most * sizeof *k->types);
    k->names = malloc(longest);
    if (!k->emitted || !k->name_ends || !k->refs || !k->inos || !k->types || !k->names) return -PYIMG_ENOMEM;
    return 0;
}

static void common_of(const pyimg_sqfs_tree *t, uint32_t ino, pyimg_sqfs_common *c) {
    size_t i = ino - 1;
    c->mode = t->mode[i];
    c->uid_idx = t->uid_idx[i];
    c->gid_idx = t->gid_idx[i];
    c->mtime = t->mtime[i];
    c->ino = ino;
    c->nlink = t->nlink[i];
    c->xattr = t->xattr[i];
}

static int64_t emit_file(pyimg_sqfs *w, const pyimg_sqfs_tree *t, const pyimg_sqfs_common *c, uint32_t ino) {
    int64_t f = t->file_of[ino - 1];
    if (f < 0 || (uint64_t)f >= t->file_count) return pyimg_sqfs_fail(w, PYIMG_EINVAL, "file without a placement");
    uint64_t first = f ? t->block_ends[f - 1] : 0;
    return pyimg_sqfs_add_file(w, c, t->size[ino - 1], t->blocks_start[f], t->sparse[f], t->frag_index[f],
                               t->frag_offset[f], t->block_sizes + first, (size_t)(t->block_ends[f] - first));
}

static int64_t emit_dir(pyimg_sqfs *w, walk *k, const pyimg_sqfs_common *c, size_t node, uint64_t *refs_out) {
    const pyimg_sqfs_tree *t = k->t;
    size_t n = 0, at = 0;
    for (uint32_t e = k->child_start[node]; e < k->child_start[node + 1]; e++, n++) {
        uint32_t child = k->child_list[e];
        uint64_t from = child ? t->name_ends[child - 1] : 0, len = t->name_ends[child] - from;
        memcpy(k->names + at, t->names + from, (size_t)len);
        at += (size_t)len;
        uint32_t ino = t->node_ino[child];
        k->name_ends[n] = (uint32_t)at;
        k->refs[n] = refs_out[ino - 1];
        k->inos[n] = ino;
        k->types[n] = t->type[ino - 1];
    }
    uint32_t parent = node ? t->node_ino[t->node_parent[node]] : (uint32_t)t->inode_count + 1;
    return pyimg_sqfs_add_dir(w, c, parent, n, k->names, k->name_ends, k->refs, k->inos, k->types);
}

static int64_t emit(pyimg_sqfs *w, walk *k, size_t node, uint64_t *refs_out) {
    const pyimg_sqfs_tree *t = k->t;
    uint32_t ino = t->node_ino[node];
    pyimg_sqfs_common c;
    common_of(t, ino, &c);
    uint16_t type = t->type[ino - 1];
    if (type == SQFS_FILE) return emit_file(w, t, &c, ino);
    if (type == SQFS_DIR) return emit_dir(w, k, &c, node, refs_out);
    uint64_t from = ino > 1 ? t->target_ends[ino - 2] : 0;
    return pyimg_sqfs_add_special(w, &c, type, t->rdev[ino - 1], t->targets + from,
                                  (size_t)(t->target_ends[ino - 1] - from));
}

static int post_order(pyimg_sqfs *w, walk *k, uint64_t *refs_out, size_t *failed_node) {
    const pyimg_sqfs_tree *t = k->t;
    /* Explicit stack of (node, next child to visit): trees can be deep. */
    size_t *stack = malloc((t->node_count + 1) * sizeof *stack);
    uint32_t *next = malloc((t->node_count + 1) * sizeof *next);
    if (!stack || !next) {
        free(stack);
        free(next);
        return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
    }
    size_t depth = 0;
    stack[depth] = 0;
    next[depth++] = k->child_start[0];
    int rc = 0;
    while (depth && !rc) {
        size_t node = stack[depth - 1];
        if (next[depth - 1] < k->child_start[node + 1]) {
            uint32_t child = k->child_list[next[depth - 1]++];
            stack[depth] = child;
            next[depth++] = k->child_start[child];
            continue;
        }
        depth--;
        uint32_t ino = t->node_ino[node];
        if (ino == 0 || ino > t->inode_count) {
            rc = pyimg_sqfs_fail(w, PYIMG_EINVAL, "inode number out of range");
        } else if (!k->emitted[ino - 1]) {
            int64_t ref = emit(w, k, node, refs_out);
            if (ref < 0) rc = (int)ref;
            else refs_out[ino - 1] = (uint64_t)ref;
            k->emitted[ino - 1] = 1;
        }
        if (rc) *failed_node = node;
    }
    free(stack);
    free(next);
    return rc;
}

int pyimg_sqfs_encode_tree(pyimg_sqfs *w, const pyimg_sqfs_tree *t, uint64_t *refs_out, size_t *failed_node) {
    *failed_node = 0;
    if (!t->node_count) return pyimg_sqfs_fail(w, PYIMG_EINVAL, "empty tree");
    walk k = {.t = t};
    int rc = build_children(&k);
    if (!rc) rc = alloc_scratch(&k);
    if (rc) {
        walk_free(&k);
        return rc == -PYIMG_EINVAL ? pyimg_sqfs_fail(w, PYIMG_EINVAL, "nodes out of tree order")
                                   : pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
    }
    rc = post_order(w, &k, refs_out, failed_node);
    walk_free(&k);
    return rc;
}
