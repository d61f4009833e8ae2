"""Build script: the Cython core (_lsmt) links liblz4, libzstd, zlib and our CRC32C.

liblz4, libzstd and zlib are linked by soname (liblz4.so.1, libzstd.so.1,
libz.so.1) and declared in native/lz4zstd.h and native/zlibdecl.h, so only the runtime
libraries are needed, not their -dev packages.

TCMU_OBD_ASAN=1 compiles the extensions with AddressSanitizer but does not
link its runtime: the fuzz harnesses preload atheris's ASan+libFuzzer
runtime (fuzz/asan.sh builds into build/asan, leaving the in-place build alone).
"""
import os
import sys

import shutil
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from Cython.Build import cythonize

CFLAGS = ["-O2"]
if os.environ.get("TCMU_OBD_ASAN") == "1":
    CFLAGS = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]

ext = Extension(
    "tcmu_obd.core._lsmt",
    sources=["tcmu_obd/core/_lsmt.pyx", "native/crc32c.c", "native/codec.c", "native/blockcache.c", "native/presence.c",
             "native/mapguard.c", "native/rwindex.c"],
    include_dirs=["native"],
    libraries=[":liblz4.so.1", ":libzstd.so.1", ":libz.so.1", "pthread"],   # runtime sonames: no -dev packages
    extra_compile_args=CFLAGS,
)


def _have_libtcmu():
    """Debian's libtcmu2 ships only libtcmu.so.2 (no -dev package, no header:
    native/libtcmu.h is ours).  Without it the TCMU module is skipped."""
    import ctypes
    try:
        ctypes.CDLL("libtcmu.so.2")
        return True
    except OSError:
        print("setup.py: libtcmu.so.2 not found (apt-get install libtcmu2): "
              "building without tcmu_obd.serve._tcmu", file=sys.stderr)
        return False


exts = [ext]
if os.environ.get("TCMU_OBD_ASAN") == "1":
    pass        # the fuzz harnesses need only the core
elif _have_libtcmu():
    exts.append(Extension(
        "tcmu_obd.serve._tcmu",
        sources=["tcmu_obd/serve/_tcmu.pyx"],
        include_dirs=["native"],
        libraries=[":libtcmu.so.2", "pthread"],
        extra_compile_args=CFLAGS,
    ))

class BuildExt(build_ext):
    """build_ext that says in one line what to install when the C compiler
    or the Python headers are missing, instead of a compiler traceback."""

    def build_extensions(self):
        cc = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else "gcc"
        if shutil.which(cc) is None:
            sys.exit(f"tcmu-obd: no C compiler ({cc!r} not found): install gcc "
                     "(apt-get install gcc python3-dev), or set CC")
        include = sysconfig.get_paths()["include"]
        if not os.path.isfile(os.path.join(include, "Python.h")):
            sys.exit(f"tcmu-obd: no Python headers ({include}/Python.h missing): "
                     "install them (apt-get install python3-dev)")
        super().build_extensions()


setup(ext_modules=cythonize(exts, compiler_directives={"language_level": 3}),
      cmdclass={"build_ext": BuildExt})
