# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython read core of tcmu-obd: index records, lookup, stack merge,
read-merge into the caller's buffer, and ZFile block decode/encode.  This
file only binds the parts together; each concept lives in one of the
_lsmt_*.pxi files included below.

It knows sectors, records, file descriptors and compressed blocks; it knows
nothing of headers, configs, paths or registries (tcmu_obd.image.layer and
tcmu_obd.image.stack do that and hand it open descriptors and parsed tables).  Every
loop over records, buffers or blocks runs with the GIL released; a read costs
one Python call.  tcmu_obd.core.reference is a pure-Python twin of this module with
the same API, and the differential tests hold the two to the same answers.

Units: every offset/length/moffset of a record is in 512-byte sectors; every
argument named *_bytes, and the offsets of read()/read_into(), are bytes.
"""

from libc.stdint cimport uint64_t, uint32_t, uint8_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR, EINVAL
from posix.unistd cimport pread
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pycapsule cimport PyCapsule_New
from cpython.exc cimport PyErr_CheckSignals
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from tcmu_obd.errors import FormatError, ReadError, UsageError
from tcmu_obd.core import readerr
from tcmu_obd import stats

# The parts, by concept; one extension module, because the TCMU ring takes a
# C function pointer from it (STACK_READ) and the parts share cdef functions
# and structs.  Order matters only for readers: declarations first.
include "_lsmt_native.pxi"      # C declarations, integer constants, read-error codes
include "_lsmt_index.pxi"       # records, Index (flat or B+tree), merge
include "_lsmt_backing.pxi"     # Backing, RawBacking, ZFileBacking, block decode, mapguard, crc32c, compress_blocks
include "_lsmt_cache.pxi"       # Presence, fetch_all, recover, raise_err
include "_lsmt_gzip.pxi"        # GzipBacking (gzip blob through a ddgzidx index), GzipScanner (index producer)
include "_lsmt_stack.pxi"       # Stack, stack_read_nogil (the TCMU ring's entry point)
include "_lsmt_bench.pxi"       # bench_* functions: benchmark only
