# Cython declarations of native/libtcmu.h (our own header for Debian's
# libtcmu.so.2, which ships none).  _tcmu.pyx is the only user.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec


cdef extern from "libtcmu.h" nogil:
    struct tcmu_device:
        pass

    struct tcmulib_context:
        pass

    struct tcmulib_cfg_info:
        pass

    struct tcmulib_handler:
        const char *name
        const char *subtype
        const char *cfg_desc
        tcmulib_context *ctx
        bint (*check_config)(const char *cfgstring, char **reason) noexcept
        int (*reconfig)(tcmu_device *dev, tcmulib_cfg_info *cfg) noexcept
        bint (*update_logdir)() noexcept
        int (*added)(tcmu_device *dev) noexcept
        void (*removed)(tcmu_device *dev) noexcept
        void *hm_private
        void *connection

    struct tcmulib_cmd:
        uint16_t cmd_id
        uint8_t *cdb
        iovec *iovec
        size_t iov_cnt
        uint8_t sense_buf[96]
        void *hm_private

    enum:
        TCMU_OBD_SENSE_BUFFERSIZE
        TCMU_STS_ASYNC_HANDLED
        TCMU_STS_NOT_HANDLED
        TCMU_STS_OK
        TCMU_STS_NO_RESOURCE
        TCMU_STS_PASSTHROUGH_ERR
        TCMU_STS_BUSY
        TCMU_STS_WR_ERR
        TCMU_STS_RD_ERR
        TCMU_STS_INVALID_CMD
        TCMU_STS_INVALID_CDB
        TCMU_STS_INVALID_PARAM_LIST
        TCMU_STS_INVALID_PARAM_LIST_LEN
        TCMU_STS_HW_ERR
        TCMU_STS_RANGE
        TCMU_STS_NOTSUPP_SAVE_PARAMS

    tcmulib_context *tcmulib_initialize(tcmulib_handler *handlers, size_t handler_count)
    void tcmulib_register(tcmulib_context *ctx)
    int tcmulib_get_master_fd(tcmulib_context *ctx)
    int tcmulib_master_fd_ready(tcmulib_context *ctx)
    void tcmulib_close(tcmulib_context *ctx)

    void tcmulib_processing_start(tcmu_device *dev)
    tcmulib_cmd *tcmulib_get_next_command(tcmu_device *dev, int hm_cmd_size)
    void tcmulib_command_complete(tcmu_device *dev, tcmulib_cmd *cmd, int result)
    void tcmulib_processing_complete(tcmu_device *dev)

    int tcmu_dev_get_fd(tcmu_device *dev)
    char *tcmu_dev_get_cfgstring(tcmu_device *dev)
    const char *tcmu_dev_get_uio_name(tcmu_device *dev)
    void tcmu_dev_set_private(tcmu_device *dev, void *priv)
    void *tcmu_dev_get_private(tcmu_device *dev)
    void tcmu_dev_set_num_lbas(tcmu_device *dev, uint64_t num_lbas)
    void tcmu_dev_set_block_size(tcmu_device *dev, uint32_t block_size)
    void tcmu_dev_set_max_xfer_len(tcmu_device *dev, uint32_t length)
    void tcmu_dev_set_write_cache_enabled(tcmu_device *dev, bint enabled)
    void tcmu_dev_set_unmap_enabled(tcmu_device *dev, bint enabled)
    void tcmu_dev_set_solid_state_media(tcmu_device *dev, bint solid_state)

    char *tcmu_cfgfs_dev_get_wwn(tcmu_device *dev)

    int tcmu_sense_set_data(uint8_t *sense_buf, uint8_t key, uint16_t asc_ascq)
