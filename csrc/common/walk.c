/* Listing one directory of a directory source in one call.
 *
 * Collecting a tree of many small files in Python costs a few microseconds per
 * entry in system calls alone (lstat, access, listxattr, each dropping and
 * retaking the GIL) plus the os.stat_result objects.  Here one call lists a whole
 * directory with the GIL released: readdir, fstatat relative to the directory's
 * descriptor, readlinkat, faccessat and llistxattr, and returns the results as
 * columns that Python converts in bulk.  Policy (excludes, hard links, owners)
 * stays in Python: this file only reports what the file system says.
 *
 * Entries are sorted here by raw name bytes, so that nothing downstream (which
 * name of a hard-link group is read, which error is reported first) depends on
 * readdir order.  A failing entry does not stop the listing: its failed step and
 * errno are kept, and Python decides whether it matters (an excluded entry's
 * failure does not).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "common.h"
#include "walk.h"

/* Seconds whose mtime in ns (plus up to 999999999 ns) fits an int64_t. */
#define SEC_NS_MAX (INT64_MAX / 1000000000 - 1)

struct pyimg_walk {
    size_t cap; /* entries the columns hold */
    uint32_t *mode, *uid, *gid, *flags;
    int32_t *err;
    int64_t *mtime_ns, *mtime_sec, *size;
    int32_t *mtime_nsec;
    uint64_t *dev, *ino, *rdev;
    uint8_t *ident;      /* PYIMG_WALK_IDENT bytes per entry */
    size_t *raw_ends;    /* end offset of each name in raw, in readdir order */
    const char **sorted; /* the names, sorted (pointers into raw) */
    pyimg_buf raw;       /* names in readdir order, NUL-terminated */
    pyimg_buf names;     /* names in sorted order, NUL-terminated */
    pyimg_buf targets;   /* one NUL-terminated target per entry */
    pyimg_buf path;      /* "dir/" + the current name, for llistxattr */
    pyimg_err error;
    int identities; /* fill the ident column (pyimg_walk_want_identities) */
    int local;      /* the listed directory's file system is pyimg_local_fs's */
};

pyimg_walk *pyimg_walk_new(void) { return calloc(1, sizeof(pyimg_walk)); }

void pyimg_walk_free(pyimg_walk *w) {
    if (!w) return;
    free(w->mode);
    free(w->uid);
    free(w->gid);
    free(w->flags);
    free(w->err);
    free(w->mtime_ns);
    free(w->mtime_sec);
    free(w->mtime_nsec);
    free(w->size);
    free(w->dev);
    free(w->ino);
    free(w->rdev);
    free(w->ident);
    free(w->raw_ends);
    free(w->sorted);
    pyimg_buf_free(&w->raw);
    pyimg_buf_free(&w->names);
    pyimg_buf_free(&w->targets);
    pyimg_buf_free(&w->path);
    free(w);
}

const char *pyimg_walk_error(const pyimg_walk *w) { return w->error.msg; }

void pyimg_walk_want_identities(pyimg_walk *w, int on) { w->identities = on != 0; }

/* code: a positive PYIMG_E*; returns its negation, as every fail helper. */
static int fail(pyimg_walk *w, int code, const char *what) { return pyimg_err_set(&w->error, code, "%s", what); }

/* realloc one column to cap entries of size elem; 0 or -1. */
static int grow_column(void *column_ptr, size_t cap, size_t elem) {
    void **column = column_ptr;
    if (cap > SIZE_MAX / elem) return -1;
    void *p = realloc(*column, cap * elem);
    if (!p) return -1;
    *column = p;
    return 0;
}

/* Room for at least n entries in every per-entry array. */
static int reserve_entries(pyimg_walk *w, size_t n) {
    if (n <= w->cap) return 0;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < n) {
        if (cap > SIZE_MAX / 2) return -PYIMG_ENOMEM;
        cap *= 2;
    }
    if (grow_column(&w->mode, cap, sizeof *w->mode) || grow_column(&w->uid, cap, sizeof *w->uid) ||
        grow_column(&w->gid, cap, sizeof *w->gid) || grow_column(&w->flags, cap, sizeof *w->flags) ||
        grow_column(&w->err, cap, sizeof *w->err) || grow_column(&w->mtime_ns, cap, sizeof *w->mtime_ns) ||
        grow_column(&w->mtime_sec, cap, sizeof *w->mtime_sec) ||
        grow_column(&w->mtime_nsec, cap, sizeof *w->mtime_nsec) ||
        grow_column(&w->size, cap, sizeof *w->size) || grow_column(&w->dev, cap, sizeof *w->dev) ||
        grow_column(&w->ino, cap, sizeof *w->ino) || grow_column(&w->rdev, cap, sizeof *w->rdev) ||
        grow_column(&w->ident, cap, PYIMG_WALK_IDENT) ||
        grow_column(&w->raw_ends, cap, sizeof *w->raw_ends) || grow_column(&w->sorted, cap, sizeof *w->sorted))
        return -PYIMG_ENOMEM; /* the columns grown so far stay valid, cap unchanged */
    w->cap = cap;
    return 0;
}

/* strcmp compares as unsigned char: byte order, a prefix before its extensions. */
static int by_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Reads every name but "." and ".." into w->raw; returns the count or a negative code. */
static int64_t read_names(pyimg_walk *w, DIR *dir, int *dir_errno) {
    size_t n = 0;
    for (;;) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (!d) {
            if (errno) {
                *dir_errno = errno;
                return -PYIMG_ESOURCE;
            }
            return (int64_t)n;
        }
        const char *name = d->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) continue;
        if (reserve_entries(w, n + 1) || pyimg_buf_append(&w->raw, name, strlen(name) + 1))
            return -PYIMG_ENOMEM;
        w->raw_ends[n++] = w->raw.len;
    }
}

/* Appends the target of symlink `name` (NUL-terminated) to w->targets; 0 or an errno. */
static int read_target(pyimg_walk *w, int dirfd, const char *name, size_t hint, int *nomem) {
    size_t cap = hint ? hint + 1 : 256;
    for (;;) {
        if (pyimg_buf_reserve(&w->targets, cap + 1)) {
            *nomem = 1;
            return ENOMEM;
        }
        char *dst = (char *)w->targets.data + w->targets.len;
        ssize_t got = readlinkat(dirfd, name, dst, cap);
        if (got < 0) return errno;
        if ((size_t)got < cap) { /* not truncated */
            dst[got] = '\0';
            w->targets.len += (size_t)got + 1;
            return 0;
        }
        if (cap > SIZE_MAX / 4) {
            *nomem = 1;
            return ENOMEM;
        }
        cap *= 2;
    }
}

int pyimg_local_fs_type(int64_t f_type) {
    /* linux/magic.h: file systems whose stat(2) is never served from a stale cache
     * of another host's (NFS, CIFS, FUSE and 9p may be: up to acregmax on NFS). */
    static const uint32_t local[] = {
        0xEF53u,     /* ext2, ext3, ext4 */
        0x58465342u, /* xfs */
        0x9123683Eu, /* btrfs */
        0x01021994u, /* tmpfs */
        0x858458F6u, /* ramfs */
        0xF2F52010u, /* f2fs */
        0x794C7630u, /* overlayfs (container builds) */
        0x2FC12FC1u, /* zfs */
        0xCA451A4Eu, /* bcachefs */
        0x73717368u, /* squashfs */
        0xE0F5E1E2u, /* erofs */
        0x4D44u,     /* vfat, msdos */
        0x2011BAB0u, /* exfat */
        0x00009660u, /* iso9660 */
    };
    for (size_t i = 0; i < sizeof local / sizeof local[0]; i++)
        if ((uint32_t)f_type == local[i]) return 1;
    return 0;
}

int pyimg_local_fs(const char *path) {
    struct statfs sfs;
    return statfs(path, &sfs) == 0 && pyimg_local_fs_type((int64_t)sfs.f_type);
}

/* A regular file's identity (walk.h: the ident column), left zero when a time
 * does not fit an int64 of ns. */
static void put_identity(uint8_t *out, const struct stat *st) {
    int64_t msec = (int64_t)st->st_mtim.tv_sec, csec = (int64_t)st->st_ctim.tv_sec;
    if (msec < -SEC_NS_MAX || msec > SEC_NS_MAX || csec < -SEC_NS_MAX || csec > SEC_NS_MAX) return;
    put_le64(out, (uint64_t)st->st_dev);
    put_le64(out + 8, (uint64_t)st->st_ino);
    put_le64(out + 16, (uint64_t)st->st_size);
    put_le64(out + 24, (uint64_t)(msec * 1000000000 + st->st_mtim.tv_nsec));
    put_le64(out + 32, (uint64_t)(csec * 1000000000 + st->st_ctim.tv_nsec));
}

/* Fills the columns of entry i, named `name`, in the directory open as dirfd;
 * w->path holds "dir/" (prefix_len bytes).  Returns 0 or a negative code (only
 * for running out of memory: failures of the entry are kept in its columns). */
static int describe(pyimg_walk *w, int dirfd, size_t prefix_len, size_t i, const char *name) {
    struct stat st;
    uint32_t flags = 0;
    int err = 0;
    w->mode[i] = w->uid[i] = w->gid[i] = 0;
    w->mtime_ns[i] = w->mtime_sec[i] = w->size[i] = 0;
    w->mtime_nsec[i] = 0;
    w->dev[i] = w->ino[i] = w->rdev[i] = 0;
    uint8_t *ident = w->identities ? w->ident + i * PYIMG_WALK_IDENT : NULL;
    if (ident) memset(ident, 0, PYIMG_WALK_IDENT);
    size_t target_at = w->targets.len;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
        flags = PYIMG_WALK_STAT;
        err = errno;
        goto done;
    }
    w->mode[i] = (uint32_t)st.st_mode;
    w->uid[i] = (uint32_t)st.st_uid;
    w->gid[i] = (uint32_t)st.st_gid;
    int64_t sec = (int64_t)st.st_mtim.tv_sec;
    w->mtime_sec[i] = sec;
    w->mtime_nsec[i] = (int32_t)st.st_mtim.tv_nsec;
    if (sec >= -SEC_NS_MAX && sec <= SEC_NS_MAX)
        w->mtime_ns[i] = sec * 1000000000 + st.st_mtim.tv_nsec;
    else
        flags |= PYIMG_WALK_WIDE_TIME; /* years beyond 1677..2262: Python computes it */
    w->size[i] = (int64_t)st.st_size;
    w->dev[i] = (uint64_t)st.st_dev;
    w->ino[i] = (uint64_t)st.st_ino;
    w->rdev[i] = (uint64_t)st.st_rdev;
    if (!S_ISDIR(st.st_mode) && st.st_nlink > 1) flags |= PYIMG_WALK_LINKED;
    if (S_ISLNK(st.st_mode)) {
        int nomem = 0;
        err = read_target(w, dirfd, name, st.st_size > 0 ? (size_t)st.st_size : 0, &nomem);
        if (nomem) return -PYIMG_ENOMEM;
        if (err) {
            flags |= PYIMG_WALK_READLINK;
            goto done;
        }
    } else if (S_ISREG(st.st_mode)) {
        /* access(2) semantics (real ids), as os.access: checked now so that the
         * error comes before any work and names the file. */
        if (faccessat(dirfd, name, R_OK, 0) != 0) {
            flags |= PYIMG_WALK_ACCESS;
            err = errno;
            goto done;
        }
        if (ident && w->local) put_identity(ident, &st);
    }
    /* There is no llistxattrat: the path is dir + "/" + name, or where that is too
     * long for the kernel (PATH_MAX), the name within the directory's descriptor
     * through /proc/self/fd (the name itself is still not followed). */
    size_t name_len = strlen(name);
    char via_fd[32 + NAME_MAX + 1];
    const char *xattr_path = via_fd;
    if (prefix_len + name_len < PATH_MAX) {
        w->path.len = prefix_len;
        if (pyimg_buf_append(&w->path, name, name_len + 1)) return -PYIMG_ENOMEM;
        xattr_path = (const char *)w->path.data;
    } else if (snprintf(via_fd, sizeof via_fd, "/proc/self/fd/%d/%s", dirfd, name) >= (int)sizeof via_fd) {
        flags |= PYIMG_WALK_XATTRS; /* not reached: readdir gives names of at most NAME_MAX bytes */
        err = ENAMETOOLONG;
        goto done;
    }
    ssize_t listed = llistxattr(xattr_path, NULL, 0);
    if (listed > 0) {
        flags |= PYIMG_WALK_HAS_XATTRS;
    } else if (listed < 0 && errno != ENOTSUP && errno != EOPNOTSUPP && errno != ENOSYS) {
        flags |= PYIMG_WALK_XATTRS;
        err = errno;
    }
done:
    if (w->targets.len == target_at) { /* not a symlink, or its target is unknown */
        if (pyimg_buf_append(&w->targets, "", 1)) return -PYIMG_ENOMEM;
    }
    w->flags[i] = flags;
    w->err[i] = err;
    return 0;
}

static int64_t list_open(pyimg_walk *w, DIR *dir, pyimg_walk_listing *out) {
    int64_t counted = read_names(w, dir, &out->dir_errno);
    if (counted < 0) return counted;
    size_t n = (size_t)counted;
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        w->sorted[i] = (const char *)w->raw.data + start;
        start = w->raw_ends[i];
    }
    if (n > 1) qsort(w->sorted, n, sizeof *w->sorted, by_name);
    size_t prefix_len = w->path.len;
    int dirfd_ = dirfd(dir);
    for (size_t i = 0; i < n; i++) {
        const char *name = w->sorted[i];
        if (pyimg_buf_append(&w->names, name, strlen(name) + 1)) return -PYIMG_ENOMEM;
        int rc = describe(w, dirfd_, prefix_len, i, name);
        if (rc) return rc;
    }
    return (int64_t)n;
}

int64_t pyimg_walk_list(pyimg_walk *w, const char *path, pyimg_walk_listing *out) {
    memset(out, 0, sizeof *out);
    w->error.code = 0;
    w->error.msg[0] = '\0';
    w->raw.len = w->names.len = w->targets.len = w->path.len = 0;
    size_t path_len = strlen(path);
    if (pyimg_buf_reserve(&w->path, path_len + 2)) return fail(w, PYIMG_ENOMEM, "out of memory");
    pyimg_buf_append(&w->path, path, path_len);
    if (path_len && path[path_len - 1] != '/') pyimg_buf_append(&w->path, "/", 1);

    int at;
    const char *rel;
    int rc = pyimg_path_at(path, &at, &rel); /* a path of PATH_MAX bytes or more: in pieces */
    if (rc) {
        out->dir_errno = rc;
        return fail(w, PYIMG_ESOURCE, "cannot open the directory");
    }
    int fd = openat(at, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    pyimg_path_done(at);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dir) {
        out->dir_errno = errno;
        if (fd >= 0) close(fd);
        return fail(w, PYIMG_ESOURCE, "cannot open the directory");
    }
    struct statfs sfs; /* (only asked for by a build with a cache: not every build's work) */
    w->local = w->identities && fstatfs(fd, &sfs) == 0 && pyimg_local_fs_type((int64_t)sfs.f_type);
    int64_t n = list_open(w, dir, out);
    closedir(dir);
    if (n == -PYIMG_ESOURCE) return fail(w, PYIMG_ESOURCE, "cannot read the directory");
    if (n < 0) return fail(w, (int)-n, "out of memory");
    out->count = (size_t)n;
    out->mode = w->mode;
    out->uid = w->uid;
    out->gid = w->gid;
    out->mtime_ns = w->mtime_ns;
    out->mtime_sec = w->mtime_sec;
    out->mtime_nsec = w->mtime_nsec;
    out->size = w->size;
    out->dev = w->dev;
    out->ino = w->ino;
    out->rdev = w->rdev;
    out->ident = w->identities ? w->ident : NULL;
    out->flags = w->flags;
    out->err = w->err;
    out->names = (const char *)w->names.data;
    out->names_len = w->names.len;
    out->targets = (const char *)w->targets.data;
    out->targets_len = w->targets.len;
    return n;
}
