/* Raw CRC32C (Castagnoli) as overlaybd uses it: reflected polynomial
 * 0x82F63B78, no initial inversion and no final XOR.  obd_crc32c(0, data)
 * is overlaybd's crc32c(); obd_crc32c(100007, data) is its salted block CRC.
 * This header is for the Cython core only; it declares no libtcmu API. */
#ifndef OBD_CRC32C_H
#define OBD_CRC32C_H
#include <stddef.h>
#include <stdint.h>

uint32_t obd_crc32c(uint32_t seed, const void *data, size_t len);
/* 1 when the SSE4.2 instruction path is in use, 0 for the table fallback. */
int obd_crc32c_hw(void);

#endif
