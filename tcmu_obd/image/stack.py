"""An image: read-only layers stacked bottom to top, plus an optional
writable upper layer, read through one core Stack (docs/formats.md, Stacking read-only layers and Writable layer on top of a stack).

Builds the merged index once per stack and answers reads and writes of the
virtual disk.  It does not parse config files (tcmu_obd.image.config) or fetch
remote layers; it takes opened Layer and RWLayer objects.
"""
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
        self._bases = bases
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
        if self.upper is None:
            raise UsageError("the image has no upper layer: it is read-only")
        return self.upper.write(data, offset)

    def discard(self, offset, length):
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
        out = [b for layer in self.lowers[::-1] for b in layer.backings]
        if self.upper is not None:       # a warp upper (build tools): fsmeta, then its target
            out.extend(self.upper.upper_backings() if hasattr(self.upper, "upper_backings")
                       else [self.upper.backing])
        return out

    def layer_tag(self, i):
        """The core's file number (tag) of lowers[i]'s own (meta) file."""
        return self._bases[len(self.lowers) - 1 - i]

    def close(self):
        if self.prefetch is not None:
            self.prefetch.stop()
        if self.downloader is not None:
            self.downloader.stop()
        for layer in self.lowers:
            layer.close()
        if self.upper is not None:
            self.upper.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
