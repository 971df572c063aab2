/* Listing one directory of a directory source in one C call (csrc/common/walk.c). */
#ifndef PYIMG_WALK_H
#define PYIMG_WALK_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
/* What failed for one entry (the low byte of its flags; 0: nothing failed). */
enum {
    PYIMG_WALK_STAT = 1,     /* fstatat failed (errno kept): nothing else is known */
    PYIMG_WALK_READLINK = 2, /* readlinkat of a symlink failed (errno kept) */
    PYIMG_WALK_ACCESS = 3,   /* faccessat(R_OK) of a regular file failed (errno kept) */
    PYIMG_WALK_XATTRS = 4    /* llistxattr failed, for a reason other than "no support" */
};
/* Flag bits above the low byte. */
enum {
    PYIMG_WALK_FAILED = 0xff,       /* mask of the failed step */
    PYIMG_WALK_HAS_XATTRS = 0x100,  /* llistxattr lists at least one name (kept or not) */
    PYIMG_WALK_LINKED = 0x200,      /* not a directory and st_nlink > 1 */
    PYIMG_WALK_WIDE_TIME = 0x400    /* the mtime in ns does not fit mtime_ns: see mtime_sec */
};
enum { PYIMG_WALK_IDENT = 40 }; /* bytes of one entry's identity (the ident column) */

/* One listed directory, as columns: entry i of each array describes the i-th
 * name, entries sorted by raw name bytes (a name before any longer name it is a
 * prefix of).  names: count NUL-terminated names back to back; targets: count
 * NUL-terminated symlink targets back to back (empty for everything that is not
 * a symlink, or whose target could not be read).  After a failed step only the
 * columns filled before it are meaningful (after a failed stat: none).  All
 * pointers are borrowed from the walker: valid until its next list or free. */
typedef struct {
    size_t count;
    const uint32_t *mode;     /* st_mode, file type included */
    const uint32_t *uid;
    const uint32_t *gid;
    const int64_t *mtime_ns;  /* 0 when PYIMG_WALK_WIDE_TIME */
    const int64_t *mtime_sec; /* st_mtim, as it is */
    const int32_t *mtime_nsec;
    const int64_t *size;      /* st_size */
    const uint64_t *dev;      /* st_dev, st_ino: the identity of hard-linked files */
    const uint64_t *ino;
    const uint64_t *rdev;     /* st_rdev (char and block devices) */
    const uint32_t *flags;    /* PYIMG_WALK_* */
    /* PYIMG_WALK_IDENT bytes per entry: a regular file's identity as the build
     * cache keys it (st_dev, st_ino, st_size, mtime and ctime in ns; u64, u64,
     * u64, i64, i64, little-endian); all zero for other types, after a failed
     * step, when a time does not fit an int64 of ns, or on a file system that
     * pyimg_local_fs does not name.  NULL unless pyimg_walk_want_identities. */
    const uint8_t *ident;
    const int32_t *err;       /* errno of the failed step, else 0 */
    const char *names;
    size_t names_len;
    const char *targets;
    size_t targets_len;
    int dir_errno;            /* when listing the directory itself failed */
} pyimg_walk_listing;

typedef struct pyimg_walk pyimg_walk;

pyimg_walk *pyimg_walk_new(void);
void pyimg_walk_free(pyimg_walk *w);
const char *pyimg_walk_error(const pyimg_walk *w);
/* Whether the listings fill the ident column (off by default: only a build with a
 * cache keeps identities; off, `ident` is NULL). */
void pyimg_walk_want_identities(pyimg_walk *w, int on);
/* Lists the directory `path` (followed if it is a symlink) into *out: for each
 * entry but "." and "..", fstatat without following symlinks, readlinkat for
 * symlinks, faccessat(R_OK) for regular files, and llistxattr to learn whether
 * there are xattrs at all (ENOTSUP, EOPNOTSUPP, ENOSYS mean none).  A failing
 * entry does not stop the listing: its step and errno are kept in its columns.
 * Returns the number of entries, or -PYIMG_ESOURCE when the directory cannot be
 * opened or read (out->dir_errno), or -PYIMG_ENOMEM. */
int64_t pyimg_walk_list(pyimg_walk *w, const char *path, pyimg_walk_listing *out);
/* 1 if `path` (followed) is on a file system whose attributes are always current
 * (ext4, xfs, btrfs, tmpfs, overlayfs, ...: the list in walk.c), else 0: only
 * there does the walk fill the ident column (a network file system may answer
 * stat from a cache that another host's write has not reached yet). */
int pyimg_local_fs(const char *path);
int pyimg_local_fs_type(int64_t f_type);
/* CDEF END */

#endif
