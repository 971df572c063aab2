/* Shared helpers of the C core: error codes, little-endian encoding, a growable
 * byte buffer, crc32c. */
#ifndef PYIMG_COMMON_H
#define PYIMG_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* CDEF BEGIN */
/* Errors.  Every fallible function returns 0 (or a non-negative count or
 * reference) on success and a negative PYIMG_E* code on failure, never -1 or an
 * errno.  The code alone picks the Python exception class (pyimg/_ffi.py
 * _ERROR_CLASS); the message is for people and is never parsed.
 *
 * Where the message lives: on the handle (pyimg_*_error(h)), for every call
 * that runs on one thread at a time per handle.  The calls that run on several
 * threads at once on one handle (pyimg_ext4_copy, pyimg_ext4_write_batch) take
 * a pyimg_err of the caller's instead, one per call, so that two failures
 * cannot mix their messages.  Status arrays (PYIMG_READ_*, PYIMG_WALK_*) are
 * per-entry results, data for Python's policy, not errors of the call. */
#define PYIMG_ERRMSG_MAX 512
enum {
    PYIMG_OK = 0,
    PYIMG_ENOMEM = 1,    /* allocation failed */
    PYIMG_ELIMIT = 2,    /* the input exceeds a limit of the format */
    PYIMG_EINVAL = 3,    /* a caller passed an invalid argument (a bug in pyimg) */
    PYIMG_EOUTPUT = 4,   /* writing the image failed, or would leave its region */
    PYIMG_ECALLBACK = 5, /* a Python callback failed (Python keeps its exception) */
    PYIMG_ENOSPC = 6,    /* the tree does not fit the image size asked for */
    PYIMG_ESOURCE = 7    /* reading a source failed (a file, a directory) */
};
/* A call's error, for the calls that run on several threads on one handle: the
 * code (positive, 0: none) and its message. */
typedef struct {
    int code;
    char msg[PYIMG_ERRMSG_MAX];
} pyimg_err;
const char *pyimg_strerror(int code);

/* Where a writer in C puts an image: the region of file fd that starts at byte
 * `base` and holds at most `limit` bytes (UINT64_MAX: no limit), the C side of
 * pyimg.region.Region.  The writer's offsets are relative to base; it writes
 * only inside the region and never sizes, truncates or seeks the file. */
typedef struct {
    int fd;
    uint64_t base;
    uint64_t limit;
} pyimg_out;
uint32_t pyimg_crc32c(uint32_t crc, const uint8_t *data, size_t len);
/* Keeps large buffers in the malloc heap instead of fresh mmaps (glibc; 0 or a
 * negative code).  For programs, not libraries: it changes the whole process. */
int pyimg_tune_malloc(void);
/* BLAKE3 of len bytes (hash mode, 32-byte digest). */
void pyimg_blake3(const uint8_t *data, size_t len, uint8_t digest[32]);
/* BLAKE3 of n inputs at once, back to back in data (lens[i] bytes each), into
 * digests (32 bytes each): same digests as pyimg_blake3, faster on many small
 * inputs (SIMD lanes across inputs). */
void pyimg_blake3_many(size_t n, const uint8_t *data, const uint64_t *lens, uint8_t *digests);

/* Per-file outcome of pyimg_read_batch. */
enum {
    PYIMG_READ_OK = 0,
    PYIMG_READ_OPEN = 1,    /* open failed (errno kept) */
    PYIMG_READ_IO = 2,      /* read failed (errno kept) */
    PYIMG_READ_CHANGED = 3, /* size or mtime differ from the recorded stamp */
    PYIMG_READ_SHORT = 4    /* the file ended early: it shrank */
};
/* Reads n files back to back into out (which holds the sum of sizes).  paths:
 * n NUL-terminated paths, back to back; offsets/sizes: the byte range of each;
 * stamp_sizes/stamp_mtimes: the recorded st_size and st_mtime in ns (size -1: do
 * not check).  Fills status[i] (PYIMG_READ_*), errnos[i] and, for each file of
 * at most hash_max bytes, its BLAKE3 in digests[32*i..] (others: left as they
 * are; the caller hashes big files with a SIMD implementation).  All arguments
 * are borrowed.  Returns the number of files that failed (>= 0: the failures
 * are data in status, for Python to report in plan order; it cannot fail). */
int pyimg_read_batch(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                     const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                     int32_t *errnos, uint8_t *digests, uint64_t hash_max);
/* pyimg_read_batch, and idents[5*i..]: each file's identity as pyimg_identity_batch
 * gives it, from the fstat after its read (unset for a file that failed). */
int pyimg_read_batch_ident(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                           const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                           int32_t *errnos, uint8_t *digests, uint64_t hash_max, int64_t *idents);
/* The build cache's identities of n files (paths as pyimg_read_batch's): each is
 * opened (a file the build cannot read has none; symlinks are not followed) and
 * fstat'ed; when its size and mtime are still the recorded stamp, ident[5*i..] =
 * st_dev, st_ino, st_size, st_mtime and st_ctime in ns, and ok[i] = 1; else
 * ok[i] = 0.  Returns the number of files with an identity. */
size_t pyimg_identity_batch(size_t n, const char *paths, const int64_t *stamp_sizes, const int64_t *stamp_mtimes,
                            int64_t *ident, uint8_t *ok);
/* The runs of non-zero blocks of data (`block` bytes each, the last one may be
 * partial; an all-zero block is a hole): run k is run_first[k] .. + run_count[k],
 * numbered from first_block.  cap: room in the two arrays (ceil(size / block)
 * always suffices).  Returns the number of runs, -PYIMG_EINVAL if cap is too small. */
/* Whether len bytes at p are all zero. */
int pyimg_all_zero(const uint8_t *p, size_t len);
int64_t pyimg_block_runs(const uint8_t *data, uint64_t size, uint32_t block, uint32_t first_block,
                         uint32_t *run_first, uint32_t *run_count, size_t cap);
/* pyimg_read_batch, and for each file read its non-zero block runs (as
 * pyimg_block_runs, numbered from 0): nruns[i] of them, the files' runs back to
 * back in run_first/run_count (run_cap: room, at least the sum of the files'
 * block counts), and stored[i], its bytes outside holes.  A file that failed
 * gets no runs.  idents, if not NULL: 5 per file, each file's identity as
 * pyimg_identity_batch gives it, from the fstat after its read (unset for a file
 * that failed).  Returns the number of files that failed. */
int pyimg_scan_batch(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                     const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                     int32_t *errnos, uint8_t *digests, uint64_t hash_max, uint32_t block, uint32_t *nruns,
                     uint32_t *run_first, uint32_t *run_count, size_t run_cap, uint64_t *stored,
                     int64_t *idents);
/* Content ids for a build's files, in plan order (keytab.c): files with the same
 * digest share one id.  For files first .. first+n-1 (digests: every file's
 * 32-byte digest by file number, the same array on every call, filled up to
 * first+n-1): ids[i] = the id of the earlier file with the same digest, or the
 * next new id (*next_id, then incremented) with is_new[i - first] = 1.  With
 * dedup == 0 every file is new.  Returns 0 or a negative PYIMG_E* code (message:
 * pyimg_dedup_error). */
typedef struct pyimg_dedup pyimg_dedup;
pyimg_dedup *pyimg_dedup_new(void);
void pyimg_dedup_free(pyimg_dedup *d);
const char *pyimg_dedup_error(const pyimg_dedup *d);
int pyimg_dedup_assign(pyimg_dedup *d, const uint8_t *digests, size_t first, size_t n, int dedup,
                       uint32_t *next_id, uint32_t *ids, uint8_t *is_new);
/* CDEF END */

/* Used inside the C core only (readfiles.c, ext4/data.c): not in the cdef. */
/* One file as pyimg_read_batch reads each: `size` bytes at `offset` into out,
 * checked against the stamp after the read.  Returns PYIMG_READ_*; *err gets
 * errno for OPEN and IO. */
int pyimg_read_file(const char *path, uint64_t offset, uint64_t size, int64_t stamp_size, int64_t stamp_mtime,
                    uint8_t *out, int32_t *err);
/* Whether the file at `path` still has the recorded stamp, for bytes read earlier
 * and kept: PYIMG_READ_OK, _CHANGED, or _OPEN when it cannot be stat'ed (*err). */
int pyimg_check_stamp(const char *path, int64_t stamp_size, int64_t stamp_mtime, int32_t *err);

/* A path for the *at calls (longpath.c): *dirfd = AT_FDCWD and *rest = path when
 * the path is shorter than PATH_MAX (no call made); else the directory reached by
 * opening the path's leading components a piece at a time (each shorter than
 * PATH_MAX) and, in *rest, the rest of the path relative to it ("." when nothing
 * is left).  Returns 0, or an errno (nothing left open).  pyimg_path_done(*dirfd)
 * closes it (errno kept). */
int pyimg_path_at(const char *path, int *dirfd, const char **rest);
void pyimg_path_done(int dirfd);

/* Sets e (code > 0, a printf message) and returns -code: every fail helper of
 * the core ends in this one, so all of them take a positive code. */
int pyimg_err_set(pyimg_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int pyimg_err_vset(pyimg_err *e, int code, const char *fmt, va_list ap);

/* Writes all of buf at relative offset off of the region, or fails with
 * PYIMG_EOUTPUT (message in err): a write that would leave the region, or the
 * write itself (a full disk says so). */
int pyimg_out_write(const pyimg_out *o, const void *buf, size_t len, uint64_t off, pyimg_err *err);
/* 0 when [off, off + len) lies inside the region, else -PYIMG_EOUTPUT. */
int pyimg_out_check(const pyimg_out *o, uint64_t off, uint64_t len, pyimg_err *err);

/* A table of 32-byte digests kept elsewhere, by number (keytab.c). */
#define PYIMG_KEY_SIZE 32
typedef struct {
    uint32_t ref; /* key number + 1; 0: an empty slot */
    uint32_t value;
} pyimg_kslot;
typedef struct {
    pyimg_kslot *slots;
    size_t cap; /* a power of two, or 0 */
    size_t count;
} pyimg_keytab;
/* 1 when `key` is in the table (keys: the key array its numbers refer to), with
 * its number and value (either pointer may be NULL); else 0. */
int pyimg_keytab_find(const pyimg_keytab *t, const uint8_t *keys, const uint8_t *key, uint32_t *key_no,
                      uint32_t *value);
/* Adds key number key_no of `keys` (known to be absent) with its value. */
int pyimg_keytab_put(pyimg_keytab *t, const uint8_t *keys, size_t key_no, uint32_t value);
void pyimg_keytab_free(pyimg_keytab *t);

/* One input of pyimg_blake3_jobs (borrowed pointers). */
typedef struct {
    const uint8_t *data;
    size_t len;
    uint8_t *digest; /* 32 bytes, written */
} pyimg_b3_job;
/* Hashes every job; the batch form of pyimg_blake3 (see blake3.c). */
void pyimg_blake3_jobs(pyimg_b3_job *jobs, size_t n);

/* A growable byte buffer; owns its memory. */
typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
} pyimg_buf;

int pyimg_buf_reserve(pyimg_buf *b, size_t extra);
int pyimg_buf_append(pyimg_buf *b, const void *src, size_t len);
void pyimg_buf_free(pyimg_buf *b);

/* Little-endian encoders: on-disk structures are written field by field. */
static inline void put_le16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void put_le64(uint8_t *p, uint64_t v) {
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}
static inline uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t get_le64(const uint8_t *p) {
    return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32);
}

#endif
