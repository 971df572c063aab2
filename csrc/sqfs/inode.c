/* The writer handle and the inode encoders.  Every inode starts with the
 * 16-byte common header; the extended form of a type is used only where the
 * basic one cannot hold the values (link count, xattrs, 64-bit sizes...). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "sqfs.h"
#include "sqfs_format.h"

struct pyimg_sqfs {
    pyimg_sqfs_meta *inodes;
    pyimg_sqfs_meta *dirs;
    pyimg_buf scratch; /* one encoded inode or one directory index */
    pyimg_err err;
};

pyimg_sqfs *pyimg_sqfs_new(pyimg_sqfs_compress_fn fn, void *ctx) {
    pyimg_sqfs *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->inodes = pyimg_sqfs_meta_new(fn, ctx);
    w->dirs = pyimg_sqfs_meta_new(fn, ctx);
    if (!w->inodes || !w->dirs) {
        pyimg_sqfs_free(w);
        return NULL;
    }
    return w;
}

void pyimg_sqfs_free(pyimg_sqfs *w) {
    if (!w) return;
    pyimg_sqfs_meta_free(w->inodes);
    pyimg_sqfs_meta_free(w->dirs);
    pyimg_buf_free(&w->scratch);
    free(w);
}

const char *pyimg_sqfs_error(const pyimg_sqfs *w) { return w->err.msg; }
pyimg_sqfs_meta *pyimg_sqfs_inodes(pyimg_sqfs *w) { return w->inodes; }
pyimg_sqfs_meta *pyimg_sqfs_directories(pyimg_sqfs *w) { return w->dirs; }

int pyimg_sqfs_fail(pyimg_sqfs *w, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = pyimg_err_vset(&w->err, code, fmt, ap);
    va_end(ap);
    return rc;
}

int pyimg_sqfs_meta_failed(pyimg_sqfs *w, const pyimg_sqfs_meta *m, int rc) {
    return pyimg_sqfs_fail(w, -rc, "%s", pyimg_sqfs_meta_error(m));
}

void pyimg_sqfs_encode_header(uint8_t *p, uint16_t type, const pyimg_sqfs_common *c) {
    put_le16(p + SQFS_INODE_TYPE, type);
    put_le16(p + SQFS_INODE_PERMISSIONS, c->mode & 07777);
    put_le16(p + SQFS_INODE_UID_IDX, c->uid_idx);
    put_le16(p + SQFS_INODE_GID_IDX, c->gid_idx);
    put_le32(p + SQFS_INODE_MTIME, c->mtime);
    put_le32(p + SQFS_INODE_NUMBER, c->ino);
}

/* Appends the encoded inode in w->scratch to the inode table; returns its ref. */
static int64_t emit_inode(pyimg_sqfs *w) {
    uint64_t ref = pyimg_sqfs_meta_ref(w->inodes);
    int rc = pyimg_sqfs_meta_append(w->inodes, w->scratch.data, w->scratch.len);
    if (rc) return pyimg_sqfs_meta_failed(w, w->inodes, rc);
    return (int64_t)ref;
}

static uint8_t *scratch_reset(pyimg_sqfs *w, size_t len) {
    w->scratch.len = 0;
    if (pyimg_buf_reserve(&w->scratch, len)) return NULL;
    memset(w->scratch.data, 0, len);
    w->scratch.len = len;
    return w->scratch.data;
}

int64_t pyimg_sqfs_add_file(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint64_t size, uint64_t blocks_start,
                            uint64_t sparse, uint32_t frag_index, uint32_t frag_offset,
                            const uint32_t *block_sizes, size_t nblocks) {
    int basic = size <= UINT32_MAX && blocks_start <= UINT32_MAX && c->nlink == 1 && c->xattr == SQFS_NO_XATTR &&
                sparse == 0;
    size_t fixed = basic ? SQFS_FILE_SIZE : SQFS_XFILE_SIZE;
    if (nblocks > (SIZE_MAX - fixed) / 4) return pyimg_sqfs_fail(w, PYIMG_ELIMIT, "file has too many blocks");
    uint8_t *p = scratch_reset(w, fixed + 4 * nblocks);
    if (!p) return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
    if (basic) {
        pyimg_sqfs_encode_header(p, SQFS_FILE, c);
        put_le32(p + SQFS_FILE_BLOCKS_START, (uint32_t)blocks_start);
        put_le32(p + SQFS_FILE_FRAG_INDEX, frag_index);
        put_le32(p + SQFS_FILE_FRAG_OFFSET, frag_offset);
        put_le32(p + SQFS_FILE_FILE_SIZE, (uint32_t)size);
    } else {
        pyimg_sqfs_encode_header(p, SQFS_FILE + SQFS_EXT, c);
        put_le64(p + SQFS_XFILE_BLOCKS_START, blocks_start);
        put_le64(p + SQFS_XFILE_FILE_SIZE, size);
        put_le64(p + SQFS_XFILE_SPARSE, sparse);
        put_le32(p + SQFS_XFILE_LINK_COUNT, c->nlink);
        put_le32(p + SQFS_XFILE_FRAG_INDEX, frag_index);
        put_le32(p + SQFS_XFILE_FRAG_OFFSET, frag_offset);
        put_le32(p + SQFS_XFILE_XATTR_IDX, c->xattr);
    }
    for (size_t i = 0; i < nblocks; i++) put_le32(p + fixed + 4 * i, block_sizes[i]);
    return emit_inode(w);
}

int64_t pyimg_sqfs_add_special(pyimg_sqfs *w, const pyimg_sqfs_common *c, uint16_t type, uint32_t rdev,
                               const uint8_t *target, size_t target_len) {
    int ext = c->xattr != SQFS_NO_XATTR;
    uint16_t disk_type = (uint16_t)(type + (ext ? SQFS_EXT : 0));
    uint8_t *p;
    switch (type) {
    case SQFS_SYMLINK:
        if (target_len > UINT32_MAX) return pyimg_sqfs_fail(w, PYIMG_ELIMIT, "symlink target too long");
        p = scratch_reset(w, SQFS_SYMLINK_TARGET + target_len + (ext ? 4 : 0));
        if (!p) return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
        pyimg_sqfs_encode_header(p, disk_type, c);
        put_le32(p + SQFS_SYMLINK_LINK_COUNT, c->nlink);
        put_le32(p + SQFS_SYMLINK_TARGET_SIZE, (uint32_t)target_len);
        if (target_len) memcpy(p + SQFS_SYMLINK_TARGET, target, target_len);
        if (ext) put_le32(p + SQFS_SYMLINK_TARGET + target_len, c->xattr); /* the extended form's xattr index */
        break;
    case SQFS_BDEV:
    case SQFS_CDEV:
        p = scratch_reset(w, ext ? SQFS_XDEV_SIZE : SQFS_DEV_SIZE);
        if (!p) return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
        pyimg_sqfs_encode_header(p, disk_type, c);
        put_le32(p + SQFS_DEV_LINK_COUNT, c->nlink);
        put_le32(p + SQFS_DEV_DEVICE, rdev);
        if (ext) put_le32(p + SQFS_XDEV_XATTR_IDX, c->xattr);
        break;
    case SQFS_FIFO:
    case SQFS_SOCKET:
        p = scratch_reset(w, ext ? SQFS_XIPC_SIZE : SQFS_IPC_SIZE);
        if (!p) return pyimg_sqfs_fail(w, PYIMG_ENOMEM, "out of memory");
        pyimg_sqfs_encode_header(p, disk_type, c);
        put_le32(p + SQFS_IPC_LINK_COUNT, c->nlink);
        if (ext) put_le32(p + SQFS_XIPC_XATTR_IDX, c->xattr);
        break;
    default:
        return pyimg_sqfs_fail(w, PYIMG_EINVAL, "not a special inode type: %u", (unsigned)type);
    }
    return emit_inode(w);
}

void pyimg_sqfs_encode_super(const pyimg_sqfs_super *s, uint8_t *out) {
    memset(out, 0, SQFS_SB_SIZE);
    put_le32(out + SQFS_SB_MAGIC, SQFS_MAGIC);
    put_le32(out + SQFS_SB_INODE_COUNT, s->inode_count);
    put_le32(out + SQFS_SB_MOD_TIME, s->mod_time);
    put_le32(out + SQFS_SB_BLOCK_SIZE, s->block_size);
    put_le32(out + SQFS_SB_FRAGMENT_COUNT, s->fragment_count);
    put_le16(out + SQFS_SB_COMPRESSOR, s->compressor);
    uint16_t block_log = 0;
    while ((1u << block_log) < s->block_size) block_log++;
    put_le16(out + SQFS_SB_BLOCK_LOG, block_log);
    put_le16(out + SQFS_SB_FLAGS, s->flags);
    put_le16(out + SQFS_SB_ID_COUNT, s->id_count);
    put_le16(out + SQFS_SB_VERSION_MAJOR, SQFS_VERSION_MAJOR);
    put_le16(out + SQFS_SB_VERSION_MINOR, SQFS_VERSION_MINOR);
    put_le64(out + SQFS_SB_ROOT_INODE_REF, s->root_ref);
    put_le64(out + SQFS_SB_BYTES_USED, s->bytes_used);
    put_le64(out + SQFS_SB_ID_TABLE, s->id_table);
    put_le64(out + SQFS_SB_XATTR_ID_TABLE, s->xattr_table);
    put_le64(out + SQFS_SB_INODE_TABLE, s->inode_table);
    put_le64(out + SQFS_SB_DIRECTORY_TABLE, s->directory_table);
    put_le64(out + SQFS_SB_FRAGMENT_TABLE, s->fragment_table);
    put_le64(out + SQFS_SB_EXPORT_TABLE, s->export_table);
}
/* The size the cdef promises Python (SQFS_SUPERBLOCK_SIZE) is the format's. */
_Static_assert(SQFS_SUPERBLOCK_SIZE == SQFS_SB_SIZE, "superblock size in sqfs.h");

int pyimg_sqfs_xattr_pair(pyimg_sqfs_meta *kv, uint16_t prefix, const uint8_t *name, size_t name_len,
                          const uint8_t *value, size_t value_len) {
    if (name_len > UINT16_MAX || value_len > UINT32_MAX) return pyimg_sqfs_meta_fail(kv, PYIMG_ELIMIT, "xattr name or value too long");
    uint8_t key[SQFS_XKEY_NAME], size[SQFS_XVALUE_VALUE];
    put_le16(key + SQFS_XKEY_TYPE, prefix);
    put_le16(key + SQFS_XKEY_NAME_SIZE, (uint16_t)name_len);
    put_le32(size + SQFS_XVALUE_SIZE, (uint32_t)value_len);
    int rc = pyimg_sqfs_meta_append(kv, key, sizeof key);
    if (!rc) rc = pyimg_sqfs_meta_append(kv, name, name_len);
    if (!rc) rc = pyimg_sqfs_meta_append(kv, size, sizeof size);
    if (!rc) rc = pyimg_sqfs_meta_append(kv, value, value_len);
    return rc;
}

int pyimg_sqfs_xattr_id(pyimg_sqfs_meta *ids, uint64_t kv_ref, uint32_t count, uint32_t size) {
    uint8_t e[SQFS_XID_ENTRY_SIZE];
    put_le64(e + SQFS_XID_REF, kv_ref);
    put_le32(e + SQFS_XID_COUNT, count);
    put_le32(e + SQFS_XID_SIZE, size);
    return pyimg_sqfs_meta_append(ids, e, sizeof e);
}
