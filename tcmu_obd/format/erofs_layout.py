"""erofs on-disk constants and the in-memory file tree shared by the erofs
meta-layer writer (format/erofs.py) and reader (format/erofs_read.py).

It holds the numbers of the erofs layout (superblock, inode formats, dirent
file types, xattr name indexes), the device-number encoding, and the Node
class: one inode of a merged tree (directory children by name, a symlink's
target, a regular file's data placement).  It does not read or write disks.
"""
import stat as _stat
import struct

from tcmu_obd.errors import UnsupportedError

MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
SB_SIZE = 128
BLKSZBITS = 12
BLOCK_SIZE = 1 << BLKSZBITS
NID_UNIT = 32                      # nid = byte offset from meta_blkaddr / 32
INODE_COMPACT = 32
INODE_EXTENDED = 64
XATTR_IBODY_HEADER = 12
XATTR_ENTRY = 4
DIRENT = 12
NAME_LEN = 255
MAX_ROOT_NID = 0xFFFF              # root_nid is a 16-bit field
MAX_BLKADDR = 0xFFFFFFFF           # block addresses are 32-bit

# i_format: bit 0 = extended inode, bits 1-3 = data layout
FORMAT_EXTENDED = 1
FORMAT_ALL = 0xF
FLAT_PLAIN = 0
FLAT_INLINE = 2

INCOMPAT_ZERO_PADDING = 0x1        # only matters to compressed files; harmless to readers

# superblock: magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
# build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name,
# feature_incompat (then fields we leave zero)
SB_STRUCT = struct.Struct("<IIIBBHQQIIII16s16sI")
# extended inode: i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u, i_ino,
# i_uid, i_gid, i_mtime, i_mtime_nsec, i_nlink, 16 reserved
EXT_STRUCT = struct.Struct("<HHHHQIIIIqII16x")
# compact inode: i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_reserved (mtime
# offset with COMPAT_MTIME), i_u, i_ino, i_uid, i_gid, i_reserved2
COMPACT_STRUCT = struct.Struct("<HHHHIIIIHHI")
DIRENT_STRUCT = struct.Struct("<QHBB")
XATTR_ENTRY_STRUCT = struct.Struct("<BBH")
COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2

# dirent file types (the generic FT_* numbers)
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = range(8)
FT_OF_FMT = {_stat.S_IFREG: FT_REG, _stat.S_IFDIR: FT_DIR, _stat.S_IFCHR: FT_CHR,
             _stat.S_IFBLK: FT_BLK, _stat.S_IFIFO: FT_FIFO, _stat.S_IFSOCK: FT_SOCK,
             _stat.S_IFLNK: FT_LNK}

# xattr name indexes: (index, prefix, whole_name) - whole_name: the prefix is the entire name
XATTR_PREFIXES = [
    (2, "system.posix_acl_access", True),
    (3, "system.posix_acl_default", True),
    (1, "user.", False),
    (4, "trusted.", False),
    (6, "security.", False),
]
XATTR_PREFIX_OF_INDEX = {i: p for i, p, _w in XATTR_PREFIXES}
MAX_XATTR_VALUE = 0xFFFF


def xattr_split(name, where):
    """xattr name -> (name index, suffix bytes); UnsupportedError for a name
    erofs cannot store without long-prefix tables."""
    for index, prefix, whole in XATTR_PREFIXES:
        if (name == prefix) if whole else (name.startswith(prefix) and len(name) > len(prefix)):
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            if len(suffix) > 255:
                raise UnsupportedError(f"{where}: xattr {name!r}: name longer than 255 bytes after its prefix")
            return index, suffix
    raise UnsupportedError(f"{where}: xattr {name!r}: erofs stores only user., trusted., security. "
                           "and system.posix_acl_* names")


def encode_dev(major, minor):
    """Linux new_encode_dev: 12-bit major and 20-bit minor in 32 bits."""
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(dev):
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def round_up(n, to):
    return (n + to - 1) // to * to


class Node:
    """One inode of the tree.  `mode` is the whole st_mode (type and
    permission bits).  Directories have `children` {name: Node}; symlinks
    `target` (bytes); devices `rdev` (major, minor); regular files either
    `blkaddr` (data already placed by a lower layer) or `data_offset` (its
    content offset in this layer's uncompressed tar, mapped at finish)."""

    __slots__ = ("mode", "uid", "gid", "mtime", "mtime_nsec", "xattrs", "size", "target",
                 "rdev", "blkaddr", "data_offset", "children", "nid")

    def __init__(self, mode, uid=0, gid=0, mtime=0, mtime_nsec=0):
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.xattrs = {}
        self.size = 0
        self.target = b""
        self.rdev = (0, 0)
        self.blkaddr = None
        self.data_offset = None
        self.children = {} if _stat.S_ISDIR(mode) else None
        self.nid = None

    @property
    def is_dir(self):
        return _stat.S_ISDIR(self.mode)

    @property
    def fmt(self):
        return _stat.S_IFMT(self.mode)
