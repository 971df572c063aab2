/* Reading many small files in one call.
 *
 * Python's per-file cost (open, fstat, pread, fstat, close, each dropping and
 * retaking the GIL) dominates trees of small files; here a batch is read with the
 * GIL released once.  Each file is checked against the size and mtime recorded
 * when the tree was collected, after the read, so a file that changed before or
 * while it was read is reported, never silently stored half-old, half-new.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

/* A path of PATH_MAX bytes or more is opened a piece at a time (pyimg_path_at);
 * any other takes the one openat(AT_FDCWD, ...) that open() is. */
static int open_source(const char *path) {
    int at;
    const char *rel;
    int rc = pyimg_path_at(path, &at, &rel);
    if (rc) {
        errno = rc;
        return -1;
    }
    int fd = openat(at, rel, O_RDONLY | O_CLOEXEC | O_NOATIME);
    if (fd < 0 && errno == EPERM) fd = openat(at, rel, O_RDONLY | O_CLOEXEC); /* O_NOATIME needs ownership */
    pyimg_path_done(at);
    return fd;
}

static int stamp_matches(const struct stat *st, int64_t want_size, int64_t want_mtime_ns) {
    if (want_size < 0) return 1; /* not checked: a spool file cannot change */
    /* Unsigned: an mtime past 2262 (beyond int64 ns) wraps modulo 2^64, as the caller's
     * stamp does (content.BatchSources), instead of overflowing. */
    uint64_t mtime_ns = (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec;
    return (int64_t)st->st_size == want_size && mtime_ns == (uint64_t)want_mtime_ns;
}

/* The build cache's identity of a file (pyimg_identity_batch). */
static void identity_from(const struct stat *st, int64_t *ident) {
    ident[0] = (int64_t)st->st_dev;
    ident[1] = (int64_t)st->st_ino;
    ident[2] = (int64_t)st->st_size;
    /* As Python's st_mtime_ns / st_ctime_ns (wrapping past 2262, as stamp_matches does). */
    ident[3] = (int64_t)((uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec);
    ident[4] = (int64_t)((uint64_t)st->st_ctim.tv_sec * 1000000000u + (uint64_t)st->st_ctim.tv_nsec);
}

/* ident (if not NULL) gets the file's identity when it is unchanged. */
static int unchanged(int fd, int64_t want_size, int64_t want_mtime_ns, int64_t *ident) {
    struct stat st;
    int ok = fstat(fd, &st) == 0 && stamp_matches(&st, want_size, want_mtime_ns);
    if (ok && ident) identity_from(&st, ident);
    return ok;
}

int pyimg_check_stamp(const char *path, int64_t stamp_size, int64_t stamp_mtime, int32_t *err) {
    if (stamp_size < 0) return PYIMG_READ_OK;
    struct stat st;
    int at;
    const char *rel;
    int rc = pyimg_path_at(path, &at, &rel);
    if (rc) {
        *err = rc;
        return PYIMG_READ_OPEN;
    }
    rc = fstatat(at, rel, &st, 0);
    if (rc != 0) *err = errno;
    pyimg_path_done(at);
    if (rc != 0) return PYIMG_READ_OPEN;
    return stamp_matches(&st, stamp_size, stamp_mtime) ? PYIMG_READ_OK : PYIMG_READ_CHANGED;
}

/* pyimg_read_file; ident (if not NULL) gets the identity of the file read, from
 * the fstat after the read. */
static int read_file(const char *path, uint64_t offset, uint64_t size, int64_t stamp_size, int64_t stamp_mtime,
                     uint8_t *out, int32_t *err, int64_t *ident) {
    int fd = open_source(path);
    if (fd < 0) {
        *err = errno;
        return PYIMG_READ_OPEN;
    }
    int status = PYIMG_READ_OK;
    uint64_t done_bytes = 0;
    while (done_bytes < size) {
        ssize_t n = pread(fd, out + done_bytes, (size_t)(size - done_bytes), (off_t)(offset + done_bytes));
        if (n < 0) {
            if (errno == EINTR) continue;
            *err = errno;
            status = PYIMG_READ_IO;
            goto done;
        }
        if (n == 0) {
            status = PYIMG_READ_SHORT;
            break;
        }
        done_bytes += (uint64_t)n;
    }
    /* One fstat, after the read, is enough: a file changed at any time since it
     * was collected no longer has the recorded size and mtime (a short read of a
     * changed file is reported as the change it is). */
    if (!unchanged(fd, stamp_size, stamp_mtime, ident)) status = PYIMG_READ_CHANGED;
done:
    close(fd);
    return status;
}

int pyimg_read_file(const char *path, uint64_t offset, uint64_t size, int64_t stamp_size, int64_t stamp_mtime,
                    uint8_t *out, int32_t *err) {
    return read_file(path, offset, size, stamp_size, stamp_mtime, out, err, NULL);
}

/* pyimg_read_batch; idents (if not NULL): 5 per file, as pyimg_identity_batch's. */
static int read_batch(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                      const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                      int32_t *errnos, uint8_t *digests, uint64_t hash_max, int64_t *idents) {
    int failed = 0;
    const char *path = paths;
    uint64_t at = 0;
    /* Read everything first, then hash the batch at once: SIMD lanes across files. */
    pyimg_b3_job *jobs = malloc((n ? n : 1) * sizeof *jobs);
    size_t njobs = 0;
    for (size_t i = 0; i < n; i++) {
        errnos[i] = 0;
        status[i] = read_file(path, offsets[i], sizes[i], stamp_sizes[i], stamp_mtimes[i], out + at, &errnos[i],
                              idents ? idents + 5 * i : NULL);
        if (status[i] != PYIMG_READ_OK) {
            failed++;
        } else if (sizes[i] <= hash_max) {
            if (jobs) jobs[njobs++] = (pyimg_b3_job){out + at, (size_t)sizes[i], digests + 32 * i};
            else pyimg_blake3(out + at, (size_t)sizes[i], digests + 32 * i);
        }
        at += sizes[i];
        path += strlen(path) + 1;
    }
    if (jobs) pyimg_blake3_jobs(jobs, njobs);
    free(jobs);
    return failed;
}

int pyimg_read_batch(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                     const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                     int32_t *errnos, uint8_t *digests, uint64_t hash_max) {
    return read_batch(n, paths, offsets, sizes, stamp_sizes, stamp_mtimes, out, status, errnos, digests, hash_max,
                      NULL);
}

/* A block of zeros (len may be short: the file's last block): the first byte is
 * zero and every byte equals the next one. */
int pyimg_all_zero(const uint8_t *p, size_t len) { return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0); }

int64_t pyimg_block_runs(const uint8_t *data, uint64_t size, uint32_t block, uint32_t first_block,
                         uint32_t *run_first, uint32_t *run_count, size_t cap) {
    size_t nruns = 0;
    uint64_t blocks = block ? (size + block - 1) / block : 0;
    for (uint64_t b = 0; b < blocks; b++) {
        uint64_t off = b * block;
        size_t len = size - off < block ? (size_t)(size - off) : block;
        if (pyimg_all_zero(data + off, len)) continue;
        uint32_t lblk = (uint32_t)(first_block + b);
        if (nruns && run_first[nruns - 1] + run_count[nruns - 1] == lblk) {
            run_count[nruns - 1]++;
            continue;
        }
        if (nruns == cap) return -PYIMG_EINVAL;
        run_first[nruns] = lblk;
        run_count[nruns] = 1;
        nruns++;
    }
    return (int64_t)nruns;
}

/* The bytes of a file of `size` bytes stored by its runs: whole blocks, except
 * that the file's last block holds only what is left of it. */
static uint64_t stored_bytes(uint64_t size, uint32_t block, const uint32_t *first, const uint32_t *count, size_t n) {
    uint64_t total = 0;
    for (size_t k = 0; k < n; k++) {
        uint64_t start = (uint64_t)first[k] * block, end = ((uint64_t)first[k] + count[k]) * block;
        total += (end < size ? end : size) - start;
    }
    return total;
}

/* The runs of one file just read (while its bytes are still in the cache). */
static int scan_runs(const uint8_t *data, uint64_t size, uint32_t block, uint32_t *nruns, uint32_t *first,
                     uint32_t *count, size_t cap, uint64_t *stored) {
    int64_t got = pyimg_block_runs(data, size, block, 0, first, count, cap);
    if (got < 0) return (int)got;
    *nruns = (uint32_t)got;
    *stored = stored_bytes(size, block, first, count, (size_t)got);
    return 0;
}

int pyimg_read_batch_ident(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                           const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                           int32_t *errnos, uint8_t *digests, uint64_t hash_max, int64_t *idents) {
    return read_batch(n, paths, offsets, sizes, stamp_sizes, stamp_mtimes, out, status, errnos, digests, hash_max,
                      idents);
}

int pyimg_scan_batch(size_t n, const char *paths, const uint64_t *offsets, const uint64_t *sizes,
                     const int64_t *stamp_sizes, const int64_t *stamp_mtimes, uint8_t *out, int32_t *status,
                     int32_t *errnos, uint8_t *digests, uint64_t hash_max, uint32_t block, uint32_t *nruns,
                     uint32_t *run_first, uint32_t *run_count, size_t run_cap, uint64_t *stored,
                     int64_t *idents) {
    int failed = read_batch(n, paths, offsets, sizes, stamp_sizes, stamp_mtimes, out, status, errnos, digests,
                            hash_max, idents);
    uint64_t at = 0;
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        nruns[i] = 0;
        stored[i] = 0;
        if (status[i] == PYIMG_READ_OK &&
            scan_runs(out + at, sizes[i], block, &nruns[i], run_first + used, run_count + used, run_cap - used,
                      &stored[i])) {
            status[i] = PYIMG_READ_IO; /* the caller gave too little room: a bug, reported on this file */
            errnos[i] = ENOBUFS;
            failed++;
        }
        used += nruns[i];
        at += sizes[i];
    }
    return failed;
}

/* One file's identity (pyimg_identity_batch): 1 if it has one. */
static int identity_of(const char *path, int64_t stamp_size, int64_t stamp_mtime, int64_t *ident) {
    int at;
    const char *rel;
    if (pyimg_path_at(path, &at, &rel)) return 0;
    int fd = openat(at, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOATIME);
    if (fd < 0 && errno == EPERM) fd = openat(at, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    pyimg_path_done(at);
    if (fd < 0) return 0;
    struct stat st;
    int ok = fstat(fd, &st) == 0 && stamp_size >= 0 && stamp_matches(&st, stamp_size, stamp_mtime);
    close(fd);
    if (ok) identity_from(&st, ident);
    return ok;
}

size_t pyimg_identity_batch(size_t n, const char *paths, const int64_t *stamp_sizes, const int64_t *stamp_mtimes,
                            int64_t *ident, uint8_t *ok) {
    size_t found = 0;
    for (size_t i = 0; i < n; i++) {
        const char *path = paths;
        paths += strlen(paths) + 1;
        ok[i] = (uint8_t)identity_of(path, stamp_sizes[i], stamp_mtimes[i], ident + 5 * i);
        found += ok[i];
    }
    return found;
}
