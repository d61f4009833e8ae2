"""The erofs metadata writer for TurboOCI erofs meta layers: ErofsBuilder
takes a layer's tar members (TarEntry, in tar order) and returns the
metadata blocks of an erofs image plus, for each new regular file, a mapping
of its data blocks to its content offset in the uncompressed tar; the data
itself is never copied.  It is what liberofs's tar mode does for overlaybd,
written here because Debian 12's erofs-utils (1.5) has no tar mode.  It does
not produce the LSMT warp file (the tools record writes as tag 0 and mappings
as tag 1), read tars from a registry, or compress anything.

Tar semantics are overlaybd-apply's (format/tar_rules.py, which
build/untar.py applies to a directory): names are normalized (never above the root); missing parents
are made (0755, uid/gid 0, mtime 0); symlinks in parent paths are followed
inside the tree; `.wh.NAME` deletes NAME and `.wh..wh..opq` empties its
directory, both sparing what this layer added earlier, neither stored
(aufs + ovlfs_strip: layers merge at block level); other `.wh..wh.*` names
are ignored; an existing entry is replaced, except a directory over a
directory, which keeps its children and takes the new attributes (xattrs
are added).  A hard link shares the target's inode and sets its attributes,
as link+chown+chmod would.  Symlinks are mode 0777.

Incremental layers (`lower` given): the lower erofs image is read into a
tree (format/erofs_read.py), this layer's entries are applied to it, and a
COMPLETE new metadata set (superblock in block 0, every inode and directory
of the merged tree) is written into blocks after the highest block the lower
image uses; unchanged files keep their raw_blkaddr (their data is mapped by
the lower layer), new files get blocks after the new metadata.  This
differs from liberofs's incremental rebuild, whose internals are not
specified: what counts is that the merged block device is a valid erofs of
the merged tree.  The on-disk layout is described in format/erofs_write.py.
"""
import dataclasses
import logging
import posixpath
import stat as _stat
import tarfile

from tcmu_obd.errors import ApplyError, UnsupportedError, UsageError
from tcmu_obd.format.erofs_layout import BLOCK_SIZE, NAME_LEN, Node
from tcmu_obd.format import erofs_write, tar_rules
from tcmu_obd.format.tar_rules import XATTR_PREFIX, pax_time_ns  # noqa: F401 -- turbo.erofs_entries takes them from here
from tcmu_obd.format.erofs_read import ErofsReader

log = logging.getLogger(__name__)

MAX_SYMLINK_TARGET = 4095

TYPES = {"file": _stat.S_IFREG, "dir": _stat.S_IFDIR, "symlink": _stat.S_IFLNK, "hardlink": None,
         "char": _stat.S_IFCHR, "block": _stat.S_IFBLK, "fifo": _stat.S_IFIFO}


@dataclasses.dataclass
class TarEntry:
    """One tar member.  `mtime` in seconds (int or float) unless `mtime_ns`
    is given; `xattrs` {name: bytes}; `data_offset`: the content's offset in
    the uncompressed tar (regular files with size > 0; a multiple of 512)."""
    path: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict = dataclasses.field(default_factory=dict)
    data_offset: int = None
    mtime_ns: int = None


def entries_from_tar(fileobj, name="<tar>"):
    """TarEntry for each member of the uncompressed tar read from `fileobj`
    (streamed: a pipe will do).  GNU sparse members are refused (their data
    is not one contiguous run of the tar)."""
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|", errorlevel=2)
    except tarfile.ReadError as e:
        raise ApplyError(f"{name}: not a tar archive: {e}") from None
    try:
        for m in tf:
            tf.members.clear()
            if m.isreg():
                if m.issparse():
                    raise UnsupportedError(f"{name}: {m.name}: GNU sparse members cannot be mapped")
                kind = "file"
            elif m.isdir():
                kind = "dir"
            elif m.issym():
                kind = "symlink"
            elif m.islnk():
                kind = "hardlink"
            elif m.ischr():
                kind = "char"
            elif m.isblk():
                kind = "block"
            elif m.isfifo():
                kind = "fifo"
            else:
                raise UnsupportedError(f"{name}: {m.name}: tar entry type {m.type.decode('latin-1')!r}")
            xattrs = {k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith(XATTR_PREFIX)}
            yield TarEntry(path=m.name, type=kind, mode=m.mode, uid=m.uid, gid=m.gid,
                           mtime=m.mtime, size=m.size if kind == "file" else 0,
                           linkname=m.linkname, devmajor=m.devmajor, devminor=m.devminor,
                           xattrs=xattrs, data_offset=m.offset_data if kind == "file" else None,
                           mtime_ns=pax_time_ns(m.pax_headers.get("mtime"), m.mtime))
    except tarfile.ReadError as e:
        raise ApplyError(f"{name}: corrupt tar: {e}") from None


class ErofsBuilder:
    """Apply a layer's TarEntry list to an erofs tree; finish() lays it out."""

    def __init__(self, block_size=BLOCK_SIZE, lower=None, name="<erofs>"):
        if block_size != BLOCK_SIZE:
            raise UsageError(f"{name}: erofs block size {block_size}: only {BLOCK_SIZE} is supported")
        self.bs = block_size
        self.name = name
        self._unpacked = set()          # (id(parent), name) added by this layer
        self._keep = []                 # keeps the parents of _unpacked alive
        self._finished = False
        if lower is None:
            self.root = Node(_stat.S_IFDIR | 0o755)
            self.start_block = 1
        else:
            reader = ErofsReader(lower, name=f"{name} (lower)")
            if reader.block_size != block_size:
                raise UsageError(f"{name}: lower erofs block size {reader.block_size} != {block_size}")
            self.root = reader.tree()
            self.start_block = max(1, reader.used_blocks())

    # -- paths ----------------------------------------------------------------------------------
    def _where(self, entry):
        return f"{self.name}: {entry.path}"

    def _walk(self, rel, create, need_dir, where):
        """The node of `rel` (a list of components): format.tar_rules.walk
        over the tree (symlinks followed inside it, missing components made
        as 0755 directories with `create`)."""
        return tar_rules.walk(_NodeTree(where), self.root, rel, create, need_dir, where)

    # -- removal ----------------------------------------------------------------------------------
    def _remove_all(self, parent, name):
        """overlaybd's remove_all: drop parent/name recursively, sparing what
        this layer added (and directories still holding it)."""
        stack = [(parent, name, False)]
        while stack:
            par, nm, after = stack.pop()
            node = par.children.get(nm)
            if node is None:
                continue
            spared = (id(par), nm) in self._unpacked
            if not node.is_dir:
                if not spared:
                    del par.children[nm]
                continue
            if not after:
                stack.append((par, nm, True))
                stack.extend((node, c, False) for c in list(node.children))
            elif not spared and not node.children:
                del par.children[nm]

    # -- entries ----------------------------------------------------------------------------------
    def add(self, entry):
        if self._finished:
            raise UsageError(f"{self.name}: add() after finish()")
        where = self._where(entry)
        kind = TYPES.get(entry.type, False)
        if kind is False:
            raise UsageError(f"{where}: unknown entry type {entry.type!r}")
        action, parent_rel, base = tar_rules.classify(entry.path)
        if action == tar_rules.ROOT:
            if entry.type != "dir":
                raise ApplyError(f"{where}: the root can only be a directory, not {entry.type}")
            self._attrs(self.root, entry, where)
            return
        parent = self._walk(parent_rel.split("/") if parent_rel else [], True, True, where)
        if action == tar_rules.OPAQUE:
            for c in list(parent.children):
                self._remove_all(parent, c)
            return
        if action == tar_rules.META:
            log.debug("%s: whiteout meta file ignored (as overlaybd-apply does)", where)
            return
        if action == tar_rules.WHITEOUT:
            self._remove_all(parent, base)
            return
        _check_name(base, where)
        old = parent.children.get(base)
        if old is not None and not (old.is_dir and kind == _stat.S_IFDIR):
            del parent.children[base]
            old = None
        if entry.type == "hardlink":
            node = self._hardlink_target(entry, where)
        elif old is not None:
            node = old
        else:
            node = self._new(entry, kind, where)
        parent.children[base] = node
        self._attrs(node, entry, where)
        self._unpacked.add((id(parent), base))
        self._keep.append(parent)

    def _new(self, entry, kind, where):
        node = Node(kind | 0o777 if kind == _stat.S_IFLNK else kind)
        if kind == _stat.S_IFREG:
            size = _int(entry.size, "size", where)
            node.size = size
            if size:
                off = _int(entry.data_offset, "data_offset", where)
                if off % 512:
                    raise UsageError(f"{where}: data_offset = {off}: not a multiple of 512")
                node.data_offset = off
        elif kind == _stat.S_IFLNK:
            target = entry.linkname.encode("utf-8", "surrogateescape")
            if not target or len(target) > MAX_SYMLINK_TARGET:
                raise ApplyError(f"{where}: symlink target of {len(target)} bytes "
                                 f"(must be 1..{MAX_SYMLINK_TARGET})")
            node.target = target
        elif kind in (_stat.S_IFCHR, _stat.S_IFBLK):
            major, minor = _int(entry.devmajor, "devmajor", where), _int(entry.devminor, "devminor", where)
            if major > 0xFFF or minor > 0xFFFFF:
                raise UnsupportedError(f"{where}: device {major}:{minor} does not fit 12:20 bits")
            node.rdev = (major, minor)
        return node

    def _hardlink_target(self, entry, where):
        target = tar_rules.norm(entry.linkname)
        tparent_rel, tbase = posixpath.split(target)
        if not tbase:
            raise ApplyError(f"{where}: hard link to the root directory")
        tparent = self._walk(tparent_rel.split("/") if tparent_rel else [], False, True,
                             f"{where}: hard link target {entry.linkname!r}")
        node = tparent.children.get(tbase)
        if node is None:
            raise ApplyError(f"{where}: hard link target {entry.linkname!r} does not exist")
        if node.is_dir:
            raise ApplyError(f"{where}: hard link target {entry.linkname!r} is a directory")
        return node

    def _attrs(self, node, entry, where):
        node.uid = _int(entry.uid, "uid", where, 0xFFFFFFFF)
        node.gid = _int(entry.gid, "gid", where, 0xFFFFFFFF)
        if entry.mtime_ns is not None:
            ns = int(entry.mtime_ns)
        else:
            ns = int(round(float(entry.mtime) * 1e9))
        node.mtime, node.mtime_nsec = divmod(ns, 10**9)
        if node.fmt != _stat.S_IFLNK:
            node.mode = node.fmt | (_int(entry.mode, "mode", where) & 0o7777)
        for name, value in (entry.xattrs or {}).items():
            if not isinstance(value, (bytes, bytearray)):
                raise UsageError(f"{where}: xattr {name!r}: value must be bytes, not {type(value).__name__}")
            if name.startswith("user.") and node.fmt not in (_stat.S_IFREG, _stat.S_IFDIR):
                # the kernel has no user.* xattrs there (untar's setxattr gets EPERM and goes on)
                log.debug("%s: xattr %s on a non-regular, non-directory entry: dropped", where, name)
                continue
            node.xattrs[name] = bytes(value)

    # -- output ----------------------------------------------------------------------------------
    def finish(self):
        """(writes, mappings): writes [(disk byte offset, bytes)] of metadata
        (tag 0); mappings [(disk byte offset, length, tar offset)] of the new
        regular files' data (length = size rounded up to 512)."""
        self._finished = True
        writes, mappings, self.end_block = erofs_write.layout(self.root, self.bs, self.start_block,
                                                              name=self.name)
        return writes, mappings


class _NodeTree:
    """format.tar_rules.walk's view of the in-memory tree: nodes are Nodes;
    a directory it makes gets a name checked against erofs's limit."""

    def __init__(self, where):
        self.where = where

    @staticmethod
    def lookup(node, name):
        child = node.children.get(name)
        if child is None:
            return None, None
        if child.fmt == _stat.S_IFLNK:
            return "link", child.target.decode("utf-8", "surrogateescape")
        return ("dir" if child.is_dir else "other"), child

    def mkdir(self, node, name):
        _check_name(name, self.where)
        child = Node(_stat.S_IFDIR | 0o755)
        node.children[name] = child
        return child


def _int(value, field, where, limit=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or \
            (limit is not None and value > limit):
        raise UsageError(f"{where}: {field} = {value!r}: not a valid non-negative integer")
    return value


def _check_name(name, where):
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > NAME_LEN:
        raise ApplyError(f"{where}: name of {len(raw)} bytes (erofs allows {NAME_LEN})")
