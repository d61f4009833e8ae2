/* Memory-mapped reads of immutable local layer files, guarded against
 * SIGBUS.  A read through a mapping of a file that shrank (or whose device
 * failed) raises SIGBUS instead of returning an error; obd_guarded() runs a
 * function with this thread's jump buffer armed, and the SIGBUS handler
 * jumps back so the caller gets OBD_GUARD_FAULT (and can retry with pread,
 * which reports the real cause).  A SIGBUS outside a guarded call goes to
 * the handler installed before ours, or kills the process as it would have.
 * The guarded function must not allocate or take locks: it is abandoned
 * mid-way on a fault.  Not a general signal framework. */
#ifndef OBD_MAPGUARD_H
#define OBD_MAPGUARD_H
#include <stddef.h>
#include <stdint.h>

#define OBD_GUARD_FAULT (-1000)

/* Install the SIGBUS handler unless it is already the current one (cheap;
 * called whenever a mapping is made, so a handler installed later by someone
 * else, e.g. Python's faulthandler, is chained behind ours).  0 or -1. */
int obd_mapguard_install(void);

/* fn(arg)'s return value, or OBD_GUARD_FAULT if it touched a mapping that faulted. */
int obd_guarded(int (*fn)(void *), void *arg);

/* mmap [off, off+len) of fd read-only; *base gets the address of byte off
 * (the mapping itself starts at the page below).  0 or -1 (errno). */
int obd_map(int fd, uint64_t off, uint64_t len, const char **base, void **map, size_t *maplen);
void obd_unmap(void *map, size_t maplen);

#endif
