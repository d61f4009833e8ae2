"""The libtcmu context of the TCMU data path (included by _tcmu.pyx): Context
registers the handler with libtcmu, exposes the netlink master fd for the
daemon's poll loop, and turns libtcmu's added()/removed() callbacks into
Device objects and calls of the Python handler.

It runs no command (_tcmu_device.pxi) and holds no policy about which
images to open (tcmu_obd.serve.handler).
"""

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
