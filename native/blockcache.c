/* Decoded-block cache for the Cython core (see blockcache.h). */
#include "blockcache.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct obd_bcache {
    pthread_mutex_t lock;
    unsigned nslots;
    size_t block_size;
    uint64_t *tag;      /* block index + 1; 0 = empty */
    char **buf;
};

obd_bcache *obd_bcache_new(unsigned nslots, size_t block_size)
{
    obd_bcache *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->tag = calloc(nslots, sizeof(uint64_t));
    c->buf = calloc(nslots, sizeof(char *));
    if (c->tag == NULL || c->buf == NULL) {
        free(c->tag);
        free(c->buf);
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    c->nslots = nslots;
    c->block_size = block_size;
    return c;
}

void obd_bcache_free(obd_bcache *c)
{
    if (c == NULL)
        return;
    for (unsigned i = 0; i < c->nslots; i++)
        free(c->buf[i]);
    free(c->buf);
    free(c->tag);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int obd_bcache_get(obd_bcache *c, uint64_t blk, char *dst, size_t at, size_t n)
{
    unsigned s = (unsigned)(blk % c->nslots);
    int hit = 0;
    pthread_mutex_lock(&c->lock);
    if (c->tag[s] == blk + 1 && c->buf[s] != NULL && at + n <= c->block_size) {
        memcpy(dst, c->buf[s] + at, n);
        hit = 1;
    }
    pthread_mutex_unlock(&c->lock);
    return hit;
}

void obd_bcache_put(obd_bcache *c, uint64_t blk, char **buf)
{
    unsigned s = (unsigned)(blk % c->nslots);
    pthread_mutex_lock(&c->lock);
    char *old = c->buf[s];
    c->buf[s] = *buf;
    c->tag[s] = blk + 1;
    *buf = old;
    pthread_mutex_unlock(&c->lock);
}
