"""The error codes of a failed read in the core, and the one table that turns
a code into the package's exception.

Both implementations of the core use it: the Cython module _lsmt reports a
failed read as an Err struct (code, errno, three numbers) and mirrors these
codes in a `cdef enum` (its READ_ERROR_CODES dict exports that enum, and a
test holds the two equal); the pure-Python twin (tcmu_obd.core.reference)
raises them as an internal exception.  Either hands the code and numbers to
exception() for the user-facing error.  This module holds no read logic and
no retry policy (what is fetched or refetched after which code is decided by
each core's recover step).
"""
import os

from tcmu_obd.errors import CorruptDataError, ReadError, UsageError

E_IO = 1          # pread failed: a = file offset, err_no = errno
E_SHORT = 2       # the file ended: a = offset of the read, b = its length, c = bytes read
E_CRC = 3         # a ZFile block failed its CRC: a = block, b = stored, c = computed
E_DECODE = 4      # a ZFile block did not decompress: a = block, b = codec result, c = wanted length
E_RANGE = 5       # a record points past the backing: a = offset, b = length, c = backing size
E_NOMEM = 6       # an allocation failed: a = bytes
E_TAG = 7         # a lower record names no file: a = sector, b = tag
E_MISS = 8        # not in the cache file yet: a = file offset, b = length
E_MAPFAULT = 9    # SIGBUS reading a mapping: a = block (the read is redone with pread)
E_INFLATE = 10    # a gzip blob did not inflate: a = access point, b = zlib code or 1/2/3 (see below), c = offset

CODES = {"E_IO": E_IO, "E_SHORT": E_SHORT, "E_CRC": E_CRC, "E_DECODE": E_DECODE, "E_RANGE": E_RANGE,
         "E_NOMEM": E_NOMEM, "E_TAG": E_TAG, "E_MISS": E_MISS, "E_MAPFAULT": E_MAPFAULT,
         "E_INFLATE": E_INFLATE}


def _signed64(v):
    """A codec's size_t return code as the signed value it stands for."""
    return v - (1 << 64) if v >= (1 << 63) else v


def exception(code, name, err_no=0, a=0, b=0, c=0):
    """The exception (not raised) for a read of backing `name` that failed
    with `code` and the numbers the code defines (see the table above)."""
    if code == E_IO:
        return ReadError(f"{name}: read at byte {a} failed: {os.strerror(err_no)}")
    if code == E_SHORT:
        return ReadError(f"{name}: file ends at byte {a + c} inside a read of {b} bytes at byte {a} (truncated?)")
    if code == E_CRC:
        return CorruptDataError(name, f"zfile block {a} crc", b, f"computed crc is 0x{c:08x}")
    if code == E_DECODE:
        return CorruptDataError(name, f"zfile block {a}", _signed64(b), f"block does not decompress to {c} bytes")
    if code == E_RANGE:
        return CorruptDataError(name, "moffset", a,
                                f"read of {b} bytes runs past the end of the layer data ({c} bytes)")
    if code == E_MISS:
        return ReadError(f"{name}: bytes {a}..{a + b} are not in the cache and no fetcher is attached")
    if code == E_MAPFAULT:
        return ReadError(f"{name}: reading zfile block {a} through the mapping faulted "
                         f"(SIGBUS: the file shrank or its device failed)")
    if code == E_INFLATE:
        return _inflate_error(name, a, _signed64(b), c)
    if code == E_NOMEM:
        return MemoryError(f"{name}: cannot allocate {a} bytes")
    if code == E_TAG:
        return UsageError(f"lower record at sector {a} has tag {b}, no such file")
    return ReadError(f"{name}: read failed (code {code})")


def _inflate_error(name, point, why, offset):
    """E_INFLATE: why is zlib's (negative) code, or 1: the deflate stream ended
    at uncompressed byte `offset`, before the index's uncompress_file_size;
    2: the gzip blob ended (compressed byte `offset`) inside the stream;
    3: access point `point`'s stored window (at `offset` in the window area)
    did not inflate to 32768 bytes."""
    field = f"gzip stream from access point {point}"
    if why == 1:
        return CorruptDataError(name, "uncompress_file_size", offset,
                                f"the deflate stream ends at uncompressed byte {offset}, before the size "
                                f"the gzip index gives (wrong index for this blob?)")
    if why == 2:
        return CorruptDataError(name, field, offset,
                                "the gzip blob ends inside the deflate stream (truncated blob?)")
    if why == 3:
        return CorruptDataError(name, f"window of access point {point}", offset,
                                "does not inflate to 32768 bytes")
    return CorruptDataError(name, field, why,
                            f"zlib cannot inflate it (error {why}) near compressed byte {offset} "
                            f"(corrupt blob, or an index made for another blob?)")
