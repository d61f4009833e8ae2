/* A small direct-mapped cache of decoded ZFile blocks, shared by the threads
 * reading one ZFile: sequential small reads inside one large block decode it
 * once.  Buffers are swapped in and out, never copied on insert.  Not an LRU
 * and not a cache of remote bytes (that is the file cache's job). */
#ifndef OBD_BLOCKCACHE_H
#define OBD_BLOCKCACHE_H
#include <stddef.h>
#include <stdint.h>

typedef struct obd_bcache obd_bcache;

obd_bcache *obd_bcache_new(unsigned nslots, size_t block_size);
void obd_bcache_free(obd_bcache *c);
/* Copy n bytes at offset `at` of block blk into dst; 1 on a hit, 0 on a miss. */
int obd_bcache_get(obd_bcache *c, uint64_t blk, char *dst, size_t at, size_t n);
/* Store *buf (a decoded block of block_size bytes) as block blk; *buf gets the
 * slot's previous buffer in exchange (possibly NULL). */
void obd_bcache_put(obd_bcache *c, uint64_t blk, char **buf);

#endif
