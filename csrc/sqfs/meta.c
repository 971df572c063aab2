/* Metadata block streams: data is appended, cut into 8 KiB blocks, each block
 * compressed as soon as it is full so that references into the stream (block
 * start, offset) are final the moment a byte is appended. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "sqfs.h"
#include "sqfs_format.h"

struct pyimg_sqfs_meta {
    pyimg_sqfs_compress_fn compress;
    void *ctx;
    uint8_t block[SQFS_META_SIZE]; /* the block being filled */
    size_t fill;
    pyimg_buf out;          /* encoded blocks: header + payload */
    pyimg_buf offsets;      /* uint64 LE offset of each block in out */
    uint8_t scratch[SQFS_META_SIZE];
    pyimg_err err;
};

pyimg_sqfs_meta *pyimg_sqfs_meta_new(pyimg_sqfs_compress_fn fn, void *ctx) {
    pyimg_sqfs_meta *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->compress = fn;
    m->ctx = ctx;
    return m;
}

void pyimg_sqfs_meta_free(pyimg_sqfs_meta *m) {
    if (!m) return;
    pyimg_buf_free(&m->out);
    pyimg_buf_free(&m->offsets);
    free(m);
}

const char *pyimg_sqfs_meta_error(const pyimg_sqfs_meta *m) { return m->err.msg; }

int pyimg_sqfs_meta_fail(pyimg_sqfs_meta *m, int code, const char *what) {
    return pyimg_err_set(&m->err, code, "metadata block: %s", what);
}

/* Encodes the current block: a 16-bit header (size, bit 15 = stored raw) and the
 * payload, compressed when that makes it smaller. */
static int meta_flush_block(pyimg_sqfs_meta *m) {
    if (m->fill == 0) return 0;
    uint8_t offset_le[8];
    put_le64(offset_le, (uint64_t)m->out.len);
    if (pyimg_buf_append(&m->offsets, offset_le, 8)) return pyimg_sqfs_meta_fail(m, PYIMG_ENOMEM, "out of memory");
    int csize = m->compress ? m->compress(m->ctx, m->block, m->fill, m->scratch, sizeof m->scratch) : 0;
    if (csize < 0) return pyimg_sqfs_meta_fail(m, PYIMG_ECALLBACK, "compression failed");
    const uint8_t *payload = csize > 0 ? m->scratch : m->block;
    size_t size = csize > 0 ? (size_t)csize : m->fill;
    uint8_t header[2];
    put_le16(header, (uint16_t)(size | (csize > 0 ? 0 : SQFS_META_UNCOMPRESSED)));
    if (pyimg_buf_append(&m->out, header, 2) || pyimg_buf_append(&m->out, payload, size))
        return pyimg_sqfs_meta_fail(m, PYIMG_ENOMEM, "out of memory");
    m->fill = 0;
    return 0;
}

int pyimg_sqfs_meta_append(pyimg_sqfs_meta *m, const uint8_t *data, size_t len) {
    while (len) {
        size_t room = SQFS_META_SIZE - m->fill;
        size_t n = len < room ? len : room;
        memcpy(m->block + m->fill, data, n);
        m->fill += n;
        data += n;
        len -= n;
        if (m->fill == SQFS_META_SIZE) {
            int rc = meta_flush_block(m);
            if (rc) return rc;
        }
    }
    return 0;
}

uint64_t pyimg_sqfs_meta_ref(const pyimg_sqfs_meta *m) { return ((uint64_t)m->out.len << 16) | m->fill; }

int pyimg_sqfs_meta_finish(pyimg_sqfs_meta *m) { return meta_flush_block(m); }

const uint8_t *pyimg_sqfs_meta_data(const pyimg_sqfs_meta *m) { return m->out.data; }

size_t pyimg_sqfs_meta_size(const pyimg_sqfs_meta *m) { return m->out.len; }

size_t pyimg_sqfs_meta_block_count(const pyimg_sqfs_meta *m) { return m->offsets.len / 8; }

uint64_t pyimg_sqfs_meta_block_offset(const pyimg_sqfs_meta *m, size_t i) {
    return i < m->offsets.len / 8 ? get_le64(m->offsets.data + 8 * i) : UINT64_MAX;
}
