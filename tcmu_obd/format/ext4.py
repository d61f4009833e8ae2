"""A small read-only ext2/3/4 reader over a virtual disk, for `tcmu-obd
info`/`demo` (superblock()) and for the dynamic prefetch list (Ext4): it
resolves absolute paths to inodes and tells which disk bytes hold a file's
data (file_extents, the equivalent of fiemap), so tcmu_obd.remote.prefetch can read
those ranges ahead of the container.

It reads the superblock, 32- and 64-byte group descriptors (meta_bg too),
inodes, extent trees of any legal depth, old-style direct/indirect block
maps, inline data (i_block plus the in-inode system.data xattr), fast and
slow symlinks, and directories entry by entry (hash-indexed directories read
linearly: their index blocks look like empty entries).  It does not write,
replay the journal, check checksums, or read other xattrs, bigalloc clusters
or erofs.

Disk bytes are untrusted: a bad value raises FormatError naming the field;
every loop is bounded (extent depth <= 5, no tree or directory block visited
twice, a file maps at most as many blocks as the file system has, at most 40
symlink hops), so a crafted image cannot crash or hang the reader.  A path
that does not exist is not an error: lookup() returns None.
"""
import stat as _stat
import struct
import uuid
from collections import OrderedDict, deque

from tcmu_obd.errors import FormatError

MAGIC = 0xEF53
SB_OFFSET = 1024
ROOT_INO = 2
MAX_SYMLINK_HOPS = 40
MAX_EXTENT_DEPTH = 5
EXTENT_MAGIC = 0xF30A
MAX_DIR_SIZE = 1 << 32             # bytes; larger needs largedir and is not worth supporting
MAX_SYMLINK_SIZE = 4096            # PATH_MAX

INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_KNOWN = 0x3F7DE           # every incompat bit Linux defines except compression (0x1)
RO_COMPAT_SPARSE_SUPER = 0x1
COMPAT_SPARSE_SUPER2 = 0x200

INODE_FL_EXTENTS = 0x80000
INODE_FL_INLINE_DATA = 0x10000000

FT_DIR = 2
FT_SYMLINK = 7


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


class Inode:
    """The fields of one on-disk inode the reader needs."""
    __slots__ = ("ino", "mode", "size", "flags", "iblock", "disk_offset", "blocks", "file_acl", "raw")

    def __init__(self, ino, mode, size, flags, iblock, disk_offset, blocks=0, file_acl=0, raw=b""):
        self.ino, self.mode, self.size, self.flags = ino, mode, size, flags
        self.iblock, self.disk_offset = iblock, disk_offset
        self.blocks, self.file_acl = blocks, file_acl      # i_blocks (512-byte units), xattr block
        self.raw = raw                                      # the whole on-disk inode

    @property
    def is_dir(self):
        return _stat.S_ISDIR(self.mode)

    @property
    def is_reg(self):
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self):
        return _stat.S_ISLNK(self.mode)

    @property
    def inline(self):
        return bool(self.flags & INODE_FL_INLINE_DATA)


class Ext4:
    """A read-only view of the ext2/3/4 file system on a disk.

    read(offset, length) -> bytes reads the disk; the reader only asks for
    512-aligned ranges (whole blocks, or the superblock), so Image.read fits.
    size, when given, is the disk size: a file system claiming more blocks
    is rejected.  name is used in error messages."""

    CACHE_BLOCKS = 1024

    def __init__(self, read, size=None, name="<ext4>"):
        self._read = read
        self.name = str(name)
        self.disk_size = size
        self._cache = OrderedDict()
        self._dir_cache = OrderedDict()
        sb = self._read_exact(SB_OFFSET, 1024, "superblock")
        self._parse_superblock(sb, size)

    # ------------------------------------------------------------ errors / io
    def _bad(self, field, value, why):
        return FormatError(self.name, field, value, why)

    def _read_exact(self, offset, length, what):
        data = self._read(offset, length)
        if len(data) != length:
            raise self._bad(what, offset, f"short read: {len(data)} of {length} bytes")
        return bytes(data)

    def block(self, blk, what="block"):
        """One file system block (cached)."""
        if not 0 <= blk < self.blocks_count:
            raise self._bad(what, blk, f"outside the file system's {self.blocks_count} blocks")
        data = self._cache.get(blk)
        if data is None:
            data = self._read_exact(blk * self.block_size, self.block_size, what)
            self._cache[blk] = data
            if len(self._cache) > self.CACHE_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(blk)
        return data

    # ------------------------------------------------------------ superblock
    def _parse_superblock(self, sb, size):
        (inodes_count, blocks_lo, _r, _fb, _fi, first_data_block, log_bs, _log_cs,
         blocks_per_group, _cpg, inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        magic = struct.unpack_from("<H", sb, 0x38)[0]
        if magic != MAGIC:
            raise self._bad("s_magic", magic, f"not the ext2/3/4 magic 0x{MAGIC:04x}")
        if log_bs > 6:
            raise self._bad("s_log_block_size", log_bs, "block size above 64 KiB")
        bs = 1024 << log_bs
        rev = struct.unpack_from("<I", sb, 0x4C)[0]
        self.feature_compat, self.feature_incompat, self.feature_ro_compat = struct.unpack_from("<III", sb, 0x5C)
        inc = self.feature_incompat
        if inc & INCOMPAT_JOURNAL_DEV:
            raise self._bad("s_feature_incompat", inc, "an external journal device, not a file system")
        if inc & ~INCOMPAT_KNOWN:
            raise self._bad("s_feature_incompat", inc, f"unknown incompatible features 0x{inc & ~INCOMPAT_KNOWN:x}")
        hi = struct.unpack_from("<I", sb, 0x150)[0] if inc & INCOMPAT_64BIT else 0
        blocks_count = blocks_lo | hi << 32
        if rev == 0:
            inode_size, self.first_ino = 128, 11
        else:
            inode_size = struct.unpack_from("<H", sb, 0x58)[0]
            self.first_ino = struct.unpack_from("<I", sb, 0x54)[0]
            if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
                raise self._bad("s_inode_size", inode_size, f"not a power of two in [128, {bs}]")
        if inc & INCOMPAT_64BIT:
            desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
            if desc_size < 64 or desc_size > min(1024, bs) or desc_size & (desc_size - 1):
                raise self._bad("s_desc_size", desc_size, "not a power of two in [64, 1024] for a 64bit file system")
        else:
            desc_size = 32
        if not 0 < blocks_per_group <= bs * 8:
            raise self._bad("s_blocks_per_group", blocks_per_group, f"not in [1, {bs * 8}]")
        if not 0 < inodes_per_group <= bs * 8:
            raise self._bad("s_inodes_per_group", inodes_per_group, f"not in [1, {bs * 8}]")
        if first_data_block >= blocks_count:
            raise self._bad("s_first_data_block", first_data_block, f"not below s_blocks_count {blocks_count}")
        if size is not None and blocks_count * bs > size:
            raise self._bad("s_blocks_count", blocks_count,
                            f"{blocks_count * bs} bytes of blocks on a disk of {size} bytes")
        groups = -(-(blocks_count - first_data_block) // blocks_per_group)
        if groups >= 1 << 32:
            raise self._bad("s_blocks_count", blocks_count, f"{groups} block groups")
        if inodes_count < ROOT_INO or inodes_count > groups * inodes_per_group:
            raise self._bad("s_inodes_count", inodes_count,
                            f"not in [2, {groups} groups x {inodes_per_group} inodes]")
        self.block_size = bs
        self.blocks_count = blocks_count
        self.first_data_block = first_data_block
        self.blocks_per_group = blocks_per_group
        self.inodes_per_group = inodes_per_group
        self.inodes_count = inodes_count
        self.inode_size = inode_size
        self.desc_size = desc_size
        self.group_count = groups
        self.first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
        self.backup_bgs = struct.unpack_from("<II", sb, 0x24C)
        self.filetype = bool(inc & INCOMPAT_FILETYPE)
        self._itable_blocks = -(-inodes_per_group * inode_size // bs)

    # ------------------------------------------------------------ group descriptors
    def _has_super(self, group):
        if group == 0:
            return True
        if self.feature_compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _desc_block(self, i):
        """Where descriptor block i lives (ext2fs_descriptor_block_loc2)."""
        first = self.first_data_block
        if not self.feature_incompat & INCOMPAT_META_BG or i < self.first_meta_bg:
            return first + 1 + i
        bg = (self.block_size // self.desc_size) * i
        blk = first + bg * self.blocks_per_group
        adjust = 1 if self.block_size == 1024 and first == 0 else 0
        return blk + (1 if self._has_super(bg) else 0) + adjust

    def inode_table(self, group):
        """The first block of a group's inode table."""
        if not 0 <= group < self.group_count:
            raise self._bad("inode group", group, f"not below the {self.group_count} groups")
        per_block = self.block_size // self.desc_size
        i, k = divmod(group, per_block)
        data = self.block(self._desc_block(i), f"group descriptor block {i}")
        off = k * self.desc_size
        table = struct.unpack_from("<I", data, off + 0x08)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", data, off + 0x28)[0] << 32
        if table < self.first_data_block or table + self._itable_blocks > self.blocks_count:
            raise self._bad(f"group[{group}].bg_inode_table", table,
                            f"a {self._itable_blocks}-block inode table does not fit "
                            f"in {self.blocks_count} blocks")
        return table

    # ------------------------------------------------------------ inodes
    def inode(self, ino):
        if not ROOT_INO - 1 <= ino <= self.inodes_count:
            raise self._bad("inode number", ino, f"not in [1, {self.inodes_count}]")
        group, index = divmod(ino - 1, self.inodes_per_group)
        table = self.inode_table(group)
        byte = index * self.inode_size
        blk, off = table + byte // self.block_size, byte % self.block_size
        raw = self.block(blk, f"inode {ino}")[off:off + self.inode_size]
        mode, size_lo = struct.unpack_from("<H2xI", raw, 0)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        blocks_lo = struct.unpack_from("<I", raw, 0x1C)[0]
        acl_lo, size_hi = struct.unpack_from("<II", raw, 0x68)
        blocks_hi, acl_hi = struct.unpack_from("<HH", raw, 0x74)
        return Inode(ino, mode, size_lo | size_hi << 32, flags, raw[0x28:0x28 + 60],
                     blk * self.block_size + off, blocks_lo | blocks_hi << 32, acl_lo | acl_hi << 32, raw)

    def _inline_value(self, inode):
        """The value of the in-inode xattr system.data: the part of an
        inline-data file or directory that does not fit in i_block."""
        raw, isz = inode.raw, len(inode.raw)
        if isz <= 128:
            return b""
        extra = struct.unpack_from("<H", raw, 0x80)[0]
        where = f"inode {inode.ino}"
        if extra % 4 or 128 + extra > isz:
            raise self._bad(f"{where} i_extra_isize", extra, f"not a multiple of 4 fitting in {isz - 128} bytes")
        base = 128 + extra + 4
        if base > isz or struct.unpack_from("<I", raw, base - 4)[0] != 0xEA020000:
            return b""
        pos = base
        while pos + 16 <= isz and struct.unpack_from("<I", raw, pos)[0] != 0:
            name_len, index, voff, vino, vsize = struct.unpack_from("<BBHII", raw, pos)
            if pos + 16 + name_len > isz:
                raise self._bad(f"{where} xattr at {pos} e_name_len", name_len, "runs past the inode")
            if index == 7 and raw[pos + 16:pos + 16 + name_len] == b"data":
                if vino:
                    raise self._bad(f"{where} system.data e_value_inum", vino, "inline data in an EA inode")
                if base + voff + vsize > isz:
                    raise self._bad(f"{where} system.data e_value_offs", voff,
                                    f"{vsize} bytes from here pass the inode's {isz} bytes")
                return raw[base + voff:base + voff + vsize]
            pos += (16 + name_len + 3) & ~3
        return b""

    def _inline_data(self, inode):
        return (inode.iblock + self._inline_value(inode))[:inode.size]

    # ------------------------------------------------------------ block mapping
    def block_map(self, inode):
        """[(logical block, physical block, count)] of the inode's data, in
        logical order, holes and unwritten extents left out, clipped to the
        blocks below i_size.  Inline-data inodes map nothing."""
        if inode.inline:
            return []
        nblocks = -(-inode.size // self.block_size)
        if nblocks == 0:
            return []
        if inode.flags & INODE_FL_EXTENTS:
            runs = self._extent_runs(inode, nblocks)
        else:
            runs = self._indirect_runs(inode, nblocks)
        total = 0
        for _l, _p, n in runs:
            total += n
        if total > self.blocks_count:
            raise self._bad(f"inode {inode.ino} block map", total,
                            f"maps more blocks than the file system's {self.blocks_count}")
        return runs

    def _extent_node(self, data, ino, where):
        magic, entries, maximum, depth = struct.unpack_from("<4H", data, 0)
        if magic != EXTENT_MAGIC:
            raise self._bad(f"inode {ino} {where} eh_magic", magic, f"not 0x{EXTENT_MAGIC:04x}")
        if depth > MAX_EXTENT_DEPTH:
            raise self._bad(f"inode {ino} {where} eh_depth", depth, f"above {MAX_EXTENT_DEPTH}")
        cap = (len(data) - 12) // 12
        if maximum > cap:
            raise self._bad(f"inode {ino} {where} eh_max", maximum, f"above the {cap} entries that fit")
        if entries > maximum:
            raise self._bad(f"inode {ino} {where} eh_entries", entries, f"above eh_max {maximum}")
        return entries, depth

    def _extent_runs(self, inode, nblocks):
        ino = inode.ino
        runs = []
        next_l = 0                    # extents must be sorted and must not overlap
        seen = set()
        mapped = 0
        # DFS in logical order: stack of (node bytes, expected depth or None, where, min logical)
        stack = [(inode.iblock, None, "i_block")]
        while stack:
            data, want, where = stack.pop()
            entries, depth = self._extent_node(data, ino, where)
            if want is not None and depth != want:
                raise self._bad(f"inode {ino} {where} eh_depth", depth, f"expected {want} below its parent")
            if depth == 0:
                for k in range(entries):
                    lblk, ln, start_hi, start_lo = struct.unpack_from("<IHHI", data, 12 + 12 * k)
                    unwritten = ln > 32768
                    if unwritten:
                        ln -= 32768
                    if ln == 0:
                        raise self._bad(f"inode {ino} {where} extent[{k}].ee_len", 0, "empty extent")
                    pblk = start_hi << 32 | start_lo
                    if lblk < next_l:
                        raise self._bad(f"inode {ino} {where} extent[{k}].ee_block", lblk,
                                        f"overlaps or precedes the previous extent (ends at {next_l})")
                    if pblk + ln > self.blocks_count:
                        raise self._bad(f"inode {ino} {where} extent[{k}].ee_start", pblk,
                                        f"{ln} blocks from here pass the {self.blocks_count} blocks")
                    next_l = lblk + ln
                    if unwritten or lblk >= nblocks:
                        continue
                    n = min(ln, nblocks - lblk)
                    mapped += n
                    if mapped > self.blocks_count:
                        raise self._bad(f"inode {ino} extents", mapped,
                                        f"map more blocks than the file system's {self.blocks_count}")
                    if runs and runs[-1][0] + runs[-1][2] == lblk and runs[-1][1] + runs[-1][2] == pblk:
                        last = runs[-1]
                        runs[-1] = (last[0], last[1], last[2] + n)
                    else:
                        runs.append((lblk, pblk, n))
                continue
            children = []
            prev = -1
            for k in range(entries):
                lblk, leaf_lo, leaf_hi = struct.unpack_from("<IIH", data, 12 + 12 * k)
                if lblk <= prev:
                    raise self._bad(f"inode {ino} {where} index[{k}].ei_block", lblk, "index entries out of order")
                prev = lblk
                child = leaf_hi << 32 | leaf_lo
                if child in seen:
                    raise self._bad(f"inode {ino} {where} index[{k}].ei_leaf", child, "extent tree block used twice")
                seen.add(child)
                children.append((child, k))
            for child, k in reversed(children):
                node = self.block(child, f"inode {ino} {where} index[{k}].ei_leaf")
                stack.append((node, depth - 1, f"extent block {child}"))
        return runs

    def _indirect_runs(self, inode, nblocks):
        ino = inode.ino
        ptrs = struct.unpack_from("<15I", inode.iblock, 0)
        per = self.block_size // 4
        runs = []
        seen = set()

        def add(lblk, pblk, where):
            if pblk >= self.blocks_count:
                raise self._bad(f"inode {ino} {where}", pblk, f"outside the {self.blocks_count} blocks")
            if runs and runs[-1][0] + runs[-1][2] == lblk and runs[-1][1] + runs[-1][2] == pblk:
                last = runs[-1]
                runs[-1] = (last[0], last[1], last[2] + 1)
            else:
                runs.append((lblk, pblk, 1))

        for k in range(min(12, nblocks)):
            if ptrs[k]:
                add(k, ptrs[k], f"i_block[{k}]")
        base, span = 12, per
        for level, k in ((1, 12), (2, 13), (3, 14)):
            if base >= nblocks:
                break
            if ptrs[k]:
                # iterative walk of one indirect tree: (block, level, first logical block)
                todo = [(ptrs[k], level, base, f"i_block[{k}]")]
                while todo:
                    blk, lev, lbase, where = todo.pop()
                    if blk >= self.blocks_count:
                        raise self._bad(f"inode {ino} {where}", blk, f"outside the {self.blocks_count} blocks")
                    if blk in seen:
                        raise self._bad(f"inode {ino} {where}", blk, "indirect block used twice")
                    seen.add(blk)
                    entries = struct.unpack_from(f"<{per}I", self.block(blk, f"inode {ino} {where}"), 0)
                    child_span = per ** (lev - 1)
                    kids = []
                    for j, p in enumerate(entries):
                        lb = lbase + j * child_span
                        if lb >= nblocks:
                            break
                        if not p:
                            continue
                        if lev == 1:
                            add(lb, p, f"indirect block {blk}[{j}]")
                        else:
                            kids.append((p, lev - 1, lb, f"indirect block {blk}[{j}]"))
                    todo.extend(reversed(kids))
            base += span
            span *= per
        return runs

    # ------------------------------------------------------------ file data
    def file_map(self, inode_or_ino):
        """[(file byte offset, disk byte offset, length)] of a file's data,
        in file order; lengths are whole blocks (the last one may reach past
        i_size); holes are absent.  An inline-data inode maps the whole
        on-disk inode, which holds its data (i_block and system.data)."""
        inode = self._as_inode(inode_or_ino)
        if inode.inline:
            return [(0, inode.disk_offset, self.inode_size)] if inode.size else []
        if inode.is_symlink and self._fast_symlink(inode):
            return []
        bs = self.block_size
        return [(lb * bs, pb * bs, n * bs) for lb, pb, n in self.block_map(inode)]

    def extent_leaf_entries(self, inode_or_ino):
        """Where each extent leaf entry of an extent-mapped inode lies on the
        disk: [(disk byte offset of the 12-byte ext4_extent, ee_block, raw
        ee_len, ee_start)], in tree order; raw ee_len > 32768 marks an
        unwritten extent.  Leaves in i_block are inside the on-disk inode.
        [] for an inode without extents (inline data, block maps)."""
        inode = self._as_inode(inode_or_ino)
        if inode.inline or not inode.flags & INODE_FL_EXTENTS:
            return []
        ino, bs = inode.ino, self.block_size
        out, seen = [], set()
        stack = [(inode.iblock, None, "i_block", inode.disk_offset + 0x28)]
        while stack:
            data, want, where, base = stack.pop()
            entries, depth = self._extent_node(data, ino, where)
            if want is not None and depth != want:
                raise self._bad(f"inode {ino} {where} eh_depth", depth, f"expected {want} below its parent")
            if depth == 0:
                for k in range(entries):
                    lblk, ln, start_hi, start_lo = struct.unpack_from("<IHHI", data, 12 + 12 * k)
                    pblk = start_hi << 32 | start_lo
                    real = ln - 32768 if ln > 32768 else ln
                    if real == 0 or pblk + real > self.blocks_count:
                        raise self._bad(f"inode {ino} {where} extent[{k}].ee_start", pblk,
                                        f"{real} blocks from here: outside the {self.blocks_count} blocks")
                    out.append((base + 12 + 12 * k, lblk, ln, pblk))
                continue
            children = []
            for k in range(entries):
                _lblk, leaf_lo, leaf_hi = struct.unpack_from("<IIH", data, 12 + 12 * k)
                child = leaf_hi << 32 | leaf_lo
                if child in seen or child >= self.blocks_count:
                    raise self._bad(f"inode {ino} {where} index[{k}].ei_leaf", child,
                                    "extent tree block used twice or outside the file system")
                seen.add(child)
                children.append((child, k))
            for child, k in reversed(children):
                node = self.block(child, f"inode {ino} {where} index[{k}].ei_leaf")
                stack.append((node, depth - 1, f"extent block {child}", child * bs))
        return out

    def inode_extents(self, inode_or_ino):
        """[(disk byte offset, length)] holding the inode's data, in file order."""
        return [(d, n) for _f, d, n in self.file_map(inode_or_ino)]

    def file_extents(self, path):
        """fiemap of an absolute path (symlinks followed): [(disk byte
        offset, length)].  FileNotFoundError if the path does not resolve."""
        ino = self.lookup(path)
        if ino is None:
            raise FileNotFoundError(path)
        return self.inode_extents(ino)

    def read_inode_data(self, inode_or_ino, limit=64 << 20):
        """The bytes of a file (holes as zeros), up to `limit` bytes."""
        inode = self._as_inode(inode_or_ino)
        size = min(inode.size, limit)
        if inode.inline:
            return self._inline_data(inode)[:size]
        if inode.is_symlink and self._fast_symlink(inode):
            return inode.iblock[:min(size, 60)]
        out = bytearray(size)
        for foff, doff, n in self.file_map(inode):
            if foff >= size:
                break
            n = min(n, size - foff)
            whole = -(-n // self.block_size) * self.block_size
            out[foff:foff + n] = self._read_exact(doff, whole, f"inode {inode.ino} data")[:n]
        return bytes(out)

    def read_file(self, path, limit=64 << 20):
        ino = self.lookup(path)
        if ino is None:
            raise FileNotFoundError(path)
        return self.read_inode_data(ino, limit)

    def _as_inode(self, x):
        return x if isinstance(x, Inode) else self.inode(x)

    # ------------------------------------------------------------ symlinks
    def _fast_symlink(self, inode):
        """The target sits in i_block: no data blocks besides an xattr block
        (ext4_inode_is_fast_symlink)."""
        ea_blocks = self.block_size >> 9 if inode.file_acl else 0
        return inode.blocks == ea_blocks

    def readlink(self, inode_or_ino):
        inode = self._as_inode(inode_or_ino)
        if not inode.is_symlink:
            raise self._bad(f"inode {inode.ino} i_mode", inode.mode, "not a symlink")
        if inode.size > min(MAX_SYMLINK_SIZE, self.block_size):
            raise self._bad(f"inode {inode.ino} i_size", inode.size, "a symlink target longer than a block")
        if inode.inline:
            return self._inline_data(inode)
        if self._fast_symlink(inode):
            return inode.iblock[:inode.size]
        return self.read_inode_data(inode)

    # ------------------------------------------------------------ directories
    def _dir_block_entries(self, data, where):
        bs = len(data)
        pos = 0
        while pos < bs:
            if pos + 8 > bs:
                raise self._bad(f"{where} entry at {pos}", bs - pos, "fewer than 8 bytes left in the block")
            ino, rec_len = struct.unpack_from("<IH", data, pos)
            if self.filetype:
                name_len, ftype = data[pos + 6], data[pos + 7]
            else:
                name_len, ftype = struct.unpack_from("<H", data, pos + 6)[0], 0
            if rec_len in (0, 65535) and bs >= 65536:
                rec_len = 65536
            if rec_len < 12 or rec_len % 4 or pos + rec_len > bs:
                raise self._bad(f"{where} entry at {pos} rec_len", rec_len,
                                f"not a multiple of 4 in [12, {bs - pos}]")
            if ino:
                if 8 + name_len > rec_len:
                    raise self._bad(f"{where} entry at {pos} name_len", name_len,
                                    f"does not fit in rec_len {rec_len}")
                if ino > self.inodes_count:
                    raise self._bad(f"{where} entry at {pos} inode", ino,
                                    f"above s_inodes_count {self.inodes_count}")
                yield bytes(data[pos + 8:pos + 8 + name_len]), ino, ftype
            pos += rec_len

    def listdir(self, inode_or_ino, budget=None):
        """[(name bytes, inode number, file type)] of a directory, '.' and
        '..' included, in on-disk order.  `budget` (a one-item list) counts
        down directory blocks read, for walks."""
        inode = self._as_inode(inode_or_ino)
        if not inode.is_dir:
            raise self._bad(f"inode {inode.ino} i_mode", inode.mode, "not a directory")
        cached = self._dir_cache.get(inode.ino)
        if cached is not None:
            self._dir_cache.move_to_end(inode.ino)
            return cached
        if inode.size > MAX_DIR_SIZE:
            raise self._bad(f"inode {inode.ino} i_size", inode.size, f"a directory above {MAX_DIR_SIZE} bytes")
        where = f"directory inode {inode.ino}"
        out = []
        if inode.inline:
            parent = struct.unpack_from("<I", inode.iblock, 0)[0]
            out.append((b".", inode.ino, FT_DIR))
            out.append((b"..", parent, FT_DIR))
            # entries in i_block after the parent's number, then in the system.data xattr
            if inode.size > 4:
                out.extend(self._dir_block_entries(inode.iblock[4:60], where))
                value = self._inline_value(inode)
                if value:
                    out.extend(self._dir_block_entries(value, where))
        else:
            for _l, pblk, n in self.block_map(inode):
                for b in range(pblk, pblk + n):
                    if budget is not None:
                        budget[0] -= 1
                        if budget[0] < 0:
                            raise self._bad(where, b, "more directory blocks than the file system has")
                    out.extend(self._dir_block_entries(self.block(b, where), where))
        self._dir_cache[inode.ino] = out
        if len(self._dir_cache) > 64:
            self._dir_cache.popitem(last=False)
        return out

    def _find(self, dir_ino, name):
        for n, ino, _t in self.listdir(dir_ino):
            if n == name:
                return ino
        return None

    # ------------------------------------------------------------ paths
    def lookup(self, path, follow=True):
        """Inode number of an absolute path, or None if it does not resolve
        (missing, a non-directory in the middle, a symlink loop).  Symlinks
        in the middle are always followed, the last one only if `follow`."""
        if isinstance(path, str):
            path = path.encode("utf-8", "surrogateescape")
        comps = deque(c for c in path.split(b"/") if c and c != b".")
        dirs = [ROOT_INO]
        hops = 0
        while comps:
            comp = comps.popleft()
            if comp == b"..":
                if len(dirs) > 1:
                    dirs.pop()
                continue
            parent = self.inode(dirs[-1])
            if not parent.is_dir:
                return None
            child = self._find(parent.ino, comp)
            if child is None:
                return None
            cnode = self.inode(child)
            if cnode.is_symlink and (comps or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None                  # ELOOP
                target = self.readlink(cnode)
                if target.startswith(b"/"):
                    dirs = [ROOT_INO]
                comps.extendleft(reversed([c for c in target.split(b"/") if c and c != b"."]))
                continue
            dirs.append(child)
        return dirs[-1]

    def walk(self, path="/"):
        """Yield (path, inode number) of every regular file below a
        directory, depth first in on-disk order; symlinks inside are not
        followed, each directory is read once.  A path naming a regular
        file yields just that file; a missing path yields nothing."""
        ino = self.lookup(path)
        if ino is None:
            return
        top = self.inode(ino)
        base = path.rstrip("/") if isinstance(path, str) else path.decode("utf-8", "surrogateescape").rstrip("/")
        if top.is_reg:
            yield base or "/", ino
            return
        if not top.is_dir:
            return
        seen = {ino}
        budget = [self.blocks_count]
        todo = [(base, ino)]
        while todo:
            dpath, dino = todo.pop()
            subdirs = []
            for name, child, ftype in self.listdir(dino, budget):
                if name in (b".", b".."):
                    continue
                cpath = f"{dpath}/{name.decode('utf-8', 'surrogateescape')}"
                if self.filetype and ftype not in (0, 1, FT_DIR):
                    continue                     # symlinks, devices...: skip without reading the inode
                node = self.inode(child)
                if node.is_reg:
                    yield cpath, child
                elif node.is_dir and child not in seen:
                    seen.add(child)
                    subdirs.append((cpath, child))
            todo.extend(reversed(subdirs))
