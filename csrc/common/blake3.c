/* BLAKE3 (hash mode, 32-byte output), portable C, written from the BLAKE3
 * specification (https://github.com/BLAKE3-team/BLAKE3-specs).
 *
 * Used for small files, hashed inside pyimg_read_batch with the GIL released
 * (pyimg_blake3_jobs: a batch at a time, SIMD across files);
 * large files go through the `blake3` Python package (SIMD, multi-threaded).
 * Both give the same digests: tests/unit/test_c_core.py checks it.
 */
#include <stdlib.h>

#include "common.h"

#define B3_BLOCK 64
#define B3_CHUNK 1024
#define B3_MAX_DEPTH 54 /* 2^54 chunks: more than any file */

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};
/* The message word order of each round: the spec's permutation
 * {2,6,3,10,7,0,4,13,1,11,12,5,9,14,15,8} applied round after round, written out so
 * no round has to move the message. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline void g(uint32_t s[16], int a, int b, int c, int d, uint32_t mx, uint32_t my) {
    s[a] = s[a] + s[b] + mx;
    s[d] = rotr(s[d] ^ s[a], 16);
    s[c] = s[c] + s[d];
    s[b] = rotr(s[b] ^ s[c], 12);
    s[a] = s[a] + s[b] + my;
    s[d] = rotr(s[d] ^ s[a], 8);
    s[c] = s[c] + s[d];
    s[b] = rotr(s[b] ^ s[c], 7);
}

/* The compression function; out receives the first 8 words of the state. */
static void compress(const uint32_t cv[8], const uint8_t block[B3_BLOCK], uint64_t counter, uint32_t block_len,
                     uint32_t flags, uint32_t out[8]) {
    uint32_t m[16], s[16];
    for (int i = 0; i < 16; i++) m[i] = get_le32(block + 4 * i);
    for (int i = 0; i < 8; i++) s[i] = cv[i];
    for (int i = 0; i < 4; i++) s[8 + i] = IV[i];
    s[12] = (uint32_t)counter;
    s[13] = (uint32_t)(counter >> 32);
    s[14] = block_len;
    s[15] = flags;
    for (int round = 0; round < 7; round++) {
        const uint8_t *r = SCHEDULE[round];
        g(s, 0, 4, 8, 12, m[r[0]], m[r[1]]);
        g(s, 1, 5, 9, 13, m[r[2]], m[r[3]]);
        g(s, 2, 6, 10, 14, m[r[4]], m[r[5]]);
        g(s, 3, 7, 11, 15, m[r[6]], m[r[7]]);
        g(s, 0, 5, 10, 15, m[r[8]], m[r[9]]);
        g(s, 1, 6, 11, 12, m[r[10]], m[r[11]]);
        g(s, 2, 7, 8, 13, m[r[12]], m[r[13]]);
        g(s, 3, 4, 9, 14, m[r[14]], m[r[15]]);
    }
    for (int i = 0; i < 8; i++) out[i] = s[i] ^ s[i + 8];
}

/* What is left to compress of a node: the root is compressed with ROOT set, any
 * other node for its chaining value. */
typedef struct {
    uint32_t cv[8];
    uint8_t block[B3_BLOCK];
    uint64_t counter;
    uint32_t block_len;
    uint32_t flags;
} b3_output;

static void output_cv(const b3_output *o, uint32_t out[8]) {
    compress(o->cv, o->block, o->counter, o->block_len, o->flags, out);
}

/* Runs a chunk (at most 1024 bytes) up to its last block. */
static void chunk_output(const uint8_t *data, size_t len, uint64_t chunk_index, b3_output *o) {
    uint32_t cv[8];
    memcpy(cv, IV, sizeof cv);
    uint32_t start = CHUNK_START;
    while (len > B3_BLOCK) {
        compress(cv, data, chunk_index, B3_BLOCK, start, cv);
        start = 0;
        data += B3_BLOCK;
        len -= B3_BLOCK;
    }
    memcpy(o->cv, cv, sizeof cv);
    memset(o->block, 0, B3_BLOCK);
    if (len) memcpy(o->block, data, len);
    o->counter = chunk_index;
    o->block_len = (uint32_t)len;
    o->flags = start | CHUNK_END;
}

static void parent_output(const uint32_t left[8], const uint32_t right[8], b3_output *o) {
    memcpy(o->cv, IV, sizeof o->cv);
    for (int i = 0; i < 8; i++) {
        put_le32(o->block + 4 * i, left[i]);
        put_le32(o->block + 32 + 4 * i, right[i]);
    }
    o->counter = 0;
    o->block_len = B3_BLOCK;
    o->flags = PARENT;
}

/* The last steps of every input: the last node output `o` is merged with the
 * chaining values left on the stack, right to left, and the root is compressed
 * with ROOT set into the digest. */
static void finish_root(b3_output *o, uint32_t (*stack)[8], size_t depth, uint8_t digest[32]) {
    while (depth > 0) {
        uint32_t cv[8];
        output_cv(o, cv);
        parent_output(stack[--depth], cv, o);
    }
    uint32_t root[8];
    compress(o->cv, o->block, o->counter, o->block_len, o->flags | ROOT, root);
    for (int i = 0; i < 8; i++) put_le32(digest + 4 * i, root[i]);
}

void pyimg_blake3(const uint8_t *data, size_t len, uint8_t digest[32]) {
    uint32_t stack[B3_MAX_DEPTH][8];
    size_t depth = 0;
    uint64_t chunk = 0;
    /* Every chunk but the last goes onto the stack, merged like a binary counter. */
    while (len > B3_CHUNK) {
        b3_output o;
        uint32_t cv[8];
        chunk_output(data, B3_CHUNK, chunk, &o);
        output_cv(&o, cv);
        chunk++;
        for (uint64_t total = chunk; (total & 1) == 0; total >>= 1) {
            b3_output p;
            parent_output(stack[--depth], cv, &p);
            output_cv(&p, cv);
        }
        memcpy(stack[depth++], cv, sizeof cv);
        data += B3_CHUNK;
        len -= B3_CHUNK;
    }
    b3_output o;
    chunk_output(data, len, chunk, &o);
    finish_root(&o, stack, depth, digest);
}

/* ---- Many inputs at once: full chunks hashed eight at a time ---------------------
 *
 * Small files are the common case, and one 4 KiB file has only four chunks: too
 * few to fill SIMD lanes within a file.  So the full chunks of every input of a
 * batch are pooled and their chaining values computed eight at a time, one chunk
 * per lane (GCC/Clang vector extensions: AVX2 where the CPU has it, SSE2 or NEON
 * otherwise).  Each input's tree is then merged from those chaining values exactly
 * as pyimg_blake3 does it. */

/* The digest of an input of more than one chunk whose full chunks' chaining
 * values are cvs[0 .. len / B3_CHUNK). */
static void finish_from_cvs(const uint8_t *data, size_t len, const uint32_t (*cvs)[8], uint8_t digest[32]) {
    uint64_t chunks = (len + B3_CHUNK - 1) / B3_CHUNK, full = len / B3_CHUNK;
    uint32_t stack[B3_MAX_DEPTH][8];
    size_t depth = 0;
    for (uint64_t c = 0; c + 1 < chunks; c++) {
        uint32_t cv[8];
        memcpy(cv, cvs[c], sizeof cv);
        for (uint64_t total = c + 1; (total & 1) == 0; total >>= 1) {
            b3_output p;
            parent_output(stack[--depth], cv, &p);
            output_cv(&p, cv);
        }
        memcpy(stack[depth++], cv, sizeof cv);
    }
    b3_output o;
    if (full == chunks) { /* the last chunk is full: its chaining value is known */
        parent_output(stack[--depth], cvs[chunks - 1], &o);
    } else {
        size_t at = (size_t)(chunks - 1) * B3_CHUNK;
        chunk_output(data + at, len - at, chunks - 1, &o);
    }
    finish_root(&o, stack, depth, digest);
}

#define LANES 8

#if defined(__GNUC__) || defined(__clang__)
typedef uint32_t u32xL __attribute__((vector_size(4 * LANES)));

/* A macro, not a function: passing 32-byte vectors by value changes the ABI. */
#define VROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

#define VG(a, b, c, d, mx, my)                                                                                   \
    do {                                                                                                         \
        s[a] = s[a] + s[b] + (mx);                                                                               \
        s[d] = VROTR(s[d] ^ s[a], 16);                                                                           \
        s[c] = s[c] + s[d];                                                                                      \
        s[b] = VROTR(s[b] ^ s[c], 12);                                                                           \
        s[a] = s[a] + s[b] + (my);                                                                               \
        s[d] = VROTR(s[d] ^ s[a], 8);                                                                            \
        s[c] = s[c] + s[d];                                                                                      \
        s[b] = VROTR(s[b] ^ s[c], 7);                                                                            \
    } while (0)

/* Chaining values of LANES full chunks: chunk j starts at p[j] and is chunk
 * number counter[j] of its input. */
#if defined(__x86_64__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
/* x86-64-v4 (AVX-512VL): its vector rotates make the rounds ~20 % faster than AVX2
 * at the same 8 lanes (16 lanes measured no faster). */
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
static void chunks_cv(const uint8_t *const p[LANES], const uint64_t counter[LANES], uint32_t out[LANES][8]) {
    u32xL cv[8], lo, hi;
    for (int i = 0; i < 8; i++) cv[i] = (u32xL){0} + IV[i];
    for (int j = 0; j < LANES; j++) {
        lo[j] = (uint32_t)counter[j];
        hi[j] = (uint32_t)(counter[j] >> 32);
    }
    for (int blk = 0; blk < B3_CHUNK / B3_BLOCK; blk++) {
        uint32_t words[16][LANES]; /* the message, transposed: one word of every lane per row */
        for (int j = 0; j < LANES; j++)
            for (int w = 0; w < 16; w++) words[w][j] = get_le32(p[j] + blk * B3_BLOCK + 4 * w);
        u32xL m[16], s[16];
        for (int w = 0; w < 16; w++) memcpy(&m[w], words[w], sizeof m[w]);
        uint32_t flags = (blk == 0 ? CHUNK_START : 0) | (blk == B3_CHUNK / B3_BLOCK - 1 ? CHUNK_END : 0);
        for (int i = 0; i < 8; i++) s[i] = cv[i];
        for (int i = 0; i < 4; i++) s[8 + i] = (u32xL){0} + IV[i];
        s[12] = lo;
        s[13] = hi;
        s[14] = (u32xL){0} + (uint32_t)B3_BLOCK;
        s[15] = (u32xL){0} + flags;
        for (int round = 0; round < 7; round++) {
            const uint8_t *r = SCHEDULE[round];
            VG(0, 4, 8, 12, m[r[0]], m[r[1]]);
            VG(1, 5, 9, 13, m[r[2]], m[r[3]]);
            VG(2, 6, 10, 14, m[r[4]], m[r[5]]);
            VG(3, 7, 11, 15, m[r[6]], m[r[7]]);
            VG(0, 5, 10, 15, m[r[8]], m[r[9]]);
            VG(1, 6, 11, 12, m[r[10]], m[r[11]]);
            VG(2, 7, 8, 13, m[r[12]], m[r[13]]);
            VG(3, 4, 9, 14, m[r[14]], m[r[15]]);
        }
        for (int i = 0; i < 8; i++) cv[i] = s[i] ^ s[i + 8];
    }
    for (int j = 0; j < LANES; j++)
        for (int i = 0; i < 8; i++) out[j][i] = cv[i][j];
}
#else
static void chunks_cv(const uint8_t *const p[LANES], const uint64_t counter[LANES], uint32_t out[LANES][8]) {
    for (int j = 0; j < LANES; j++) {
        b3_output o;
        chunk_output(p[j], B3_CHUNK, counter[j], &o);
        output_cv(&o, out[j]);
    }
}
#endif

void pyimg_blake3_jobs(pyimg_b3_job *jobs, size_t n) {
    size_t pooled = 0; /* full chunks of the inputs with more than one chunk */
    for (size_t i = 0; i < n; i++)
        if (jobs[i].len > B3_CHUNK) pooled += jobs[i].len / B3_CHUNK;
    uint32_t (*cvs)[8] = pooled ? malloc(pooled * sizeof *cvs) : NULL;
    if (pooled && !cvs) { /* no memory for the pool: one input at a time */
        for (size_t i = 0; i < n; i++) pyimg_blake3(jobs[i].data, jobs[i].len, jobs[i].digest);
        return;
    }
    const uint8_t *lane_data[LANES];
    uint64_t lane_counter[LANES];
    uint32_t lane_cv[LANES][8];
    size_t lanes = 0, done = 0; /* lanes filled; chaining values stored */
    for (size_t i = 0; i < n; i++) {
        if (jobs[i].len <= B3_CHUNK) continue;
        for (uint64_t c = 0; c < jobs[i].len / B3_CHUNK; c++) {
            lane_data[lanes] = jobs[i].data + c * B3_CHUNK;
            lane_counter[lanes++] = c;
            if (lanes == LANES) {
                chunks_cv(lane_data, lane_counter, lane_cv);
                memcpy(cvs[done], lane_cv, sizeof lane_cv);
                done += LANES;
                lanes = 0;
            }
        }
    }
    if (lanes) { /* the last, partial group: idle lanes repeat the first one */
        for (size_t j = lanes; j < LANES; j++) {
            lane_data[j] = lane_data[0];
            lane_counter[j] = lane_counter[0];
        }
        chunks_cv(lane_data, lane_counter, lane_cv);
        memcpy(cvs[done], lane_cv, lanes * sizeof lane_cv[0]);
    }
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (jobs[i].len <= B3_CHUNK) {
            pyimg_blake3(jobs[i].data, jobs[i].len, jobs[i].digest);
            continue;
        }
        finish_from_cvs(jobs[i].data, jobs[i].len, cvs + at, jobs[i].digest);
        at += jobs[i].len / B3_CHUNK;
    }
    free(cvs);
}

void pyimg_blake3_many(size_t n, const uint8_t *data, const uint64_t *lens, uint8_t *digests) {
    pyimg_b3_job *jobs = malloc((n ? n : 1) * sizeof *jobs);
    if (!jobs) {
        for (size_t i = 0; i < n; i++, data += lens[i - 1]) pyimg_blake3(data, (size_t)lens[i], digests + 32 * i);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        jobs[i] = (pyimg_b3_job){data, (size_t)lens[i], digests + 32 * i};
        data += lens[i];
    }
    pyimg_blake3_jobs(jobs, n);
    free(jobs);
}
