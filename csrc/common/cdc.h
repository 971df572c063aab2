/* Content-defined chunking: a gear-hash cutter after FastCDC (Xia et al., USENIX ATC
 * 2016), for storing images as chunks that stay the same between versions. */
#ifndef PYIMG_CDC_H
#define PYIMG_CDC_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
/* A cutter's parameters and its state, carried from one buffer to the next (so a file
 * can be scanned in pieces of any size and gives the same cuts as in one piece).
 *
 *   gear      256 pseudo-random words: gear[i] = the first 8 bytes (little-endian) of
 *             BLAKE3("pyimg cdc gear v1" || u32le(i)), made by pyimg_cdc_init.
 *   h         the gear hash: h = (h << 1) + gear[byte]; after 64 bytes a byte has
 *             shifted out, so h depends on the last 64 bytes only.
 *   n         bytes in the chunk so far.
 *
 * A chunk ends after byte n when n == max, or when n > min and the top bits of h are
 * all zero: `bits_small` top bits before n reaches avg, `bits_large` after (FastCDC's
 * "normalized chunking": harder to cut early, easier late, so sizes bunch near avg).
 * Nothing is hashed in a chunk's first min - 64 bytes: a cut depends only on the bytes
 * from the chunk's start. */
typedef struct {
    uint64_t gear[256];
    uint64_t h;
    uint64_t n;
    uint64_t min_size;
    uint64_t avg_size;
    uint64_t max_size;
    unsigned bits_small;
    unsigned bits_large;
} pyimg_cdc;

/* Sets up a cutter: 64 < min_size < avg_size < max_size, avg_size a power of two (2^k,
 * 8 <= k <= 40); 0 or PYIMG_EINVAL. */
int pyimg_cdc_init(pyimg_cdc *c, uint64_t min_size, uint64_t avg_size, uint64_t max_size);
/* Scans len bytes that follow what the cutter has seen.  Writes the length of each
 * chunk that ends inside data to lens (at most cap of them) and returns how many;
 * *used is the number of bytes consumed: len, or less when lens filled up (call again
 * with the rest).  The bytes after the last cut belong to the chunk still open (its
 * length so far is c->n): at the end of the input it is the last chunk. */
size_t pyimg_cdc_scan(pyimg_cdc *c, const uint8_t *data, size_t len, uint64_t *lens, size_t cap,
                      size_t *used);
/* CDEF END */

#endif
