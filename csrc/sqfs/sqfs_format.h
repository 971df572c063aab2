/* squashfs 4.0 on-disk structures: byte offsets of every field, named after the
 * fields of squashfs-tools-ng's doc/format.adoc and the kernel's
 * fs/squashfs/squashfs_fs.h.  All integers are little-endian.
 *
 * These are offsets, not C structs: the encoders write field by field with
 * put_le16/32/64 at these names (never a raw struct, whose padding and byte
 * order the compiler chooses).  The _Static_asserts check that each structure's
 * fields are contiguous and end at its size, so a mistyped offset fails the
 * build.  tests/unit/test_format_decode.py decodes images with Python's struct
 * independently of this header. */
#ifndef PYIMG_SQFS_FORMAT_H
#define PYIMG_SQFS_FORMAT_H

#define SQFS_MAGIC 0x73717368u /* "hsqs" */
#define SQFS_VERSION_MAJOR 4
#define SQFS_VERSION_MINOR 0

/* The superblock, at byte 0 of the image. */
enum {
    SQFS_SB_MAGIC = 0x00,             /* u32 */
    SQFS_SB_INODE_COUNT = 0x04,       /* u32 */
    SQFS_SB_MOD_TIME = 0x08,          /* u32 */
    SQFS_SB_BLOCK_SIZE = 0x0C,        /* u32 */
    SQFS_SB_FRAGMENT_COUNT = 0x10,    /* u32 fragment_entry_count */
    SQFS_SB_COMPRESSOR = 0x14,        /* u16 compression_id */
    SQFS_SB_BLOCK_LOG = 0x16,         /* u16 log2(block_size) */
    SQFS_SB_FLAGS = 0x18,             /* u16 */
    SQFS_SB_ID_COUNT = 0x1A,          /* u16 */
    SQFS_SB_VERSION_MAJOR = 0x1C,     /* u16 */
    SQFS_SB_VERSION_MINOR = 0x1E,     /* u16 */
    SQFS_SB_ROOT_INODE_REF = 0x20,    /* u64 */
    SQFS_SB_BYTES_USED = 0x28,        /* u64 */
    SQFS_SB_ID_TABLE = 0x30,          /* u64 id_table_start */
    SQFS_SB_XATTR_ID_TABLE = 0x38,    /* u64 xattr_id_table_start, ~0 when absent */
    SQFS_SB_INODE_TABLE = 0x40,       /* u64 inode_table_start */
    SQFS_SB_DIRECTORY_TABLE = 0x48,   /* u64 directory_table_start */
    SQFS_SB_FRAGMENT_TABLE = 0x50,    /* u64 fragment_table_start, ~0 when absent */
    SQFS_SB_EXPORT_TABLE = 0x58,      /* u64 export_table_start, ~0 when absent */
    SQFS_SB_SIZE = 0x60
};
_Static_assert(SQFS_SB_COMPRESSOR == SQFS_SB_FRAGMENT_COUNT + 4, "superblock: u32 fields then u16 fields");
_Static_assert(SQFS_SB_ROOT_INODE_REF == SQFS_SB_VERSION_MINOR + 2, "superblock: u16 fields then u64 fields");
_Static_assert(SQFS_SB_EXPORT_TABLE == SQFS_SB_ROOT_INODE_REF + 7 * 8, "superblock: eight u64 fields");
_Static_assert(SQFS_SB_EXPORT_TABLE + 8 == SQFS_SB_SIZE, "superblock: 96 bytes");

/* The header every inode starts with.  (Each structure below is its own enum;
 * the asserts that compare two of them cast to int.) */
enum {
    SQFS_INODE_TYPE = 0x00,        /* u16 inode_type: 1..7 basic, 8..14 extended */
    SQFS_INODE_PERMISSIONS = 0x02, /* u16 mode & 07777 */
    SQFS_INODE_UID_IDX = 0x04,     /* u16 index into the id table */
    SQFS_INODE_GID_IDX = 0x06,     /* u16 */
    SQFS_INODE_MTIME = 0x08,       /* u32 */
    SQFS_INODE_NUMBER = 0x0C,      /* u32 inode_number */
    SQFS_INODE_HEADER_SIZE = 0x10
};
_Static_assert(SQFS_INODE_NUMBER + 4 == SQFS_INODE_HEADER_SIZE, "inode header: 16 bytes");

/* Basic directory (type 1). */
enum {
    SQFS_DIR_BLOCK_START = 0x10,  /* u32 block_idx: directory table block of the listing */
    SQFS_DIR_LINK_COUNT = 0x14,   /* u32 */
    SQFS_DIR_FILE_SIZE = 0x18,    /* u16 listing size + 3 */
    SQFS_DIR_BLOCK_OFFSET = 0x1A, /* u16 offset of the listing in that block */
    SQFS_DIR_PARENT = 0x1C,       /* u32 parent_inode */
    SQFS_DIR_SIZE = 0x20
};
_Static_assert((int)SQFS_DIR_BLOCK_START == (int)SQFS_INODE_HEADER_SIZE, "basic dir: fields follow the header");
_Static_assert(SQFS_DIR_PARENT + 4 == SQFS_DIR_SIZE, "basic dir: 32 bytes");

/* Extended directory (type 8), followed by index_count directory index entries. */
enum {
    SQFS_XDIR_LINK_COUNT = 0x10,   /* u32 */
    SQFS_XDIR_FILE_SIZE = 0x14,    /* u32 */
    SQFS_XDIR_BLOCK_START = 0x18,  /* u32 */
    SQFS_XDIR_PARENT = 0x1C,       /* u32 */
    SQFS_XDIR_INDEX_COUNT = 0x20,  /* u16 */
    SQFS_XDIR_BLOCK_OFFSET = 0x22, /* u16 */
    SQFS_XDIR_XATTR_IDX = 0x24,    /* u32, 0xFFFFFFFF: none */
    SQFS_XDIR_SIZE = 0x28
};
_Static_assert((int)SQFS_XDIR_LINK_COUNT == (int)SQFS_INODE_HEADER_SIZE, "extended dir: fields follow the header");
_Static_assert(SQFS_XDIR_XATTR_IDX + 4 == SQFS_XDIR_SIZE, "extended dir: 40 bytes");

/* Basic file (type 2), followed by one u32 size word per full block. */
enum {
    SQFS_FILE_BLOCKS_START = 0x10, /* u32 */
    SQFS_FILE_FRAG_INDEX = 0x14,   /* u32 fragment_block_index, 0xFFFFFFFF: none */
    SQFS_FILE_FRAG_OFFSET = 0x18,  /* u32 block_offset in the fragment */
    SQFS_FILE_FILE_SIZE = 0x1C,    /* u32 */
    SQFS_FILE_SIZE = 0x20
};
_Static_assert((int)SQFS_FILE_BLOCKS_START == (int)SQFS_INODE_HEADER_SIZE, "basic file: fields follow the header");
_Static_assert(SQFS_FILE_FILE_SIZE + 4 == SQFS_FILE_SIZE, "basic file: 32 bytes before its block sizes");

/* Extended file (type 9), followed by the block size words. */
enum {
    SQFS_XFILE_BLOCKS_START = 0x10, /* u64 */
    SQFS_XFILE_FILE_SIZE = 0x18,    /* u64 */
    SQFS_XFILE_SPARSE = 0x20,       /* u64 bytes saved by holes */
    SQFS_XFILE_LINK_COUNT = 0x28,   /* u32 */
    SQFS_XFILE_FRAG_INDEX = 0x2C,   /* u32 */
    SQFS_XFILE_FRAG_OFFSET = 0x30,  /* u32 */
    SQFS_XFILE_XATTR_IDX = 0x34,    /* u32 */
    SQFS_XFILE_SIZE = 0x38
};
_Static_assert((int)SQFS_XFILE_BLOCKS_START == (int)SQFS_INODE_HEADER_SIZE, "extended file: fields follow the header");
_Static_assert(SQFS_XFILE_LINK_COUNT == SQFS_XFILE_BLOCKS_START + 3 * 8, "extended file: three u64 fields");
_Static_assert(SQFS_XFILE_XATTR_IDX + 4 == SQFS_XFILE_SIZE, "extended file: 56 bytes before its block sizes");

/* Symlink (type 3; extended type 10 adds a u32 xattr index after the target). */
enum {
    SQFS_SYMLINK_LINK_COUNT = 0x10,  /* u32 */
    SQFS_SYMLINK_TARGET_SIZE = 0x14, /* u32 */
    SQFS_SYMLINK_TARGET = 0x18,      /* target_size bytes, no NUL */
};
_Static_assert((int)SQFS_SYMLINK_LINK_COUNT == (int)SQFS_INODE_HEADER_SIZE, "symlink: fields follow the header");
_Static_assert(SQFS_SYMLINK_TARGET_SIZE + 4 == SQFS_SYMLINK_TARGET, "symlink: target after its size");

/* Block and character devices (types 4, 5; extended 11, 12). */
enum {
    SQFS_DEV_LINK_COUNT = 0x10, /* u32 */
    SQFS_DEV_DEVICE = 0x14,     /* u32 major/minor in the kernel's new_encode_dev */
    SQFS_DEV_SIZE = 0x18,
    SQFS_XDEV_XATTR_IDX = 0x18, /* u32, extended only */
    SQFS_XDEV_SIZE = 0x1C
};
_Static_assert(SQFS_DEV_DEVICE + 4 == SQFS_DEV_SIZE && SQFS_XDEV_XATTR_IDX + 4 == SQFS_XDEV_SIZE, "devices");

/* FIFOs and sockets (types 6, 7; extended 13, 14). */
enum {
    SQFS_IPC_LINK_COUNT = 0x10, /* u32 */
    SQFS_IPC_SIZE = 0x14,
    SQFS_XIPC_XATTR_IDX = 0x14, /* u32, extended only */
    SQFS_XIPC_SIZE = 0x18
};
_Static_assert(SQFS_IPC_LINK_COUNT + 4 == SQFS_IPC_SIZE && SQFS_XIPC_XATTR_IDX + 4 == SQFS_XIPC_SIZE, "ipc");

/* Directory table: a header, then count + 1 entries. */
enum {
    SQFS_DIRHDR_COUNT = 0x00,        /* u32 entries - 1 */
    SQFS_DIRHDR_START = 0x04,        /* u32 inode table block of the entries' inodes */
    SQFS_DIRHDR_INODE_NUMBER = 0x08, /* u32 base inode number */
    SQFS_DIRHDR_SIZE = 0x0C
};
_Static_assert(SQFS_DIRHDR_INODE_NUMBER + 4 == SQFS_DIRHDR_SIZE, "directory header: 12 bytes");
enum {
    SQFS_DIRENT_OFFSET = 0x00,       /* u16 offset of the inode in its block */
    SQFS_DIRENT_INODE_OFFSET = 0x02, /* s16 inode number - base */
    SQFS_DIRENT_TYPE = 0x04,         /* u16 basic inode type */
    SQFS_DIRENT_NAME_SIZE = 0x06,    /* u16 name length - 1 */
    SQFS_DIRENT_NAME = 0x08,         /* the name, no NUL */
    SQFS_DIRENT_SIZE = 0x08
};
_Static_assert(SQFS_DIRENT_NAME_SIZE + 2 == SQFS_DIRENT_SIZE, "directory entry: 8 bytes before the name");

/* Directory index entry (after an extended directory inode). */
enum {
    SQFS_DIRIDX_INDEX = 0x00,     /* u32 byte offset into the listing */
    SQFS_DIRIDX_START = 0x04,     /* u32 directory table block */
    SQFS_DIRIDX_NAME_SIZE = 0x08, /* u32 name length - 1 */
    SQFS_DIRIDX_NAME = 0x0C,
    SQFS_DIRIDX_SIZE = 0x0C
};
_Static_assert(SQFS_DIRIDX_NAME_SIZE + 4 == SQFS_DIRIDX_SIZE, "directory index: 12 bytes before the name");

/* Fragment table entry (packed by pyimg/formats/squashfs.py; named here for the
 * test and the reader of this header). */
enum {
    SQFS_FRAG_START = 0x00,  /* u64 image offset of the fragment block */
    SQFS_FRAG_SIZE = 0x08,   /* u32 size word: bit 24 set = stored uncompressed */
    SQFS_FRAG_UNUSED = 0x0C, /* u32, 0 */
    SQFS_FRAG_ENTRY_SIZE = 0x10
};
_Static_assert(SQFS_FRAG_UNUSED + 4 == SQFS_FRAG_ENTRY_SIZE, "fragment entry: 16 bytes");

/* Xattr table: key (type, name_size, name), value (value_size, value), and the
 * id table entries that point at a set of pairs. */
enum {
    SQFS_XKEY_TYPE = 0x00,      /* u16 prefix: 0 user., 1 trusted., 2 security. */
    SQFS_XKEY_NAME_SIZE = 0x02, /* u16 */
    SQFS_XKEY_NAME = 0x04,
    SQFS_XVALUE_SIZE = 0x00,    /* u32 */
    SQFS_XVALUE_VALUE = 0x04,
    SQFS_XID_REF = 0x00,        /* u64 reference of the first key in the kv stream */
    SQFS_XID_COUNT = 0x08,      /* u32 pairs */
    SQFS_XID_SIZE = 0x0C,       /* u32 bytes of the pairs' names and values */
    SQFS_XID_ENTRY_SIZE = 0x10
};
_Static_assert(SQFS_XKEY_NAME_SIZE + 2 == SQFS_XKEY_NAME, "xattr key header: 4 bytes");
_Static_assert(SQFS_XID_SIZE + 4 == SQFS_XID_ENTRY_SIZE, "xattr id entry: 16 bytes");

/* Metadata blocks: a u16 header, then up to 8 KiB. */
#define SQFS_META_UNCOMPRESSED 0x8000u /* header bit: the payload is stored raw */

#endif
