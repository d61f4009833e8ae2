"""One TCMU device ring (included by _tcmu.pyx): Device, whose owner thread
polls the ring, checks every command against the opcode table, runs
READ/WRITE through the core (GIL-free when it can) or the worker pool, asks
the backend for the rest, and completes each command; and run_cdb(), the
same path without a kernel for the host tests.

It does not talk to the netlink master (_tcmu_context.pxi) or open images
(tcmu_obd.serve.handler).
"""

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
    # latency of every command, ring to completion (owner thread only; read at scrape time)
    cdef uint64_t lat_count[LAT_NBOUNDS + 1]     # per bucket, not cumulative; the last is +Inf
    cdef uint64_t lat_sum_ns
    cdef uint64_t read_lat_max_ns               # since the last latency() call that reset it

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

    def latency(self, bint reset_max=False):
        """(bucket upper bounds in seconds, per-bucket counts with +Inf last,
        sum of latencies in seconds, largest read latency in seconds since
        the last call with reset_max).  Read without a lock: a scrape may see
        a count one command ahead of the sum."""
        cdef int k
        counts = [self.lat_count[k] for k in range(LAT_NBOUNDS + 1)]
        mx = self.read_lat_max_ns
        if reset_max:
            self.read_lat_max_ns = 0
        return [LAT_BOUNDS_US[k] / 1e6 for k in range(LAT_NBOUNDS)], counts, self.lat_sum_ns / 1e9, mx / 1e9

    cdef void timed(self, uint64_t t0, int kind) noexcept nogil:
        """Count one completed command that left the ring at t0 (owner thread)."""
        cdef uint64_t ns = now_ns() - t0
        cdef uint64_t us = ns // 1000
        cdef int k = 0
        while k < LAT_NBOUNDS and us > LAT_BOUNDS_US[k]:
            k += 1
        self.lat_count[k] += 1
        self.lat_sum_ns += ns
        if kind == K_READ and ns > self.read_lat_max_ns:
            self.read_lat_max_ns = ns

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
                        j = <Job *>cmd.hm_private
                        j.t0 = now_ns()
                        j.kind = -1
                        rc = self.submit(cmd)
                        if rc != QUEUED:
                            if rc != TCMU_STS_OK:
                                self.n_errors += 1
                            self.timed(j.t0, j.kind)
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
                self.timed(j.t0, j.kind)
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
        """Look the CDB up in the opcode table and hand it to the check of its
        kind: its status now, or QUEUED when the job in cmd.hm_private must go
        to a worker (work())."""
        cdef Job *j = <Job *>cmd.hm_private
        cdef const obd_scsi_op *op = op_lookup(cmd.cdb)
        if op == NULL:
            self.n_other += 1
            return TCMU_STS_INVALID_CMD
        j.cmd = cmd
        j.owner = <void *>self
        j.op = op
        j.kind = op.kind
        j.result = TCMU_STS_OK
        j.offset = j.length = 0
        if op.kind == K_READ or op.kind == K_WRITE:
            return self.check_io(cmd, j)
        self.n_other += 1
        if op.kind == K_EMULATE:
            with gil:
                return self.run_emulate(cmd, op)
        return self.check_slow(cmd, op.kind)

    cdef int check_io(self, tcmulib_cmd *cmd, Job *j) noexcept nogil:
        """READ/WRITE (6/10/12/16): the range, write protection and data area
        checked in C; a write is queued, a read goes to start_read."""
        cdef uint64_t lba = 0, blocks = 0
        cdb_lba(j.op, cmd.cdb, &lba, &blocks)
        if lba > self.num_lbas or blocks > self.num_lbas - lba:
            return TCMU_STS_RANGE
        if j.kind == K_WRITE and not self.writable:
            return tcmu_sense_set_data(cmd.sense_buf, 0x07, 0x2700)   # DATA PROTECT / WRITE PROTECTED
        if blocks == 0:
            return TCMU_STS_OK
        j.offset = lba * SECTOR
        j.length = blocks * SECTOR
        if j.length > iov_total(cmd):
            return TCMU_STS_INVALID_CDB
        if j.kind == K_READ:
            return self.start_read(j)
        self.n_writes += 1
        self.bytes_written += j.length
        if j.length > self.max_write:
            self.max_write = j.length
        return QUEUED

    cdef int start_read(self, Job *j) noexcept nogil:
        """A checked read: served here when it is small and alone in the ring
        (the GIL-free core read costs less than a hand-off to a worker; at
        depth, workers keep reads of a real disk in parallel), else QUEUED."""
        self.n_reads += 1
        self.bytes_read += j.length
        if j.length > self.max_read:
            self.max_read = j.length
        if j.length <= self.inline_max and self.solo and self.inflight == 0:
            if self.try_fast(j, &self.scratch, &self.scratch_cap):
                return j.result
            with gil:
                return self.run_job(j, &self.scratch, &self.scratch_cap)
        return QUEUED

    cdef int check_slow(self, tcmulib_cmd *cmd, int kind) noexcept nogil:
        """SYNCHRONIZE CACHE, UNMAP, WRITE SAME: queued for the backend's
        slow(); on a read-only device SYNC succeeds at once and the two that
        change data fail as WRITE PROTECTED."""
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
