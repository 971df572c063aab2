/* The data copy: each extent of a content is copied from the source file to
 * its blocks with copy_file_range (reflinks or in-kernel copies where the file
 * systems allow), falling back to pread/pwrite.  Holes are never touched: the
 * image file is sparse there and the blocks are not allocated. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "ext4_int.h"

#define COPY_BUF (1u << 20)

static int fallback(int src, uint64_t soff, const pyimg_out *dst, uint64_t doff, uint64_t len, pyimg_err *err) {
    uint8_t *buf = malloc(COPY_BUF);
    if (!buf) return pyimg_err_set(err, PYIMG_ENOMEM, "out of memory");
    int rc = 0;
    while (len && !rc) {
        size_t want = len < COPY_BUF ? (size_t)len : COPY_BUF;
        ssize_t n = pread(src, buf, want, (off_t)soff);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            rc = pyimg_err_set(err, PYIMG_ESOURCE, "reading the source: %s", n < 0 ? strerror(errno) : "file shrank");
            break;
        }
        rc = pyimg_out_write(dst, buf, (size_t)n, doff, err);
        soff += (uint64_t)n;
        doff += (uint64_t)n;
        len -= (uint64_t)n;
    }
    free(buf);
    return rc;
}

/* Which side failed is not known from copy_file_range's errno: EIO or ENOSPC
 * name the image's file system, the others a bug or the source. */
static int copy_range(int src, uint64_t soff, const pyimg_out *dst, uint64_t doff, uint64_t len, pyimg_err *err) {
    int rc = pyimg_out_check(dst, doff, len, err);
    if (rc) return rc;
    while (len) {
        loff_t in = (loff_t)soff, out = (loff_t)(dst->base + doff);
        size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t n = copy_file_range(src, &in, dst->fd, &out, want, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP || errno == EBADF ||
                      errno == EPERM || errno == ETXTBSY))
            return fallback(src, soff, dst, doff, len, err);
        if (n < 0)
            return pyimg_err_set(err, PYIMG_EOUTPUT, "copying data: %s",
                                 errno == ENOSPC ? "no space left on device" : strerror(errno));
        if (n == 0) return pyimg_err_set(err, PYIMG_ESOURCE, "reading the source: file shrank");
        soff += (uint64_t)n;
        doff += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Calls fn for each stored range of a content (holes are skipped): offset within
 * the content, length, and where in the image it goes. */
typedef int (*range_fn)(void *ctx, uint64_t off, uint64_t len, uint64_t dest, pyimg_err *err);

static int for_each_range(const pyimg_ext4 *h, uint32_t content, uint64_t size, range_fn fn, void *ctx,
                          pyimg_err *err) {
    if (!h->laid_out || content >= h->ncontents) return pyimg_err_set(err, PYIMG_EINVAL, "data: bad content %u", content);
    const e4_content *ct = &h->contents[content];
    const e4_extent *ev = e4_ext_v(&ct->ext, ct->next);
    for (uint32_t i = 0; i < ct->next; i++) {
        uint64_t off = (uint64_t)ev[i].lblk * E4_BS;
        if (off >= size) break;
        uint64_t len = (uint64_t)ev[i].len * E4_BS;
        if (off + len > size) len = size - off;
        int rc = fn(ctx, off, len, ev[i].pblk * E4_BS, err);
        if (rc) return rc;
    }
    return 0;
}

typedef struct {
    int src_fd;
    uint64_t src_offset;
    const pyimg_out *out;
} copy_ctx;

static int copy_one_range(void *ctx, uint64_t off, uint64_t len, uint64_t dest, pyimg_err *err) {
    const copy_ctx *c = ctx;
    return copy_range(c->src_fd, c->src_offset + off, c->out, dest, len, err);
}

int pyimg_ext4_copy(const pyimg_ext4 *h, uint32_t content, int src_fd, uint64_t src_offset, uint64_t size,
                    const pyimg_out *out, pyimg_err *err) {
    copy_ctx c = {src_fd, src_offset, out};
    return for_each_range(h, content, size, copy_one_range, &c, err);
}

/* ---- many small contents in one call ---- */

#define STAGE_MAX (1u << 20)

/* Writes to adjacent image blocks gathered into one buffer: the layout puts the
 * contents of a batch of small files mostly back to back, so one pwrite covers
 * many files instead of one (or more) per file. */
typedef struct {
    const pyimg_out *out;
    uint8_t *buf;
    size_t len;
    uint64_t dest; /* image offset of buf[0] */
    const uint8_t *data; /* the content being staged */
} stage;

static int stage_flush(stage *s, pyimg_err *err) {
    int rc = s->len ? pyimg_out_write(s->out, s->buf, s->len, s->dest, err) : 0;
    s->len = 0;
    return rc;
}

/* One stored range of the current content, padded with zeros to whole blocks:
 * the image holds zeros there anyway (its blocks are the content's own), and the
 * padding keeps the next content's blocks adjacent in the buffer. */
static int stage_range(void *ctx, uint64_t off, uint64_t len, uint64_t dest, pyimg_err *err) {
    stage *s = ctx;
    uint64_t padded = (len + E4_BS - 1) / E4_BS * E4_BS;
    if (s->len && (dest != s->dest + s->len || s->len + padded > STAGE_MAX)) {
        int rc = stage_flush(s, err);
        if (rc) return rc;
    }
    if (padded > STAGE_MAX) return pyimg_out_write(s->out, s->data + off, (size_t)len, dest, err);
    if (!s->len) s->dest = dest;
    memcpy(s->buf + s->len, s->data + off, (size_t)len);
    memset(s->buf + s->len + len, 0, (size_t)(padded - len));
    s->len += (size_t)padded;
    return 0;
}

/* The image offset of a content stored in one piece from its first byte (no
 * holes, one extent), else 0: such a file can be read straight into the stage. */
static uint64_t one_piece(const pyimg_ext4 *h, uint32_t content, uint64_t size) {
    if (!h->laid_out || content >= h->ncontents) return 0;
    const e4_content *ct = &h->contents[content];
    const e4_extent *e = &ct->ext.one; /* a single extent is inline */
    if (ct->next != 1 || e->lblk != 0 || (uint64_t)e->len * E4_BS < size || (uint64_t)e->len * E4_BS >= size + E4_BS)
        return 0;
    return e->pblk * E4_BS;
}

/* Reads a content in one piece straight into the stage (no copy through a
 * scratch buffer), zero padded to whole blocks. */
static int stage_read(stage *s, const char *path, uint64_t offset, uint64_t size, int64_t stamp_size,
                      int64_t stamp_mtime, uint64_t dest, int32_t *status, int32_t *err_no, pyimg_err *err) {
    uint64_t padded = (size + E4_BS - 1) / E4_BS * E4_BS;
    if (s->len && (dest != s->dest + s->len || s->len + padded > STAGE_MAX)) {
        int rc = stage_flush(s, err);
        if (rc) return rc;
    }
    if (!s->len) s->dest = dest;
    *status = pyimg_read_file(path, offset, size, stamp_size, stamp_mtime, s->buf + s->len, err_no);
    if (*status != PYIMG_READ_OK) return pyimg_err_set(err, PYIMG_ESOURCE, "reading the source failed");
    memset(s->buf + s->len + size, 0, (size_t)(padded - size));
    s->len += (size_t)padded;
    return 0;
}

/* The largest content of the batch that is read from its file (0: none). */
static uint64_t largest_read(size_t n, const uint64_t *sizes, const int64_t *cache_at) {
    uint64_t most = 0;
    for (size_t i = 0; i < n; i++)
        if (cache_at[i] < 0 && sizes[i] > most) most = sizes[i];
    return most;
}

int pyimg_ext4_write_batch(const pyimg_ext4 *h, size_t n, const uint32_t *contents, const char *paths,
                           const uint64_t *offsets, const uint64_t *sizes, const int64_t *stamp_sizes,
                           const int64_t *stamp_mtimes, const uint8_t *cache, const int64_t *cache_at,
                           const pyimg_out *out, size_t *failed, int32_t *status, int32_t *err_no,
                           pyimg_err *err) {
    *failed = 0;
    *status = PYIMG_READ_OK;
    *err_no = 0;
    uint64_t most = largest_read(n, sizes, cache_at);
    uint8_t *scratch = most ? malloc((size_t)most) : NULL;
    stage s = {out, malloc(STAGE_MAX), 0, 0, NULL};
    int rc = 0;
    if ((most && !scratch) || !s.buf) {
        rc = pyimg_err_set(err, PYIMG_ENOMEM, "out of memory");
        goto done;
    }
    const char *path = paths;
    for (size_t i = 0; i < n && !rc; i++, path += strlen(path) + 1) {
        *failed = i;
        uint64_t dest = cache_at[i] < 0 && sizes[i] <= STAGE_MAX ? one_piece(h, contents[i], sizes[i]) : 0;
        if (dest) {
            rc = stage_read(&s, path, offsets[i], sizes[i], stamp_sizes[i], stamp_mtimes[i], dest, status, err_no,
                            err);
            continue;
        }
        if (cache_at[i] >= 0) {
            /* Bytes the hash pass kept: the file must still be as collected, as if
             * it were read again (one stat instead of a read). */
            *status = pyimg_check_stamp(path, stamp_sizes[i], stamp_mtimes[i], err_no);
            s.data = cache + cache_at[i];
        } else {
            *status = pyimg_read_file(path, offsets[i], sizes[i], stamp_sizes[i], stamp_mtimes[i], scratch, err_no);
            s.data = scratch;
        }
        if (*status != PYIMG_READ_OK) {
            rc = pyimg_err_set(err, PYIMG_ESOURCE, "reading the source failed");
            break;
        }
        rc = for_each_range(h, contents[i], sizes[i], stage_range, &s, err);
    }
    if (!rc) rc = stage_flush(&s, err);
done:
    free(s.buf);
    free(scratch);
    return rc;
}
