"""Reading an ext4 superblock from an image, for `tcmu-obd info`/`demo`:
a handful of fields so a user can see the disk holds a file system.
Not a file system reader."""
import struct
import uuid

MAGIC = 0xEF53


def superblock(read):
    """Fields of the ext4 superblock at byte 1024, or None if there is none.
    `read(offset, length)` reads the virtual disk."""
    sb = read(1024, 1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != MAGIC:
        return None
    inodes, blocks_lo, _r, free_lo, free_inodes, _first, log_bs = struct.unpack_from("<IIIIIII", sb, 0)
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0]
    free_hi = struct.unpack_from("<I", sb, 0x158)[0]
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    if not incompat & 0x80:            # no 64bit feature: the high words are not used
        blocks_hi = free_hi = 0
    bs = 1024 << log_bs
    return {
        "magic": f"0x{MAGIC:04X}",
        "block_size": bs,
        "blocks": blocks_lo | blocks_hi << 32,
        "free_blocks": free_lo | free_hi << 32,
        "inodes": inodes,
        "free_inodes": free_inodes,
        "size_bytes": (blocks_lo | blocks_hi << 32) * bs,
        "uuid": str(uuid.UUID(bytes=sb[0x68:0x78])),
        "volume_name": sb[0x78:0x88].split(b"\0", 1)[0].decode("latin-1"),
    }
