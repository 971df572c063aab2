/* ext4 writer: see the .c files beside this header. */
#ifndef PYIMG_EXT4_H
#define PYIMG_EXT4_H

#include "../common/common.h"

/* CDEF BEGIN */
/* CDEF END */

#endif
