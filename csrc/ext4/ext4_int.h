/* Internal state of the ext4 writer, shared by the .c files of csrc/ext4. */
#ifndef PYIMG_EXT4_INT_H
#define PYIMG_EXT4_INT_H

#include <stdarg.h>

#include "ext4.h"
#include "ext4_format.h"

#define E4_BS 4096u
#define E4_INODE_SIZE 256u
#define E4_EXTRA_ISIZE 32u
#define E4_ROOT_INO 2u
#define E4_JOURNAL_INO 8u
#define E4_FIRST_INO 11u
#define E4_MAX_EXT_LEN 32768u /* longest initialized extent */
#define E4_EXT_PER_BLOCK 340u /* (4096 - 12) / 12: header, entries, then the 4-byte tail */

/* feature bits */
#define E4_COMPAT_HAS_JOURNAL 0x0004u
#define E4_COMPAT_EXT_ATTR 0x0008u
#define E4_COMPAT_DIR_INDEX 0x0020u
#define E4_INCOMPAT_FILETYPE 0x0002u
#define E4_INCOMPAT_EXTENTS 0x0040u
#define E4_INCOMPAT_64BIT 0x0080u
#define E4_INCOMPAT_FLEX_BG 0x0200u
#define E4_INCOMPAT_CSUM_SEED 0x2000u
#define E4_RO_COMPAT_SPARSE_SUPER 0x0001u
#define E4_RO_COMPAT_HUGE_FILE 0x0008u
#define E4_RO_COMPAT_METADATA_CSUM 0x0400u

/* inode flags */
#define E4_INDEX_FL 0x1000u
#define E4_EXTENTS_FL 0x80000u

/* Memory: a tree of 100k small files registers 100k inodes, contents and
 * directory entries, so the per-item structures below are kept small and free
 * of per-item mallocs in the common case (one run, one extent, no extra part).
 * Sizes are checked by the _Static_asserts in handle.c. */

typedef struct {
    uint32_t lblk;
    uint32_t len;
    uint64_t pblk;
} e4_extent;

typedef struct {
    uint32_t lblk, count;
} e4_run;

/* Small vectors whose first element lives inline: with n <= 1 the element is
 * `one` (no allocation), with n >= 2 the elements are in the heap array `v`
 * (capacity implied by n: see handle.c).  The count n is kept by the owner, so
 * that two of them and their counts pack without padding in e4_content. */
typedef union {
    e4_extent one;
    e4_extent *v;
} e4_extbuf;

typedef union {
    e4_run one;
    e4_run *v;
} e4_runbuf;

static inline const e4_extent *e4_ext_v(const e4_extbuf *b, uint32_t n) { return n <= 1 ? &b->one : b->v; }
static inline const e4_run *e4_run_v(const e4_runbuf *b, uint32_t n) { return n <= 1 ? &b->one : b->v; }

typedef struct {
    e4_extbuf ext; /* computed by the layout */
    e4_runbuf runs;
    uint32_t next, nruns;
} e4_content;

/* A directory entry; the name is in the handle's name arena (h->names) at
 * name_lo | name_hi << 32: 40 bits of offset keep the entry at 12 bytes. */
typedef struct {
    uint32_t ino;
    uint32_t name_lo;
    uint8_t name_hi;
    uint8_t len;
} e4_dirent;

typedef struct {
    uint8_t index;    /* name index (1 user., 4 trusted., ...) */
    uint8_t name_len; /* length of the suffix after the prefix */
    uint8_t *name;
    uint8_t *value;
    uint32_t value_len;
} e4_xattr;

/* What only some inodes need: directories (entries, htree layout, their
 * blocks), symlinks, devices, inodes with xattrs, the journal, and files whose
 * extents need tree blocks.  Allocated on first need (e4_extra_get). */
typedef struct {
    uint8_t *symlink;
    e4_dirent *dents;
    e4_xattr *xattrs;
    size_t ndents, dcap;
    size_t nx, xcap;
    uint32_t symlink_len;
    uint32_t rdev_major, rdev_minor;
    /* layout results */
    uint32_t dir_blocks;
    int htree_levels;   /* -1: linear directory */
    uint32_t nleaves;
    size_t *leaf_start; /* htree and multi-block linear: first dirent index of each leaf, nleaves + 1 */
    uint32_t *leaf_hash; /* htree: the index hash of each leaf */
    size_t nx_inode;    /* xattrs[0 .. nx_inode) live in the inode body */
    int64_t xblock;     /* index into h->xblocks, -1 none */
    e4_extbuf own;      /* dirs, slow symlinks, the journal */
    uint32_t nown;
    uint32_t ntree;
    uint64_t *tree;     /* extent tree blocks (leaves first, then upper levels) */
} e4_extra;

/* What every inode needs; fields ordered by size so that there is no padding
 * before the tail. */
typedef struct {
    int64_t mtime;
    uint64_t size;
    uint64_t i_blocks; /* in 4 KiB blocks */
    e4_extra *x;       /* NULL: none yet (read through e4_x) */
    uint32_t uid, gid;
    uint32_t parent;
    uint32_t mtime_nsec;
    int32_t content;   /* -1: none */
    uint16_t mode;
    uint16_t links;    /* at most 65000 (checked by set_inode) */
    uint8_t used;
} e4_inode;

/* The extra part of an inode for reading: a shared all-defaults one (no
 * entries, no xattrs, linear, no xattr block) when the inode has none. */
extern const e4_extra e4_no_extra;
static inline const e4_extra *e4_x(const e4_inode *in) { return in->x ? in->x : &e4_no_extra; }

typedef struct {
    uint8_t *body; /* encoded block without checksum */
    uint32_t crc;  /* lookup key */
    uint32_t refcount;
    uint64_t pblk;
} e4_xblock;

struct pyimg_ext4 {
    pyimg_err err;
    uint32_t max_ino;
    e4_inode *inodes; /* [0 .. max_ino], index = inode number */
    e4_content *contents;
    size_t ncontents, ccap;
    uint8_t *names; /* the arena of directory entry names */
    uint64_t nnames, names_cap;
    e4_xblock *xblocks;
    size_t nxblocks, xbcap;
    /* layout */
    int laid_out;
    pyimg_ext4_geom g;
    uint32_t groups, gdt_blocks, desc_size, itb; /* itb: inode table blocks per group */
    int csum;
    uint32_t csum_seed;
    uint64_t *bb_loc, *ib_loc, *it_loc; /* per group */
    uint8_t *bmap; /* allocation bitmap over [0, bmap_bits) */
    uint64_t bmap_bits;
    uint64_t cursor, end, used, data_blocks;
    uint8_t jnl_iblock[60]; /* the journal inode's i_block, for s_jnl_blocks */
};

/* helpers shared between files; e4_fail: code is a positive PYIMG_E*, the
 * return value its negation (as every fail helper) */
int e4_fail(pyimg_ext4 *h, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int e4_grow(void **v, size_t *cap, size_t need, size_t elem);
e4_extra *e4_extra_get(e4_inode *in);
int e4_ext_push(e4_extbuf *b, uint32_t *n, uint32_t lblk, uint64_t pblk, uint32_t len);
void e4_ext_clear(e4_extbuf *b, uint32_t *n);
static inline const uint8_t *e4_dirent_name(const pyimg_ext4 *h, const e4_dirent *d) {
    return h->names + ((uint64_t)d->name_hi << 32 | d->name_lo);
}
int e4_is_backup_group(uint64_t g);
/* allocation (super.c) */
int e4_alloc(pyimg_ext4 *h, uint32_t want, uint64_t *start, uint32_t *got);
int e4_alloc_contig(pyimg_ext4 *h, uint32_t n, uint64_t *start);
int e4_alloc_extents(pyimg_ext4 *h, e4_extbuf *b, uint32_t *n, uint32_t lblk, uint32_t count);
int e4_pwrite(pyimg_ext4 *h, const pyimg_out *out, const void *buf, size_t len, uint64_t off);
/* checksums */
uint32_t e4_inode_seed(const pyimg_ext4 *h, uint32_t ino);
/* extent.c */
uint32_t e4_tree_blocks(size_t nextents);
int e4_encode_extents(pyimg_ext4 *h, uint32_t ino, uint8_t i_block[60], uint8_t *blocks);
/* dir.c / htree.c */
int e4_dir_plan(pyimg_ext4 *h, uint32_t ino);
int e4_dir_write(pyimg_ext4 *h, uint32_t ino, const pyimg_out *out);
uint8_t e4_filetype(uint16_t mode);
uint32_t e4_dx_hash(const uint8_t *name, size_t len, const uint8_t seed[16], uint32_t *minor);
int e4_htree_plan(pyimg_ext4 *h, e4_extra *in);
int e4_htree_write(pyimg_ext4 *h, uint32_t ino, uint8_t *blocks);
void e4_dirblock_tail(pyimg_ext4 *h, uint32_t ino, uint8_t *blk);
/* The room of a leaf block for entries (before the checksum tail). */
uint32_t e4_leaf_room(const pyimg_ext4 *h);
/* The bytes an entry with a name of name_len takes: header + name, padded to 4. */
uint32_t e4_rec_len(uint32_t name_len);
/* Writes one entry at p; returns rlen. */
uint32_t e4_put_dirent(uint8_t *p, uint32_t ino, const uint8_t *name, uint32_t len, uint8_t type, uint32_t rlen);
/* "." (rec_len 12) and ".." (dotdot_rec_len) at the start of blk, as linear
 * directories and the htree root have them; returns 24, where entries go on. */
uint32_t e4_put_dots(pyimg_ext4 *h, uint32_t ino, uint8_t *blk, uint32_t dotdot_rec_len);
void e4_dir_leaf(pyimg_ext4 *h, uint32_t ino, const e4_dirent *d, size_t n, uint8_t *blk, uint32_t pos);
uint8_t e4_dirent_type(const pyimg_ext4 *h, uint32_t ino);
/* xattr.c */
int e4_xattr_plan(pyimg_ext4 *h, uint32_t ino);
void e4_xattr_inode_body(const pyimg_ext4 *h, const e4_inode *in, uint8_t *raw);
int e4_xattr_write_blocks(pyimg_ext4 *h, const pyimg_out *out);
/* inode.c */
void e4_encode_inode(pyimg_ext4 *h, uint32_t ino, uint8_t *raw);
void e4_inode_finish(const pyimg_ext4 *h, uint32_t ino, uint8_t *raw);

#endif
