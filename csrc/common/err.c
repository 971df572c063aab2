/* The one way the C core records a failure (see common.h): a positive code in,
 * its negation out, and the message beside the code. */
#include <stdio.h>

#include "common.h"

int pyimg_err_vset(pyimg_err *e, int code, const char *fmt, va_list ap) {
    e->code = code;
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    return -code;
}

int pyimg_err_set(pyimg_err *e, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = pyimg_err_vset(e, code, fmt, ap);
    va_end(ap);
    return rc;
}
