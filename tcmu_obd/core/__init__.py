"""Picks the implementation of the read core: the Cython module _lsmt, or
its pure-Python twin tcmu_obd.core.reference when TCMU_OBD_PURE=1 is set (for
debugging and for machines where the extension did not build).

Everything above the core imports it from here and nowhere else; this module
holds no logic of its own.
"""
import os

if os.environ.get("TCMU_OBD_PURE") == "1":
    from tcmu_obd.core.reference import (GzipBacking, Index, Presence, RawBacking, Stack, ZFileBacking,  # noqa: F401
                                         compress_blocks, crc32c, fetch_all, merge)
    IMPLEMENTATION = "python"
else:
    from tcmu_obd.core._lsmt import (GzipBacking, Index, Presence, RawBacking, Stack, ZFileBacking,  # noqa: F401
                                     compress_blocks, crc32c, fetch_all, merge)
    IMPLEMENTATION = "cython"
