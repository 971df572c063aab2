/* sqfs writer: see the .c files beside this header. */
#ifndef PYIMG_SQFS_H
#define PYIMG_SQFS_H

#include "../common/common.h"

/* CDEF BEGIN */
/* CDEF END */

#endif
