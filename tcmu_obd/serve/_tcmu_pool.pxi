"""The worker pool of the TCMU data path (included by _tcmu.pyx): the job a
command carries in its hm_private area, the shared job queue and its
threads, RawBuf (a buffer view of ring or scratch memory) and the helpers
that copy a command's bytes in and out of its iovecs.

It does not decide what a command means (_tcmu_scsi.pxi, _tcmu_device.pxi);
a worker only calls Device.work and hands the job back with Device.done.
"""

cdef struct Job:
    tcmulib_cmd *cmd
    void *owner            # the Device (borrowed: it outlives its jobs)
    Job *next
    const obd_scsi_op *op  # the command's table entry
    int kind
    int result
    uint64_t offset        # bytes
    uint64_t length        # bytes
    uint64_t t0            # CLOCK_MONOTONIC ns when the owner thread took it from the ring


cdef struct Queue:
    pthread_mutex_t lock
    pthread_cond_t cond
    Job *head
    Job *tail
    int closed


cdef class RawBuf:
    """A buffer-protocol view of C memory (a ring iovec or a worker buffer)."""
    cdef char *ptr
    cdef Py_ssize_t n
    cdef bint ro

    @staticmethod
    cdef RawBuf wrap(char *ptr, Py_ssize_t n, bint ro):
        cdef RawBuf b = RawBuf.__new__(RawBuf)
        b.ptr, b.n, b.ro = ptr, n, ro
        return b

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.n, self.ro, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.n


cdef uint64_t iov_total(tcmulib_cmd *cmd) noexcept nogil:
    cdef uint64_t n = 0
    cdef size_t i
    for i in range(cmd.iov_cnt):
        n += cmd.iovec[i].iov_len
    return n


cdef void iov_scatter(tcmulib_cmd *cmd, const char *src, uint64_t n) noexcept nogil:
    """Copy n bytes into the iovecs (without moving them) and zero the rest."""
    cdef size_t i
    cdef uint64_t k
    for i in range(cmd.iov_cnt):
        k = cmd.iovec[i].iov_len
        if k > n:
            if n:
                memcpy(cmd.iovec[i].iov_base, src, n)
            memset(<char *>cmd.iovec[i].iov_base + n, 0, k - n)
            n = 0
        else:
            memcpy(cmd.iovec[i].iov_base, src, k)
            src += k
            n -= k


cdef void iov_gather(tcmulib_cmd *cmd, char *dst, uint64_t n) noexcept nogil:
    cdef size_t i
    cdef uint64_t k
    for i in range(cmd.iov_cnt):
        if n == 0:
            break
        k = cmd.iovec[i].iov_len
        if k > n:
            k = n
        memcpy(dst, cmd.iovec[i].iov_base, k)
        dst += k
        n -= k


# ------------------------------------------------------------------ worker pool
cdef char *io_buf(tcmulib_cmd *cmd, uint64_t length, char **scratch, size_t *cap,
                  bint *direct) noexcept nogil:
    """Where a READ/WRITE's bytes are read into or taken from: the command's
    one iovec when it holds them all (direct), else the thread's scratch
    buffer, grown to `length` (NULL when out of memory)."""
    cdef char *p
    direct[0] = cmd.iov_cnt == 1 and cmd.iovec[0].iov_len >= length
    if direct[0]:
        return <char *>cmd.iovec[0].iov_base
    if cap[0] < length:
        p = <char *>realloc(scratch[0], length)
        if p == NULL:
            return NULL
        scratch[0], cap[0] = p, length
    return scratch[0]


cdef Queue _queue
cdef bint _queue_ready = False


cdef inline void job_append(Job **head, Job **tail, Job *j) noexcept nogil:
    """Append j to a singly linked job list (the caller holds its lock)."""
    j.next = NULL
    if tail[0] == NULL:
        head[0] = j
    else:
        tail[0].next = j
    tail[0] = j


cdef void queue_put(Job *j) noexcept nogil:
    pthread_mutex_lock(&_queue.lock)
    job_append(&_queue.head, &_queue.tail, j)
    pthread_cond_signal(&_queue.cond)
    pthread_mutex_unlock(&_queue.lock)


cdef Job *queue_take() noexcept nogil:
    cdef Job *j
    pthread_mutex_lock(&_queue.lock)
    while _queue.head == NULL and not _queue.closed:
        pthread_cond_wait(&_queue.cond, &_queue.lock)
    j = _queue.head
    if j != NULL:
        _queue.head = j.next
        if _queue.head == NULL:
            _queue.tail = NULL
    pthread_mutex_unlock(&_queue.lock)
    return j


class Pool:
    """The worker threads shared by all devices."""

    def __init__(self, int workers):
        global _queue_ready
        if not _queue_ready:
            pthread_mutex_init(&_queue.lock, NULL)
            pthread_cond_init(&_queue.cond, NULL)
            _queue_ready = True
        _queue.closed = 0
        self.threads = [threading.Thread(target=_worker, name=f"tcmu-worker-{i}", daemon=True)
                        for i in range(max(1, workers))]
        for t in self.threads:
            t.start()

    def stop(self):
        with nogil:
            pthread_mutex_lock(&_queue.lock)
            _queue.closed = 1
            pthread_cond_broadcast(&_queue.cond)
            pthread_mutex_unlock(&_queue.lock)
        for t in self.threads:
            t.join()


def _worker():
    """A pool thread: reads the core can serve at once never take the GIL;
    everything else (writes, misses, errors, SYNC/UNMAP) makes run_job's one
    Python call."""
    cdef Job *j
    cdef char *scratch = NULL
    cdef size_t cap = 0
    try:
        with nogil:
            while True:
                j = queue_take()
                if j == NULL:
                    break
                (<Device>j.owner).work(j, &scratch, &cap)
                (<Device>j.owner).done(j)
    finally:
        free(scratch)
