/* The B+tree behind a writable layer's index (see rwindex.h): leaves hold up
 * to RWI_B records, inner nodes up to RWI_B children, and every inner key is
 * the exact largest record end under that child, so a descent finds the
 * first record ending past a sector in O(height).
 *
 * Nodes are split when full and removed when empty, but underfull nodes are
 * not merged: a node is at least half full when a split creates it, so after
 * W inserts the height is at most 1 + log_{RWI_B/2}(W + 1), and W (records
 * ever inserted since the index was built, i.e. the length of the RW log plus
 * the writes of this session) bounds every operation at O(log W).  It does
 * not lock, allocate outside insert, or know about files. */
#define _GNU_SOURCE
#include "rwindex.h"

#include <stdlib.h>
#include <string.h>

#define RWI_B 64          /* records per leaf, children per inner node */
#define RWI_POOL 64       /* spare nodes kept so that an insert cannot fail halfway */

typedef struct rwi_node rwi_node;
struct rwi_node {
    rwi_node *parent;
    int n;
    int leaf;
    union {
        struct {
            rwi_node *prev, *next;
            obd_rec r[RWI_B];
        } l;
        struct {
            uint64_t key[RWI_B];   /* largest record end under kid[i] */
            rwi_node *kid[RWI_B];
        } i;
    } u;
};

struct obd_rwidx {
    rwi_node *root;
    rwi_node *first, *last;     /* the leaf chain */
    uint64_t count;
    int height;                 /* 1: the root is a leaf */
    int npool;
    rwi_node *pool[RWI_POOL];
};

static inline uint64_t rend(const obd_rec *r) { return r->offset + r->length; }

static uint64_t node_max(const rwi_node *x)
{
    if (x->leaf)
        return x->n ? rend(&x->u.l.r[x->n - 1]) : 0;
    return x->n ? x->u.i.key[x->n - 1] : 0;
}

static int slot_of(const rwi_node *p, const rwi_node *c)
{
    int s;
    for (s = 0; s < p->n; s++)
        if (p->u.i.kid[s] == c)
            return s;
    abort();    /* a child missing from its parent: the tree is broken */
}

static rwi_node *take(obd_rwidx *t, int leaf)
{
    rwi_node *x = t->pool[--t->npool];
    x->parent = NULL;
    x->n = 0;
    x->leaf = leaf;
    if (leaf)
        x->u.l.prev = x->u.l.next = NULL;
    return x;
}

static void give(obd_rwidx *t, rwi_node *x)
{
    if (t->npool < RWI_POOL)
        t->pool[t->npool++] = x;
    else
        free(x);
}

static int reserve(obd_rwidx *t, int need)
{
    if (need > RWI_POOL)
        need = RWI_POOL;
    while (t->npool < need) {
        rwi_node *x = malloc(sizeof(rwi_node));
        if (x == NULL)
            return -1;
        t->pool[t->npool++] = x;
    }
    return 0;
}

/* x's largest end changed: bring the keys above it up to date. */
static void fix_up(rwi_node *x)
{
    while (x->parent) {
        rwi_node *p = x->parent;
        int s = slot_of(p, x);
        uint64_t m = node_max(x);
        if (p->u.i.key[s] == m)
            return;
        p->u.i.key[s] = m;
        if (s != p->n - 1)
            return;
        x = p;
    }
}

static void new_root(obd_rwidx *t, rwi_node *a, rwi_node *b)
{
    rwi_node *r = take(t, 0);
    r->n = 2;
    r->u.i.kid[0] = a;
    r->u.i.kid[1] = b;
    r->u.i.key[0] = node_max(a);
    r->u.i.key[1] = node_max(b);
    a->parent = b->parent = r;
    t->root = r;
    t->height++;
}

static void inner_put(rwi_node *p, int s, uint64_t key, rwi_node *kid)
{
    memmove(&p->u.i.key[s + 1], &p->u.i.key[s], (size_t)(p->n - s) * sizeof(uint64_t));
    memmove(&p->u.i.kid[s + 1], &p->u.i.kid[s], (size_t)(p->n - s) * sizeof(rwi_node *));
    p->u.i.key[s] = key;
    p->u.i.kid[s] = kid;
    kid->parent = p;
    p->n++;
}

/* Insert kid (whose largest end is key) at slot s of inner node p. */
static void inner_insert(obd_rwidx *t, rwi_node *p, int s, uint64_t key, rwi_node *kid)
{
    rwi_node *q, *pp;
    int half = RWI_B / 2, k, ps;
    if (p->n < RWI_B) {
        inner_put(p, s, key, kid);
        if (s == p->n - 1)
            fix_up(p);
        return;
    }
    q = take(t, 0);
    q->n = RWI_B - half;
    memcpy(q->u.i.key, &p->u.i.key[half], (size_t)q->n * sizeof(uint64_t));
    memcpy(q->u.i.kid, &p->u.i.kid[half], (size_t)q->n * sizeof(rwi_node *));
    for (k = 0; k < q->n; k++)
        q->u.i.kid[k]->parent = q;
    p->n = half;
    if (s <= half)
        inner_put(p, s, key, kid);
    else
        inner_put(q, s - half, key, kid);
    if (p == t->root) {
        new_root(t, p, q);
        return;
    }
    pp = p->parent;
    ps = slot_of(pp, p);
    pp->u.i.key[ps] = node_max(p);
    inner_insert(t, pp, ps + 1, node_max(q), q);
}

/* Insert r at position p of leaf L; out and outp say where it went. */
static void leaf_insert(obd_rwidx *t, rwi_node *L, int p, const obd_rec *r, rwi_node **out, int *outp)
{
    rwi_node *R, *pp, *dst;
    int half = RWI_B / 2, ps;
    if (L->n < RWI_B) {
        memmove(&L->u.l.r[p + 1], &L->u.l.r[p], (size_t)(L->n - p) * sizeof(obd_rec));
        L->u.l.r[p] = *r;
        L->n++;
        if (p == L->n - 1)
            fix_up(L);
        *out = L;
        *outp = p;
        return;
    }
    R = take(t, 1);
    R->n = RWI_B - half;
    memcpy(R->u.l.r, &L->u.l.r[half], (size_t)R->n * sizeof(obd_rec));
    L->n = half;
    R->u.l.next = L->u.l.next;
    R->u.l.prev = L;
    if (L->u.l.next)
        L->u.l.next->u.l.prev = R;
    else
        t->last = R;
    L->u.l.next = R;
    if (p <= half) {
        dst = L;
    } else {
        dst = R;
        p -= half;
    }
    memmove(&dst->u.l.r[p + 1], &dst->u.l.r[p], (size_t)(dst->n - p) * sizeof(obd_rec));
    dst->u.l.r[p] = *r;
    dst->n++;
    *out = dst;
    *outp = p;
    if (L == t->root) {
        new_root(t, L, R);
        return;
    }
    pp = L->parent;
    ps = slot_of(pp, L);
    pp->u.i.key[ps] = node_max(L);
    inner_insert(t, pp, ps + 1, node_max(R), R);
}

/* Remove the empty node x from the tree (x is not the only leaf). */
static void remove_node(obd_rwidx *t, rwi_node *x)
{
    rwi_node *p = x->parent;
    int s;
    if (x->leaf) {
        if (x->u.l.prev)
            x->u.l.prev->u.l.next = x->u.l.next;
        else
            t->first = x->u.l.next;
        if (x->u.l.next)
            x->u.l.next->u.l.prev = x->u.l.prev;
        else
            t->last = x->u.l.prev;
    }
    s = slot_of(p, x);
    memmove(&p->u.i.key[s], &p->u.i.key[s + 1], (size_t)(p->n - s - 1) * sizeof(uint64_t));
    memmove(&p->u.i.kid[s], &p->u.i.kid[s + 1], (size_t)(p->n - s - 1) * sizeof(rwi_node *));
    p->n--;
    give(t, x);
    if (p->n == 0)
        remove_node(t, p);      /* p is not the root: the root keeps a path to the last leaf */
    else if (s == p->n)
        fix_up(p);
}

static void collapse_root(obd_rwidx *t)
{
    while (!t->root->leaf && t->root->n == 1) {
        rwi_node *old = t->root;
        t->root = old->u.i.kid[0];
        t->root->parent = NULL;
        give(t, old);
        t->height--;
    }
}

/* Delete records p..p+c-1 of leaf L. */
static void leaf_delete(obd_rwidx *t, rwi_node *L, int p, int c)
{
    memmove(&L->u.l.r[p], &L->u.l.r[p + c], (size_t)(L->n - p - c) * sizeof(obd_rec));
    L->n -= c;
    t->count -= (uint64_t)c;
    if (L->n == 0 && t->first != t->last)
        remove_node(t, L);
    else if (p == L->n)
        fix_up(L);
}

obd_rwidx *obd_rwidx_new(void)
{
    obd_rwidx *t = calloc(1, sizeof(obd_rwidx));
    if (t == NULL)
        return NULL;
    if (reserve(t, 1)) {
        free(t);
        return NULL;
    }
    t->root = take(t, 1);
    t->first = t->last = t->root;
    t->height = 1;
    return t;
}

static void free_node(rwi_node *x)
{
    int k;
    if (!x->leaf)
        for (k = 0; k < x->n; k++)
            free_node(x->u.i.kid[k]);
    free(x);
}

void obd_rwidx_free(obd_rwidx *t)
{
    if (t == NULL)
        return;
    free_node(t->root);
    while (t->npool)
        free(t->pool[--t->npool]);
    free(t);
}

uint64_t obd_rwidx_count(const obd_rwidx *t) { return t->count; }

int obd_rwidx_height(const obd_rwidx *t) { return t->height; }

const obd_rec *obd_rwidx_seek(const obd_rwidx *t, uint64_t x, obd_rwcur *c)
{
    const rwi_node *nd = t->root;
    int lo, hi, mid;
    while (!nd->leaf) {
        lo = 0;
        hi = nd->n;
        while (lo < hi) {
            mid = (lo + hi) >> 1;
            if (nd->u.i.key[mid] > x)
                hi = mid;
            else
                lo = mid + 1;
        }
        if (lo == nd->n) {
            c->leaf = NULL;
            return NULL;
        }
        nd = nd->u.i.kid[lo];
    }
    lo = 0;
    hi = nd->n;
    while (lo < hi) {
        mid = (lo + hi) >> 1;
        if (rend(&nd->u.l.r[mid]) > x)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == nd->n) {          /* only an empty root leaf, or x past every end */
        c->leaf = NULL;
        return NULL;
    }
    c->leaf = (rwi_node *)nd;
    c->pos = lo;
    return &nd->u.l.r[lo];
}

const obd_rec *obd_rwcur_next(obd_rwcur *c)
{
    if (c->leaf == NULL)
        return NULL;
    if (++c->pos >= c->leaf->n) {
        c->leaf = c->leaf->u.l.next;
        c->pos = 0;
        if (c->leaf == NULL)
            return NULL;
    }
    return &c->leaf->u.l.r[c->pos];
}

int obd_rwidx_insert(obd_rwidx *t, const obd_rec *nr)
{
    uint64_t off = nr->offset, end = off + nr->length;
    obd_rwcur c;
    const obd_rec *cur;
    rwi_node *L, *L2;
    int p, p2, q;
    obd_rec head, tail;

    if (nr->length == 0)
        return 0;
    /* head + new + tail: two leaf inserts, each splitting at most one node
     * per level and adding a root */
    if (reserve(t, 2 * (t->height + 2)))
        return -1;
    cur = obd_rwidx_seek(t, off, &c);
    if (cur != NULL && cur->offset < off) {
        L = c.leaf;
        p = c.pos;
        head = *cur;
        head.length = (uint32_t)(off - head.offset);
        if (rend(cur) > end) {
            /* the new record lands inside one old record: head, new, tail */
            tail = *cur;
            tail.length = (uint32_t)(rend(cur) - end);
            tail.offset = end;
            if (!tail.zeroed)
                tail.moffset += end - cur->offset;
            L->u.l.r[p] = head;
            if (p == L->n - 1)
                fix_up(L);
            leaf_insert(t, L, p + 1, nr, &L2, &p2);
            leaf_insert(t, L2, p2 + 1, &tail, &L2, &p2);
            t->count += 2;
            return 0;
        }
        L->u.l.r[p] = head;
        if (p == L->n - 1)
            fix_up(L);
        cur = obd_rwcur_next(&c);
    }
    /* records wholly inside [off, end) go, one leaf run at a time */
    while (cur != NULL && cur->offset < end) {
        L = c.leaf;
        p = c.pos;
        q = p;
        while (q < L->n && L->u.l.r[q].offset < end && rend(&L->u.l.r[q]) <= end)
            q++;
        if (q == p) {
            /* it runs past end: keep its tail (the end does not move) */
            obd_rec *r = &L->u.l.r[p];
            uint64_t cut = end - r->offset;
            r->offset = end;
            r->length -= (uint32_t)cut;
            if (!r->zeroed)
                r->moffset += cut;
            break;
        }
        if (q == L->n) {
            L2 = L->u.l.next;
            leaf_delete(t, L, p, q - p);
            c.leaf = L2;
            c.pos = 0;
            cur = L2 ? &L2->u.l.r[0] : NULL;
        } else {
            leaf_delete(t, L, p, q - p);
            cur = &L->u.l.r[p];
        }
    }
    collapse_root(t);
    if (cur != NULL)
        leaf_insert(t, c.leaf, c.pos, nr, &L2, &p2);
    else
        leaf_insert(t, t->last, t->last->n, nr, &L2, &p2);
    t->count++;
    return 0;
}

void obd_rwidx_copy(const obd_rwidx *t, obd_rec *out)
{
    const rwi_node *L;
    for (L = t->first; L != NULL; L = L->u.l.next) {
        memcpy(out, L->u.l.r, (size_t)L->n * sizeof(obd_rec));
        out += L->n;
    }
}

static int check_node(const obd_rwidx *t, const rwi_node *x, int depth, const rwi_node **leaf,
                      uint64_t *count, uint64_t *prev_end)
{
    int k, rc;
    if (x->n < 0 || x->n > RWI_B)
        return 1;
    if (x->leaf) {
        if (depth != t->height)
            return 2;
        if (*leaf != x)
            return 3;                       /* the leaf chain skips or reorders leaves */
        if (x->n == 0 && !(t->first == x && t->last == x))
            return 4;                       /* only a lone leaf may be empty */
        for (k = 0; k < x->n; k++) {
            const obd_rec *r = &x->u.l.r[k];
            if (r->length == 0 || r->offset < *prev_end)
                return 5;
            *prev_end = rend(r);
        }
        *count += (uint64_t)x->n;
        *leaf = x->u.l.next;
        if (*leaf != NULL && (*leaf)->u.l.prev != x)
            return 6;
        return 0;
    }
    if (x->n == 0 || (x == t->root && x->n < 2))
        return 7;
    for (k = 0; k < x->n; k++) {
        const rwi_node *kid = x->u.i.kid[k];
        if (kid->parent != x)
            return 8;
        if ((rc = check_node(t, kid, depth + 1, leaf, count, prev_end)) != 0)
            return rc;
        if (x->u.i.key[k] != node_max(kid))
            return 9;
    }
    return 0;
}

int obd_rwidx_check(const obd_rwidx *t)
{
    const rwi_node *leaf = t->first;
    uint64_t count = 0, prev_end = 0;
    int rc;
    if (t->root->parent != NULL || (t->first && t->first->u.l.prev != NULL))
        return 10;
    if ((rc = check_node(t, t->root, 1, &leaf, &count, &prev_end)) != 0)
        return rc;
    if (leaf != NULL)
        return 11;
    return count == t->count ? 0 : 12;
}

int obd_rwlock_init_wpref(pthread_rwlock_t *l)
{
    pthread_rwlockattr_t a;
    int rc;
    if ((rc = pthread_rwlockattr_init(&a)) != 0)
        return rc;
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    rc = pthread_rwlock_init(l, &a);
    pthread_rwlockattr_destroy(&a);
    return rc;
}

/* ------------------------------------------------------------ lock probe (tests) */
#include <errno.h>
#include <sched.h>
#include <time.h>

struct probe_arg {
    pthread_rwlock_t *l;
    volatile int started;
};

static void *probe_writer(void *p)
{
    struct probe_arg *a = p;
    __atomic_store_n(&a->started, 1, __ATOMIC_SEQ_CST);
    pthread_rwlock_wrlock(a->l);
    pthread_rwlock_unlock(a->l);
    return NULL;
}

int obd_rwlock_probe_writer_pref(pthread_rwlock_t *l)
{
    struct probe_arg a;
    pthread_t th;
    struct timespec nap = {0, 1000000};      /* 1 ms */
    int i, result = 0;
    a.l = l;
    a.started = 0;
    if (pthread_rwlock_rdlock(l) != 0)
        return -1;
    if (pthread_create(&th, NULL, probe_writer, &a) != 0) {
        pthread_rwlock_unlock(l);
        return -1;
    }
    while (!__atomic_load_n(&a.started, __ATOMIC_SEQ_CST))
        sched_yield();
    /* Once the writer is queued, a writer-preferring lock refuses new
     * readers; a reader-preferring one lets them in for ever. */
    for (i = 0; i < 5000 && !result; i++) {
        if (pthread_rwlock_tryrdlock(l) == EBUSY)
            result = 1;
        else
            pthread_rwlock_unlock(l);
        if (!result)
            nanosleep(&nap, NULL);
    }
    pthread_rwlock_unlock(l);
    pthread_join(th, NULL);
    return result;
}
