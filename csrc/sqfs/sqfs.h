/* squashfs 4.0 writer: the on-disk encoders of the C core.
 *
 * Python lays the image out (which content goes where, ids, fragments) and
 * streams file data; C encodes every metadata structure: inodes, directory
 * listings with their headers and index, lookup tables, the xattr table and the
 * superblock, and packs them into 8 KiB metadata blocks.  Metadata blocks are
 * compressed through a callback so the C core does not link a compressor itself
 * (Python's zstandard/zlib/lzma do the work, and the same ones compress data).
 *
 * Layout facts: squashfs-tools-ng doc/format.adoc, the kernel's
 * Documentation/filesystems/squashfs.rst.
 */
#ifndef PYIMG_SQFS_H
#define PYIMG_SQFS_H

#include "../common/common.h"

#define SQFS_META_SIZE 8192
#define SQFS_SUPERBLOCK_SIZE 96

/* CDEF BEGIN */
#define PYIMG_SQFS_MEMBER 36 /* a fragment block member record: digest, length */
#define PYIMG_SQFS_BLIND 16  /* a blind range: file number, offset, length */
/* Compress len bytes at src into dst (capacity cap).  Returns the compressed size
 * when it is smaller than len, 0 when it is not (the block is then stored raw),
 * and -1 on failure (the Python side keeps the exception; the call then fails
 * with -PYIMG_ECALLBACK).  ctx is passed back untouched (borrowed). */
typedef int (*pyimg_sqfs_compress_fn)(void *ctx, const uint8_t *src, size_t len, uint8_t *dst, size_t cap);

/* A stream of metadata blocks, kept in memory: 2-byte header + (compressed) data
 * for each block of up to 8 KiB.  References into it are (block start << 16) |
 * offset, block start counted from the first block of this stream. */
typedef struct pyimg_sqfs_meta pyimg_sqfs_meta;

pyimg_sqfs_meta *pyimg_sqfs_meta_new(pyimg_sqfs_compress_fn fn, void *ctx); /* ctx borrowed for the handle's life */
void pyimg_sqfs_meta_free(pyimg_sqfs_meta *m);
const char *pyimg_sqfs_meta_error(const pyimg_sqfs_meta *m);
int pyimg_sqfs_meta_append(pyimg_sqfs_meta *m, const uint8_t *data, size_t len);
/* Where the next appended byte will live. */
uint64_t pyimg_sqfs_meta_ref(const pyimg_sqfs_meta *m);
/* Compresses the last, partial block.  Call once, after the last append. */
int pyimg_sqfs_meta_finish(pyimg_sqfs_meta *m);
/* The encoded stream (borrowed; valid until the next call on m). */
const uint8_t *pyimg_sqfs_meta_data(const pyimg_sqfs_meta *m);
size_t pyimg_sqfs_meta_size(const pyimg_sqfs_meta *m);
/* Offsets of each block within the stream (for lookup tables). */
size_t pyimg_sqfs_meta_block_count(const pyimg_sqfs_meta *m);
uint64_t pyimg_sqfs_meta_block_offset(const pyimg_sqfs_meta *m, size_t i);

/* The inode and directory tables, written bottom-up: each entry's inode before
 * the directory that lists it, so every reference is known when it is needed. */
typedef struct pyimg_sqfs pyimg_sqfs;

pyimg_sqfs *pyimg_sqfs_new(pyimg_sqfs_compress_fn fn, void *ctx); /* ctx borrowed */
void pyimg_sqfs_free(pyimg_sqfs *w);
const char *pyimg_sqfs_error(const pyimg_sqfs *w);
pyimg_sqfs_meta *pyimg_sqfs_inodes(pyimg_sqfs *w);      /* borrowed, owned by w */
pyimg_sqfs_meta *pyimg_sqfs_directories(pyimg_sqfs *w); /* borrowed, owned by w */


/* A whole tree as columns (tree.c).  Nodes (directory entries) come in tree
 * order: depth first, children by name, node 0 the root; node_ino[i] is the
 * entry's inode number (1-based; hard links share one), node_parent[i] its
 * parent node, and names[name_ends[i-1] .. name_ends[i]) its name.  Inode
 * columns are indexed by ino - 1.  type: the basic squashfs type 1..7.  Files:
 * file_of[ino-1] indexes the file columns (-1 for other types); file f's block
 * sizes are block_sizes[block_ends[f-1] .. block_ends[f]).  Symlinks: targets
 * [target_ends[ino-2] .. target_ends[ino-1]) (empty for other types).  Devices:
 * rdev in squashfs's encoding.  All arrays are borrowed. */
typedef struct {
    size_t node_count;
    const uint32_t *node_ino;
    const uint32_t *node_parent;
    const uint8_t *names;
    const uint64_t *name_ends;
    size_t inode_count;
    const uint16_t *type;
    const uint16_t *mode;
    const uint16_t *uid_idx;
    const uint16_t *gid_idx;
    const uint32_t *mtime;
    const uint32_t *nlink;
    const uint32_t *xattr;
    const uint64_t *size;
    const uint32_t *rdev;
    const uint8_t *targets;
    const uint64_t *target_ends;
    const int64_t *file_of;
    size_t file_count;
    const uint64_t *blocks_start;
    const uint64_t *sparse;
    const uint32_t *frag_index;
    const uint32_t *frag_offset;
    const uint64_t *block_ends;
    const uint32_t *block_sizes;
} pyimg_sqfs_tree;

/* Encodes every inode and directory listing of the tree into w's tables;
 * refs_out[ino-1] receives each inode's reference.  On failure, *failed_node
 * is the node being encoded. */
int pyimg_sqfs_encode_tree(pyimg_sqfs *w, const pyimg_sqfs_tree *t, uint64_t *refs_out, size_t *failed_node);

/* Appends one xattr key/value pair (prefix 0 user, 1 trusted, 2 security; name
 * without its prefix) to a key/value metadata stream. */
int pyimg_sqfs_xattr_pair(pyimg_sqfs_meta *kv, uint16_t prefix, const uint8_t *name, size_t name_len,
                          const uint8_t *value, size_t value_len);
/* Appends one xattr id entry (16 bytes) to an id metadata stream. */
int pyimg_sqfs_xattr_id(pyimg_sqfs_meta *ids, uint64_t kv_ref, uint32_t count, uint32_t size);

/* The fragment packer (frag.c): packs tails into fragment blocks in plan order,
 * storing identical ones once.  Closed blocks wait in the packer until Python
 * takes them (take, then clear_pending) and compresses them. */
typedef struct pyimg_sqfs_packer pyimg_sqfs_packer;

pyimg_sqfs_packer *pyimg_sqfs_packer_new(uint32_t block_size);
void pyimg_sqfs_packer_free(pyimg_sqfs_packer *p);
/* The message of the last failure; borrowed, valid until the next call. */
const char *pyimg_sqfs_packer_error(const pyimg_sqfs_packer *p);
/* The tail of a larger file.  key: the tail's 32-byte digest (NULL: none; then
 * its block has no member key), required with dedup (an identical earlier tail
 * is reused).  Sets its place: fragment index and offset in that fragment. */
int pyimg_sqfs_packer_add_tail(pyimg_sqfs_packer *p, const uint8_t *tail, size_t len, const uint8_t *key,
                               int dedup, uint32_t *frag_index, uint32_t *frag_offset);
/* n small files (each smaller than a block), files first .. first+n-1 of the
 * build: sizes[i - first]; the non-empty ones' bytes back to back in data, or
 * data NULL: "blind", their digests known but not their bytes (frag.c).
 * digests: the 32-byte digests of ALL files of the build, by file number (the
 * packer keeps referring to them: the same array, unchanged, on every call).
 * Sets each one's place in frag_index/frag_offset (also by file number; empty
 * files: no fragment, 0xFFFFFFFF) and adds to *unique_bytes the sizes of those
 * that are not duplicates of an earlier small file (with dedup). */
int pyimg_sqfs_packer_add_small(pyimg_sqfs_packer *p, size_t first, size_t n, const uint64_t *sizes,
                                const uint8_t *data, const uint8_t *digests, int dedup, uint32_t *frag_index,
                                uint32_t *frag_offset, uint64_t *unique_bytes);
/* Closes the open block (if it holds anything): it becomes pending. */
int pyimg_sqfs_packer_close_block(pyimg_sqfs_packer *p);
size_t pyimg_sqfs_packer_pending(const pyimg_sqfs_packer *p);
/* Pending block i, handed over: the caller frees it with pyimg_free. */
uint8_t *pyimg_sqfs_packer_take(pyimg_sqfs_packer *p, size_t i, size_t *size);
/* Pending block i's members: *members_len bytes of records (PYIMG_SQFS_MEMBER
 * each: 32-byte digest, length u32 LE) and *blind_len bytes of blind ranges
 * (PYIMG_SQFS_BLIND each: file number u64 LE, offset u32 LE, length u32 LE);
 * borrowed until clear_pending.  Returns 1 if every member has a digest (the
 * records then determine the block's bytes), else 0. */
int pyimg_sqfs_packer_members(const pyimg_sqfs_packer *p, size_t i, const uint8_t **members, size_t *members_len,
                              const uint8_t **blind, size_t *blind_len);
/* Forgets the pending blocks (frees those not taken). */
void pyimg_sqfs_packer_clear_pending(pyimg_sqfs_packer *p);
void pyimg_free(void *ptr);

typedef struct {
    uint32_t inode_count;
    uint32_t mod_time;
    uint32_t block_size;
    uint32_t fragment_count;
    uint16_t compressor;
    uint16_t flags;
    uint16_t id_count;
    uint64_t root_ref;
    uint64_t bytes_used;
    uint64_t id_table;
    uint64_t xattr_table; /* ~0 when absent */
    uint64_t inode_table;
    uint64_t directory_table;
    uint64_t fragment_table; /* ~0 when absent */
    uint64_t export_table;   /* ~0 when absent */
} pyimg_sqfs_super;

/* Encodes the 96-byte superblock into out. */
void pyimg_sqfs_encode_super(const pyimg_sqfs_super *s, uint8_t *out);
/* CDEF END */

/* Used inside the C core only (tree.c encodes a whole tree with them): not in
 * the cdef, so they are no API to keep for Python. */
/* Common inode fields.  xattr is an index into the xattr id table, or 0xFFFFFFFF. */
typedef struct {
    uint16_t mode;  /* permission bits (07777) */
    uint16_t uid_idx;
    uint16_t gid_idx;
    uint32_t mtime;
    uint32_t ino;
    uint32_t nlink;
    uint32_t xattr;
} pyimg_sqfs_common;

/* Each returns the new inode's reference (>= 0) or a negative PYIMG_E* code.
 * The extended inode form is chosen when the basic one cannot hold the values. */
int64_t pyimg_sqfs_add_file(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint64_t size, uint64_t blocks_start,
                            uint64_t sparse, uint32_t frag_index, uint32_t frag_offset,
                            const uint32_t *block_sizes, size_t nblocks);
/* type: 3 symlink (target used), 4 block dev, 5 char dev (rdev used), 6 fifo, 7 socket. */
int64_t pyimg_sqfs_add_special(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint16_t type, uint32_t rdev,
                               const uint8_t *target, size_t target_len);
/* A directory: its listing (n entries, sorted by name) goes to the directory
 * table and its inode to the inode table.  names holds the names back to back,
 * name_ends[i] the end offset of name i; refs/inos/types describe each child
 * (types: the basic squashfs type 1..7). */
int64_t pyimg_sqfs_add_dir(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint32_t parent_ino, size_t n,
                           const uint8_t *names, const uint32_t *name_ends, const uint64_t *refs,
                           const uint32_t *inos, const uint16_t *types);

/* Inode types. */
enum {
    SQFS_DIR = 1, SQFS_FILE = 2, SQFS_SYMLINK = 3, SQFS_BDEV = 4, SQFS_CDEV = 5, SQFS_FIFO = 6, SQFS_SOCKET = 7,
    SQFS_EXT = 7 /* extended type = basic type + 7 */
};

#define SQFS_NO_XATTR 0xFFFFFFFFu
#define SQFS_NO_FRAGMENT 0xFFFFFFFFu

/* Shared between the .c files of the writer.  pyimg_sqfs_fail: code is a
 * positive PYIMG_E*, the return value its negation (as every fail helper).
 * pyimg_sqfs_meta_failed: passes on the failure rc (< 0) of a call on m, with
 * m's message, as the writer's.  pyimg_sqfs_meta_fail: the same for a stream. */
int pyimg_sqfs_fail(pyimg_sqfs *w, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int pyimg_sqfs_meta_failed(pyimg_sqfs *w, const pyimg_sqfs_meta *m, int rc);
int pyimg_sqfs_meta_fail(pyimg_sqfs_meta *m, int code, const char *what);
/* The 16-byte header every inode starts with (inode.c; used by dir.c too). */
void pyimg_sqfs_encode_header(uint8_t *p, uint16_t type, const pyimg_sqfs_common *c);

#endif
