/* The index of a writable layer: records kept sorted and non-overlapping in
 * a B+tree, so that one write (insert, newer wins) costs O(log W) instead of
 * moving the tail of a flat array.  Lookups descend to the first record whose
 * end is past a sector and walk the leaf chain.
 *
 * It is not thread-safe by itself and knows nothing of Python: the caller
 * (cdef class Index in tcmu_obd/core/_lsmt_index.pxi) holds a writer-preferring rwlock
 * around every call, which obd_rwlock_init_wpref sets up.  Read-only
 * (committed) indexes do not use it; they stay flat arrays. */
#ifndef OBD_RWINDEX_H
#define OBD_RWINDEX_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t offset;     /* sectors */
    uint64_t moffset;    /* sectors (zeroed: unused but kept) */
    uint32_t length;     /* sectors */
    uint8_t zeroed;
    uint8_t tag;
} obd_rec;

typedef struct obd_rwidx obd_rwidx;
struct rwi_node;

typedef struct {
    struct rwi_node *leaf;   /* NULL: past the last record */
    int pos;
} obd_rwcur;

obd_rwidx *obd_rwidx_new(void);
void obd_rwidx_free(obd_rwidx *t);
uint64_t obd_rwidx_count(const obd_rwidx *t);
int obd_rwidx_height(const obd_rwidx *t);
/* Insert r (length > 0); whatever it overlaps is cut away.  0, or -1 when
 * memory ran out, with the index unchanged. */
int obd_rwidx_insert(obd_rwidx *t, const obd_rec *r);
/* The first record whose end > x, or NULL (c->leaf = NULL) if none. */
const obd_rec *obd_rwidx_seek(const obd_rwidx *t, uint64_t x, obd_rwcur *c);
/* The record after the one c points at, or NULL. */
const obd_rec *obd_rwcur_next(obd_rwcur *c);
/* Copy every record in order into out (room for obd_rwidx_count records). */
void obd_rwidx_copy(const obd_rwidx *t, obd_rec *out);
/* Structural self-check for tests: 0 when keys, parents, leaf links, order
 * and count are all consistent, else a positive code naming the fault. */
int obd_rwidx_check(const obd_rwidx *t);

/* A rwlock whose waiting writers block new readers (no writer starvation
 * under a constant read load).  Not recursive for readers. */
int obd_rwlock_init_wpref(pthread_rwlock_t *l);
/* For tests: hold l shared, queue a writer in another thread, and report
 * whether new readers are then refused (1), or still let in after 5 s of
 * trying (0); -1 if a thread could not be started.  l must be free. */
int obd_rwlock_probe_writer_pref(pthread_rwlock_t *l);

#endif
