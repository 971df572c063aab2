/* Content-defined chunking (see cdc.h).  One table lookup, a shift, an add and a
 * compare per byte; the loop is split so that the bytes no cut can follow (before min)
 * cost nothing and the two masks need no test of n inside the hot loop. */
#include "cdc.h"

#include "common.h"

static const char GEAR_SEED[] = "pyimg cdc gear v1";

int pyimg_cdc_init(pyimg_cdc *c, uint64_t min_size, uint64_t avg_size, uint64_t max_size) {
    unsigned k = 0;
    while (k < 64 && (UINT64_C(1) << k) < avg_size) k++;
    if (min_size <= 64 || min_size >= avg_size || avg_size >= max_size || k < 8 || k > 40 ||
        (UINT64_C(1) << k) != avg_size)
        return -PYIMG_EINVAL;
    uint8_t seed[sizeof GEAR_SEED - 1 + 4];
    memcpy(seed, GEAR_SEED, sizeof GEAR_SEED - 1);
    for (uint32_t i = 0; i < 256; i++) {
        uint8_t digest[32];
        put_le32(seed + sizeof GEAR_SEED - 1, i);
        pyimg_blake3(seed, sizeof seed, digest);
        c->gear[i] = get_le64(digest);
    }
    c->h = 0;
    c->n = 0;
    c->min_size = min_size;
    c->avg_size = avg_size;
    c->max_size = max_size;
    /* Normalization level 2 (the paper's choice): avg * 4 below avg, avg / 4 above. */
    c->bits_small = k + 2;
    c->bits_large = k - 2;
    return 0;
}

/* Advances over data[i..end) looking for a hash whose top `bits` bits are zero; returns
 * the index just after the cutting byte, or end. */
static size_t find_cut(pyimg_cdc *c, const uint8_t *data, size_t i, size_t end, unsigned bits) {
    uint64_t h = c->h;
    const unsigned shift = 64 - bits;
    while (i < end) {
        h = (h << 1) + c->gear[data[i++]];
        if ((h >> shift) == 0) break;
    }
    c->h = h;
    return i;
}

size_t pyimg_cdc_scan(pyimg_cdc *c, const uint8_t *data, size_t len, uint64_t *lens, size_t cap,
                      size_t *used) {
    size_t i = 0, found = 0;
    /* Hashing starts this many bytes into a chunk: its first cut candidate (after byte
     * min + 1) then sees a full 64-byte window. */
    const uint64_t warm = c->min_size - 64;
    while (i < len && found < cap) {
        size_t left = len - i;
        if (c->n < warm) { /* skip the bytes no hash will look at */
            uint64_t skip = warm - c->n;
            if (skip > left) skip = left;
            c->n += skip;
            i += (size_t)skip;
            continue;
        }
        /* Hash up to the next point where the rule changes: min, avg, max. */
        uint64_t stop;
        unsigned bits;
        int can_cut = 1;
        if (c->n < c->min_size) {
            stop = c->min_size;
            bits = 64;
            can_cut = 0;
        } else if (c->n < c->avg_size) {
            stop = c->avg_size;
            bits = c->bits_small;
        } else {
            stop = c->max_size;
            bits = c->bits_large;
        }
        uint64_t room = stop - c->n;
        size_t end = i + (size_t)(room < left ? room : left);
        size_t at;
        if (!can_cut) {
            uint64_t h = c->h;
            for (at = i; at < end; at++) h = (h << 1) + c->gear[data[at]];
            c->h = h;
        } else {
            at = find_cut(c, data, i, end, bits);
        }
        c->n += at - i;
        int cut = c->n == c->max_size || (can_cut && at > i && (c->h >> (64 - bits)) == 0);
        i = at;
        if (cut) {
            lens[found++] = c->n;
            c->n = 0;
            c->h = 0;
        }
    }
    *used = i;
    return found;
}
