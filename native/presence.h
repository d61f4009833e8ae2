/* Which refill units of a cached remote blob are present in its cache file:
 * one bit per unit, set after the unit's bytes were written, cleared when a
 * range is evicted.  Readers test bits without locks (atomic loads), so the
 * read core can tell a cache hole from data without the GIL. */
#ifndef OBD_PRESENCE_H
#define OBD_PRESENCE_H
#include <stdint.h>

typedef struct {
    uint64_t *bits;
    uint64_t nunits;
    unsigned shift;         /* unit = 1 << shift bytes */
    uint64_t size;          /* blob size in bytes */
} obd_presence;

int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift);
void obd_presence_destroy(obd_presence *p);
void obd_presence_set(obd_presence *p, uint64_t off, uint64_t n, int on);
/* First missing byte range inside [off, off+n): 1 and *moff/*mlen (whole
 * units, clipped to the blob) when something is missing, else 0.  The range
 * runs from the first missing unit to the last missing unit. */
int obd_presence_missing(const obd_presence *p, uint64_t off, uint64_t n, uint64_t *moff, uint64_t *mlen);

#endif
