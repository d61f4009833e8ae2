/* Presence bitmap of a cached blob (see presence.h). */
#define _GNU_SOURCE
#include "presence.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

static uint64_t use_clock;              /* process-wide use stamps */
static const obd_presence *last_user;   /* the blob that took the last stamp */

int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift)
{
    pthread_rwlockattr_t attr;
    p->shift = shift;
    p->size = size;
    p->nunits = (size + (1ULL << shift) - 1) >> shift;
    p->bits = calloc((p->nunits + 63) / 64 + 1, sizeof(uint64_t));
    if (p->bits == NULL)
        return -1;
    /* eviction must not starve behind a steady stream of readers */
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    p->used = __atomic_add_fetch(&use_clock, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&last_user, p, __ATOMIC_RELAXED);
    return 0;
}

void obd_presence_destroy(obd_presence *p)
{
    if (p->bits != NULL)
        pthread_rwlock_destroy(&p->lock);
    free(p->bits);
    p->bits = NULL;
    __atomic_compare_exchange_n(&last_user, &(const obd_presence *){p}, NULL, 0,
                                __ATOMIC_RELAXED, __ATOMIC_RELAXED);
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

uint64_t obd_presence_count(const obd_presence *p, uint64_t off, uint64_t n)
{
    if (n == 0 || off >= p->size)
        return 0;
    uint64_t end = off + n > p->size ? p->size : off + n, total = 0;
    for (uint64_t u = off >> p->shift; u <= (end - 1) >> p->shift; u++) {
        if (test(p, u)) {
            uint64_t lo = u << p->shift, hi = (u + 1) << p->shift;
            total += (hi > p->size ? p->size : hi) - lo;
        }
    }
    return total;
}

void obd_presence_touch(obd_presence *p)
{
    if (__atomic_load_n(&last_user, __ATOMIC_RELAXED) == p)
        return;
    __atomic_store_n(&p->used, __atomic_add_fetch(&use_clock, 1, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
    __atomic_store_n(&last_user, p, __ATOMIC_RELAXED);
}

uint64_t obd_presence_evict(obd_presence *p, int fd, uint64_t off, uint64_t n, int *err)
{
    uint64_t freed, lo, hi;
    *err = 0;
    if (n == 0 || off >= p->size)
        return 0;
    lo = off >> p->shift << p->shift;
    hi = ((off + n > p->size ? p->size : off + n) + (1ULL << p->shift) - 1) >> p->shift << p->shift;
    if (hi > p->size)
        hi = p->size;
    pthread_rwlock_wrlock(&p->lock);
    freed = obd_presence_count(p, lo, hi - lo);
    obd_presence_set(p, lo, hi - lo, 0);
    if (fd >= 0 && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)lo, (off_t)(hi - lo)) != 0)
        *err = errno;
    pthread_rwlock_unlock(&p->lock);
    return freed;
}

int obd_presence_pread(obd_presence *p, int fd, char *dst, uint64_t off, uint64_t n)
{
    uint64_t mo, ml, done = 0;
    int rc = 0;
    pthread_rwlock_rdlock(&p->lock);
    if (obd_presence_missing(p, off, n, &mo, &ml)) {
        rc = 1;
    } else {
        while (done < n) {
            ssize_t r = pread(fd, dst + done, n - done, (off_t)(off + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                if (r == 0)
                    errno = EIO;            /* the cache file is shorter than the blob */
                rc = -1;
                break;
            }
            done += (uint64_t)r;
        }
    }
    pthread_rwlock_unlock(&p->lock);
    return rc;
}

int obd_presence_store(obd_presence *p, int fd, const char *src, uint64_t off, uint64_t n)
{
    uint64_t done = 0;
    int rc = 0;
    pthread_rwlock_rdlock(&p->lock);
    while (done < n) {
        ssize_t r = pwrite(fd, src + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = ENOSPC;
            rc = -1;
            break;
        }
        done += (uint64_t)r;
    }
    if (rc == 0)
        obd_presence_set(p, off, n, 1);
    pthread_rwlock_unlock(&p->lock);
    return rc;
}
