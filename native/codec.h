/* zstd with one reusable context per thread for the Cython core: creating a
 * context per block costs more than decoding a 4 KiB block.  Same output as
 * ZSTD_compress / ZSTD_decompress.  Errors are zstd error codes.
 *
 * A decode inside a SIGBUS-guarded call (mapguard.h) must not allocate: a
 * jump out of malloc would leave the heap broken.  So obd_codec_prepare()
 * makes this thread's decompression context before arming, and every zstd
 * allocation goes through an allocator that refuses (NULL, counted) while
 * this thread is armed.  Not a general codec layer: LZ4 needs no context. */
#ifndef OBD_CODEC_H
#define OBD_CODEC_H
#include <stddef.h>
#include <stdint.h>

/* Make this thread's decompression context if it has none.  0 or -1. */
int obd_codec_prepare(void);
size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t n);
size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t n, int level);
/* zstd allocations refused because the thread was inside a guarded call
 * (all threads; 0 unless a guarded decode skipped obd_codec_prepare). */
uint64_t obd_codec_armed_allocs(void);

#endif
