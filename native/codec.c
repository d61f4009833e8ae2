/* Per-thread zstd contexts (see codec.h).  Contexts are freed when their
 * thread exits.  Nothing else lives here: LZ4 needs no context. */
#include "codec.h"
#include <pthread.h>
#include <zstd.h>

static pthread_key_t dkey, ckey;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void free_dctx(void *p) { ZSTD_freeDCtx((ZSTD_DCtx *)p); }
static void free_cctx(void *p) { ZSTD_freeCCtx((ZSTD_CCtx *)p); }

static void init_keys(void)
{
    pthread_key_create(&dkey, free_dctx);
    pthread_key_create(&ckey, free_cctx);
}

size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t n)
{
    pthread_once(&once, init_keys);
    ZSTD_DCtx *d = pthread_getspecific(dkey);
    if (d == NULL) {
        d = ZSTD_createDCtx();
        if (d == NULL)
            return (size_t)-1;          /* a zstd error code (GENERIC) */
        pthread_setspecific(dkey, d);
    }
    return ZSTD_decompressDCtx(d, dst, cap, src, n);
}

size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t n, int level)
{
    pthread_once(&once, init_keys);
    ZSTD_CCtx *c = pthread_getspecific(ckey);
    if (c == NULL) {
        c = ZSTD_createCCtx();
        if (c == NULL)
            return (size_t)-1;
        pthread_setspecific(ckey, c);
    }
    return ZSTD_compressCCtx(c, dst, cap, src, n, level);
}
