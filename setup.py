"""Build script: the Cython core (_lsmt) links liblz4, libzstd and our CRC32C."""
from setuptools import Extension, setup
from Cython.Build import cythonize

ext = Extension(
    "tcmu_obd._lsmt",
    sources=["tcmu_obd/_lsmt.pyx", "native/crc32c.c", "native/codec.c", "native/blockcache.c", "native/presence.c"],
    include_dirs=["native"],
    libraries=["lz4", "zstd", "pthread"],
    extra_compile_args=["-O2"],
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
