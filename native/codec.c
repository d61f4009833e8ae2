/* Per-thread zstd contexts (see codec.h).  Contexts are freed when their
 * thread exits.  Nothing else lives here: LZ4 needs no context. */
#include "codec.h"
#include "mapguard.h"
#include <pthread.h>
#include <stdlib.h>
#include "lz4zstd.h"              /* our declarations: no libzstd-dev needed */

static pthread_key_t dkey, ckey;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static uint64_t armed_allocs;

static void *guarded_alloc(void *opaque, size_t n)
{
    (void)opaque;
    if (obd_mapguard_armed()) {
        __atomic_add_fetch(&armed_allocs, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    return malloc(n);
}

static void guarded_free(void *opaque, void *p)
{
    (void)opaque;
    free(p);
}

static const ZSTD_customMem mem = {guarded_alloc, guarded_free, NULL};

static void free_dctx(void *p) { ZSTD_freeDCtx((ZSTD_DCtx *)p); }
static void free_cctx(void *p) { ZSTD_freeCCtx((ZSTD_CCtx *)p); }

static void init_keys(void)
{
    pthread_key_create(&dkey, free_dctx);
    pthread_key_create(&ckey, free_cctx);
}

static ZSTD_DCtx *dctx(void)
{
    pthread_once(&once, init_keys);
    ZSTD_DCtx *d = pthread_getspecific(dkey);
    if (d == NULL) {
        d = ZSTD_createDCtx_advanced(mem);
        if (d != NULL)
            pthread_setspecific(dkey, d);
    }
    return d;
}

int obd_codec_prepare(void)
{
    return dctx() != NULL ? 0 : -1;
}

size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t n)
{
    ZSTD_DCtx *d = dctx();
    if (d == NULL)
        return (size_t)-1;              /* a zstd error code (GENERIC) */
    return ZSTD_decompressDCtx(d, dst, cap, src, n);
}

size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t n, int level)
{
    pthread_once(&once, init_keys);
    ZSTD_CCtx *c = pthread_getspecific(ckey);
    if (c == NULL) {
        c = ZSTD_createCCtx_advanced(mem);
        if (c == NULL)
            return (size_t)-1;
        pthread_setspecific(ckey, c);
    }
    return ZSTD_compressCCtx(c, dst, cap, src, n, level);
}

uint64_t obd_codec_armed_allocs(void)
{
    return __atomic_load_n(&armed_allocs, __ATOMIC_RELAXED);
}
