"""The SCSI side of the TCMU data path (included by _tcmu.pyx): the opcode
table, one declarative line per command the device answers (kind, where
its LBA and length fields are, data direction), its lookup, and the CDB
field parsers the table's forms name.

It runs no command and touches no ring: Device.dispatch (_tcmu_device.pxi)
acts on what the table says, and the data of emulated commands is built in
tcmu_obd.serve.scsi.
"""

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
