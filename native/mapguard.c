/* SIGBUS-guarded reads from mappings (see mapguard.h). */
#define _GNU_SOURCE
#include "mapguard.h"
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static __thread sigjmp_buf *armed __attribute__((tls_model("initial-exec")));
static __thread uintptr_t armed_lo __attribute__((tls_model("initial-exec")));
static __thread uintptr_t armed_hi __attribute__((tls_model("initial-exec")));
static uint64_t recovered;
static struct sigaction previous;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *info, void *uc)
{
    sigjmp_buf *jb = armed;
    uintptr_t addr = (uintptr_t)info->si_addr;
    /* only a fault the kernel raised (si_code > 0: not kill/sigqueue) at an
     * address inside the armed mapping is ours to recover */
    if (jb != NULL && info->si_code > 0 && addr >= armed_lo && addr < armed_hi) {
        armed = NULL;
        __atomic_add_fetch(&recovered, 1, __ATOMIC_RELAXED);
        siglongjmp(*jb, 1);
    }
    /* not a guarded read of the armed mapping: behave as if we were not here */
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        previous.sa_sigaction(sig, info, uc);
        return;
    }
    if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler != SIG_DFL &&
            previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* default action: returning re-runs the faulting access, which now kills */
    signal(SIGBUS, SIG_DFL);
}

int obd_mapguard_install(void)
{
    struct sigaction cur, sa;
    int rc = 0;
    pthread_mutex_lock(&install_lock);
    if (sigaction(SIGBUS, NULL, &cur) == 0 &&
            !((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        /* SA_NODEFER: SIGBUS stays unblocked after the jump, so the jump
         * buffer need not save the signal mask (a system call per read) */
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        previous = cur;
        rc = sigaction(SIGBUS, &sa, NULL);
    }
    pthread_mutex_unlock(&install_lock);
    return rc;
}

int obd_guarded(int (*fn)(void *), void *arg, const void *lo, size_t len)
{
    sigjmp_buf jb;
    volatile int rc = OBD_GUARD_FAULT;
    if (sigsetjmp(jb, 0) == 0) {
        armed_lo = (uintptr_t)lo;
        armed_hi = (uintptr_t)lo + len;
        armed = &jb;
        rc = fn(arg);
    }
    armed = NULL;
    return rc;
}

int obd_mapguard_armed(void)
{
    return armed != NULL;
}

uint64_t obd_mapguard_recovered(void)
{
    return __atomic_load_n(&recovered, __ATOMIC_RELAXED);
}

int obd_map(int fd, uint64_t off, uint64_t len, const char **base, void **map, size_t *maplen)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t start = off - off % (uint64_t)page;
    size_t n = (size_t)(off + len - start);
    void *p;
    if (len == 0 || off + len < off)
        return -1;
    p = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (p == MAP_FAILED)
        return -1;
    *map = p;
    *maplen = n;
    *base = (const char *)p + (off - start);
    return 0;
}

void obd_unmap(void *map, size_t maplen)
{
    if (map != NULL)
        munmap(map, maplen);
}
