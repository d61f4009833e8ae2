/* Memory-mapped reads of immutable local layer files, guarded against
 * SIGBUS.  A read through a mapping of a file that shrank (or whose device
 * failed) raises SIGBUS instead of returning an error; obd_guarded() runs a
 * function with this thread's jump buffer armed for one address range (the
 * mapping it reads from), and the SIGBUS handler jumps back, so the caller
 * gets OBD_GUARD_FAULT (and can retry with pread, which reports the real
 * cause), only when the kernel reports the faulting address inside that
 * range.  Any other SIGBUS (outside a guarded call, or inside one but at
 * another address, e.g. the destination buffer is itself a mapping that
 * faults) goes to the handler installed before ours, or kills the process as
 * it would have.  The guarded function must not allocate or take locks: it
 * is abandoned mid-way on a fault (so per-thread codec contexts are made
 * before arming: see codec.h).  Not a general signal framework. */
#ifndef OBD_MAPGUARD_H
#define OBD_MAPGUARD_H
#include <stddef.h>
#include <stdint.h>

#define OBD_GUARD_FAULT (-1000)

/* Install the SIGBUS handler unless it is already the current one (cheap;
 * called whenever a mapping is made, so a handler installed later by someone
 * else, e.g. Python's faulthandler, is chained behind ours).  0 or -1. */
int obd_mapguard_install(void);

/* fn(arg)'s return value, or OBD_GUARD_FAULT if it touched [lo, lo+len) and
 * that faulted.  A fault anywhere else is not caught. */
int obd_guarded(int (*fn)(void *), void *arg, const void *lo, size_t len);

/* Is this thread inside obd_guarded()?  (For allocators that must refuse.) */
int obd_mapguard_armed(void);

/* Faults recovered so far (all threads). */
uint64_t obd_mapguard_recovered(void);

/* mmap [off, off+len) of fd read-only; *base gets the address of byte off
 * (the mapping itself starts at the page below).  0 or -1 (errno). */
int obd_map(int fd, uint64_t off, uint64_t len, const char **base, void **map, size_t *maplen);
void obd_unmap(void *map, size_t maplen);

#endif
