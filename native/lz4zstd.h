/*
 * Our own declarations of the few liblz4 and libzstd functions the Cython
 * core calls, so that building tcmu-obd needs only the runtime libraries
 * every Debian has (liblz4.so.1, libzstd.so.1; setup.py links them by
 * soname) and not the liblz4-dev / libzstd-dev headers.  Written from the
 * libraries' documented API (lz4.h of LZ4 1.9, zstd.h of zstd 1.5).
 *
 * Not a general binding: add a declaration here only when the core starts
 * calling the function.  The two *_advanced constructors belong to zstd's
 * "static linking only" section; libzstd.so.1 exports them and their
 * signatures have not changed since zstd 1.0, which is why they are safe to
 * declare against the shared library.
 */
#ifndef TCMU_OBD_LZ4ZSTD_H
#define TCMU_OBD_LZ4ZSTD_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- liblz4 (block API) ------------------------------------------------- */
/* Compress srcSize bytes into at most dstCapacity; bytes written, 0 on failure. */
int LZ4_compress_default(const char *src, char *dst, int srcSize, int dstCapacity);
/* Decompress a block; bytes written, or a negative number on malformed input. */
int LZ4_decompress_safe(const char *src, char *dst, int compressedSize, int dstCapacity);
/* Worst-case compressed size of inputSize bytes (0 if too large). */
int LZ4_compressBound(int inputSize);

/* ---- libzstd -------------------------------------------------------------- */
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;

typedef void *(*ZSTD_allocFunction)(void *opaque, size_t size);
typedef void (*ZSTD_freeFunction)(void *opaque, void *address);
typedef struct {
    ZSTD_allocFunction customAlloc;
    ZSTD_freeFunction customFree;
    void *opaque;
} ZSTD_customMem;

/* Results are sizes, or error codes that ZSTD_isError() recognises. */
size_t ZSTD_compressBound(size_t srcSize);
unsigned ZSTD_isError(size_t code);

ZSTD_CCtx *ZSTD_createCCtx_advanced(ZSTD_customMem customMem);
ZSTD_DCtx *ZSTD_createDCtx_advanced(ZSTD_customMem customMem);
size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
size_t ZSTD_compressCCtx(ZSTD_CCtx *cctx, void *dst, size_t dstCapacity,
                         const void *src, size_t srcSize, int compressionLevel);
size_t ZSTD_decompressDCtx(ZSTD_DCtx *dctx, void *dst, size_t dstCapacity,
                           const void *src, size_t srcSize);

#ifdef __cplusplus
}
#endif

#endif
