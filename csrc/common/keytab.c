/* A hash table of 32-byte digests that does not hold the digests: each slot
 * names its key by number in a key array the caller keeps (every file's digest,
 * back to back), so a table of 100k files costs 8 bytes a slot, not 40.
 *
 * Open addressing with linear probing; BLAKE3 digests are uniform, so their
 * first 8 bytes are the hash.  Used for dedup: the squashfs fragment packer
 * (csrc/sqfs/frag.c) and pyimg_dedup_assign below (ext4 contents). */
#include <stdlib.h>

#include "common.h"

static uint64_t key_hash(const uint8_t *key) {
    uint64_t h;
    memcpy(&h, key, sizeof h);
    return h;
}

static const uint8_t *key_at(const uint8_t *keys, uint32_t ref) {
    return keys + (size_t)(ref - 1) * PYIMG_KEY_SIZE;
}

int pyimg_keytab_find(const pyimg_keytab *t, const uint8_t *keys, const uint8_t *key, uint32_t *key_no,
                      uint32_t *value) {
    if (!t->cap) return 0;
    for (size_t i = (size_t)key_hash(key) & (t->cap - 1);; i = (i + 1) & (t->cap - 1)) {
        const pyimg_kslot *s = &t->slots[i];
        if (!s->ref) return 0;
        if (!memcmp(key_at(keys, s->ref), key, PYIMG_KEY_SIZE)) {
            if (key_no) *key_no = s->ref - 1;
            if (value) *value = s->value;
            return 1;
        }
    }
}

static int grow(pyimg_keytab *t, const uint8_t *keys) {
    size_t cap = t->cap ? t->cap * 2 : 1024;
    pyimg_kslot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -PYIMG_ENOMEM;
    for (size_t j = 0; j < t->cap; j++) {
        if (!t->slots[j].ref) continue;
        size_t i = (size_t)key_hash(key_at(keys, t->slots[j].ref)) & (cap - 1);
        while (slots[i].ref) i = (i + 1) & (cap - 1);
        slots[i] = t->slots[j];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

int pyimg_keytab_put(pyimg_keytab *t, const uint8_t *keys, size_t key_no, uint32_t value) {
    if (key_no >= UINT32_MAX) return -PYIMG_ELIMIT;
    if ((t->count + 1) * 4 > t->cap * 3) { /* keep the load under 3/4 */
        int rc = grow(t, keys);
        if (rc) return rc;
    }
    const uint8_t *key = keys + key_no * PYIMG_KEY_SIZE;
    size_t i = (size_t)key_hash(key) & (t->cap - 1);
    while (t->slots[i].ref) i = (i + 1) & (t->cap - 1);
    t->slots[i] = (pyimg_kslot){(uint32_t)key_no + 1, value};
    t->count++;
    return 0;
}

void pyimg_keytab_free(pyimg_keytab *t) {
    free(t->slots);
    t->slots = NULL;
    t->cap = t->count = 0;
}

/* ---- Content ids for a build's files (ext4) ----------------------------------- */

struct pyimg_dedup {
    pyimg_keytab seen; /* digest (by file number) -> content id */
    pyimg_err err;
};

pyimg_dedup *pyimg_dedup_new(void) { return calloc(1, sizeof(pyimg_dedup)); }

const char *pyimg_dedup_error(const pyimg_dedup *d) { return d->err.msg; }

void pyimg_dedup_free(pyimg_dedup *d) {
    if (!d) return;
    pyimg_keytab_free(&d->seen);
    free(d);
}

int pyimg_dedup_assign(pyimg_dedup *d, const uint8_t *digests, size_t first, size_t n, int dedup,
                       uint32_t *next_id, uint32_t *ids, uint8_t *is_new) {
    for (size_t i = first; i < first + n; i++) {
        const uint8_t *key = digests + i * PYIMG_KEY_SIZE;
        if (dedup && pyimg_keytab_find(&d->seen, digests, key, NULL, &ids[i])) {
            is_new[i - first] = 0;
            continue;
        }
        ids[i] = (*next_id)++;
        is_new[i - first] = 1;
        if (dedup) {
            int rc = pyimg_keytab_put(&d->seen, digests, i, ids[i]);
            if (rc) return pyimg_err_set(&d->err, -rc, "dedup table: %s", pyimg_strerror(rc));
        }
    }
    return 0;
}
