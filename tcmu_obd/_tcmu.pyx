# cython: language_level=3, boundscheck=False, wraparound=False
"""The TCMU data path on Debian's libtcmu.so.2 (declared in native/libtcmu.h).

Threads:
- the caller's thread (the daemon's main loop) polls the netlink master fd
  and runs Context.master_ready(); libtcmu calls added()/removed() from
  there, and they call the Python handler (tcmu_obd.handler).
- one owner thread per device ring: it polls the UIO fd and an eventfd,
  pulls commands (tcmulib_processing_start / get_next_command), checks
  READ/WRITE (6/10/12/16) CDBs in C and queues them to the worker pool,
  answers the other commands through the backend's emulate() (with the
  GIL), and completes every command itself (tcmulib_command_complete, then
  one tcmulib_processing_complete per batch).  libtcmu has no locks, so
  nothing else touches the ring.
- a shared pool of worker threads: one Python call per READ/WRITE
  (Stack.read_into / Image.write, which release the GIL for the I/O).  A
  read whose data area is one iovec lands straight in the ring; otherwise
  it goes through a per-worker buffer copied into the iovecs in C.  The job
  lives in the command's hm_private area (no malloc per command); the
  worker queues it on its device's done list and wakes the owner through
  the eventfd.
"""
import logging
import threading

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset
from posix.unistd cimport close, read, write

log = logging.getLogger("tcmu_obd.tcmu")

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<sys/socket.h>" nogil:
    int setsockopt(int fd, int level, int optname, const void *optval, unsigned int optlen)
    enum:
        SOL_SOCKET
        SO_RCVBUF
        SO_RCVBUFFORCE

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)

cdef enum:
    SECTOR = 512
    QUEUED = -100
    SOL_NETLINK = 270
    NETLINK_NO_ENOBUFS = 5

# job kinds (the same numbers as tcmu_obd.scsi.KIND_*)
cdef enum:
    K_EMULATE = 0
    K_READ = 1
    K_WRITE = 2
    K_SYNC = 3
    K_UNMAP = 4
    K_WRITE_SAME = 5

STS_OK = TCMU_STS_OK
STS_RD_ERR = TCMU_STS_RD_ERR
STS_WR_ERR = TCMU_STS_WR_ERR
STS_PASSTHROUGH_ERR = TCMU_STS_PASSTHROUGH_ERR


ctypedef int (*stack_read_fn)(void *stack, char *dst, uint64_t offset, uint64_t length) noexcept nogil


cdef struct Job:
    tcmulib_cmd *cmd
    void *owner            # the Device (borrowed: it outlives its jobs)
    Job *next
    int kind
    int result
    uint64_t offset        # bytes
    uint64_t length        # bytes


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


# ------------------------------------------------------------------ CDB parsing (C)
cdef inline uint32_t _be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]

cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef int cdb_kind(const uint8_t *cdb) noexcept nogil:
    cdef uint8_t op = cdb[0]
    if op == 0x08 or op == 0x28 or op == 0xA8 or op == 0x88:
        return K_READ
    if op == 0x0A or op == 0x2A or op == 0xAA or op == 0x8A:
        return K_WRITE
    if op == 0x35 or op == 0x91:
        return K_SYNC
    if op == 0x42:
        return K_UNMAP
    if op == 0x41 or op == 0x93:
        return K_WRITE_SAME
    return K_EMULATE


cdef void cdb_rw(const uint8_t *cdb, uint64_t *lba, uint64_t *blocks) noexcept nogil:
    cdef uint8_t op = cdb[0]
    if op == 0x08 or op == 0x0A:
        lba[0] = ((<uint64_t>(cdb[1] & 0x1F)) << 16) | _be16(cdb + 2)
        blocks[0] = cdb[4] if cdb[4] else 256
    elif op == 0x28 or op == 0x2A:
        lba[0] = _be32(cdb + 2)
        blocks[0] = _be16(cdb + 7)
    elif op == 0xA8 or op == 0xAA:
        lba[0] = _be32(cdb + 2)
        blocks[0] = _be32(cdb + 6)
    else:
        lba[0] = _be64(cdb + 2)
        blocks[0] = _be32(cdb + 10)


cdef int cdb_len(uint8_t op) noexcept nogil:
    cdef int group = op >> 5
    if group == 0:
        return 6
    if group == 1 or group == 2:
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    return 16


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
                if not (<Device>j.owner).try_fast(j, &scratch, &cap):
                    with gil:
                        j.result = (<Device>j.owner).run_job(j, &scratch, &cap)
                (<Device>j.owner).done(j)
    finally:
        free(scratch)


# ------------------------------------------------------------------ devices
cdef class Device:
    """One TCMU device: its ring's owner thread and its backend.

    backend: an object with `stack` (read_into), write(buf, offset),
    emulate(cdb, data_out) -> (status | Sense, data), slow(kind, cdb, data_out)
    -> status | Sense (SYNC / UNMAP / WRITE SAME), and `writable`."""
    cdef tcmu_device *dev
    cdef int uio_fd
    cdef int efd
    cdef pthread_mutex_t lock
    cdef Job *done_head
    cdef Job *done_tail
    cdef int inflight
    cdef volatile int stopping
    cdef uint64_t num_lbas
    cdef bint writable
    cdef uint64_t inline_max        # reads up to this size run on the owner thread when idle
    cdef char *scratch              # the owner thread's buffer for inline reads
    cdef size_t scratch_cap
    cdef bint solo                  # the command being submitted is the only one in the ring
    cdef object stack
    cdef stack_read_fn fast_read    # the core's GIL-free Stack read (NULL: not a core Stack)
    cdef void *stack_ptr            # borrowed: self.stack keeps it alive
    cdef object write_fn
    cdef object thread
    cdef public object backend
    cdef public str uio_name
    cdef public str cfgstring
    cdef public object user         # whatever the handler wants to keep here
    # statistics
    cdef public uint64_t n_cmds, n_reads, n_writes, n_other, bytes_read, bytes_written
    cdef public uint64_t max_read, max_write, n_errors

    def __cinit__(self):
        self.efd = -1
        self.uio_fd = -1
        pthread_mutex_init(&self.lock, NULL)

    def __dealloc__(self):
        if self.efd >= 0:
            close(self.efd)
        free(self.scratch)
        pthread_mutex_destroy(&self.lock)

    cdef bind(self, tcmu_device *dev):
        cdef const char *name = tcmu_dev_get_uio_name(dev)
        self.dev = dev
        self.uio_fd = tcmu_dev_get_fd(dev)
        self.uio_name = name.decode("utf-8", "replace") if name != NULL else ""
        self.cfgstring = tcmu_dev_get_cfgstring(dev).decode("utf-8", "surrogateescape")

    @property
    def wwn(self):
        """configfs wwn/vpd_unit_serial, or ''."""
        cdef char *s = tcmu_cfgfs_dev_get_wwn(self.dev)
        if s == NULL:
            return ""
        try:
            return s.decode("ascii", "replace").strip()
        finally:
            free(s)

    def set_geometry(self, uint64_t num_lbas, uint32_t block_size, uint32_t max_xfer_blocks,
                     bint writable, bint write_cache):
        if block_size != SECTOR:
            raise ValueError("only 512-byte blocks are supported")
        self.num_lbas = num_lbas
        self.writable = writable
        tcmu_dev_set_block_size(self.dev, block_size)
        tcmu_dev_set_num_lbas(self.dev, num_lbas)
        tcmu_dev_set_max_xfer_len(self.dev, max_xfer_blocks)
        tcmu_dev_set_write_cache_enabled(self.dev, write_cache)
        tcmu_dev_set_unmap_enabled(self.dev, writable)
        tcmu_dev_set_solid_state_media(self.dev, True)

    def start(self, backend, uint64_t inline_max=0):
        """Start serving the ring with `backend`.  Reads of at most
        `inline_max` bytes arriving when nothing is in flight are done by the
        owner thread itself (no hand-off to a worker: lower latency)."""
        self.backend = backend
        self.inline_max = inline_max
        self.stack = backend.stack
        self.fast_read = NULL
        self.stack_ptr = NULL
        from tcmu_obd import _lsmt
        if type(self.stack) is _lsmt.Stack:
            self.fast_read = <stack_read_fn>PyCapsule_GetPointer(_lsmt.STACK_READ,
                                                                 b"tcmu_obd._lsmt.stack_read_nogil")
            self.stack_ptr = <void *>self.stack
        self.write_fn = backend.write
        self.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")
        self.thread = threading.Thread(target=self._owner, name=f"tcmu-{self.uio_name}", daemon=True)
        self.thread.start()

    def stop(self):
        """Stop the owner thread once every queued command is completed."""
        cdef uint64_t one = 1
        if self.thread is None:
            return
        self.stopping = 1
        write(self.efd, &one, 8)
        self.thread.join()
        self.thread = None

    def stats(self):
        return {"commands": self.n_cmds, "reads": self.n_reads, "writes": self.n_writes,
                "other": self.n_other, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "max_read": self.max_read,
                "max_write": self.max_write, "errors": self.n_errors}

    # -------------------------------------------------------------- owner thread
    def _owner(self):
        with nogil:
            self.loop()

    cdef void done(self, Job *j) noexcept nogil:
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        job_append(&self.done_head, &self.done_tail, j)
        pthread_mutex_unlock(&self.lock)
        write(self.efd, &one, 8)

    cdef void loop(self) noexcept nogil:
        cdef pollfd fds[2]
        cdef int nfds, rc, completed
        cdef bint uio_ok = True
        cdef uint64_t v
        cdef tcmulib_cmd *cmd
        cdef tcmulib_cmd *nxt_cmd
        cdef Job *j
        cdef Job *nxt
        while True:
            fds[0].fd = self.efd
            fds[0].events = POLLIN
            fds[0].revents = 0
            nfds = 1
            if uio_ok and not self.stopping:
                fds[1].fd = self.uio_fd
                fds[1].events = POLLIN
                fds[1].revents = 0
                nfds = 2
            rc = poll(fds, nfds, 1000)
            if rc < 0 and errno != EINTR:
                break
            if fds[0].revents & POLLIN:
                read(self.efd, &v, 8)
            completed = 0
            if nfds == 2 and fds[1].revents:
                if fds[1].revents & (POLLERR | POLLHUP | POLLNVAL):
                    uio_ok = False          # the device is going away
                else:
                    tcmulib_processing_start(self.dev)
                    cmd = tcmulib_get_next_command(self.dev, sizeof(Job))
                    while cmd != NULL:
                        nxt_cmd = tcmulib_get_next_command(self.dev, sizeof(Job))
                        self.solo = nxt_cmd == NULL
                        self.n_cmds += 1
                        rc = self.submit(cmd)
                        if rc != QUEUED:
                            if rc != TCMU_STS_OK:
                                self.n_errors += 1
                            tcmulib_command_complete(self.dev, cmd, rc)
                            completed += 1
                        cmd = nxt_cmd
            pthread_mutex_lock(&self.lock)
            j = self.done_head
            self.done_head = self.done_tail = NULL
            pthread_mutex_unlock(&self.lock)
            while j != NULL:
                nxt = j.next
                self.inflight -= 1
                if j.result != TCMU_STS_OK:
                    self.n_errors += 1
                tcmulib_command_complete(self.dev, j.cmd, j.result)    # frees cmd and j
                completed += 1
                j = nxt
            if completed:
                tcmulib_processing_complete(self.dev)
            if self.stopping and self.inflight == 0:
                break

    cdef int submit(self, tcmulib_cmd *cmd) noexcept nogil:
        """Check a command; queue it (QUEUED) or return its status now."""
        cdef const uint8_t *cdb = cmd.cdb
        cdef Job *j = <Job *>cmd.hm_private
        cdef int kind = cdb_kind(cdb)
        cdef uint64_t lba = 0, blocks = 0
        j.cmd = cmd
        j.owner = <void *>self
        j.kind = kind
        j.result = TCMU_STS_OK
        if kind == K_READ or kind == K_WRITE:
            cdb_rw(cdb, &lba, &blocks)
            if lba > self.num_lbas or blocks > self.num_lbas - lba:
                return TCMU_STS_RANGE
            if kind == K_WRITE and not self.writable:
                return tcmu_sense_set_data(cmd.sense_buf, 0x07, 0x2700)   # DATA PROTECT / WRITE PROTECTED
            if blocks == 0:
                return TCMU_STS_OK
            j.offset = lba * SECTOR
            j.length = blocks * SECTOR
            if j.length > iov_total(cmd):
                return TCMU_STS_INVALID_CDB
            if kind == K_READ:
                self.n_reads += 1
                self.bytes_read += j.length
                if j.length > self.max_read:
                    self.max_read = j.length
                if j.length <= self.inline_max and self.solo and self.inflight == 0:
                    # alone in the ring: the GIL-free core read costs less than a hand-off
                    # to a worker (at depth, workers keep reads of a real disk in parallel)
                    if self.try_fast(j, &self.scratch, &self.scratch_cap):
                        return j.result
                    with gil:
                        return self.run_job(j, &self.scratch, &self.scratch_cap)
            else:
                self.n_writes += 1
                self.bytes_written += j.length
                if j.length > self.max_write:
                    self.max_write = j.length
        elif kind == K_EMULATE:
            self.n_other += 1
            with gil:
                return self.run_emulate(cmd)
        else:
            self.n_other += 1
            if kind == K_SYNC and not self.writable:
                return TCMU_STS_OK
            if (kind == K_UNMAP or kind == K_WRITE_SAME) and not self.writable:
                return tcmu_sense_set_data(cmd.sense_buf, 0x07, 0x2700)
        self.inflight += 1
        queue_put(j)
        return QUEUED

    # -------------------------------------------------------------- with the GIL
    cdef bytes data_out(self, tcmulib_cmd *cmd, uint64_t limit):
        cdef uint64_t n = iov_total(cmd)
        if n > limit:
            n = limit
        out = PyBytes_FromStringAndSize(NULL, n)
        iov_gather(cmd, PyBytes_AS_STRING(out), n)
        return out

    cdef int status(self, tcmulib_cmd *cmd, object st) except? -99:
        """A status int, or a Sense(key, asc, ascq) written into sense_buf."""
        if isinstance(st, tuple):
            return tcmu_sense_set_data(cmd.sense_buf, st[0], (st[1] << 8) | st[2])
        return st

    cdef int run_emulate(self, tcmulib_cmd *cmd) noexcept:
        cdef bytes data
        cdef int n = cdb_len(cmd.cdb[0])
        try:
            cdb = PyBytes_FromStringAndSize(<char *>cmd.cdb, n)
            st, data = self.backend.emulate(cdb, self.data_out(cmd, 1 << 20))
            if data:
                iov_scatter(cmd, PyBytes_AS_STRING(data), min(<uint64_t>len(data), iov_total(cmd)))
            return self.status(cmd, st)
        except BaseException:
            log.exception("%s: emulating opcode 0x%02x failed", self.uio_name, cmd.cdb[0])
            return TCMU_STS_HW_ERR

    cdef bint try_fast(self, Job *j, char **scratch, size_t *cap) noexcept nogil:
        """A read straight from the core without the GIL; False when it needs
        run_job (not a read, not a core Stack, a cache miss or an error)."""
        cdef tcmulib_cmd *cmd = j.cmd
        cdef char *p
        cdef bint direct
        if j.kind != K_READ or self.fast_read == NULL:
            return False
        p = io_buf(cmd, j.length, scratch, cap, &direct)
        if p == NULL:
            return False
        if self.fast_read(self.stack_ptr, p, j.offset, j.length) != 0:
            return False
        if not direct:
            iov_scatter(cmd, p, j.length)
        j.result = TCMU_STS_OK
        return True

    cdef int run_job(self, Job *j, char **scratch, size_t *cap) noexcept:
        """In a worker thread: the job's one Python call."""
        cdef tcmulib_cmd *cmd = j.cmd
        cdef char *p
        cdef bint direct
        try:
            if j.kind == K_READ or j.kind == K_WRITE:
                p = io_buf(cmd, j.length, scratch, cap, &direct)
                if p == NULL:
                    return TCMU_STS_NO_RESOURCE
                if j.kind == K_READ:
                    self.stack.read_into(RawBuf.wrap(p, j.length, False), j.offset)
                    if not direct:
                        with nogil:
                            iov_scatter(cmd, p, j.length)
                else:
                    if not direct:
                        with nogil:
                            iov_gather(cmd, p, j.length)
                    self.write_fn(memoryview(RawBuf.wrap(p, j.length, True)), j.offset)
                return TCMU_STS_OK
            cdb = PyBytes_FromStringAndSize(<char *>cmd.cdb, cdb_len(cmd.cdb[0]))
            data = self.data_out(cmd, 1 << 20) if j.kind != K_SYNC else b""
            return self.status(cmd, self.backend.slow(j.kind, cdb, data))
        except BaseException as e:
            log.error("%s: %s at byte %d failed: %s", self.uio_name,
                      {K_READ: "read", K_WRITE: "write"}.get(j.kind, f"opcode 0x{cmd.cdb[0]:02x}"),
                      j.offset, e)
            return TCMU_STS_RD_ERR if j.kind == K_READ else TCMU_STS_WR_ERR


# ------------------------------------------------------------------ context + callbacks
cdef object _active = None          # the Context whose handler libtcmu calls


cdef int _cb_added(tcmu_device *dev) noexcept with gil:
    cdef Device d
    ctx = _active
    if ctx is None:
        return -EIO
    try:
        d = Device.__new__(Device)
        d.bind(dev)
        rc = ctx.handler.added(d)
        if rc:
            return rc if rc < 0 else -rc
        Py_INCREF(d)
        tcmu_dev_set_private(dev, <void *>d)
        ctx.devices[d.uio_name] = d
        return 0
    except BaseException:
        log.exception("added() failed")
        return -EIO


cdef void _cb_removed(tcmu_device *dev) noexcept with gil:
    cdef void *p = tcmu_dev_get_private(dev)
    cdef Device d
    if p == NULL:
        return
    d = <Device>p
    ctx = _active
    try:
        d.stop()
        if ctx is not None:
            ctx.devices.pop(d.uio_name, None)
            ctx.handler.removed(d)
    except BaseException:
        log.exception("%s: removed() failed", d.uio_name)
    finally:
        tcmu_dev_set_private(dev, NULL)
        Py_DECREF(d)


cdef class Context:
    """A libtcmu context with one handler (subtype) served by `handler`
    (a Python object with added(Device) -> 0 / -errno and removed(Device))."""
    cdef tcmulib_context *ctx
    cdef tcmulib_handler h
    cdef bytes _name, _subtype, _desc
    cdef public object handler
    cdef public dict devices

    def __init__(self, handler, str subtype, str name, str cfg_desc):
        self.handler = handler
        self.devices = {}
        self._name, self._subtype, self._desc = name.encode(), subtype.encode(), cfg_desc.encode()
        memset(&self.h, 0, sizeof(self.h))
        self.h.name = self._name
        self.h.subtype = self._subtype
        self.h.cfg_desc = self._desc
        self.h.added = _cb_added
        self.h.removed = _cb_removed

    def open(self):
        """tcmulib_initialize: may call added() for devices that already
        exist (the reopen path).  False when libtcmu cannot start (no
        target_core_user)."""
        global _active
        if _active is not None:
            raise RuntimeError("one libtcmu context per process")
        _active = self
        with nogil:
            self.ctx = tcmulib_initialize(&self.h, 1)
        if self.ctx == NULL:
            _active = None
            return False
        return True

    @property
    def master_fd(self):
        return tcmulib_get_master_fd(self.ctx)

    def set_rcvbuf(self, int size):
        """Force the netlink receive buffer to `size` bytes and ask for no
        ENOBUFS, so a burst of device adds is not dropped."""
        cdef int fd = tcmulib_get_master_fd(self.ctx)
        cdef int one = 1
        rc = setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(int))
        if rc != 0:
            rc = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(int))
        setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(int))
        return rc == 0

    def master_ready(self):
        cdef int rc
        with nogil:
            rc = tcmulib_master_fd_ready(self.ctx)
        return rc

    def register_dbus(self):
        tcmulib_register(self.ctx)

    def close(self):
        """tcmulib_close: blocks each device, waits for its ring to drain,
        calls removed(), unblocks it, closes netlink."""
        global _active
        if self.ctx != NULL:
            with nogil:
                tcmulib_close(self.ctx)
            self.ctx = NULL
        _active = None


def set_log_level(int level):
    tcmu_set_log_level(level)


def mod_param_set(str name, uint32_t value):
    return tcmu_cfgfs_mod_param_set_u32(name.encode(), value)
