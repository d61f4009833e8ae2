"""Shared pieces of the pure-Python twin (tcmu_obd.core.reference): the
format constants, the conversion of arguments the way Cython converts them
to C integers and buffers (so both cores fail alike on bad arguments), and
ReadFail, the twin's form of the C core's Err record, with raise_fail().

It holds no index, backing or stack logic; the sibling modules do.
"""
import operator

from tcmu_obd.core import readerr


# ---------------------------------------------------------------- constants
INVALID_OFFSET = (1 << 50) - 1       # offset of a padding record; also the largest record end
MAX_LENGTH = (1 << 14) - 1           # sectors a record can hold
MAX_MOFFSET = (1 << 55) - 1
SECTOR = 512
MAX_INDEX = 128000000                # records in one Index
SALT = 100007                        # seed of a ZFile block's CRC
ALGO_LZ4 = 1
ALGO_ZSTD = 2
ZSTD_LEVEL = 3
COALESCE_MAX = 1 << 20               # largest single pread of compressed bytes
VERIFY_STEP = 16 << 20               # verify_all decodes this many bytes per step
LZ4_MAX_INPUT_SIZE = 0x7E000000
U32, U64 = (1 << 32) - 1, (1 << 64) - 1

# error codes of a failed backing read (the C core's Err.code): one table for both cores
E_IO, E_SHORT, E_CRC, E_DECODE, E_RANGE, E_TAG, E_MISS = (
    readerr.E_IO, readerr.E_SHORT, readerr.E_CRC, readerr.E_DECODE, readerr.E_RANGE, readerr.E_TAG, readerr.E_MISS)
MAX_CRC_RETRIES = 2      # evict-and-refetch rounds per cached block that fails its check
MAX_MISS_ROUNDS = 64     # fetch rounds one read may need (misses evicted again before use)


# ---------------------------------------------------------------- argument conversion
def cint(v, bits, signed=False, what=None):
    """Convert v the way Cython converts an argument to a C integer: __index__,
    else __int__ (so floats truncate), else TypeError; OverflowError when the
    value does not fit."""
    t = type(v)
    if hasattr(t, "__index__"):
        n = operator.index(v)
    elif hasattr(t, "__int__"):
        n = int(v)
    else:
        raise TypeError("an integer is required")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if n < lo:
        raise OverflowError(f"can't convert negative value to {what or 'uint%d_t' % bits}"
                            if not signed else f"value too small to convert to {what or 'int'}")
    if n > hi:
        raise OverflowError(f"value too large to convert to {what or ('int' if signed else 'uint%d_t' % bits)}")
    return n


def u64(v):
    return cint(v, 64)


def u32(v):
    return cint(v, 32)


def u8(v):
    return cint(v, 8)


def c_int(v):
    return cint(v, 32, signed=True, what="int")


def ssize(v):
    """A Py_ssize_t argument: __index__ only."""
    n = operator.index(v)
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


def check_name(v, arg="name"):
    if v is not None and type(v) is not str:
        raise TypeError(f"Argument '{arg}' has incorrect type (expected str, got {type(v).__name__})")
    return v


def typed(v, cls, arg, none_ok=True):
    if v is None and none_ok:
        return v
    if not isinstance(v, cls):
        raise TypeError(f"Argument '{arg}' has incorrect type (expected {cls.__name__}, "
                        f"got {type(v).__name__})")
    return v


def rbuf(data):
    """A flat read-only byte view of a C-contiguous buffer (PyBUF_SIMPLE)."""
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def wbuf(data):
    """A flat writable byte view (PyBUF_WRITABLE)."""
    mv = memoryview(data)
    if mv.readonly:
        raise BufferError("Object is not writable.")
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


class ReadFail(Exception):
    """A failed backing read, as the C core's Err struct."""

    def __init__(self, code, a=0, b=0, c=0, err_no=0):
        super().__init__(code)
        self.code, self.a, self.b, self.c, self.err_no = code, a, b, c, err_no
        self.which = -1


def raise_fail(err, files):
    """Raise the package's exception for a ReadFail, as _lsmt.raise_err does
    (the messages: tcmu_obd.core.readerr)."""
    name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
    raise readerr.exception(err.code, name, err.err_no, err.a, err.b, err.c)
