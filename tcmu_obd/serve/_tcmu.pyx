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
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

log = logging.getLogger("tcmu_obd.tcmu")

# Upper bounds (µs) of the per-device command latency histogram (Device.latency).
_LAT_BOUNDS_PY = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                  500000, 1000000, 2500000)
cdef enum:
    LAT_NBOUNDS = 15
cdef uint64_t LAT_BOUNDS_US[LAT_NBOUNDS]
for _k, _b in enumerate(_LAT_BOUNDS_PY):
    LAT_BOUNDS_US[_k] = _b


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec

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


ctypedef int (*stack_read_fn)(void *stack, char *dst, uint64_t offset, uint64_t length) noexcept nogil

# The parts; one module, since they share cdef structs and functions.
include "_tcmu_scsi.pxi"        # the opcode table, its lookup, CDB field parsing
include "_tcmu_pool.pxi"        # jobs, the worker pool, iovec copies
include "_tcmu_device.pxi"      # Device (a ring's owner thread, dispatch) and run_cdb
include "_tcmu_context.pxi"     # Context (libtcmu registration) and its callbacks
