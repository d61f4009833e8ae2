/* zstd with one reusable context per thread for the Cython core: creating a
 * context per block costs more than decoding a 4 KiB block.  Same output as
 * ZSTD_compress / ZSTD_decompress.  Errors are zstd error codes. */
#ifndef OBD_CODEC_H
#define OBD_CODEC_H
#include <stddef.h>

size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t n);
size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t n, int level);

#endif
