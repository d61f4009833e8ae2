"""Lays out a complete erofs metadata set for a file tree (erofs_layout.Node)
and returns it as block writes plus data mappings; used by ErofsBuilder
(format/erofs.py), which owns the tar semantics.  It neither reads tars nor
lower images, and never writes file content: a regular file's blocks are only
reserved, and the caller fills them from the tar through the mappings.

Layout (block size 4096): block 0 holds the superblock at byte 1024 and is
always (re)written.  The metadata area starts at `start_block` (1 for a
first layer, the first block after everything the lower image uses for an
incremental one) and holds every inode of the tree as a 64-byte extended
inode, in depth-first name order with the root first (root nid 0), each
followed by its inline xattrs (ibody header + entries, no shared xattrs) and,
for directories and symlinks, its inline tail (FLAT_INLINE) when inode,
xattrs and tail fit in one block; an inode record never crosses a block
boundary unless it alone is larger than a block.  Then the whole blocks of
directories and symlinks that are not inline (FLAT_PLAIN, or the head
blocks of a FLAT_INLINE directory), then the data blocks of the regular
files that have none yet (FLAT_PLAIN, never tail-inlined: the tail comes
from the tar too).  Empty files have raw_blkaddr 0; device inodes hold
their rdev there (12-bit major, 20-bit minor).  Inodes are always extended
(64 bytes), so uid/gid, size and mtime in nanoseconds never need a fallback.
Directories: 12-byte dirents then names, sorted bytewise across blocks,
"." and ".." included, no entry split across a block.
"""
import stat as _stat

from tcmu_obd.errors import UnsupportedError, UsageError
from tcmu_obd.format.erofs_layout import (
    BLKSZBITS, DIRENT, DIRENT_STRUCT, EXT_STRUCT, FLAT_INLINE, FLAT_PLAIN, FORMAT_EXTENDED,
    FT_DIR, FT_OF_FMT, INODE_EXTENDED, MAGIC, MAX_BLKADDR, MAX_ROOT_NID, MAX_XATTR_VALUE, NID_UNIT,
    SB_OFFSET, SB_STRUCT, XATTR_ENTRY, XATTR_ENTRY_STRUCT, XATTR_IBODY_HEADER, encode_dev,
    round_up, xattr_split)


def _xattr_body(node, where):
    """The inline xattr area of `node` (b"" when it has none)."""
    if not node.xattrs:
        return b""
    items = []
    for name, value in node.xattrs.items():
        index, suffix = xattr_split(name, where)
        if len(value) > MAX_XATTR_VALUE:
            raise UnsupportedError(f"{where}: xattr {name!r}: value of {len(value)} bytes "
                                   f"(erofs allows {MAX_XATTR_VALUE})")
        items.append((index, suffix, bytes(value)))
    items.sort()
    out = bytearray(XATTR_IBODY_HEADER)
    for index, suffix, value in items:
        out += XATTR_ENTRY_STRUCT.pack(len(suffix), index, len(value)) + suffix + value
        out += bytes(-len(out) % XATTR_ENTRY)
    if (len(out) - XATTR_IBODY_HEADER) // 4 + 1 > 0xFFFF:
        raise UnsupportedError(f"{where}: xattrs take {len(out)} bytes, more than an inode can hold")
    return bytes(out)


def _dir_blocks(node, bs):
    """Sorted (name bytes, child) lists, one per directory block."""
    names = sorted([(b".", None), (b"..", None)] +
                   [(n.encode("utf-8", "surrogateescape"), c) for n, c in node.children.items()],
                   key=lambda t: t[0])
    blocks, cur, used = [], [], 0
    for name, child in names:
        need = DIRENT + len(name)
        if cur and used + need > bs:
            blocks.append(cur)
            cur, used = [], 0
        cur.append((name, child))
        used += need
    blocks.append(cur)
    return blocks


def _dir_size(blocks, bs):
    last = sum(DIRENT + len(n) for n, _c in blocks[-1])
    return (len(blocks) - 1) * bs + last


class _Rec:
    __slots__ = ("node", "parent", "path", "xattrs", "layout", "tail", "nblocks", "head_blk",
                 "dirblocks", "nlink", "offset", "ino")


def layout(root, bs, start_block, build_time=0, name="<erofs>"):
    """Lay the tree out from `start_block`.  Returns (writes, mappings,
    end_block): writes = [(disk byte offset, bytes)], mappings =
    [(disk byte offset, length rounded up to 512, tar offset)]."""
    if bs != 1 << BLKSZBITS:
        raise UsageError(f"erofs block size {bs}: only {1 << BLKSZBITS} is supported")
    recs, order = {}, []
    stack = [(root, root, "")]
    while stack:                            # depth-first, names in order, the root first
        node, parent, path = stack.pop()
        rec = recs.get(id(node))
        if rec is not None:
            rec.nlink += 1                  # a hard link
            continue
        rec = _Rec()
        rec.node, rec.parent, rec.path, rec.nlink = node, parent, path, 1
        recs[id(node)] = rec
        order.append(rec)
        if node.is_dir:
            rec.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
            for cname in sorted(node.children, reverse=True):
                stack.append((node.children[cname], node, f"{path}/{cname}" if path else cname))

    # sizes, layouts and record lengths
    for rec in order:
        node = rec.node
        rec.xattrs = _xattr_body(node, f"{name}: {rec.path or '/'}")
        rec.tail, rec.nblocks, rec.dirblocks, rec.layout = 0, 0, None, FLAT_PLAIN
        if node.is_dir:
            rec.dirblocks = _dir_blocks(node, bs)
            node.size = _dir_size(rec.dirblocks, bs)
        elif node.fmt == _stat.S_IFLNK:
            node.size = len(node.target)
        elif node.fmt == _stat.S_IFREG:
            rec.nblocks = (node.size + bs - 1) // bs
            continue
        else:
            continue
        tail = node.size % bs
        if tail and INODE_EXTENDED + len(rec.xattrs) + tail <= bs:
            rec.layout, rec.tail, rec.nblocks = FLAT_INLINE, tail, node.size // bs
        else:
            rec.nblocks = (node.size + bs - 1) // bs

    # inode records in the metadata area
    meta_start = start_block * bs
    pos = meta_start
    for i, rec in enumerate(order):
        length = round_up(INODE_EXTENDED + len(rec.xattrs) + rec.tail, NID_UNIT)
        if length <= bs and pos % bs + length > bs:
            pos = round_up(pos, bs)
        rec.offset, rec.ino = pos, i + 1
        rec.node.nid = (pos - meta_start) // NID_UNIT
        pos += length
    if root.nid > MAX_ROOT_NID:
        raise UnsupportedError(f"erofs root nid {root.nid} does not fit 16 bits")
    next_blk = round_up(pos, bs) // bs

    # whole blocks of directories and symlinks (metadata), then new file data (mapped)
    head = {}
    for rec in order:
        if rec.node.fmt in (_stat.S_IFDIR, _stat.S_IFLNK) and rec.nblocks:
            head[id(rec)] = next_blk
            next_blk += rec.nblocks
    meta_end_blk = next_blk
    mappings = []
    for rec in order:
        node = rec.node
        if node.fmt == _stat.S_IFREG and node.blkaddr is None and rec.nblocks:
            node.blkaddr = next_blk
            mappings.append((next_blk * bs, round_up(node.size, 512), node.data_offset))
            next_blk += rec.nblocks
    if next_blk > MAX_BLKADDR:
        raise UnsupportedError(f"erofs image needs {next_blk} blocks, more than 32-bit block addresses reach")

    area = bytearray((meta_end_blk - start_block) * bs)

    def put(disk_off, data):
        area[disk_off - meta_start:disk_off - meta_start + len(data)] = data

    for rec in order:
        node = rec.node
        if node.is_dir:
            data = _dir_bytes(rec, recs, bs)
        elif node.fmt == _stat.S_IFLNK:
            data = node.target
        else:
            data = b""
        if node.fmt in (_stat.S_IFDIR, _stat.S_IFLNK):
            blkaddr = head.get(id(rec), 0)
            full = rec.nblocks * bs if rec.layout == FLAT_PLAIN else len(data) - rec.tail
            if rec.nblocks:
                put(blkaddr * bs, data[:full])
            tail = data[full:] if rec.layout == FLAT_INLINE else b""
            iu = blkaddr
        elif node.fmt == _stat.S_IFREG:
            tail, iu = b"", node.blkaddr if rec.nblocks else 0
        elif node.fmt in (_stat.S_IFCHR, _stat.S_IFBLK):
            tail, iu = b"", encode_dev(*node.rdev)
        else:
            tail, iu = b"", 0
        icount = (len(rec.xattrs) - XATTR_IBODY_HEADER) // 4 + 1 if rec.xattrs else 0
        inode = EXT_STRUCT.pack(FORMAT_EXTENDED | rec.layout << 1, icount, node.mode & 0xFFFF, 0,
                                node.size, iu, rec.ino & 0xFFFFFFFF, node.uid, node.gid,
                                node.mtime, node.mtime_nsec, rec.nlink)
        put(rec.offset, inode + rec.xattrs + tail)

    sb_block = bytearray(bs)
    SB_STRUCT.pack_into(sb_block, SB_OFFSET, MAGIC, 0, 0, BLKSZBITS, 0, root.nid, len(order),
                        build_time, 0, next_blk, start_block, 0, bytes(16), bytes(16), 0)
    writes = [(0, bytes(sb_block)), (meta_start, bytes(area))]
    return writes, mappings, next_blk


def _dir_bytes(rec, recs, bs):
    node = rec.node
    out = bytearray()
    for bi, block in enumerate(rec.dirblocks):
        ents, names = bytearray(), bytearray()
        nameoff = DIRENT * len(block)
        for name, child in block:
            if name == b".":
                nid, ft = node.nid, FT_DIR
            elif name == b"..":
                nid, ft = rec.parent.nid, FT_DIR
            else:
                nid, ft = child.nid, FT_OF_FMT[child.fmt]
            ents += DIRENT_STRUCT.pack(nid, nameoff + len(names), ft, 0)
            names += name
        blk = ents + names
        if bi < len(rec.dirblocks) - 1:
            blk += bytes(bs - len(blk))
        out += blk
    assert len(out) == node.size
    return bytes(out)

