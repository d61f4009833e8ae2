/*
 * Our own declarations of the few zlib functions the Cython core calls (the
 * gzip index reader and writer, tcmu_obd/core/_lsmt_gzip.pxi), so that
 * building tcmu-obd needs only the runtime library every Debian has
 * (libz.so.1; setup.py links it by soname), not zlib1g-dev.  Written from
 * zlib's documented API (zlib.h of zlib 1.2).
 *
 * z_stream's layout is part of zlib's stable ABI (every 1.x release); the
 * *Init*_ entry points take the library version and sizeof(z_stream) so the
 * library can refuse a mismatch: we pass zlibVersion() (the running
 * library's own string, which always has the major version it checks) and
 * our sizeof.  Not a general binding: add a declaration only when the core
 * starts calling it.
 */
#ifndef TCMU_OBD_ZLIBDECL_H
#define TCMU_OBD_ZLIBDECL_H

#ifdef __cplusplus
extern "C" {
#endif

typedef void *(*obd_z_alloc_func)(void *opaque, unsigned items, unsigned size);
typedef void (*obd_z_free_func)(void *opaque, void *address);

typedef struct obd_z_stream {
    const unsigned char *next_in;
    unsigned avail_in;
    unsigned long total_in;
    unsigned char *next_out;
    unsigned avail_out;
    unsigned long total_out;
    const char *msg;
    void *state;
    obd_z_alloc_func zalloc;
    obd_z_free_func zfree;
    void *opaque;
    int data_type;
    unsigned long adler;
    unsigned long reserved;
} obd_z_stream;

#define OBD_Z_OK 0
#define OBD_Z_STREAM_END 1
#define OBD_Z_NEED_DICT 2
#define OBD_Z_BUF_ERROR (-5)
#define OBD_Z_NO_FLUSH 0
#define OBD_Z_FINISH 4
#define OBD_Z_BLOCK 5

const char *zlibVersion(void);
int inflateInit2_(obd_z_stream *strm, int windowBits, const char *version, int stream_size);
int inflate(obd_z_stream *strm, int flush);
int inflateEnd(obd_z_stream *strm);
int inflatePrime(obd_z_stream *strm, int bits, int value);
int inflateSetDictionary(obd_z_stream *strm, const unsigned char *dictionary, unsigned dictLength);

/* inflateInit2() as zlib.h's macro spells it */
static inline int obd_inflate_init2(obd_z_stream *strm, int window_bits)
{
    return inflateInit2_(strm, window_bits, zlibVersion(), (int)sizeof(obd_z_stream));
}

#ifdef __cplusplus
}
#endif

#endif
