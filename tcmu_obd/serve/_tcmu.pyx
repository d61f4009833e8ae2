# cython: language_level=3, boundscheck=False, wraparound=False
"""The TCMU data path on Debian's libtcmu.so.2 (declared in native/libtcmu.h).

Threads:
- the caller's thread (the daemon's main loop) polls the netlink master fd
  and runs Context.master_ready(); libtcmu calls added()/removed() from
  there, and they call the Python handler (tcmu_obd.serve.handler).
- one owner thread per device ring: it polls the UIO fd and an eventfd,
  pulls commands (tcmulib_processing_start / get_next_command), looks
  each CDB up in the opcode table below (Device.dispatch: the one place
  that knows SCSI opcodes), checks READ/WRITE (6/10/12/16) in C and queues
  them to the worker pool, answers the other commands through the
  backend's emulate() (with the GIL), and completes every command itself (tcmulib_command_complete, then
  one tcmulib_processing_complete per batch).  libtcmu has no locks, so
  nothing else touches the ring.
- a shared pool of worker threads: one Python call per READ/WRITE
  (Stack.read_into / Image.write, which release the GIL for the I/O).  A
  read whose data area is one iovec lands straight in the ring; otherwise
  it goes through a per-worker buffer copied into the iovecs in C.  The job
  lives in the command's hm_private area (no malloc per command); the
  worker queues it on its device's done list and wakes the owner through
  the eventfd.
run_cdb() runs one CDB through the same dispatch and worker code without a
kernel, for the host tests.  Not here: the data of emulated commands
(tcmu_obd.serve.scsi), opening images (tcmu_obd.serve.handler).
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

# ------------------------------------------------------------------ the opcode table
# Every SCSI opcode the device answers, and how: the one place that knows
# opcodes (tcmu_obd.serve.scsi builds the data of the emulated commands by name).
# kind: read/write (CDB checked in C, I/O in the core), a slow command
# (backend.slow(name, cdb, data_out, lba, blocks): SYNCHRONIZE CACHE, UNMAP,
# WRITE SAME), or emulated (backend.emulate(name, cdb, data_out)).  form:
# where the LBA and block count are.  xfer_at/xfer_size: the allocation
# length (data in, cut to it) or parameter list length (data out, must all
# be there).  sa >= 0: the service action in CDB byte 1 must match.  Sorted
# by opcode.  Anything not here is INVALID COMMAND OPERATION CODE, in C.
cdef extern from *:
    """
    enum { OBD_K_EMULATE, OBD_K_READ, OBD_K_WRITE, OBD_K_SYNC, OBD_K_UNMAP, OBD_K_WRITE_SAME };
    enum { OBD_F_NONE, OBD_F_6, OBD_F_10, OBD_F_12, OBD_F_16 };
    enum { OBD_D_NONE, OBD_D_IN, OBD_D_OUT };
    typedef struct {
        int op, sa, kind, form, dir, xfer_at, xfer_size;
        const char *name;
    } obd_scsi_op;
    static const obd_scsi_op obd_scsi_ops[] = {
        {0x00, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_NONE, 0, 0,  "test_unit_ready"},
        {0x03, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_IN,   4, 1,  "request_sense"},
        {0x08, -1, OBD_K_READ,       OBD_F_6,    OBD_D_IN,   0, 0,  "read_6"},
        {0x0A, -1, OBD_K_WRITE,      OBD_F_6,    OBD_D_OUT,  0, 0,  "write_6"},
        {0x12, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_IN,   3, 2,  "inquiry"},
        {0x15, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_OUT,  4, 1,  "mode_select_6"},
        {0x1A, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_IN,   4, 1,  "mode_sense_6"},
        {0x1B, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_NONE, 0, 0,  "start_stop_unit"},
        {0x25, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_IN,   0, 0,  "read_capacity_10"},
        {0x28, -1, OBD_K_READ,       OBD_F_10,   OBD_D_IN,   0, 0,  "read_10"},
        {0x2A, -1, OBD_K_WRITE,      OBD_F_10,   OBD_D_OUT,  0, 0,  "write_10"},
        {0x35, -1, OBD_K_SYNC,       OBD_F_10,   OBD_D_NONE, 0, 0,  "synchronize_cache"},
        {0x41, -1, OBD_K_WRITE_SAME, OBD_F_10,   OBD_D_OUT,  0, 0,  "write_same"},
        {0x42, -1, OBD_K_UNMAP,      OBD_F_NONE, OBD_D_OUT,  7, 2,  "unmap"},
        {0x55, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_OUT,  7, 2,  "mode_select_10"},
        {0x5A, -1, OBD_K_EMULATE,    OBD_F_NONE, OBD_D_IN,   7, 2,  "mode_sense_10"},
        {0x88, -1, OBD_K_READ,       OBD_F_16,   OBD_D_IN,   0, 0,  "read_16"},
        {0x8A, -1, OBD_K_WRITE,      OBD_F_16,   OBD_D_OUT,  0, 0,  "write_16"},
        {0x91, -1, OBD_K_SYNC,       OBD_F_16,   OBD_D_NONE, 0, 0,  "synchronize_cache"},
        {0x93, -1, OBD_K_WRITE_SAME, OBD_F_16,   OBD_D_OUT,  0, 0,  "write_same"},
        {0x9E, 0x10, OBD_K_EMULATE,  OBD_F_NONE, OBD_D_IN,  10, 4,  "read_capacity_16"},
        {0xA8, -1, OBD_K_READ,       OBD_F_12,   OBD_D_IN,   0, 0,  "read_12"},
        {0xAA, -1, OBD_K_WRITE,      OBD_F_12,   OBD_D_OUT,  0, 0,  "write_12"},
    };
    #define OBD_SCSI_NOPS ((int)(sizeof obd_scsi_ops / sizeof obd_scsi_ops[0]))
    """
    ctypedef struct obd_scsi_op:
        int op, sa, kind, form, dir, xfer_at, xfer_size
        const char *name
    const obd_scsi_op obd_scsi_ops[]
    int OBD_SCSI_NOPS
    enum:
        K_EMULATE "OBD_K_EMULATE"
        K_READ "OBD_K_READ"
        K_WRITE "OBD_K_WRITE"
        K_SYNC "OBD_K_SYNC"
        K_UNMAP "OBD_K_UNMAP"
        K_WRITE_SAME "OBD_K_WRITE_SAME"
        F_NONE "OBD_F_NONE"
        F_6 "OBD_F_6"
        F_10 "OBD_F_10"
        F_12 "OBD_F_12"
        F_16 "OBD_F_16"
        D_NONE "OBD_D_NONE"
        D_IN "OBD_D_IN"
        D_OUT "OBD_D_OUT"

cdef short _op_first[256]          # index of an opcode's first table entry, or -1


cdef _index_ops():
    cdef int i
    for i in range(256):
        _op_first[i] = -1
    for i in range(OBD_SCSI_NOPS):
        if i and obd_scsi_ops[i].op < obd_scsi_ops[i - 1].op:
            raise ImportError(f"the SCSI opcode table is not sorted at entry {i}")
        if _op_first[obd_scsi_ops[i].op] < 0:
            _op_first[obd_scsi_ops[i].op] = i

_index_ops()


cdef const obd_scsi_op *op_lookup(const uint8_t *cdb) noexcept nogil:
    """The table entry of a CDB, or NULL (not supported)."""
    cdef int i = _op_first[cdb[0]]
    if i < 0:
        return NULL
    while i < OBD_SCSI_NOPS and obd_scsi_ops[i].op == cdb[0]:
        if obd_scsi_ops[i].sa < 0 or obd_scsi_ops[i].sa == (cdb[1] & 0x1F):
            return &obd_scsi_ops[i]
        i += 1
    return NULL


def opcode_table():
    """The table, for tests and docs: [(opcode, service action or None, kind,
    name)], kind one of 'read', 'write', 'sync', 'unmap', 'write_same', 'emulate'."""
    names = {K_EMULATE: "emulate", K_READ: "read", K_WRITE: "write", K_SYNC: "sync",
             K_UNMAP: "unmap", K_WRITE_SAME: "write_same"}
    return [(obd_scsi_ops[i].op, None if obd_scsi_ops[i].sa < 0 else obd_scsi_ops[i].sa,
             names[obd_scsi_ops[i].kind], obd_scsi_ops[i].name.decode()) for i in range(OBD_SCSI_NOPS)]


STS_OK = TCMU_STS_OK
STS_RD_ERR = TCMU_STS_RD_ERR
STS_WR_ERR = TCMU_STS_WR_ERR
STS_PASSTHROUGH_ERR = TCMU_STS_PASSTHROUGH_ERR


ctypedef int (*stack_read_fn)(void *stack, char *dst, uint64_t offset, uint64_t length) noexcept nogil


cdef struct Job:
    tcmulib_cmd *cmd
    void *owner            # the Device (borrowed: it outlives its jobs)
    Job *next
    const obd_scsi_op *op  # the command's table entry
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


cdef void cdb_lba(const obd_scsi_op *op, const uint8_t *cdb, uint64_t *lba, uint64_t *blocks) noexcept nogil:
    """The LBA and block count of a CDB whose table entry has a form (0, 0 without)."""
    if op.form == F_6:
        lba[0] = ((<uint64_t>(cdb[1] & 0x1F)) << 16) | _be16(cdb + 2)
        blocks[0] = cdb[4] if cdb[4] else 256
    elif op.form == F_10:
        lba[0] = _be32(cdb + 2)
        blocks[0] = _be16(cdb + 7)
    elif op.form == F_12:
        lba[0] = _be32(cdb + 2)
        blocks[0] = _be32(cdb + 6)
    elif op.form == F_16:
        lba[0] = _be64(cdb + 2)
        blocks[0] = _be32(cdb + 10)
    else:
        lba[0] = blocks[0] = 0


cdef uint64_t cdb_xfer(const obd_scsi_op *op, const uint8_t *cdb) noexcept nogil:
    """The allocation / parameter list length field (bytes), or -1 without one."""
    cdef uint64_t n = 0
    cdef int i
    if op.xfer_size == 0:
        return <uint64_t>-1
    for i in range(op.xfer_size):
        n = (n << 8) | cdb[op.xfer_at + i]
    return n


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
                (<Device>j.owner).work(j, &scratch, &cap)
                (<Device>j.owner).done(j)
    finally:
        free(scratch)


# ------------------------------------------------------------------ devices
cdef class Device:
    """One TCMU device: its ring's owner thread and its backend.

    backend: an object with `stack` (read_into), write(buf, offset),
    emulate(name, cdb, data_out) -> (status | Sense, data), slow(name, cdb,
    data_out, lba, blocks) -> status | Sense (SYNC / UNMAP / WRITE SAME), and
    `writable`; `name` is the command's name in the opcode table."""
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
        self.use_backend(backend, inline_max)
        self.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")
        self.thread = threading.Thread(target=self._owner, name=f"tcmu-{self.uio_name}", daemon=True)
        self.thread.start()

    cdef use_backend(self, backend, uint64_t inline_max):
        self.backend = backend
        self.inline_max = inline_max
        self.stack = backend.stack
        self.fast_read = NULL
        self.stack_ptr = NULL
        from tcmu_obd.core import _lsmt
        if type(self.stack) is _lsmt.Stack:
            self.fast_read = <stack_read_fn>PyCapsule_GetPointer(_lsmt.STACK_READ,
                                                                 b"tcmu_obd.core._lsmt.stack_read_nogil")
            self.stack_ptr = <void *>self.stack
        self.write_fn = backend.write

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
        cdef int rc = self.dispatch(cmd)
        if rc == QUEUED:
            self.inflight += 1
            queue_put(<Job *>cmd.hm_private)
        return rc

    cdef int dispatch(self, tcmulib_cmd *cmd) noexcept nogil:
        """Look the CDB up in the opcode table and check it: its status now,
        or QUEUED when the job in cmd.hm_private must go to a worker (work())."""
        cdef const uint8_t *cdb = cmd.cdb
        cdef Job *j = <Job *>cmd.hm_private
        cdef const obd_scsi_op *op = op_lookup(cdb)
        cdef int kind
        cdef uint64_t lba = 0, blocks = 0
        if op == NULL:
            self.n_other += 1
            return TCMU_STS_INVALID_CMD
        kind = op.kind
        j.cmd = cmd
        j.owner = <void *>self
        j.op = op
        j.kind = kind
        j.result = TCMU_STS_OK
        j.offset = j.length = 0
        if kind == K_READ or kind == K_WRITE:
            cdb_lba(op, cdb, &lba, &blocks)
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
                return self.run_emulate(cmd, op)
        else:
            self.n_other += 1
            if kind == K_SYNC and not self.writable:
                return TCMU_STS_OK
            if (kind == K_UNMAP or kind == K_WRITE_SAME) and not self.writable:
                return tcmu_sense_set_data(cmd.sense_buf, 0x07, 0x2700)
        return QUEUED

    cdef void work(self, Job *j, char **scratch, size_t *cap) noexcept nogil:
        """In a worker thread: run a queued job, leaving its status in j.result."""
        if not self.try_fast(j, scratch, cap):
            with gil:
                j.result = self.run_job(j, scratch, cap)

    # -------------------------------------------------------------- with the GIL
    cdef object data_out(self, tcmulib_cmd *cmd, const obd_scsi_op *op):
        """The command's data-out bytes: the parameter list when the CDB gives
        its length (None when the buffer holds less), else up to 1 MiB."""
        cdef uint64_t n = iov_total(cmd)
        cdef uint64_t want = cdb_xfer(op, cmd.cdb)
        if op.dir != D_OUT:
            return b""
        if want != <uint64_t>-1:
            if n < want:
                return None
            n = want
        elif n > (1 << 20):
            n = 1 << 20
        out = PyBytes_FromStringAndSize(NULL, n)
        iov_gather(cmd, PyBytes_AS_STRING(out), n)
        return out

    cdef int status(self, tcmulib_cmd *cmd, object st) except? -99:
        """A status int, or a Sense(key, asc, ascq) written into sense_buf."""
        if isinstance(st, tuple):
            return tcmu_sense_set_data(cmd.sense_buf, st[0], (st[1] << 8) | st[2])
        return st

    cdef int run_emulate(self, tcmulib_cmd *cmd, const obd_scsi_op *op) noexcept:
        cdef bytes data
        cdef int n = cdb_len(cmd.cdb[0])
        cdef uint64_t limit = iov_total(cmd)
        try:
            cdb = PyBytes_FromStringAndSize(<char *>cmd.cdb, n)
            out = self.data_out(cmd, op)
            if out is None:
                return TCMU_STS_INVALID_PARAM_LIST_LEN
            st, data = self.backend.emulate(op.name.decode(), cdb, out)
            if op.dir == D_IN and cdb_xfer(op, cmd.cdb) < limit:
                limit = cdb_xfer(op, cmd.cdb)             # the allocation length cuts the data
            if data and limit:
                limit = min(<uint64_t>len(data), limit)
                iov_scatter(cmd, PyBytes_AS_STRING(data), limit)
                (<Job *>cmd.hm_private).length = limit
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
        cdef uint64_t lba, blocks
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
            data = self.data_out(cmd, j.op)
            if data is None:
                return TCMU_STS_INVALID_PARAM_LIST_LEN
            lba = blocks = 0
            cdb_lba(j.op, cmd.cdb, &lba, &blocks)
            return self.status(cmd, self.backend.slow(j.op.name.decode(), cdb, data, lba, blocks))
        except BaseException as e:
            log.error("%s: %s at byte %d failed: %s", self.uio_name,
                      {K_READ: "read", K_WRITE: "write"}.get(j.kind, f"opcode 0x{cmd.cdb[0]:02x}"),
                      j.offset, e)
            return TCMU_STS_RD_ERR if j.kind == K_READ else TCMU_STS_WR_ERR


def run_cdb(backend, uint64_t num_lbas, bint writable, cdb, data=b"", Py_ssize_t data_in=0,
            int iovecs=1):
    """Run one command through the data path without a kernel: the CDB goes
    through Device.dispatch (what the ring's owner thread calls for every
    command) and, when queued, Device.work (what a worker runs), against
    `backend` (a handler.Backend over a real image).  `data`: the data-out
    bytes; data_in: the size of the data-in buffer; the buffer is cut into
    `iovecs` iovecs.  Returns (status, data-in bytes, sense bytes): the data
    is what an emulated command produced, or the whole buffer for a read."""
    cdef Device d = Device.__new__(Device)
    cdef tcmulib_cmd cmd
    cdef Job job
    cdef iovec iov[16]
    cdef uint8_t cdbbuf[32]
    cdef char *scratch = NULL
    cdef size_t cap = 0
    cdef int rc, i
    cdef Py_ssize_t size, per, at
    cdef char *base
    if not 1 <= len(cdb) <= 32 or not 1 <= iovecs <= 16:
        raise ValueError(f"a CDB of {len(cdb)} bytes in {iovecs} iovecs")
    d.num_lbas = num_lbas
    d.writable = writable
    d.uio_name = "run_cdb"
    d.use_backend(backend, 0)
    buf = bytearray(data) if data else bytearray(data_in)
    size = len(buf)
    base = <char *>buf if size else NULL
    per = size // iovecs
    at = 0
    for i in range(iovecs):
        iov[i].iov_base = base + at
        iov[i].iov_len = per if i < iovecs - 1 else size - at
        at += per
    memset(cdbbuf, 0, sizeof(cdbbuf))
    for i in range(len(cdb)):
        cdbbuf[i] = cdb[i]
    memset(&cmd, 0, sizeof(cmd))
    memset(&job, 0, sizeof(job))
    job.kind = -1
    cmd.cdb = cdbbuf
    cmd.iovec = iov
    cmd.iov_cnt = iovecs
    cmd.hm_private = &job
    try:
        with nogil:
            rc = d.dispatch(&cmd)
            if rc == QUEUED:
                d.work(&job, &scratch, &cap)
                rc = job.result
    finally:
        free(scratch)
    if rc == TCMU_STS_OK and job.kind == K_EMULATE:
        out = bytes(buf[:job.length])
    else:
        out = bytes(buf) if not data else b""
    return rc, out, bytes(cmd.sense_buf[:18])


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
