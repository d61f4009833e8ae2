"""A read-only erofs reader for the lower image of an incremental TurboOCI
erofs meta layer: superblock, compact and extended inodes, inline and shared
xattrs, directories, symlinks and device numbers, read into the tree of
erofs_layout.Node that ErofsBuilder then changes.  Regular files are not
read, only their data placement (raw_blkaddr) is kept.  It does not read
compressed or chunk-based files, long xattr name prefixes, extra devices or
any incompatible feature: those are refused with FormatError, as are
on-disk values out of range.  The superblock checksum is verified when its
feature bit is set (mkfs.erofs sets it; our writer does not).

Disk bytes are untrusted: a bad value raises FormatError naming the field,
the value and the nid; every loop is bounded (each directory nid is read
once, so a cycle or a hard-linked directory is an error; the tree holds at
most as many inodes as the metadata area has 32-byte slots, and at most
MAX_INODES), so a crafted image cannot crash or hang the reader.
"""
import stat as _stat
import struct

from tcmu_obd import core
from tcmu_obd.errors import CorruptDataError, FormatError
from tcmu_obd.format.erofs_layout import (
    COMPACT_STRUCT, COMPAT_MTIME, COMPAT_SB_CHKSUM, DIRENT, DIRENT_STRUCT, EXT_STRUCT, FLAT_INLINE, FLAT_PLAIN,
    FORMAT_ALL, FORMAT_EXTENDED, FT_OF_FMT, INCOMPAT_ZERO_PADDING, INODE_COMPACT,
    INODE_EXTENDED, MAGIC, MAX_BLKADDR, NAME_LEN, NID_UNIT, SB_OFFSET, SB_SIZE, SB_STRUCT,
    XATTR_ENTRY_STRUCT, XATTR_IBODY_HEADER, XATTR_PREFIX_OF_INDEX, Node, decode_dev, round_up)

MAX_INODES = 1 << 24
MAX_DIR_SIZE = 64 << 20            # about a million entries
CACHE_UNIT = 4096                  # every read of the image is of whole, aligned 4 KiB units
CACHE_UNITS = 4096
MAX_SYMLINK_SIZE = 4095
MAX_DEPTH = 4096
VALID_FMTS = (_stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK, _stat.S_IFCHR, _stat.S_IFBLK,
              _stat.S_IFIFO, _stat.S_IFSOCK)


class ErofsReader:
    """`pread(offset, length) -> bytes` reads the image, always 4 KiB at a
    4 KiB-aligned offset (a short read past its end is fine; a short read of
    needed bytes is a FormatError)."""

    def __init__(self, pread, name="<erofs>"):
        self.pread = pread
        self.name = name
        self._cache = {}
        sb = self._read(SB_OFFSET, SB_SIZE, "superblock")
        (magic, _csum, self.feature_compat, self.blkszbits, _ext, self.root_nid, self.inos,
         self.build_time, self.build_time_nsec, self.blocks, self.meta_blkaddr,
         self.xattr_blkaddr, _uuid, _vol, incompat) = SB_STRUCT.unpack_from(sb, 0)
        if magic != MAGIC:
            self._bad("superblock.magic", magic, f"not erofs (0x{MAGIC:08x} expected)")
        if not 9 <= self.blkszbits <= 16:
            self._bad("superblock.blkszbits", self.blkszbits, "block size must be 512..65536")
        if incompat & ~INCOMPAT_ZERO_PADDING:
            self._bad("superblock.feature_incompat", incompat, "unsupported incompatible features")
        self.block_size = 1 << self.blkszbits
        if self.feature_compat & COMPAT_SB_CHKSUM:
            self._check_sb_crc()
        self._end = 0                      # highest byte of the image seen in use
        self._note(0, self.blocks * self.block_size)

    def _check_sb_crc(self):
        """crc32c (seed ~0, no final xor) of block 0 from byte 1024 with the
        checksum field zeroed, as the kernel checks it."""
        length = max(self.block_size - SB_OFFSET, SB_SIZE)
        sb = bytearray(self._read(SB_OFFSET, length, "superblock"))
        stored = struct.unpack_from("<I", sb, 4)[0]
        struct.pack_into("<I", sb, 4, 0)
        crc = core.crc32c(bytes(sb), 0xFFFFFFFF)
        if crc != stored:
            raise CorruptDataError(self.name, "superblock.checksum", stored, f"crc32c is 0x{crc:08x}")

    def _bad(self, field, value, why):
        raise FormatError(self.name, field, value, why)

    def _unit(self, u):
        data = self._cache.get(u)
        if data is None:
            if len(self._cache) >= CACHE_UNITS:
                self._cache.clear()
            data = bytes(self.pread(u * CACHE_UNIT, CACHE_UNIT))
            self._cache[u] = data
        return data

    def _read(self, offset, length, what):
        """`length` bytes at `offset`, through a cache of aligned 4 KiB reads
        (the image below may only take sector-aligned reads)."""
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            u = pos // CACHE_UNIT
            data = self._unit(u)
            chunk = data[pos - u * CACHE_UNIT:min(len(data), end - u * CACHE_UNIT)]
            out += chunk
            pos += len(chunk)
            if len(data) < CACHE_UNIT or not chunk:
                break
        if len(out) < length:
            self._bad(what, offset, f"short read: {len(out)} of {length} bytes")
        return bytes(out)

    def _note(self, start, end):
        self._end = max(self._end, end)

    def used_blocks(self):
        """Blocks [0, n) hold everything the image uses (valid after tree())."""
        return round_up(self._end, self.block_size) // self.block_size

    # -- inodes -----------------------------------------------------------------------------------
    def inode(self, nid):
        """(Node, layout, inline_offset, raw) of inode `nid`; inline_offset is
        the disk offset right after the inode and its xattrs."""
        bs = self.block_size
        where = f"nid {nid}"
        off = self.meta_blkaddr * bs + nid * NID_UNIT
        head = self._read(off, INODE_COMPACT, f"{where}: inode")
        fmt = struct.unpack_from("<H", head, 0)[0]
        if fmt & ~FORMAT_ALL:
            self._bad(f"{where}: i_format", fmt, "unknown bits")
        layout = fmt >> 1 & 7
        if fmt & FORMAT_EXTENDED:
            raw = self._read(off, INODE_EXTENDED, f"{where}: inode")
            (_f, icount, mode, _r, size, iu, _ino, uid, gid, mtime, nsec,
             _nlink) = EXT_STRUCT.unpack_from(raw, 0)
            isize = INODE_EXTENDED
        else:
            raw = head
            (_f, icount, mode, _nlink, size, mt_off, iu, _ino, uid, gid,
             _r2) = COMPACT_STRUCT.unpack_from(raw, 0)
            isize = INODE_COMPACT
            mtime, nsec = self.build_time, self.build_time_nsec
            if self.feature_compat & COMPAT_MTIME:
                mtime += mt_off
        if _stat.S_IFMT(mode) not in VALID_FMTS:
            self._bad(f"{where}: i_mode", mode, "not a valid file type")
        if layout not in (FLAT_PLAIN, FLAT_INLINE):
            self._bad(f"{where}: datalayout", layout, "only flat (uncompressed, not chunked) inodes are supported")
        if nsec >= 10**9:
            self._bad(f"{where}: i_mtime_nsec", nsec, "must be below 10^9")
        node = Node(mode, uid, gid, mtime, nsec)
        node.nid = nid
        xsize = XATTR_IBODY_HEADER + 4 * (icount - 1) if icount else 0
        if xsize:
            node.xattrs = self._xattrs(off + isize, xsize, where)
        node.size = size
        fmtbits = _stat.S_IFMT(mode)
        if fmtbits in (_stat.S_IFCHR, _stat.S_IFBLK):
            node.rdev = decode_dev(iu)
        elif fmtbits == _stat.S_IFREG:
            nblocks = (size + bs - 1) // bs
            if layout != FLAT_PLAIN:
                self._bad(f"{where}: datalayout", layout, "a regular file's tail must not be inline")
            if nblocks and iu + nblocks > MAX_BLKADDR + 1:
                self._bad(f"{where}: raw_blkaddr", iu, f"{nblocks} blocks from there pass 2^32")
            node.blkaddr = iu
            if nblocks:
                self._note(iu * bs, (iu + nblocks) * bs)
        inline_at = off + isize + xsize
        self._note(off, inline_at)
        return node, layout, inline_at, iu

    def _xattrs(self, at, xsize, where):
        body = self._read(at, xsize, f"{where}: xattrs")
        shared = body[4]
        pos = XATTR_IBODY_HEADER + 4 * shared
        if pos > xsize:
            self._bad(f"{where}: h_shared_count", shared, f"does not fit the {xsize}-byte xattr area")
        out = {}
        for k in range(shared):
            xid = struct.unpack_from("<I", body, XATTR_IBODY_HEADER + 4 * k)[0]
            eoff = self.xattr_blkaddr * self.block_size + xid * 4
            ehead = self._read(eoff, 4, f"{where}: shared xattr {xid}")
            nlen, _idx, vlen = XATTR_ENTRY_STRUCT.unpack_from(ehead, 0)
            ent = self._read(eoff, 4 + nlen + vlen, f"{where}: shared xattr {xid}")
            self._note(eoff, eoff + len(ent))
            name, value, _n = self._entry(ent, 0, f"{where}: shared xattr {xid}")
            out[name] = value
        while pos < xsize:
            if pos + 4 > xsize:
                self._bad(f"{where}: xattr entry at {pos}", xsize, "entry header past the xattr area")
            name, value, n = self._entry(body[:xsize], pos, f"{where}: xattr entry at {pos}")
            if name in out:
                self._bad(f"{where}: xattr name", name, "appears twice")
            out[name] = value
            pos += round_up(n, 4)
        return out

    def _entry(self, buf, pos, where):
        nlen, idx, vlen = XATTR_ENTRY_STRUCT.unpack_from(buf, pos)
        end = pos + 4 + nlen + vlen
        if end > len(buf):
            self._bad(f"{where}: e_value_size", vlen, "entry runs past its area")
        prefix = XATTR_PREFIX_OF_INDEX.get(idx)
        if prefix is None:
            self._bad(f"{where}: e_name_index", idx, "unknown or long-prefix name index")
        suffix = buf[pos + 4:pos + 4 + nlen]
        if prefix.startswith("system.posix_acl") != (nlen == 0):
            self._bad(f"{where}: e_name_len", nlen, f"does not suit prefix {prefix!r}")
        return prefix + suffix.decode("utf-8", "surrogateescape"), buf[pos + 4 + nlen:end], end - pos

    def data(self, nid, node, layout, inline_at, raw_blkaddr, limit):
        """The bytes of a directory or symlink (metadata content)."""
        bs = self.block_size
        size = node.size
        if size > limit:
            self._bad(f"nid {nid}: i_size", size, f"larger than {limit} bytes")
        if layout == FLAT_INLINE:
            full, tail = size // bs * bs, size % bs
            if inline_at % bs + tail > bs:
                self._bad(f"nid {nid}: i_size", size, "inline tail crosses a block boundary")
        else:
            full, tail = size, 0
        out = b""
        if full:
            if raw_blkaddr + (full + bs - 1) // bs > MAX_BLKADDR + 1:
                self._bad(f"nid {nid}: raw_blkaddr", raw_blkaddr, "blocks pass 2^32")
            out = self._read(raw_blkaddr * bs, full, f"nid {nid}: data")
            self._note(raw_blkaddr * bs, round_up(raw_blkaddr * bs + full, bs))
        if tail:
            out += self._read(inline_at, tail, f"nid {nid}: inline data")
            self._note(inline_at, inline_at + tail)
        return out

    # -- directories ------------------------------------------------------------------------------
    def dirents(self, nid, data):
        """[(name, nid, file_type)] of a directory's bytes, '.' and '..' dropped."""
        bs = self.block_size
        out, seen = [], set()
        for start in range(0, len(data), bs):
            blk = data[start:start + bs]
            where = f"nid {nid}: dir block {start // bs}"
            if len(blk) < DIRENT:
                self._bad(f"{where}: size", len(blk), "too small for a dirent")
            first = DIRENT_STRUCT.unpack_from(blk, 0)[1]
            if first < DIRENT or first % DIRENT or first >= len(blk):
                self._bad(f"{where}: nameoff[0]", first, "must be a multiple of 12 inside the block")
            count = first // DIRENT
            ents = [DIRENT_STRUCT.unpack_from(blk, DIRENT * i) for i in range(count)]
            for i, (cnid, nameoff, ftype, _r) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < count else len(blk)
                if not first <= nameoff < end <= len(blk):
                    self._bad(f"{where}: nameoff[{i}]", nameoff, "names out of order or out of the block")
                name = blk[nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                if not name or len(name) > NAME_LEN or b"/" in name or b"\0" in name:
                    self._bad(f"{where}: name[{i}]", name, "not a valid file name")
                if ftype > 7:
                    self._bad(f"{where}: file_type[{i}]", ftype, "unknown file type")
                if name in (b".", b".."):
                    continue
                if name in seen:
                    self._bad(f"{where}: name[{i}]", name, "appears twice in the directory")
                seen.add(name)
                out.append((name.decode("utf-8", "surrogateescape"), cnid, ftype))
        return out

    def tree(self):
        """The root Node of the whole tree (hard links share one Node)."""
        nodes = {}
        dirs_seen = set()
        root, layout, inline_at, iu = self.inode(self.root_nid)
        if not root.is_dir:
            self._bad("superblock.root_nid", self.root_nid, "is not a directory")
        nodes[self.root_nid] = root
        stack = [(self.root_nid, root, layout, inline_at, iu, 0)]
        while stack:
            nid, node, layout, inline_at, iu, depth = stack.pop()
            if nid in dirs_seen:
                self._bad(f"nid {nid}", nid, "directory reached twice (a cycle or a hard-linked directory)")
            dirs_seen.add(nid)
            if depth > MAX_DEPTH:
                self._bad(f"nid {nid}: depth", depth, f"directories nested deeper than {MAX_DEPTH}")
            data = self.data(nid, node, layout, inline_at, iu, MAX_DIR_SIZE)
            for name, cnid, ftype in self.dirents(nid, data):
                child = nodes.get(cnid)
                if child is None:
                    if len(nodes) >= MAX_INODES:
                        self._bad("superblock.inos", self.inos, f"more than {MAX_INODES} inodes")
                    child, clayout, cinline, ciu = self.inode(cnid)
                    nodes[cnid] = child
                    if child.is_dir:
                        stack.append((cnid, child, clayout, cinline, ciu, depth + 1))
                    elif child.fmt == _stat.S_IFLNK:
                        if not 1 <= child.size <= MAX_SYMLINK_SIZE:
                            self._bad(f"nid {cnid}: i_size", child.size, "a symlink target must be 1..4095 bytes")
                        child.target = self.data(cnid, child, clayout, cinline, ciu, MAX_SYMLINK_SIZE)
                        if b"\0" in child.target:
                            self._bad(f"nid {cnid}: symlink target", child.target, "contains a NUL byte")
                elif child.is_dir:
                    self._bad(f"nid {nid}: dirent {name!r}", cnid,
                              "directory reached twice (a cycle or a hard-linked directory)")
                if FT_OF_FMT[child.fmt] != ftype:
                    self._bad(f"nid {nid}: dirent {name!r} file_type", ftype,
                              f"inode {cnid} has mode 0o{child.mode:o}")
                node.children[name] = child
        return root
