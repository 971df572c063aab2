/* ext4 on-disk structures: byte offsets of every field pyimg writes (and of the
 * neighbours that place them), named after the fields of e2fsprogs'
 * lib/ext2fs/ext2_fs.h, ext3_extents.h and kernel/jbd2.h, with the same hex
 * offsets in the comments.  Integers are little-endian, except jbd2's, which
 * are big-endian.
 *
 * Offsets, not C structs: the encoders write field by field with put_le16/32/64
 * at these names, never a raw struct.  Each enum is one structure; the
 * _Static_asserts check that runs of fields are contiguous and that the last
 * field ends at the structure's size, so a mistyped offset fails the build.
 * tests/unit/test_format_decode.py decodes images with Python's struct,
 * independently of this header. */
#ifndef PYIMG_EXT4_FORMAT_H
#define PYIMG_EXT4_FORMAT_H

#define E4_SUPER_MAGIC 0xEF53u
#define E4_EXT_MAGIC 0xF30Au
#define E4_XATTR_MAGIC 0xEA020000u
#define JBD2_MAGIC 0xC03B3998u

/* The superblock: 1024 bytes at byte 1024 of the image (and at the start of
 * each backup group). */
enum {
    E4_SB_INODES_COUNT = 0x00,       /* u32 s_inodes_count */
    E4_SB_BLOCKS_COUNT_LO = 0x04,    /* u32 */
    E4_SB_R_BLOCKS_COUNT_LO = 0x08,  /* u32 reserved for root */
    E4_SB_FREE_BLOCKS_LO = 0x0C,     /* u32 */
    E4_SB_FREE_INODES = 0x10,        /* u32 */
    E4_SB_FIRST_DATA_BLOCK = 0x14,   /* u32 */
    E4_SB_LOG_BLOCK_SIZE = 0x18,     /* u32 log2(block size) - 10 */
    E4_SB_LOG_CLUSTER_SIZE = 0x1C,   /* u32 */
    E4_SB_BLOCKS_PER_GROUP = 0x20,   /* u32 */
    E4_SB_CLUSTERS_PER_GROUP = 0x24, /* u32 */
    E4_SB_INODES_PER_GROUP = 0x28,   /* u32 */
    E4_SB_MTIME = 0x2C,              /* u32 last mount */
    E4_SB_WTIME = 0x30,              /* u32 last write */
    E4_SB_MNT_COUNT = 0x34,          /* u16 */
    E4_SB_MAX_MNT_COUNT = 0x36,      /* s16 */
    E4_SB_MAGIC = 0x38,              /* u16 0xEF53 */
    E4_SB_STATE = 0x3A,              /* u16 1: clean */
    E4_SB_ERRORS = 0x3C,             /* u16 1: continue */
    E4_SB_MINOR_REV_LEVEL = 0x3E,    /* u16 */
    E4_SB_LASTCHECK = 0x40,          /* u32 */
    E4_SB_CHECKINTERVAL = 0x44,      /* u32 */
    E4_SB_CREATOR_OS = 0x48,         /* u32 0: Linux */
    E4_SB_REV_LEVEL = 0x4C,          /* u32 1: dynamic */
    E4_SB_DEF_RESUID = 0x50,         /* u16 */
    E4_SB_DEF_RESGID = 0x52,         /* u16 */
    E4_SB_FIRST_INO = 0x54,          /* u32 */
    E4_SB_INODE_SIZE = 0x58,         /* u16 */
    E4_SB_BLOCK_GROUP_NR = 0x5A,     /* u16 the group holding this copy */
    E4_SB_FEATURE_COMPAT = 0x5C,     /* u32 */
    E4_SB_FEATURE_INCOMPAT = 0x60,   /* u32 */
    E4_SB_FEATURE_RO_COMPAT = 0x64,  /* u32 */
    E4_SB_UUID = 0x68,               /* u8[16] */
    E4_SB_VOLUME_NAME = 0x78,        /* char[16] */
    E4_SB_LAST_MOUNTED = 0x88,       /* char[64] */
    E4_SB_ALGORITHM_USAGE = 0xC8,    /* u32 */
    E4_SB_PREALLOC_BLOCKS = 0xCC,    /* u8 */
    E4_SB_PREALLOC_DIR_BLOCKS = 0xCD,/* u8 */
    E4_SB_RESERVED_GDT_BLOCKS = 0xCE,/* u16 */
    E4_SB_JOURNAL_UUID = 0xD0,       /* u8[16] */
    E4_SB_JOURNAL_INUM = 0xE0,       /* u32 */
    E4_SB_JOURNAL_DEV = 0xE4,        /* u32 */
    E4_SB_LAST_ORPHAN = 0xE8,        /* u32 */
    E4_SB_HASH_SEED = 0xEC,          /* u32[4] */
    E4_SB_DEF_HASH_VERSION = 0xFC,   /* u8 1: half_md4 */
    E4_SB_JNL_BACKUP_TYPE = 0xFD,    /* u8 1: s_jnl_blocks holds a copy */
    E4_SB_DESC_SIZE = 0xFE,          /* u16 group descriptor size (64bit) */
    E4_SB_DEFAULT_MOUNT_OPTS = 0x100,/* u32 */
    E4_SB_FIRST_META_BG = 0x104,     /* u32 */
    E4_SB_MKFS_TIME = 0x108,         /* u32 */
    E4_SB_JNL_BLOCKS = 0x10C,        /* u32[17]: journal i_block[15], i_size_high, i_size */
    E4_SB_BLOCKS_COUNT_HI = 0x150,   /* u32 */
    E4_SB_R_BLOCKS_COUNT_HI = 0x154, /* u32 */
    E4_SB_FREE_BLOCKS_HI = 0x158,    /* u32 */
    E4_SB_MIN_EXTRA_ISIZE = 0x15C,   /* u16 */
    E4_SB_WANT_EXTRA_ISIZE = 0x15E,  /* u16 */
    E4_SB_FLAGS = 0x160,             /* u32 */
    E4_SB_RAID_STRIDE = 0x164,       /* u16 */
    E4_SB_MMP_INTERVAL = 0x166,      /* u16 */
    E4_SB_MMP_BLOCK = 0x168,         /* u64 */
    E4_SB_RAID_STRIPE_WIDTH = 0x170, /* u32 */
    E4_SB_LOG_GROUPS_PER_FLEX = 0x174, /* u8 */
    E4_SB_CHECKSUM_TYPE = 0x175,     /* u8 1: crc32c */
    E4_SB_CHECKSUM_SEED = 0x270,     /* u32 crc32c(~0, the original UUID), with metadata_csum_seed */
    E4_SB_WTIME_HI = 0x274,          /* u8: bits 32..39 of s_wtime */
    E4_SB_MTIME_HI = 0x275,          /* u8 */
    E4_SB_MKFS_TIME_HI = 0x276,      /* u8 */
    E4_SB_LASTCHECK_HI = 0x277,      /* u8 */
    E4_SB_CHECKSUM = 0x3FC,          /* u32 crc32c of bytes 0 .. 0x3FB */
    E4_SB_SIZE = 0x400
};
_Static_assert(E4_SB_INODES_PER_GROUP + 4 == E4_SB_MTIME && E4_SB_WTIME + 4 == E4_SB_MNT_COUNT, "sb: times");
_Static_assert(E4_SB_MINOR_REV_LEVEL + 2 == E4_SB_LASTCHECK, "sb: the u16 run ends at s_lastcheck");
_Static_assert(E4_SB_UUID + 16 == E4_SB_VOLUME_NAME && E4_SB_VOLUME_NAME + 16 == E4_SB_LAST_MOUNTED, "sb: names");
_Static_assert(E4_SB_LAST_MOUNTED + 64 == E4_SB_ALGORITHM_USAGE, "sb: s_last_mounted is 64 bytes");
_Static_assert(E4_SB_JOURNAL_UUID + 16 == E4_SB_JOURNAL_INUM, "sb: journal uuid");
_Static_assert(E4_SB_HASH_SEED + 16 == E4_SB_DEF_HASH_VERSION, "sb: the hash seed is 4 words");
_Static_assert(E4_SB_JNL_BLOCKS + 17 * 4 == E4_SB_BLOCKS_COUNT_HI, "sb: s_jnl_blocks is 17 words");
_Static_assert(E4_SB_MMP_BLOCK + 8 == E4_SB_RAID_STRIPE_WIDTH, "sb: s_mmp_block is 64-bit");
_Static_assert(E4_SB_WTIME_HI + 3 == E4_SB_LASTCHECK_HI, "sb: the four time _hi bytes");
_Static_assert(E4_SB_CHECKSUM + 4 == E4_SB_SIZE, "sb: the checksum is the last word of 1024 bytes");

/* A group descriptor: 32 bytes, or 64 with the 64bit feature (s_desc_size). */
enum {
    E4_GD_BLOCK_BITMAP_LO = 0x00,      /* u32 */
    E4_GD_INODE_BITMAP_LO = 0x04,      /* u32 */
    E4_GD_INODE_TABLE_LO = 0x08,       /* u32 */
    E4_GD_FREE_BLOCKS_LO = 0x0C,       /* u16 */
    E4_GD_FREE_INODES_LO = 0x0E,       /* u16 */
    E4_GD_USED_DIRS_LO = 0x10,         /* u16 */
    E4_GD_FLAGS = 0x12,                /* u16 EXT4_BG_* */
    E4_GD_EXCLUDE_BITMAP_LO = 0x14,    /* u32 */
    E4_GD_BLOCK_BITMAP_CSUM_LO = 0x18, /* u16 */
    E4_GD_INODE_BITMAP_CSUM_LO = 0x1A, /* u16 */
    E4_GD_ITABLE_UNUSED_LO = 0x1C,     /* u16 */
    E4_GD_CHECKSUM = 0x1E,             /* u16 crc32c(seed, group, descriptor) & 0xFFFF */
    E4_GD_SIZE_32 = 0x20,
    E4_GD_BLOCK_BITMAP_HI = 0x20,      /* u32 */
    E4_GD_INODE_BITMAP_HI = 0x24,      /* u32 */
    E4_GD_INODE_TABLE_HI = 0x28,       /* u32 */
    E4_GD_FREE_BLOCKS_HI = 0x2C,       /* u16 */
    E4_GD_FREE_INODES_HI = 0x2E,       /* u16 */
    E4_GD_USED_DIRS_HI = 0x30,         /* u16 */
    E4_GD_ITABLE_UNUSED_HI = 0x32,     /* u16 */
    E4_GD_EXCLUDE_BITMAP_HI = 0x34,    /* u32 */
    E4_GD_BLOCK_BITMAP_CSUM_HI = 0x38, /* u16 */
    E4_GD_INODE_BITMAP_CSUM_HI = 0x3A, /* u16 */
    E4_GD_RESERVED = 0x3C,             /* u32 */
    E4_GD_SIZE_64 = 0x40
};
_Static_assert(E4_GD_CHECKSUM + 2 == E4_GD_SIZE_32, "gd: 32 bytes end with the checksum");
_Static_assert(E4_GD_FREE_BLOCKS_HI - E4_GD_BLOCK_BITMAP_HI == E4_GD_FREE_BLOCKS_LO - E4_GD_BLOCK_BITMAP_LO,
               "gd: the high halves repeat the low halves' layout");
_Static_assert(E4_GD_RESERVED + 4 == E4_GD_SIZE_64, "gd: 64 bytes");

/* An inode: the 128-byte base, then i_extra_isize bytes of extra fields (32 in
 * pyimg), then in-inode xattrs up to s_inode_size (256). */
enum {
    E4_I_MODE = 0x00,            /* u16 */
    E4_I_UID = 0x02,             /* u16 low half */
    E4_I_SIZE_LO = 0x04,         /* u32 */
    E4_I_ATIME = 0x08,           /* u32 */
    E4_I_CTIME = 0x0C,           /* u32 */
    E4_I_MTIME = 0x10,           /* u32 */
    E4_I_DTIME = 0x14,           /* u32 */
    E4_I_GID = 0x18,             /* u16 low half */
    E4_I_LINKS_COUNT = 0x1A,     /* u16 */
    E4_I_BLOCKS_LO = 0x1C,       /* u32 in 512-byte sectors */
    E4_I_FLAGS = 0x20,           /* u32 EXT4_*_FL */
    E4_I_VERSION = 0x24,         /* u32 osd1 */
    E4_I_BLOCK = 0x28,           /* u8[60]: extent tree root, fast symlink, device numbers */
    E4_I_GENERATION = 0x64,      /* u32 */
    E4_I_FILE_ACL_LO = 0x68,     /* u32 xattr block */
    E4_I_SIZE_HIGH = 0x6C,       /* u32 */
    E4_I_OBSO_FADDR = 0x70,      /* u32 */
    E4_I_BLOCKS_HIGH = 0x74,     /* u16 osd2.linux2.l_i_blocks_high */
    E4_I_FILE_ACL_HIGH = 0x76,   /* u16 */
    E4_I_UID_HIGH = 0x78,        /* u16 */
    E4_I_GID_HIGH = 0x7A,        /* u16 */
    E4_I_CHECKSUM_LO = 0x7C,     /* u16 */
    E4_I_RESERVED = 0x7E,        /* u16 */
    E4_I_GOOD_OLD_SIZE = 0x80,   /* the base inode ends here */
    E4_I_EXTRA_ISIZE = 0x80,     /* u16 */
    E4_I_CHECKSUM_HI = 0x82,     /* u16 */
    E4_I_CTIME_EXTRA = 0x84,     /* u32 nanoseconds << 2 | epoch bits */
    E4_I_MTIME_EXTRA = 0x88,     /* u32 */
    E4_I_ATIME_EXTRA = 0x8C,     /* u32 */
    E4_I_CRTIME = 0x90,          /* u32 */
    E4_I_CRTIME_EXTRA = 0x94,    /* u32 */
    E4_I_VERSION_HI = 0x98,      /* u32 */
    E4_I_PROJID = 0x9C,          /* u32 */
    E4_I_EXTRA_END = 0xA0        /* the extra fields pyimg writes end here */
};
_Static_assert(E4_I_BLOCK + 60 == E4_I_GENERATION, "inode: i_block is 15 words");
_Static_assert(E4_I_RESERVED + 2 == E4_I_GOOD_OLD_SIZE, "inode: the base is 128 bytes");
_Static_assert(E4_I_PROJID + 4 == E4_I_EXTRA_END, "inode: the extra fields end after i_projid");

/* A directory entry (ext4_dir_entry_2), and the checksum tail that ends each
 * leaf block with metadata_csum (a fake entry of 12 bytes). */
enum {
    E4_DE_INODE = 0x00,     /* u32 */
    E4_DE_REC_LEN = 0x04,   /* u16 */
    E4_DE_NAME_LEN = 0x06,  /* u8 */
    E4_DE_FILE_TYPE = 0x07, /* u8 */
    E4_DE_NAME = 0x08,      /* name_len bytes, padded to 4 */
    E4_DE_HEADER_SIZE = 0x08
};
_Static_assert(E4_DE_FILE_TYPE + 1 == E4_DE_HEADER_SIZE, "dirent: 8 bytes before the name");
enum {
    E4_DT_RESERVED_ZERO1 = 0x00, /* u32, 0: an unused entry */
    E4_DT_REC_LEN = 0x04,        /* u16 12 */
    E4_DT_RESERVED_ZERO2 = 0x06, /* u8 name_len 0 */
    E4_DT_RESERVED_FT = 0x07,    /* u8 0xDE */
    E4_DT_CHECKSUM = 0x08,       /* u32 crc32c of the block before the tail */
    E4_DT_SIZE = 0x0C
};
_Static_assert(E4_DT_CHECKSUM + 4 == E4_DT_SIZE, "dirent tail: 12 bytes");
#define E4_DT_RESERVED_FT_VALUE 0xDEu

/* Hashed directories: the root block (fake "." and ".." entries, dx_root_info,
 * then a count/limit header and the index entries), the interior nodes (one
 * fake entry spanning the block, then the same count/limit), the entries, and
 * the checksum tail after the last possible entry. */
enum {
    E4_DX_ROOT_DOT = 0x00,            /* dirent "." with rec_len 12 */
    E4_DX_ROOT_DOTDOT = 0x0C,         /* dirent ".." with rec_len block - 12 */
    E4_DX_ROOT_INFO = 0x18,           /* dx_root_info: */
    E4_DX_ROOT_RESERVED_ZERO = 0x18,  /*   u32 */
    E4_DX_ROOT_HASH_VERSION = 0x1C,   /*   u8 */
    E4_DX_ROOT_INFO_LENGTH = 0x1D,    /*   u8 8 */
    E4_DX_ROOT_INDIRECT_LEVELS = 0x1E,/*   u8 */
    E4_DX_ROOT_UNUSED_FLAGS = 0x1F,   /*   u8 */
    E4_DX_ROOT_ENTRIES = 0x20,        /* dx_countlimit, then the entries */
    E4_DX_NODE_FAKE = 0x00,           /* dirent with inode 0 and rec_len = block size */
    E4_DX_NODE_ENTRIES = 0x08
};
_Static_assert(E4_DX_ROOT_DOTDOT == E4_DX_ROOT_DOT + 12 && E4_DX_ROOT_INFO == E4_DX_ROOT_DOTDOT + 12,
               "dx root: two 12-byte fake entries");
_Static_assert(E4_DX_ROOT_UNUSED_FLAGS + 1 == E4_DX_ROOT_ENTRIES, "dx root: dx_root_info is 8 bytes");
_Static_assert(E4_DX_NODE_ENTRIES == E4_DX_NODE_FAKE + E4_DE_HEADER_SIZE, "dx node: one empty fake entry");
enum {
    E4_DX_LIMIT = 0x00, /* u16 dx_countlimit.limit (in the place of entry 0's hash) */
    E4_DX_COUNT = 0x02, /* u16 dx_countlimit.count */
    E4_DX_HASH = 0x00,  /* u32 dx_entry.hash (entries 1..) */
    E4_DX_BLOCK = 0x04, /* u32 dx_entry.block (logical block in the directory) */
    E4_DX_ENTRY_SIZE = 0x08
};
_Static_assert(E4_DX_COUNT + 2 == E4_DX_BLOCK && E4_DX_BLOCK + 4 == E4_DX_ENTRY_SIZE, "dx entry: 8 bytes");
enum {
    E4_DX_TAIL_RESERVED = 0x00, /* u32 dt_reserved */
    E4_DX_TAIL_CHECKSUM = 0x04, /* u32 dt_checksum */
    E4_DX_TAIL_SIZE = 0x08
};
_Static_assert(E4_DX_TAIL_CHECKSUM + 4 == E4_DX_TAIL_SIZE, "dx tail: 8 bytes");

/* Extent trees: a header, then entries: extents (leaves) or indexes; a tree
 * block ends with a checksum tail after its last possible entry. */
enum {
    E4_EH_MAGIC = 0x00,      /* u16 0xF30A */
    E4_EH_ENTRIES = 0x02,    /* u16 */
    E4_EH_MAX = 0x04,        /* u16 */
    E4_EH_DEPTH = 0x06,      /* u16 0: leaves */
    E4_EH_GENERATION = 0x08, /* u32 */
    E4_EH_SIZE = 0x0C
};
_Static_assert(E4_EH_GENERATION + 4 == E4_EH_SIZE, "extent header: 12 bytes");
enum {
    E4_EE_BLOCK = 0x00,    /* u32 first logical block */
    E4_EE_LEN = 0x04,      /* u16 blocks (at most 32768 initialized) */
    E4_EE_START_HI = 0x06, /* u16 */
    E4_EE_START_LO = 0x08, /* u32 */
    E4_EE_SIZE = 0x0C
};
_Static_assert(E4_EE_START_LO + 4 == E4_EE_SIZE, "extent: 12 bytes");
enum {
    E4_EI_BLOCK = 0x00,   /* u32 first logical block covered */
    E4_EI_LEAF_LO = 0x04, /* u32 the child block */
    E4_EI_LEAF_HI = 0x08, /* u16 */
    E4_EI_UNUSED = 0x0A,  /* u16 */
    E4_EI_SIZE = 0x0C
};
_Static_assert(E4_EI_UNUSED + 2 == E4_EI_SIZE && (int)E4_EI_SIZE == (int)E4_EE_SIZE, "extent index: 12 bytes");
#define E4_ET_CHECKSUM_SIZE 4 /* ext4_extent_tail: u32 et_checksum */
_Static_assert((int)E4_EH_SIZE == (int)E4_EE_SIZE, "the header takes one entry's room: 4 fit in i_block");

/* Extended attributes: the block header, the entries (in a block after the
 * header, in the inode after a u32 magic), values placed from the end. */
enum {
    E4_XH_MAGIC = 0x00,    /* u32 0xEA020000 */
    E4_XH_REFCOUNT = 0x04, /* u32 */
    E4_XH_BLOCKS = 0x08,   /* u32 1 */
    E4_XH_HASH = 0x0C,     /* u32 */
    E4_XH_CHECKSUM = 0x10, /* u32 */
    E4_XH_RESERVED = 0x14, /* u32[3] */
    E4_XH_SIZE = 0x20
};
_Static_assert(E4_XH_RESERVED + 3 * 4 == E4_XH_SIZE, "xattr block header: 32 bytes");
enum {
    E4_XE_NAME_LEN = 0x00,    /* u8 */
    E4_XE_NAME_INDEX = 0x01,  /* u8 prefix: 1 user., 4 trusted., 6 security. */
    E4_XE_VALUE_OFFS = 0x02,  /* u16 from the first entry (inode) or the block start */
    E4_XE_VALUE_INUM = 0x04,  /* u32 */
    E4_XE_VALUE_SIZE = 0x08,  /* u32 */
    E4_XE_HASH = 0x0C,        /* u32 */
    E4_XE_NAME = 0x10,        /* name_len bytes, entry padded to 4 */
    E4_XE_HEADER_SIZE = 0x10
};
_Static_assert(E4_XE_HASH + 4 == E4_XE_HEADER_SIZE, "xattr entry: 16 bytes before the name");
#define E4_XATTR_IBODY_HEADER_SIZE 4 /* ext2_ext_attr_ibody_header: u32 h_magic */

/* The jbd2 journal superblock (big-endian), in the journal's first block. */
enum {
    JBD2_H_MAGIC = 0x00,            /* be32 */
    JBD2_H_BLOCKTYPE = 0x04,        /* be32 4: superblock v2 */
    JBD2_H_SEQUENCE = 0x08,         /* be32 */
    JBD2_SB_BLOCKSIZE = 0x0C,       /* be32 */
    JBD2_SB_MAXLEN = 0x10,          /* be32 blocks in the journal */
    JBD2_SB_FIRST = 0x14,           /* be32 first log block */
    JBD2_SB_SEQUENCE = 0x18,        /* be32 first commit id expected */
    JBD2_SB_START = 0x1C,           /* be32 0: the journal is empty */
    JBD2_SB_ERRNO = 0x20,           /* be32 */
    JBD2_SB_FEATURE_COMPAT = 0x24,  /* be32 */
    JBD2_SB_FEATURE_INCOMPAT = 0x28,/* be32 */
    JBD2_SB_FEATURE_RO_COMPAT = 0x2C,/* be32 */
    JBD2_SB_UUID = 0x30,            /* u8[16] */
    JBD2_SB_NR_USERS = 0x40,        /* be32 */
    JBD2_SB_DYNSUPER = 0x44,        /* be32 */
    JBD2_SB_MAX_TRANSACTION = 0x48, /* be32 */
    JBD2_SB_MAX_TRANS_DATA = 0x4C,  /* be32 */
    JBD2_SB_CHECKSUM_TYPE = 0x50,   /* u8 */
    JBD2_SB_USERS = 0x100,          /* u8[16 * 48] */
    JBD2_SB_SIZE = 0x400
};
_Static_assert(JBD2_SB_UUID + 16 == JBD2_SB_NR_USERS, "jbd2 sb: uuid");
_Static_assert(JBD2_SB_USERS + 16 * 48 == JBD2_SB_SIZE, "jbd2 sb: 1024 bytes end with s_users");

static inline void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

#endif
