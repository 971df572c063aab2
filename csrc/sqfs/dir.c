/* Directory listings and directory inodes.
 *
 * A listing is a run of headers (count-1, inode block, base inode number), each
 * followed by at most 256 entries whose inodes sit in that one inode metadata
 * block and whose numbers are within a signed 16-bit distance of the base.  A run
 * also ends where the listing crosses into a new directory metadata block, and
 * every header that starts a new block gets an entry in the directory index of
 * the (extended) directory inode: the kernel's lookup then reads one block, not
 * the whole listing.
 */
#include "sqfs.h"
#include "sqfs_format.h"

#define DIR_HEADER_SIZE SQFS_DIRHDR_SIZE
#define DIR_ENTRY_SIZE SQFS_DIRENT_SIZE
#define DIR_MAX_RUN 256
#define DIR_MAX_NAME 256

typedef struct {
    const uint8_t *names;
    const uint32_t *name_ends;
    const uint64_t *refs;
    const uint32_t *inos;
    const uint16_t *types;
    size_t n;
} listing_t;

static size_t name_start(const listing_t *l, size_t i) { return i ? l->name_ends[i - 1] : 0; }
static size_t name_len(const listing_t *l, size_t i) { return l->name_ends[i] - name_start(l, i); }

/* How many entries from `first` share one header, given that the header starts
 * at `offset` within its directory metadata block. */
static size_t run_length(const listing_t *l, size_t first, size_t offset) {
    uint64_t inode_block = l->refs[first] >> 16;
    size_t pos = offset + DIR_HEADER_SIZE;
    size_t i = first;
    while (i < l->n && i - first < DIR_MAX_RUN) {
        if ((l->refs[i] >> 16) != inode_block) break;
        int64_t diff = (int64_t)l->inos[i] - (int64_t)l->inos[first];
        if (diff < INT16_MIN || diff > INT16_MAX) break;
        pos += DIR_ENTRY_SIZE + name_len(l, i);
        i++;
        if (pos >= SQFS_META_SIZE) break; /* this entry reaches the next block: end the run */
    }
    return i - first;
}

static int append_header(pyimg_sqfs_meta *dirs, const listing_t *l, size_t first, size_t run) {
    uint8_t h[SQFS_DIRHDR_SIZE];
    put_le32(h + SQFS_DIRHDR_COUNT, (uint32_t)(run - 1));
    put_le32(h + SQFS_DIRHDR_START, (uint32_t)(l->refs[first] >> 16));
    put_le32(h + SQFS_DIRHDR_INODE_NUMBER, l->inos[first]);
    return pyimg_sqfs_meta_append(dirs, h, sizeof h);
}

static int append_entry(pyimg_sqfs_meta *dirs, const listing_t *l, size_t i, uint32_t base_ino) {
    uint8_t e[SQFS_DIRENT_SIZE];
    size_t len = name_len(l, i);
    put_le16(e + SQFS_DIRENT_OFFSET, (uint16_t)(l->refs[i] & 0xFFFF));
    put_le16(e + SQFS_DIRENT_INODE_OFFSET, (uint16_t)(int16_t)((int64_t)l->inos[i] - (int64_t)base_ino));
    put_le16(e + SQFS_DIRENT_TYPE, l->types[i]);
    put_le16(e + SQFS_DIRENT_NAME_SIZE, (uint16_t)(len - 1));
    int rc = pyimg_sqfs_meta_append(dirs, e, sizeof e);
    return rc ? rc : pyimg_sqfs_meta_append(dirs, l->names + name_start(l, i), len);
}

static int index_add(pyimg_buf *idx, uint32_t listing_offset, uint32_t dir_block, const uint8_t *name,
                     size_t len) {
    uint8_t e[SQFS_DIRIDX_SIZE];
    put_le32(e + SQFS_DIRIDX_INDEX, listing_offset);
    put_le32(e + SQFS_DIRIDX_START, dir_block);
    put_le32(e + SQFS_DIRIDX_NAME_SIZE, (uint32_t)(len - 1));
    return pyimg_buf_append(idx, e, sizeof e) || pyimg_buf_append(idx, name, len) ? -PYIMG_ENOMEM : 0;
}

/* Writes the listing; fills the directory index (idx, index_count) and its size. */
static int write_listing(pyimg_sqfs *w, const listing_t *l, pyimg_buf *idx, uint32_t *index_count,
                         uint64_t *size) {
    pyimg_sqfs_meta *dirs = pyimg_sqfs_directories(w);
    uint64_t start_block = pyimg_sqfs_meta_ref(dirs) >> 16;
    uint64_t listing = 0;
    for (size_t i = 0; i < l->n; i++) {
        size_t len = name_len(l, i);
        if (len == 0 || len > DIR_MAX_NAME)
            return pyimg_sqfs_fail(w, PYIMG_ELIMIT, "a name of %zu bytes (squashfs allows 1 to %d)", len,
                                   DIR_MAX_NAME);
    }
    size_t i = 0;
    while (i < l->n) {
        uint64_t ref = pyimg_sqfs_meta_ref(dirs);
        if ((ref >> 16) != start_block) {
            if (index_add(idx, (uint32_t)listing, (uint32_t)(ref >> 16), l->names + name_start(l, i),
                          name_len(l, i)))
                return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
            (*index_count)++;
            start_block = ref >> 16;
        }
        size_t run = run_length(l, i, (size_t)(ref & 0xFFFF));
        int rc = append_header(dirs, l, i, run);
        listing += DIR_HEADER_SIZE;
        for (size_t end = i + run, base = i; !rc && i < end; i++) {
            rc = append_entry(dirs, l, i, l->inos[base]);
            listing += DIR_ENTRY_SIZE + name_len(l, i);
        }
        if (rc) return pyimg_sqfs_meta_failed(w, dirs, rc);
    }
    *size = listing;
    return 0;
}

static int64_t append_inode(pyimg_sqfs *w, const uint8_t *p, size_t len, const pyimg_buf *idx) {
    pyimg_sqfs_meta *inodes = pyimg_sqfs_inodes(w);
    uint64_t ref = pyimg_sqfs_meta_ref(inodes);
    int rc = pyimg_sqfs_meta_append(inodes, p, len);
    if (!rc && idx && idx->len) rc = pyimg_sqfs_meta_append(inodes, idx->data, idx->len);
    if (rc) return pyimg_sqfs_meta_failed(w, inodes, rc);
    return (int64_t)ref;
}

int64_t pyimg_sqfs_add_dir(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint32_t parent_ino, size_t n,
                           const uint8_t *names, const uint32_t *name_ends, const uint64_t *refs,
                           const uint32_t *inos, const uint16_t *types) {
    listing_t l = {names, name_ends, refs, inos, types, n};
    uint64_t start = pyimg_sqfs_meta_ref(pyimg_sqfs_directories(w));
    pyimg_buf idx = {0};
    uint32_t index_count = 0;
    uint64_t listing = 0;
    int rc = write_listing(w, &l, &idx, &index_count, &listing);
    if (rc) {
        pyimg_buf_free(&idx);
        return rc;
    }
    uint64_t file_size = listing + 3; /* "." and ".." are implied: the kernel counts them as 3 bytes */
    if (file_size > UINT32_MAX || index_count > UINT16_MAX || (start >> 16) > UINT32_MAX) {
        pyimg_buf_free(&idx);
        return pyimg_sqfs_fail(w, PYIMG_ELIMIT, "directory listing too large for squashfs");
    }
    uint8_t p[SQFS_XDIR_SIZE] = {0};
    size_t inode_len;
    if (c->xattr == SQFS_NO_XATTR && index_count == 0 && file_size <= UINT16_MAX) {
        pyimg_sqfs_encode_header(p, SQFS_DIR, c);
        put_le32(p + SQFS_DIR_BLOCK_START, (uint32_t)(start >> 16));
        put_le32(p + SQFS_DIR_LINK_COUNT, c->nlink);
        put_le16(p + SQFS_DIR_FILE_SIZE, (uint16_t)file_size);
        put_le16(p + SQFS_DIR_BLOCK_OFFSET, (uint16_t)(start & 0xFFFF));
        put_le32(p + SQFS_DIR_PARENT, parent_ino);
        inode_len = SQFS_DIR_SIZE;
    } else {
        pyimg_sqfs_encode_header(p, SQFS_DIR + SQFS_EXT, c);
        put_le32(p + SQFS_XDIR_LINK_COUNT, c->nlink);
        put_le32(p + SQFS_XDIR_FILE_SIZE, (uint32_t)file_size);
        put_le32(p + SQFS_XDIR_BLOCK_START, (uint32_t)(start >> 16));
        put_le32(p + SQFS_XDIR_PARENT, parent_ino);
        put_le16(p + SQFS_XDIR_INDEX_COUNT, (uint16_t)index_count);
        put_le16(p + SQFS_XDIR_BLOCK_OFFSET, (uint16_t)(start & 0xFFFF));
        put_le32(p + SQFS_XDIR_XATTR_IDX, c->xattr);
        inode_len = SQFS_XDIR_SIZE;
    }
    int64_t ref = append_inode(w, p, inode_len, &idx);
    pyimg_buf_free(&idx);
    return ref;
}
