/* Presence bitmap of a cached blob (see presence.h). */
#include "presence.h"
#include <stdlib.h>

int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift)
{
    p->shift = shift;
    p->size = size;
    p->nunits = (size + (1ULL << shift) - 1) >> shift;
    p->bits = calloc((p->nunits + 63) / 64 + 1, sizeof(uint64_t));
    return p->bits == NULL ? -1 : 0;
}

void obd_presence_destroy(obd_presence *p)
{
    free(p->bits);
    p->bits = NULL;
}

static inline int test(const obd_presence *p, uint64_t u)
{
    return (__atomic_load_n(&p->bits[u >> 6], __ATOMIC_ACQUIRE) >> (u & 63)) & 1;
}

void obd_presence_set(obd_presence *p, uint64_t off, uint64_t n, int on)
{
    if (n == 0 || off >= p->size)
        return;
    uint64_t end = off + n > p->size ? p->size : off + n;
    uint64_t u0, u1;
    if (on) {       /* only whole units, or the blob's last partial unit */
        u0 = (off + (1ULL << p->shift) - 1) >> p->shift;
        u1 = end == p->size ? p->nunits : end >> p->shift;
    } else {        /* every unit touched */
        u0 = off >> p->shift;
        u1 = (end + (1ULL << p->shift) - 1) >> p->shift;
    }
    for (uint64_t u = u0; u < u1; u++) {
        uint64_t m = 1ULL << (u & 63);
        if (on)
            __atomic_fetch_or(&p->bits[u >> 6], m, __ATOMIC_RELEASE);
        else
            __atomic_fetch_and(&p->bits[u >> 6], ~m, __ATOMIC_RELEASE);
    }
}

int obd_presence_missing(const obd_presence *p, uint64_t off, uint64_t n, uint64_t *moff, uint64_t *mlen)
{
    if (n == 0 || off >= p->size)
        return 0;
    uint64_t end = off + n > p->size ? p->size : off + n;
    uint64_t u0 = off >> p->shift, u1 = (end - 1) >> p->shift, first = UINT64_MAX, last = 0;
    for (uint64_t u = u0; u <= u1; u++) {
        if (!test(p, u)) {
            if (first == UINT64_MAX)
                first = u;
            last = u;
        }
    }
    if (first == UINT64_MAX)
        return 0;
    *moff = first << p->shift;
    uint64_t stop = (last + 1) << p->shift;
    if (stop > p->size)
        stop = p->size;
    *mlen = stop - *moff;
    return 1;
}
