"""Pure-Python twin of the Cython read core tcmu_obd.core._lsmt, with the same API.

This package only gathers the names; the parts follow the seams of _lsmt:
index (records, Index, merge), backing (crc32c, backings, block codec,
compress_blocks), cache (Presence, fetch_all, recover), stack (Stack), bench
(bench_* functions, benchmark only) and _common (constants, argument
conversion, the read-failure record).

It is the model the fast path is checked against: the differential tests
(tests/test_reference_differential.py) and the fuzzer (fuzz/fuzz_core_diff.py)
run both modules on the same inputs and require the same results, or the same
exception class with the same field names.  tcmu_obd.core also selects it when
TCMU_OBD_PURE=1 (debugging, or a machine where the extension did not build).
It is written to be read: plain lists of tuples, bisect, os.preadv, and the
lz4 / zstandard / crc32c packages.  It is not the fast path: it holds the GIL,
copies, and is one to three orders of magnitude slower; nothing should depend
on its speed.  Records are (offset, length, moffset, zeroed, tag) tuples in
512-byte sectors, exactly as _lsmt.Index.record() returns them.

Where the answer depends on machinery rather than on the format, it copies
that machinery so the two agree exactly: C integer argument conversion
(OverflowError/TypeError), the coalescing of adjacent reads (it decides which
error a failing read reports), and the order of validation checks.  It has no
block cache: _lsmt serves partial ZFile blocks it decoded before from memory
and skips their bytes, so for a truncated ZFile the span named in a ReadError
("inside a read of N bytes at byte X") may differ.  Two more
things are outside the contract and may differ: results of lookups, inserts
and merges on an Index that is not sorted and non-overlapping (check_sorted()
!= -1; layer code rejects such indexes before using them), and the `value`
of a CorruptDataError for an undecodable block (the C core reports the
codec's return code, which a Python binding does not expose).  Compressed
bytes may differ too: python-lz4 compresses through the streaming API and
the zstandard wheel bundles its own libzstd, so only the round trip is the
same (see compress_blocks).
"""
from tcmu_obd.core.reference._common import SALT
from tcmu_obd.core.reference.index import Index, merge
from tcmu_obd.core.reference.cache import Presence, fetch_all
from tcmu_obd.core.reference.backing import (CRC_HW, Backing, RawBacking, ZFileBacking,
                                             compress_blocks, crc32c, crc32c_table)
from tcmu_obd.core.reference.stack import Stack
from tcmu_obd.core.reference.gz import GzipBacking
from tcmu_obd.core.reference.bench import bench_find

__all__ = ["SALT", "CRC_HW", "crc32c", "Index", "merge", "Backing", "RawBacking", "ZFileBacking", "Presence",
           "fetch_all", "Stack", "GzipBacking", "compress_blocks", "bench_find", "crc32c_table"]
