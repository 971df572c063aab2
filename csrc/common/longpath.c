/* Paths of PATH_MAX (4096) bytes or more.
 *
 * The kernel refuses such a path in every call (ENAMETOOLONG), yet a tree may hold
 * files far deeper: a tar archive does, and a directory source must read what it
 * holds.  A long path is therefore opened a piece at a time, each piece whole
 * components and shorter than PATH_MAX, relative to the directory the previous
 * piece opened; what is left (shorter than PATH_MAX) is then used relative to the
 * last of them.  A shorter path takes no extra call: AT_FDCWD and the path as it is.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include "common.h"

int pyimg_path_at(const char *path, int *dirfd, const char **rest) {
    *dirfd = AT_FDCWD;
    *rest = path;
    if (strnlen(path, PATH_MAX) < PATH_MAX) return 0;
    char piece[PATH_MAX];
    int at = AT_FDCWD;
    const char *left = path;
    while (strnlen(left, PATH_MAX) >= PATH_MAX) {
        /* The last "/" among the first PATH_MAX bytes: the piece before it is shorter
         * than PATH_MAX; a first component that long is too long for any call. */
        size_t cut = 0;
        for (size_t i = 1; i < PATH_MAX; i++)
            if (left[i] == '/') cut = i;
        if (cut == 0) {
            if (at >= 0) close(at);
            return ENAMETOOLONG;
        }
        memcpy(piece, left, cut);
        piece[cut] = '\0';
        int fd = openat(at, piece, O_PATH | O_DIRECTORY | O_CLOEXEC);
        int saved = errno;
        if (at >= 0) close(at);
        if (fd < 0) return saved;
        at = fd;
        left += cut;
        while (*left == '/') left++;
    }
    *dirfd = at;
    *rest = *left ? left : ".";
    return 0;
}

void pyimg_path_done(int dirfd) {
    if (dirfd >= 0) {
        int saved = errno;
        close(dirfd);
        errno = saved;
    }
}
