"""Declarations shared by every part of the Cython core (tcmu_obd.core._lsmt
includes this first): the C functions of native/*.h, liblz4, libzstd and
pthreads it calls, the record struct of native/rwindex.h, and the integer
constants (enums: sizes, backing kinds, read-error codes).

It defines no functions and no classes; the code that uses these lives in
the other _lsmt_*.pxi files.  The read-error codes are spelled once more in
tcmu_obd.core.readerr, the Python side, and a test holds the two equal.
"""

cdef extern from "crc32c.h" nogil:
    uint32_t obd_crc32c(uint32_t seed, const void *data, size_t n)
    int obd_crc32c_hw()

cdef extern from "lz4zstd.h" nogil:           # our declarations (native/lz4zstd.h)
    int LZ4_decompress_safe(const char *src, char *dst, int csize, int cap)
    int LZ4_compress_default(const char *src, char *dst, int size, int cap)
    int LZ4_compressBound(int size)

cdef extern from "blockcache.h" nogil:
    ctypedef struct obd_bcache:
        pass
    obd_bcache *obd_bcache_new(unsigned nslots, size_t block_size)
    void obd_bcache_free(obd_bcache *c)
    int obd_bcache_get(obd_bcache *c, uint64_t blk, char *dst, size_t at, size_t n)
    void obd_bcache_put(obd_bcache *c, uint64_t blk, char **buf)

cdef extern from "presence.h" nogil:
    ctypedef struct obd_presence:
        uint64_t *bits
        uint64_t nunits
        unsigned shift
        uint64_t size
        uint64_t used
    int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift)
    void obd_presence_destroy(obd_presence *p)
    void obd_presence_set(obd_presence *p, uint64_t off, uint64_t n, int on)
    int obd_presence_missing(const obd_presence *p, uint64_t off, uint64_t n, uint64_t *moff, uint64_t *mlen)
    uint64_t obd_presence_count(const obd_presence *p, uint64_t off, uint64_t n)
    void obd_presence_touch(obd_presence *p)
    uint64_t obd_presence_evict(obd_presence *p, int fd, uint64_t off, uint64_t n, int *err)
    int obd_presence_pread(obd_presence *p, int fd, char *dst, uint64_t off, uint64_t n)
    int obd_presence_store(obd_presence *p, int fd, const char *src, uint64_t off, uint64_t n)
    int obd_presence_rdlock "pthread_rwlock_rdlock"(void *lock)
    int obd_presence_unlock "pthread_rwlock_unlock"(void *lock)

cdef extern from * nogil:
    """
    #define OBD_PRESENCE_LOCK(p) (&(p)->lock)
    """
    void *OBD_PRESENCE_LOCK(obd_presence *p)

cdef extern from "codec.h" nogil:
    int obd_codec_prepare()
    uint64_t obd_codec_armed_allocs()
    size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t csize)
    size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t size, int level)

cdef extern from "mapguard.h" nogil:
    int OBD_GUARD_FAULT
    int obd_mapguard_install()
    int obd_guarded(int (*fn)(void *) noexcept nogil, void *arg, const void *lo, size_t length)
    uint64_t obd_mapguard_recovered()
    int obd_map(int fd, uint64_t off, uint64_t length, const char **base, void **mapping, size_t *maplen)
    void obd_unmap(void *mapping, size_t maplen)

cdef extern from "lz4zstd.h" nogil:
    size_t ZSTD_compressBound(size_t size)
    unsigned ZSTD_isError(size_t code)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *, void *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)

# ---------------------------------------------------------------- constants
cdef extern from *:
    """
    #define OBD_INVALID_OFFSET ((uint64_t)((1ULL << 50) - 1))
    #define OBD_MAX_LENGTH ((uint64_t)((1ULL << 14) - 1))
    #define OBD_MAX_MOFFSET ((uint64_t)((1ULL << 55) - 1))
    """
    const uint64_t INVALID_OFFSET "OBD_INVALID_OFFSET"
    const uint64_t MAX_LENGTH "OBD_MAX_LENGTH"
    const uint64_t MAX_MOFFSET "OBD_MAX_MOFFSET"
cdef enum:
    SECTOR = 512
    MAX_INDEX = 128000000           # records in one Index
    ZF_SALT = 100007                # seed of a ZFile block's CRC
    ALGO_LZ4 = 1
    ALGO_ZSTD = 2
    ZSTD_LEVEL = 3
    COALESCE_MAX = 1 << 20          # largest single pread of compressed bytes
    STACK_CBUF = 16384              # compressed bytes a ZFile read keeps on the stack
    BLOCK_CACHE_SLOTS = 64          # decoded blocks kept per ZFile (<= 4 MiB at 64 KiB blocks)
    MAX_MISSES = 64                 # cache misses one stack read collects before it asks for them
    REPLAY_CHUNK = 65536            # log records replayed per GIL-free step; signals are checked between steps
    SIGNAL_EVERY = 65536            # records a loop holding the GIL handles between signal checks

# the kinds of backing (BackingC.kind)
cdef enum:
    K_RAW = 1
    K_ZFILE = 2
    K_GZIP = 3        # GzipBacking (_lsmt_gzip.pxi): BackingC.gz is its GzC

# Err.code of a failed read: the values of tcmu_obd.core.readerr, which turns
# them into exceptions (READ_ERROR_CODES exports them for the test that the
# two agree)
cdef enum:
    E_IO = 1
    E_SHORT = 2
    E_CRC = 3
    E_DECODE = 4
    E_RANGE = 5
    E_NOMEM = 6
    E_TAG = 7
    E_MISS = 8
    E_MAPFAULT = 9
    E_INFLATE = 10

READ_ERROR_CODES = {"E_IO": E_IO, "E_SHORT": E_SHORT, "E_CRC": E_CRC, "E_DECODE": E_DECODE, "E_RANGE": E_RANGE,
                    "E_NOMEM": E_NOMEM, "E_TAG": E_TAG, "E_MISS": E_MISS, "E_MAPFAULT": E_MAPFAULT,
                    "E_INFLATE": E_INFLATE}

SALT = ZF_SALT

# ---------------------------------------------------------------- records (native/rwindex.h)
cdef extern from "rwindex.h" nogil:
    ctypedef struct Rec "obd_rec":
        uint64_t offset
        uint64_t moffset
        uint32_t length
        uint8_t zeroed
        uint8_t tag
    ctypedef struct obd_rwidx:
        pass
    ctypedef struct obd_rwcur:
        void *leaf
        int pos
    obd_rwidx *obd_rwidx_new()
    void obd_rwidx_free(obd_rwidx *t)
    uint64_t obd_rwidx_count(const obd_rwidx *t)
    int obd_rwidx_height(const obd_rwidx *t)
    int obd_rwidx_insert(obd_rwidx *t, const Rec *r)
    const Rec *obd_rwidx_seek(const obd_rwidx *t, uint64_t x, obd_rwcur *c)
    const Rec *obd_rwcur_next(obd_rwcur *c)
    void obd_rwidx_copy(const obd_rwidx *t, Rec *out)
    int obd_rwidx_check(const obd_rwidx *t)
    int obd_rwlock_init_wpref(pthread_rwlock_t *l)
    int obd_rwlock_probe_writer_pref(pthread_rwlock_t *l)
