/* pyimg's C core: the one public header.
 *
 * Each included header has a section between the markers CDEF BEGIN / CDEF END;
 * pyimg/_build_ffi.py hands exactly those sections to cffi, so this header *is*
 * the C API that Python sees.  Conventions:
 *   - handles have a _new and a _free function; Python owns them through ffi.gc;
 *   - functions return 0 (or a non-negative count) on success and a negative
 *     PYIMG_E* code on failure, keeping a message on the handle (..._error()),
 *     or in the caller's pyimg_err for calls made on several threads at once
 *     (see common.h);
 *   - pointer arguments are borrowed for the duration of the call unless the
 *     comment says the handle keeps them.
 */
#ifndef PYIMG_H
#define PYIMG_H

#include "common/common.h"
#include "common/cdc.h"
#include "common/walk.h"
#include "sqfs/sqfs.h"
#include "ext4/ext4.h"

#endif
