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
 *
 * Members: each block also lists what was appended to it, in order, as records
 * of its digest and length (PYIMG_SQFS_MEMBER bytes each).  The bytes of a block
 * follow from that list alone (members are appended back to back from offset 0,
 * and a member's digest is the BLAKE3 of its bytes), so the build cache keys a
 * fragment block by it (docs/cache.md).  A batch of small files may come without
 * their bytes ("blind": digests from the stat cache): their ranges are left zero
 * and listed as (file number, offset, length) for Python to read on a cache miss.
 */
#include <stdlib.h>

#include "sqfs.h"

struct pyimg_sqfs_packer {
    uint32_t block_size;
    uint8_t *block; /* the fragment block being filled */
    size_t fill;
    uint32_t closed;    /* fragment blocks closed so far: the index of the open one */
    pyimg_keytab small; /* small files by whole digest; keys: the caller's digests by file number */
    pyimg_keytab tails; /* tails of larger files; keys: tail_keys */
    pyimg_buf tail_keys;
    pyimg_buf tail_places; /* tail_place of each tail key, by the same number */
    pyimg_buf members;     /* the open block's member records (see above) */
    pyimg_buf blind;       /* the open block's blind ranges, PYIMG_SQFS_BLIND bytes each */
    int keyed;             /* every member of the open block came with a digest */
    /* Closed blocks Python has not taken yet.  Each is its own allocation, handed
     * over as it is (no copy): Python compresses it and frees it. */
    pyimg_buf pending; /* pending_block items, native order (never on disk) */
    pyimg_err err;
};

const char *pyimg_sqfs_packer_error(const pyimg_sqfs_packer *p) { return p->err.msg; }

/* The message of a failed step (rc < 0) inside the packer: the helpers below
 * return bare codes, each public entry point names what failed. */
static int packer_fail(pyimg_sqfs_packer *p, int rc, const char *what) {
    return pyimg_err_set(&p->err, -rc, "fragment packer: %s: %s", what, pyimg_strerror(rc));
}

typedef struct {
    uint32_t frag_index, frag_offset;
} tail_place;

typedef struct {
    uint8_t *data;
    size_t size;
    pyimg_buf members, blind;
    int keyed;
} pending_block;

pyimg_sqfs_packer *pyimg_sqfs_packer_new(uint32_t block_size) {
    pyimg_sqfs_packer *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->block_size = block_size;
    p->keyed = 1;
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
    pyimg_keytab_free(&p->small);
    pyimg_keytab_free(&p->tails);
    pyimg_buf_free(&p->tail_keys);
    pyimg_buf_free(&p->tail_places);
    pyimg_buf_free(&p->members);
    pyimg_buf_free(&p->blind);
    pyimg_sqfs_packer_clear_pending(p);
    pyimg_buf_free(&p->pending);
    free(p);
}

static int close_block(pyimg_sqfs_packer *p) {
    if (!p->fill) return 0;
    uint8_t *next = malloc(p->block_size);
    if (!next) return -PYIMG_ENOMEM;
    pending_block closed = {p->block, p->fill, p->members, p->blind, p->keyed};
    int rc = pyimg_buf_append(&p->pending, &closed, sizeof closed);
    if (rc) {
        free(next);
        return rc;
    }
    p->block = next;
    p->fill = 0;
    p->closed++;
    p->members = (pyimg_buf){0};
    p->blind = (pyimg_buf){0};
    p->keyed = 1;
    return 0;
}

/* Records a member of the open block: its digest (NULL: none, the block is then
 * not keyed) and length; and, for a blind one, file number `blind_file`. */
static int add_member(pyimg_sqfs_packer *p, const uint8_t *digest, size_t len, int blind, size_t blind_file) {
    uint8_t rec[PYIMG_SQFS_MEMBER];
    if (digest) memcpy(rec, digest, PYIMG_KEY_SIZE);
    else p->keyed = 0;
    put_le32(rec + PYIMG_KEY_SIZE, (uint32_t)len);
    int rc = digest ? pyimg_buf_append(&p->members, rec, sizeof rec) : 0;
    if (rc || !blind) return rc;
    uint8_t range[PYIMG_SQFS_BLIND];
    put_le64(range, (uint64_t)blind_file);
    put_le32(range + 8, (uint32_t)p->fill - (uint32_t)len);
    put_le32(range + 12, (uint32_t)len);
    return pyimg_buf_append(&p->blind, range, sizeof range);
}

/* Appends a tail to the open block (closing it first when the tail does not fit).
 * tail NULL: a blind member (its range zeroed, listed with blind_file). */
static int append_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, const uint8_t *digest,
                       size_t blind_file, uint32_t *frag_index, uint32_t *frag_offset) {
    if (len > p->block_size) return -PYIMG_EINVAL;
    if (p->fill + len > p->block_size) {
        int rc = close_block(p);
        if (rc) return rc;
    }
    *frag_index = p->closed;
    *frag_offset = (uint32_t)p->fill;
    if (tail) memcpy(p->block + p->fill, tail, len);
    else memset(p->block + p->fill, 0, len);
    p->fill += len;
    return add_member(p, digest, len, tail == NULL, blind_file);
}

/* The place of an earlier identical tail of a larger file, if any. */
static int find_tail(const pyimg_sqfs_packer *p, const uint8_t *key, uint32_t *frag_index, uint32_t *frag_offset) {
    uint32_t no;
    if (!pyimg_keytab_find(&p->tails, p->tail_keys.data, key, &no, NULL)) return 0;
    tail_place place;
    memcpy(&place, p->tail_places.data + (size_t)no * sizeof place, sizeof place);
    *frag_index = place.frag_index;
    *frag_offset = place.frag_offset;
    return 1;
}

int pyimg_sqfs_packer_close_block(pyimg_sqfs_packer *p) {
    int rc = close_block(p);
    return rc ? packer_fail(p, rc, "closing a block") : 0;
}

static int add_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, const uint8_t *key, int dedup,
                    uint32_t *frag_index, uint32_t *frag_offset) {
    if (!tail) return -PYIMG_EINVAL;
    if (dedup && !key) return -PYIMG_EINVAL;
    if (dedup && find_tail(p, key, frag_index, frag_offset)) return 0;
    int rc = append_tail(p, tail, len, key, 0, frag_index, frag_offset);
    if (rc || !dedup) return rc;
    size_t key_no = p->tail_keys.len / PYIMG_KEY_SIZE;
    tail_place place = {*frag_index, *frag_offset};
    rc = pyimg_buf_append(&p->tail_keys, key, PYIMG_KEY_SIZE);
    if (!rc) rc = pyimg_buf_append(&p->tail_places, &place, sizeof place);
    if (!rc) rc = pyimg_keytab_put(&p->tails, p->tail_keys.data, key_no, 0);
    return rc;
}

int pyimg_sqfs_packer_add_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, const uint8_t *key,
                               int dedup, uint32_t *frag_index, uint32_t *frag_offset) {
    int rc = add_tail(p, tail, len, key, dedup, frag_index, frag_offset);
    return rc ? packer_fail(p, rc, "adding a tail") : 0;
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
        const uint8_t *key = digests + i * PYIMG_KEY_SIZE;
        uint32_t earlier;
        int duplicate = dedup && pyimg_keytab_find(&p->small, digests, key, &earlier, NULL);
        int rc = 0;
        if (duplicate) { /* an earlier small file: its place, already in the caller's arrays */
            frag_index[i] = frag_index[earlier];
            frag_offset[i] = frag_offset[earlier];
        } else if (!(dedup && find_tail(p, key, &frag_index[i], &frag_offset[i]))) {
            rc = append_tail(p, data ? at : NULL, len, key, i, &frag_index[i], &frag_offset[i]);
        }
        if (!duplicate) {
            *unique_bytes += len;
            if (!rc && dedup) rc = pyimg_keytab_put(&p->small, digests, i, 0);
        }
        if (rc) return packer_fail(p, rc, "adding a small file");
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

int pyimg_sqfs_packer_members(const pyimg_sqfs_packer *p, size_t i, const uint8_t **members, size_t *members_len,
                              const uint8_t **blind, size_t *blind_len) {
    const pending_block *b = pending_at(p, i);
    *members = b->members.data;
    *members_len = b->members.len;
    *blind = b->blind.data;
    *blind_len = b->blind.len;
    return b->keyed;
}

void pyimg_sqfs_packer_clear_pending(pyimg_sqfs_packer *p) {
    for (size_t i = 0; i < pyimg_sqfs_packer_pending(p); i++) {
        pending_block *b = pending_at(p, i);
        free(b->data);
        pyimg_buf_free(&b->members);
        pyimg_buf_free(&b->blind);
    }
    p->pending.len = 0;
}

void pyimg_free(void *ptr) { free(ptr); }
