/* ext4 writer: builds a complete ext4 image from inodes, directory entries,
 * xattrs and file contents registered by Python (pyimg/formats/ext4.py).
 *
 * Life cycle: pyimg_ext4_new -> set_inode/add_dirent/add_xattr/set_symlink/
 * new_content/content_run/set_content -> pyimg_ext4_layout (may be called again
 * with another geometry) -> pyimg_ext4_copy (any thread, any order, once the
 * layout is final) -> pyimg_ext4_finalize -> pyimg_ext4_free.
 *
 * Pointers: every pointer argument is borrowed for the duration of the call;
 * the handle copies what it keeps.  The handle is owned by the caller (Python
 * frees it through ffi.gc).  Block size is 4096, inodes are 256 bytes.
 */
#ifndef PYIMG_EXT4_H
#define PYIMG_EXT4_H

#include "../common/common.h"

/* CDEF BEGIN */
typedef struct pyimg_ext4 pyimg_ext4;

/* The geometry and identity of the image; chosen by Python. */
typedef struct {
    uint64_t blocks_count;        /* image size in 4 KiB blocks */
    uint32_t blocks_per_group;    /* 32768 */
    uint32_t inodes_per_group;    /* multiple of 16, at most 32768 */
    uint32_t log_groups_per_flex; /* s_log_groups_per_flex */
    uint32_t journal_blocks;      /* 0: no journal (inode 8 unused) */
    uint32_t feature_compat;
    uint32_t feature_incompat;
    uint32_t feature_ro_compat;
    int64_t epoch;                /* mkfs/write/check time of the file system */
    uint8_t uuid[16];
    /* With metadata_csum_seed: the metadata checksums are seeded with crc32c of this,
     * not of uuid (so a new UUID need not change every checksum). */
    uint8_t csum_uuid[16];
    uint8_t hash_seed[16];
    uint8_t label[16];
} pyimg_ext4_geom;

typedef struct {
    uint64_t blocks_end;   /* one past the highest block the layout needs */
    uint64_t blocks_used;  /* blocks marked in the block bitmaps */
    uint64_t free_blocks;
    uint64_t free_inodes;
    uint64_t data_blocks;  /* file data blocks (each shared block once) */
    uint32_t groups;
    uint32_t inodes_count;
} pyimg_ext4_stats;

/* max_ino: the highest inode number that will be registered. NULL on ENOMEM. */
pyimg_ext4 *pyimg_ext4_new(uint32_t max_ino);
void pyimg_ext4_free(pyimg_ext4 *h);
/* The message of the last failure; borrowed, valid until the next call. */
const char *pyimg_ext4_error(const pyimg_ext4 *h);

/* mode: S_IF* type and permission bits.  parent: for directories, the inode
 * ".." points at.  links: the link count as stored (Python applies dir_nlink). */
int pyimg_ext4_set_inode(pyimg_ext4 *h, uint32_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                         int64_t mtime, uint32_t mtime_nsec, uint64_t size, uint32_t links,
                         uint32_t rdev_major, uint32_t rdev_minor, uint32_t parent);
int pyimg_ext4_set_symlink(pyimg_ext4 *h, uint32_t ino, const uint8_t *target, size_t len);
/* name: the full xattr name ("user.foo"); value in the on-disk format. */
int pyimg_ext4_add_xattr(pyimg_ext4 *h, uint32_t ino, const uint8_t *name, size_t name_len,
                         const uint8_t *value, size_t value_len);
/* One entry of directory `dir` (without "." and ".."), names unique. */
int pyimg_ext4_add_dirent(pyimg_ext4 *h, uint32_t dir, const uint8_t *name, size_t name_len,
                          uint32_t child);

/* Bulk forms of the calls above, one call for many items (each cffi call costs
 * about a microsecond: too much per file on trees of 100k small files).  On a
 * failure *failed is the index of the item and nothing after it is registered. */
/* pyimg_ext4_set_inode for inos[i], ... (mtimes in whole seconds). */
int pyimg_ext4_set_inodes(pyimg_ext4 *h, size_t n, const uint32_t *inos, const uint32_t *modes,
                          const uint32_t *uids, const uint32_t *gids, const int64_t *mtimes,
                          const uint32_t *mtime_nsecs, const uint64_t *sizes, const uint32_t *links,
                          const uint32_t *rdev_majors, const uint32_t *rdev_minors, const uint32_t *parents,
                          size_t *failed);
/* pyimg_ext4_add_dirent for each (dirs[i], name i, children[i]); names: back to
 * back, name_lens[i] bytes each. */
int pyimg_ext4_add_dirents(pyimg_ext4 *h, size_t n, const uint32_t *dirs, const uint8_t *names,
                           const uint32_t *name_lens, const uint32_t *children, size_t *failed);
/* A content for each of the n files with keep[i] set, in order, holding that
 * file's runs: file i has nruns[i] runs, the files' runs back to back in
 * run_first/run_count (files not kept included).  Returns the id of the first
 * new content (the others follow), or the number of contents when none is kept. */
int pyimg_ext4_add_contents(pyimg_ext4 *h, size_t n, const uint8_t *keep, const uint32_t *nruns,
                            const uint32_t *run_first, const uint32_t *run_count, size_t *failed);
/* pyimg_ext4_set_content(h, inos[i], contents[i]) for each i. */
int pyimg_ext4_set_contents(pyimg_ext4 *h, size_t n, const uint32_t *inos, const uint32_t *contents,
                            size_t *failed);

/* Allocates every block for `geom`; never fails for lack of space: the stats
 * report blocks_end and the caller compares it with blocks_count. */
int pyimg_ext4_layout(pyimg_ext4 *h, const pyimg_ext4_geom *geom);
void pyimg_ext4_get_stats(const pyimg_ext4 *h, pyimg_ext4_stats *out);

/* Copies the data of `content` (file bytes at src_offset .. +size in src_fd)
 * to its blocks in the image region `out`.  Thread safe after the layout: it
 * only reads the handle, and a failure goes to the caller's err (one per call):
 * PYIMG_ESOURCE when reading the source failed, PYIMG_EOUTPUT the image. */
int pyimg_ext4_copy(const pyimg_ext4 *h, uint32_t content, int src_fd, uint64_t src_offset, uint64_t size,
                    const pyimg_out *out, pyimg_err *err);

/* Writes many small contents: contents[i] (sizes[i] bytes) comes from memory,
 * cache + cache_at[i], when cache_at[i] >= 0, else it is read from paths[i] at
 * offsets[i] exactly as pyimg_read_batch reads (the stamp checked before and
 * after).  Writes of adjacent blocks are merged into one.  Thread safe after the
 * layout, like pyimg_ext4_copy.  On failure: a negative code and the message in
 * err, *failed the index of the content; for a source that could not be read
 * (-PYIMG_ESOURCE) also *status (PYIMG_READ_*) and *err_no, else *status 0. */
int pyimg_ext4_write_batch(const pyimg_ext4 *h, size_t n, const uint32_t *contents, const char *paths,
                           const uint64_t *offsets, const uint64_t *sizes, const int64_t *stamp_sizes,
                           const int64_t *stamp_mtimes, const uint8_t *cache, const int64_t *cache_at,
                           const pyimg_out *out, size_t *failed, int32_t *status, int32_t *err_no,
                           pyimg_err *err);

/* Writes all metadata (superblocks, descriptors, bitmaps, inode tables,
 * directories, extent trees, xattr blocks, journal) into the region `out`.  The
 * image is blocks_count * 4096 bytes; the region's owner sizes the file (the
 * image's last blocks may be holes). */
int pyimg_ext4_finalize(pyimg_ext4 *h, const pyimg_out *out);

/* The ext4 directory hash (half_md4, unsigned chars) of a name; for tests. */
uint32_t pyimg_ext4_dirhash(const uint8_t *name, size_t len, const uint8_t seed[16]);
/* CDEF END */

/* The single-item forms the bulk calls are made of; used inside the C core
 * only (not in the cdef). */
/* A content: the non-zero block runs of a file's data; returns its id (>= 0). */
int pyimg_ext4_new_content(pyimg_ext4 *h);
int pyimg_ext4_content_run(pyimg_ext4 *h, uint32_t content, uint32_t lblk, uint32_t count);
/* Regular file `ino` holds `content` (several inodes may share one: shared_blocks). */
int pyimg_ext4_set_content(pyimg_ext4 *h, uint32_t ino, uint32_t content);

#endif
