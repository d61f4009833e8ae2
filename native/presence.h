/* Presence bitmap of a cached blob: one bit per refill unit, set after the
 * unit's bytes were written, cleared when a range is evicted.  Readers test
 * bits with atomic loads, so the read core can tell a cache hole from data
 * without the GIL.
 *
 * The rwlock makes "test the bits, then read the bytes" atomic against
 * eviction: readers (and writers of fresh units) hold it shared around
 * check+read (check+write+set); eviction holds it exclusive around
 * clear+punch, so no reader ever reads a hole it was told is data.
 * `used` is a use stamp from a process-wide clock, bumped by reads, so the
 * cache can evict the least recently used blob.  It knows no paths or
 * Python; tcmu_obd/core/_lsmt_cache.pxi wraps it and tcmu_obd/remote/cache.py drives it. */
#ifndef OBD_PRESENCE_H
#define OBD_PRESENCE_H
#include <pthread.h>
#include <stdint.h>

typedef struct {
    uint64_t *bits;
    uint64_t nunits;
    unsigned shift;         /* unit = 1 << shift bytes */
    uint64_t size;          /* blob size in bytes */
    uint64_t used;          /* use stamp (obd_presence_touch) */
    pthread_rwlock_t lock;  /* shared: check+read / write+set; exclusive: clear+punch */
} obd_presence;

int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift);
void obd_presence_destroy(obd_presence *p);
void obd_presence_set(obd_presence *p, uint64_t off, uint64_t n, int on);
/* First missing byte range inside [off, off+n): 1 and *moff, *mlen (whole
 * units, clipped to the blob) when something is missing, else 0.  The range
 * runs from the first missing unit to the last missing unit. */
int obd_presence_missing(const obd_presence *p, uint64_t off, uint64_t n, uint64_t *moff, uint64_t *mlen);
/* Bytes (units clipped to the blob) of the units touched by [off, off+n) that are present. */
uint64_t obd_presence_count(const obd_presence *p, uint64_t off, uint64_t n);
/* Note a use: a new stamp unless this blob was the last one used (then no
 * shared cache line is written, so a hot blob costs one load per read). */
void obd_presence_touch(obd_presence *p);
/* Under the exclusive lock: clear every unit touched by [off, off+n) and
 * punch those units out of fd.  Returns the bytes that were present;
 * *err gets errno of a failed punch (0 if none; the bits are cleared anyway). */
uint64_t obd_presence_evict(obd_presence *p, int fd, uint64_t off, uint64_t n, int *err);
/* Under the shared lock: pread [off, off+n) of fd if every unit is present.
 * 0 done, 1 something is missing (nothing read), -1 with errno on an I/O
 * error or a short file. */
int obd_presence_pread(obd_presence *p, int fd, char *dst, uint64_t off, uint64_t n);
/* Under the shared lock: pwrite [off, off+n) to fd, then mark its units
 * present.  0 or -1 with errno (nothing marked). */
int obd_presence_store(obd_presence *p, int fd, const char *src, uint64_t off, uint64_t n);

#endif
