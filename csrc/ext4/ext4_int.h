/* Internal state of the ext4 writer, shared by the .c files of csrc/ext4. */
#ifndef PYIMG_EXT4_INT_H
#define PYIMG_EXT4_INT_H

#include <stdarg.h>

#include "ext4.h"

#define E4_BS 4096u
#define E4_INODE_SIZE 256u
#define E4_EXTRA_ISIZE 32u
#define E4_ROOT_INO 2u
#define E4_JOURNAL_INO 8u
#define E4_FIRST_INO 11u
#define E4_MAX_EXT_LEN 32768u /* longest initialized extent */
#define E4_EXT_PER_BLOCK 340u /* (4096 - 12) / 12 */

/* feature bits */
#define E4_COMPAT_HAS_JOURNAL 0x0004u
#define E4_COMPAT_EXT_ATTR 0x0008u
#define E4_COMPAT_DIR_INDEX 0x0020u
#define E4_INCOMPAT_FILETYPE 0x0002u
#define E4_INCOMPAT_EXTENTS 0x0040u
#define E4_INCOMPAT_64BIT 0x0080u
#define E4_INCOMPAT_FLEX_BG 0x0200u
#define E4_RO_COMPAT_SPARSE_SUPER 0x0001u
#define E4_RO_COMPAT_HUGE_FILE 0x0008u
#define E4_RO_COMPAT_METADATA_CSUM 0x0400u

/* inode flags */
#define E4_INDEX_FL 0x1000u
#define E4_EXTENTS_FL 0x80000u

typedef struct {
    uint32_t lblk;
    uint32_t len;
    uint64_t pblk;
} e4_extent;

typedef struct {
    e4_extent *v;
    size_t n, cap;
} e4_extents;

typedef struct {
    uint32_t lblk, count;
} e4_run;

typedef struct {
    e4_run *runs;
    size_t nruns, cap;
    e4_extents ext; /* computed by the layout */
    uint64_t blocks;
} e4_content;

typedef struct {
    uint8_t *name;
    uint32_t ino;
    uint16_t len;
    uint32_t hash, minor;
} e4_dirent;

typedef struct {
    uint8_t index;    /* name index (1 user., 4 trusted., ...) */
    uint8_t name_len; /* length of the suffix after the prefix */
    uint8_t *name;
    uint8_t *value;
    uint32_t value_len;
} e4_xattr;

typedef struct {
    int used;
    uint16_t mode;
    uint32_t uid, gid, links, rdev_major, rdev_minor, parent;
    int64_t mtime;
    uint32_t mtime_nsec;
    uint64_t size;
    int64_t content; /* -1: none */
    uint8_t *symlink;
    uint32_t symlink_len;
    e4_dirent *dents;
    size_t ndents, dcap;
    e4_xattr *xattrs;
    size_t nx, xcap;
    /* layout results */
    size_t nx_inode;    /* xattrs[0 .. nx_inode) live in the inode body */
    int64_t xblock;     /* index into h->xblocks, -1 none */
    uint32_t dir_blocks;
    int htree_levels;   /* -1: linear directory */
    size_t *leaf_start; /* htree: first dirent index of each leaf, nleaves + 1 */
    uint32_t nleaves;
    e4_extents own;     /* dirs, slow symlinks, the journal */
    uint64_t *tree;     /* extent tree blocks (leaves first, then upper levels) */
    uint32_t ntree;
    uint64_t i_blocks;  /* in 4 KiB blocks */
} e4_inode;

typedef struct {
    uint8_t *body; /* encoded block without checksum */
    uint32_t crc;  /* lookup key */
    uint32_t refcount;
    uint64_t pblk;
} e4_xblock;

struct pyimg_ext4 {
    char err[PYIMG_ERRMSG_MAX];
    uint32_t max_ino;
    e4_inode *inodes; /* [0 .. max_ino], index = inode number */
    e4_content *contents;
    size_t ncontents, ccap;
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

/* helpers shared between files */
int e4_fail(pyimg_ext4 *h, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int e4_grow(void **v, size_t *cap, size_t need, size_t elem);
int e4_ext_push(e4_extents *e, uint32_t lblk, uint64_t pblk, uint32_t len);
int e4_is_backup_group(uint64_t g);
/* allocation (super.c) */
int e4_alloc(pyimg_ext4 *h, uint32_t want, uint64_t *start, uint32_t *got);
int e4_alloc_contig(pyimg_ext4 *h, uint32_t n, uint64_t *start);
int e4_alloc_extents(pyimg_ext4 *h, e4_extents *e, uint32_t lblk, uint32_t count);
int e4_pwrite(pyimg_ext4 *h, int fd, const void *buf, size_t len, uint64_t off);
/* checksums */
uint32_t e4_inode_seed(const pyimg_ext4 *h, uint32_t ino);
/* extent.c */
uint32_t e4_tree_blocks(size_t nextents);
int e4_encode_extents(pyimg_ext4 *h, uint32_t ino, uint8_t i_block[60], uint8_t *blocks);
/* dir.c / htree.c */
int e4_dir_plan(pyimg_ext4 *h, uint32_t ino);
int e4_dir_write(pyimg_ext4 *h, uint32_t ino, int fd);
uint8_t e4_filetype(uint16_t mode);
uint32_t e4_dx_hash(const uint8_t *name, size_t len, const uint8_t seed[16], uint32_t *minor);
int e4_htree_plan(pyimg_ext4 *h, e4_inode *in);
int e4_htree_write(pyimg_ext4 *h, uint32_t ino, uint8_t *blocks);
void e4_dirblock_tail(pyimg_ext4 *h, uint32_t ino, uint8_t *blk);
void e4_dir_leaf(pyimg_ext4 *h, uint32_t ino, const e4_dirent *d, size_t n, uint8_t *blk, uint32_t pos);
uint8_t e4_dirent_type(const pyimg_ext4 *h, uint32_t ino);
/* xattr.c */
int e4_xattr_plan(pyimg_ext4 *h, uint32_t ino);
void e4_xattr_inode_body(const pyimg_ext4 *h, const e4_inode *in, uint8_t *raw);
int e4_xattr_write_blocks(pyimg_ext4 *h, int fd);
/* inode.c */
void e4_encode_inode(pyimg_ext4 *h, uint32_t ino, uint8_t *raw);
void e4_inode_finish(const pyimg_ext4 *h, uint32_t ino, uint8_t *raw);

#endif
