/* The fragment packer: tails (the last partial block of a file, or all of a
 * small file) are appended to fragment blocks, in plan order, by the committing
 * thread.  Identical tails are stored once.
 *
 * Why in C: a tree of 100k small files sends 100k tails through here; packing
 * them one Python call at a time cost more than reading and hashing them.  A
 * batch of small files is packed in one call, and the closed blocks are handed
 * back to Python, which compresses them on its worker threads.
 *
 * Two dedup tables, kept apart on purpose: small files are looked up by their
 * whole-content digest (in both tables), tails of larger files by the digest of
 * the tail (only among other such tails).  Which table a tail may match is part
 * of the image bytes, so it must never depend on anything but plan order.
 */
#include <stdlib.h>

#include "sqfs.h"

#define KEY_SIZE 32

/* A slot names its key by number (keys live in a key store, 32 bytes each) so
 * that a table of 100k small files costs 12 bytes a slot, not 44.  ref is the
 * key's number + 1; 0 marks an empty slot. */
typedef struct {
    uint32_t ref;
    uint32_t frag_index;
    uint32_t frag_offset;
} slot;

/* Open addressing, linear probing, keyed by a BLAKE3 digest (already uniform:
 * its first 8 bytes are the hash). */
typedef struct {
    slot *slots;
    size_t cap; /* a power of two, or 0 */
    size_t count;
} table;

struct pyimg_sqfs_packer {
    uint32_t block_size;
    uint8_t *block; /* the fragment block being filled */
    size_t fill;
    uint32_t closed; /* fragment blocks closed so far: the index of the open one */
    table small;     /* whole digests of small files; keys: the caller's digest array */
    table tails;     /* digests of the tails of larger files; keys: tail_keys */
    pyimg_buf tail_keys;
    /* Closed blocks Python has not taken yet.  Each is its own allocation, handed
     * over as it is (no copy): Python compresses it and frees it. */
    pyimg_buf pending; /* pending_block items, native order (never on disk) */
};

typedef struct {
    uint8_t *data;
    size_t size;
} pending_block;

static uint64_t key_hash(const uint8_t *key) {
    uint64_t h;
    memcpy(&h, key, sizeof h);
    return h;
}

static const slot *table_find(const table *t, const uint8_t *keys, const uint8_t *key) {
    if (!t->cap) return NULL;
    for (size_t i = (size_t)key_hash(key) & (t->cap - 1);; i = (i + 1) & (t->cap - 1)) {
        const slot *s = &t->slots[i];
        if (!s->ref) return NULL;
        if (!memcmp(keys + (size_t)(s->ref - 1) * KEY_SIZE, key, KEY_SIZE)) return s;
    }
}

static int table_grow(table *t, const uint8_t *keys) {
    size_t cap = t->cap ? t->cap * 2 : 1024;
    if (cap > UINT32_MAX) return -PYIMG_ELIMIT;
    slot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -PYIMG_ENOMEM;
    for (size_t j = 0; j < t->cap; j++) {
        if (!t->slots[j].ref) continue;
        size_t i = (size_t)key_hash(keys + (size_t)(t->slots[j].ref - 1) * KEY_SIZE) & (cap - 1);
        while (slots[i].ref) i = (i + 1) & (cap - 1);
        slots[i] = t->slots[j];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* Inserts key number `key_no` (of `keys`), known to be absent. */
static int table_put(table *t, const uint8_t *keys, size_t key_no, uint32_t frag_index, uint32_t frag_offset) {
    if (key_no >= UINT32_MAX) return -PYIMG_ELIMIT;
    if ((t->count + 1) * 4 > t->cap * 3) { /* keep the load under 3/4 */
        int rc = table_grow(t, keys);
        if (rc) return rc;
    }
    const uint8_t *key = keys + key_no * KEY_SIZE;
    size_t i = (size_t)key_hash(key) & (t->cap - 1);
    while (t->slots[i].ref) i = (i + 1) & (t->cap - 1);
    t->slots[i] = (slot){(uint32_t)key_no + 1, frag_index, frag_offset};
    t->count++;
    return 0;
}

pyimg_sqfs_packer *pyimg_sqfs_packer_new(uint32_t block_size) {
    pyimg_sqfs_packer *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->block_size = block_size;
    p->block = malloc(block_size);
    if (!p->block) {
        free(p);
        return NULL;
    }
    return p;
}

void pyimg_sqfs_packer_free(pyimg_sqfs_packer *p) {
    if (!p) return;
    free(p->block);
    free(p->small.slots);
    free(p->tails.slots);
    pyimg_buf_free(&p->tail_keys);
    pyimg_sqfs_packer_clear_pending(p);
    pyimg_buf_free(&p->pending);
    free(p);
}

int pyimg_sqfs_packer_close_block(pyimg_sqfs_packer *p) {
    if (!p->fill) return 0;
    uint8_t *next = malloc(p->block_size);
    if (!next) return -PYIMG_ENOMEM;
    pending_block closed = {p->block, p->fill};
    int rc = pyimg_buf_append(&p->pending, &closed, sizeof closed);
    if (rc) {
        free(next);
        return rc;
    }
    p->block = next;
    p->fill = 0;
    p->closed++;
    return 0;
}

/* Appends a tail to the open block (closing it first when the tail does not fit). */
static int append_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, uint32_t *frag_index,
                       uint32_t *frag_offset) {
    if (len > p->block_size) return -PYIMG_EINVAL;
    if (p->fill + len > p->block_size) {
        int rc = pyimg_sqfs_packer_close_block(p);
        if (rc) return rc;
    }
    *frag_index = p->closed;
    *frag_offset = (uint32_t)p->fill;
    memcpy(p->block + p->fill, tail, len);
    p->fill += len;
    return 0;
}

int pyimg_sqfs_packer_add_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, const uint8_t *key,
                               uint32_t *frag_index, uint32_t *frag_offset) {
    if (key) {
        const slot *s = table_find(&p->tails, p->tail_keys.data, key);
        if (s) {
            *frag_index = s->frag_index;
            *frag_offset = s->frag_offset;
            return 0;
        }
    }
    int rc = append_tail(p, tail, len, frag_index, frag_offset);
    if (rc || !key) return rc;
    size_t key_no = p->tail_keys.len / KEY_SIZE;
    rc = pyimg_buf_append(&p->tail_keys, key, KEY_SIZE);
    if (!rc) rc = table_put(&p->tails, p->tail_keys.data, key_no, *frag_index, *frag_offset);
    return rc;
}

int pyimg_sqfs_packer_add_small(pyimg_sqfs_packer *p, size_t first, size_t n, const uint64_t *sizes,
                                const uint8_t *data, const uint8_t *digests, int dedup, uint32_t *frag_index,
                                uint32_t *frag_offset, uint64_t *unique_bytes) {
    const uint8_t *at = data;
    for (size_t i = first; i < first + n; i++) {
        size_t len = (size_t)sizes[i - first];
        if (len == 0) { /* no fragment: the caller shares one empty content */
            frag_index[i] = SQFS_NO_FRAGMENT;
            frag_offset[i] = 0;
            continue;
        }
        const uint8_t *key = digests + i * KEY_SIZE;
        const slot *s = dedup ? table_find(&p->small, digests, key) : NULL;
        int duplicate = s != NULL;
        if (!s && dedup) s = table_find(&p->tails, p->tail_keys.data, key); /* stored as another file's tail */
        int rc = 0;
        if (s) {
            frag_index[i] = s->frag_index;
            frag_offset[i] = s->frag_offset;
        } else {
            rc = append_tail(p, at, len, &frag_index[i], &frag_offset[i]);
        }
        if (!duplicate) {
            *unique_bytes += len;
            if (!rc && dedup) rc = table_put(&p->small, digests, i, frag_index[i], frag_offset[i]);
        }
        if (rc) return rc;
        at += len;
    }
    return 0;
}

size_t pyimg_sqfs_packer_pending(const pyimg_sqfs_packer *p) { return p->pending.len / sizeof(pending_block); }

static pending_block *pending_at(const pyimg_sqfs_packer *p, size_t i) {
    return (pending_block *)(void *)(p->pending.data + i * sizeof(pending_block));
}

uint8_t *pyimg_sqfs_packer_take(pyimg_sqfs_packer *p, size_t i, size_t *size) {
    pending_block *b = pending_at(p, i);
    uint8_t *data = b->data;
    *size = b->size;
    b->data = NULL;
    return data;
}

void pyimg_sqfs_packer_clear_pending(pyimg_sqfs_packer *p) {
    for (size_t i = 0; i < pyimg_sqfs_packer_pending(p); i++) free(pending_at(p, i)->data);
    p->pending.len = 0;
}

void pyimg_free(void *ptr) { free(ptr); }
