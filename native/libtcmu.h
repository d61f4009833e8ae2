/*
 * Our own declarations of the part of libtcmu (Debian 12 libtcmu2 1.5.4,
 * libtcmu.so.2) that tcmu-obd uses.  Debian ships no header and no -dev
 * package, so the structures below are written from the documented layout
 * (docs/runtime.md, libtcmu interface: x86_64 offsets checked with offsetof against the
 * v1.5.4 headers) and checked again at compile time by the static asserts
 * at the end of this file.
 *
 * struct tcmu_device and struct tcmulib_context are opaque: use accessors.
 */
#ifndef TCMU_OBD_LIBTCMU_H
#define TCMU_OBD_LIBTCMU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCMU_OBD_SENSE_BUFFERSIZE 96

struct tcmu_device;
struct tcmulib_context;

enum tcmulib_cfg_type {
    TCMULIB_CFG_DEV_CFGSTR,
    TCMULIB_CFG_DEV_SIZE,
    TCMULIB_CFG_WRITE_CACHE,
};

struct tcmulib_cfg_info {
    enum tcmulib_cfg_type type;
    union {
        uint64_t dev_size;
        char *dev_cfgstring;
        bool write_cache;
    } data;
};

struct tcmulib_handler {
    const char *name;                                                  /*  0 */
    const char *subtype;                                               /*  8 */
    const char *cfg_desc;                                              /* 16 */
    struct tcmulib_context *ctx;                                       /* 24 */
    bool (*check_config)(const char *cfgstring, char **reason);        /* 32 */
    int (*reconfig)(struct tcmu_device *dev, struct tcmulib_cfg_info *cfg); /* 40 */
    bool (*update_logdir)(void);                                       /* 48 */
    int (*added)(struct tcmu_device *dev);                             /* 56 */
    void (*removed)(struct tcmu_device *dev);                          /* 64 */
    void *hm_private;                                                  /* 72 */
    void *connection;                                                  /* 80 */
};

struct tcmulib_cmd {
    uint16_t cmd_id;                                                   /*   0 */
    uint8_t *cdb;                                                      /*   8 */
    struct iovec *iovec;                                               /*  16 */
    size_t iov_cnt;                                                    /*  24 */
    uint8_t sense_buf[TCMU_OBD_SENSE_BUFFERSIZE];                      /*  32 */
    void *hm_private;                                                  /* 128 */
};

/* The `int result` of tcmulib_command_complete (TCMU_STS_*). */
enum {
    TCMU_STS_ASYNC_HANDLED = -2,
    TCMU_STS_NOT_HANDLED = -1,
    TCMU_STS_OK = 0,
    TCMU_STS_NO_RESOURCE = 1,
    TCMU_STS_PASSTHROUGH_ERR = 2,   /* the handler filled sense_buf itself */
    TCMU_STS_BUSY = 3,
    TCMU_STS_WR_ERR = 4,
    TCMU_STS_RD_ERR = 5,
    TCMU_STS_MISCOMPARE = 6,
    TCMU_STS_INVALID_CMD = 7,
    TCMU_STS_INVALID_CDB = 8,
    TCMU_STS_INVALID_PARAM_LIST = 9,
    TCMU_STS_INVALID_PARAM_LIST_LEN = 10,
    TCMU_STS_TIMEOUT = 11,
    TCMU_STS_FENCED = 12,
    TCMU_STS_HW_ERR = 13,
    TCMU_STS_RANGE = 14,
    TCMU_STS_FRMT_IN_PROGRESS = 15,
    TCMU_STS_CAPACITY_CHANGED = 16,
    TCMU_STS_NOTSUPP_SAVE_PARAMS = 17,
    TCMU_STS_WR_ERR_INCOMPAT_FRMT = 18,
};

/* context */
struct tcmulib_context *tcmulib_initialize(struct tcmulib_handler *handlers, size_t handler_count);
void tcmulib_register(struct tcmulib_context *ctx);
int tcmulib_get_master_fd(struct tcmulib_context *ctx);
int tcmulib_master_fd_ready(struct tcmulib_context *ctx);
void tcmulib_close(struct tcmulib_context *ctx);

/* commands */
void tcmulib_processing_start(struct tcmu_device *dev);
struct tcmulib_cmd *tcmulib_get_next_command(struct tcmu_device *dev, int hm_cmd_size);
void tcmulib_command_complete(struct tcmu_device *dev, struct tcmulib_cmd *cmd, int result);
void tcmulib_processing_complete(struct tcmu_device *dev);

/* device accessors */
int tcmu_dev_get_fd(struct tcmu_device *dev);
char *tcmu_dev_get_cfgstring(struct tcmu_device *dev);
const char *tcmu_dev_get_uio_name(struct tcmu_device *dev);
void tcmu_dev_set_private(struct tcmu_device *dev, void *priv);
void *tcmu_dev_get_private(struct tcmu_device *dev);
void tcmu_dev_set_num_lbas(struct tcmu_device *dev, uint64_t num_lbas);
uint64_t tcmu_dev_get_num_lbas(struct tcmu_device *dev);
void tcmu_dev_set_block_size(struct tcmu_device *dev, uint32_t block_size);
uint32_t tcmu_dev_get_block_size(struct tcmu_device *dev);
void tcmu_dev_set_max_xfer_len(struct tcmu_device *dev, uint32_t len);
uint32_t tcmu_dev_get_max_xfer_len(struct tcmu_device *dev);
void tcmu_dev_set_write_cache_enabled(struct tcmu_device *dev, bool enabled);
bool tcmu_dev_get_write_cache_enabled(struct tcmu_device *dev);
void tcmu_dev_set_unmap_enabled(struct tcmu_device *dev, bool enabled);
bool tcmu_dev_get_unmap_enabled(struct tcmu_device *dev);
void tcmu_dev_set_solid_state_media(struct tcmu_device *dev, bool solid_state);
bool tcmu_dev_oooc_supported(struct tcmu_device *dev);

/* configfs helpers */
char *tcmu_cfgfs_dev_get_wwn(struct tcmu_device *dev);         /* malloc'd, or NULL */
int tcmu_cfgfs_mod_param_set_u32(const char *name, uint32_t val);

/* sense data: zeroes 96 bytes, fills fixed-format sense, returns PASSTHROUGH_ERR */
int tcmu_sense_set_data(uint8_t *sense_buf, uint8_t key, uint16_t asc_ascq);

/* logging (messages at INFO and above go to stderr without tcmu_setup_log) */
void tcmu_set_log_level(int level);

#ifdef __cplusplus
}
#endif

/* The layout is what libtcmu.so.2 was built with: fail the build, not the run. */
_Static_assert(sizeof(struct tcmulib_handler) == 88, "tcmulib_handler size");
_Static_assert(offsetof(struct tcmulib_handler, added) == 56, "tcmulib_handler.added");
_Static_assert(offsetof(struct tcmulib_handler, removed) == 64, "tcmulib_handler.removed");
_Static_assert(sizeof(struct tcmulib_cmd) == 136, "tcmulib_cmd size");
_Static_assert(offsetof(struct tcmulib_cmd, iovec) == 16, "tcmulib_cmd.iovec");
_Static_assert(offsetof(struct tcmulib_cmd, sense_buf) == 32, "tcmulib_cmd.sense_buf");
_Static_assert(offsetof(struct tcmulib_cmd, hm_private) == 128, "tcmulib_cmd.hm_private");
_Static_assert(sizeof(struct tcmulib_cfg_info) == 16, "tcmulib_cfg_info size");

#endif
