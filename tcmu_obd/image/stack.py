"""An image: read-only layers stacked bottom to top, plus an optional
writable upper layer, read through one core Stack (docs/formats.md, Stacking read-only layers and Writable layer on top of a stack).

Builds the merged index once per stack and answers reads and writes of the
virtual disk; restack() turns the upper into the top lower and serves a new
upper, in place, while the device runs (the live snapshot,
tcmu_obd.image.snapshot).  It does not parse config files
(tcmu_obd.image.config) or fetch remote layers; it takes opened Layer and
RWLayer objects.
"""
import threading

from tcmu_obd import core
from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.format.lsmt import SECTOR

MAX_LAYERS = 255


class Image:
    def __init__(self, lowers, upper=None):
        """lowers: Layer objects bottom -> top (config order); upper: RWLayer or None."""
        if len(lowers) > MAX_LAYERS:
            raise FormatError("<config>", "lowers", len(lowers), f"at most {MAX_LAYERS} layers")
        self.lowers = list(lowers)
        self.upper = upper
        top_first = self.lowers[::-1]
        # file numbers (tags) in the core: each lower's backings, top first; a
        # warp (TurboOCI) lower has two, its meta file and its target
        files, bases, self.file_layer = [], [], []
        for pos, layer in enumerate(top_first):
            bases.append(len(files))
            for role, backing in enumerate(layer.backings):
                files.append(backing)
                self.file_layer.append((len(self.lowers) - 1 - pos, role))
        if len(files) > MAX_LAYERS:
            raise FormatError("<config>", "lowers", len(self.lowers),
                              f"{len(files)} files (meta files and TurboOCI targets); at most {MAX_LAYERS}")
        self._tag_of = bases[::-1]           # lowers[i]'s own file number
        warp = len(files) > len(top_first)
        self.lower_index = (core.merge([layer.index for layer in top_first], bases if warp else None)
                            if top_first else None)
        self.lower_files = list(files)
        ro_vsize = next((layer.virtual_size for layer in top_first if layer.virtual_size > 0), 0)
        upper_files = [upper.backing] if upper is not None else []
        if upper is not None:
            if upper.vsize == 0 and ro_vsize:
                upper.update_vsize(ro_vsize)
            if hasattr(upper, "upper_backings"):      # a warp upper (image.warp_rw): tag 0, tag 1
                upper_files = upper.upper_backings()
            files.extend(upper_files)
        self.stack = core.Stack(files, self.lower_index, upper.index if upper else None,
                                max(1, len(upper_files)))
        self.ro_vsize = ro_vsize
        self.remote = None        # the RemoteContext its remote layers use, if any
        self.downloader = None    # its download.Downloader (background download), if any
        self.prefetch = None      # its prefetch handle (trace record/replay, file list), if any
        # held by writes, discards and restack(): a write is in the upper it
        # found, whole, before a restack seals that upper
        self.lock = threading.Lock()
        self._retired = []        # uppers a restack sealed: their files are closed with the image

    @property
    def virtual_size(self):
        return self.upper.vsize if self.upper is not None else self.ro_vsize

    @property
    def writable(self):
        return self.upper is not None

    def read_into(self, buf, offset):
        self.stack.read_into(buf, offset)

    def read(self, offset, length):
        """Bytes of the virtual disk; any 512-aligned range (past the end reads as zeros)."""
        return self.stack.read(offset, length)

    def pread(self, offset, length):
        """Unaligned read, clamped to the virtual size."""
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        lo = offset - offset % SECTOR
        hi = -(-end // SECTOR) * SECTOR
        data = self.stack.read(lo, hi - lo)
        return data[offset - lo:end - lo]

    def write(self, data, offset):
        with self.lock:
            if self.upper is None:
                raise UsageError("the image has no upper layer: it is read-only")
            return self.upper.write(data, offset)

    def discard(self, offset, length):
        with self.lock:
            if self.upper is None:
                raise UsageError("the image has no upper layer: it is read-only")
            self.upper.discard(offset, length)

    def fsync(self):
        if self.upper is not None:
            self.upper.fsync()

    def effective_records(self, offset=0, length=None):
        """Merged records (sectors) with tags = file numbers (top-first lowers, then upper)."""
        if length is None:
            length = -(-self.virtual_size // SECTOR) - offset
        return self.stack.lookup(offset, length)

    def files(self):
        """Backings in tag order (a warp lower's target right after its meta file)."""
        out = [self.lowers[pos].backings[role] for pos, role in self.file_layer]
        if self.upper is not None:       # a warp upper (build tools): fsmeta, then its target
            out.extend(self.upper.upper_backings() if hasattr(self.upper, "upper_backings")
                       else [self.upper.backing])
        return out

    def layer_tag(self, i):
        """The core's file number (tag) of lowers[i]'s own (meta) file."""
        return self._tag_of[i]

    def restack(self, sealed, new_upper):
        """The live snapshot's stack change: `sealed` (the current upper's
        data file, sealed in place and opened read-only) becomes the top
        lower, `new_upper` (an open RWLayer) the upper.  The caller holds
        self.lock (no write is in the old upper) and has sealed it.

        File numbers of the layers already there do not change (the sealed
        layer takes the next free number, the new upper the one after), so
        a background download or a trace recording that named a file by
        its number still names the same one.  Reads in flight finish on the
        old stack; later ones see the new.  Nothing changes when this raises."""
        if self.upper is None or hasattr(self.upper, "upper_backings") or hasattr(new_upper, "upper_backings"):
            raise UsageError("restack needs a plain writable upper, before and after")
        tag = len(self.file_layer)
        if len(self.lowers) + 1 > MAX_LAYERS or tag + 1 > MAX_LAYERS:
            raise FormatError("<config>", "lowers", len(self.lowers) + 1,
                              f"a snapshot would make {tag + 1} read-only files; at most {MAX_LAYERS}")
        if len(sealed.backings) != 1:
            raise UsageError(f"{sealed.path}: a sealed upper has one file, not {len(sealed.backings)}")
        layers, bases = [sealed.index], [tag]
        if self.lower_index is not None:
            layers.append(self.lower_index)
            bases.append(0)
        lower_index = core.merge(layers, bases)
        if new_upper.vsize == 0:
            new_upper.update_vsize(self.virtual_size)
        self.stack.restack(tag, [sealed.backing, new_upper.backing], lower_index, new_upper.index, 1)
        # the stack serves the new layers: now the bookkeeping follows
        self.lowers.append(sealed)
        self.file_layer.append((len(self.lowers) - 1, 0))
        self._tag_of.append(tag)
        self.lower_index = lower_index
        self.lower_files = self.stack.backings[:tag + 1]
        if sealed.virtual_size > 0:
            self.ro_vsize = sealed.virtual_size
        self._retired.append(self.upper)
        self.upper = new_upper

    def close(self):
        if self.prefetch is not None:
            self.prefetch.stop()
        if self.downloader is not None:
            self.downloader.stop()
        for layer in self.lowers:
            layer.close()
        if self.upper is not None:
            self.upper.close()
        for old in self._retired:
            old.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
