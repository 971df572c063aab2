#include <stdlib.h>

#include "common.h"

int pyimg_buf_reserve(pyimg_buf *b, size_t extra) {
    if (b->cap - b->len >= extra) return 0;
    size_t need = b->len + extra;
    if (need < b->len) return -PYIMG_ENOMEM; /* overflow */
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) return -PYIMG_ENOMEM;
        cap *= 2;
    }
    uint8_t *data = realloc(b->data, cap);
    if (!data) return -PYIMG_ENOMEM;
    b->data = data;
    b->cap = cap;
    return 0;
}

int pyimg_buf_append(pyimg_buf *b, const void *src, size_t len) {
    int rc = pyimg_buf_reserve(b, len);
    if (rc) return rc;
    if (len) memcpy(b->data + b->len, src, len);
    b->len += len;
    return 0;
}

void pyimg_buf_free(pyimg_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

const char *pyimg_strerror(int code) {
    switch (code < 0 ? -code : code) {
    case PYIMG_OK: return "success";
    case PYIMG_ENOMEM: return "out of memory";
    case PYIMG_ELIMIT: return "format limit exceeded";
    case PYIMG_EINVAL: return "invalid argument";
    case PYIMG_EOUTPUT: return "writing the image failed";
    case PYIMG_ECALLBACK: return "a callback failed";
    case PYIMG_ENOSPC: return "the tree does not fit the image size";
    case PYIMG_ESOURCE: return "reading a source failed";
    default: return "unknown error";
    }
}
