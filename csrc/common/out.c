/* Writing into a region of the output file (pyimg_out, common.h).  Every image
 * byte the C core writes goes through here, so the region's bounds are checked
 * in one place. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

int pyimg_out_check(const pyimg_out *o, uint64_t off, uint64_t len, pyimg_err *err) {
    if (off > o->limit || len > o->limit - off || o->base > UINT64_MAX - off - len ||
        o->base + off + len > (uint64_t)INT64_MAX)
        return pyimg_err_set(err, PYIMG_EOUTPUT, "writing the image: bytes %llu..%llu are outside its region of %llu",
                             (unsigned long long)off, (unsigned long long)(off + len), (unsigned long long)o->limit);
    return 0;
}

int pyimg_out_write(const pyimg_out *o, const void *buf, size_t len, uint64_t off, pyimg_err *err) {
    int rc = pyimg_out_check(o, off, len, err);
    if (rc) return rc;
    const uint8_t *p = buf;
    uint64_t at = o->base + off;
    while (len) {
        ssize_t n = pwrite(o->fd, p, len, (off_t)at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0)
            return pyimg_err_set(err, PYIMG_EOUTPUT, "writing the image: %s",
                                 n < 0 ? (errno == ENOSPC ? "no space left on device" : strerror(errno)) : "short write");
        p += n;
        len -= (size_t)n;
        at += (uint64_t)n;
    }
    return 0;
}
