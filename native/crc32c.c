/* Raw CRC32C for the Cython core: the SSE4.2 crc32 instruction when the CPU
 * has it, else a slicing-by-8 table.  Both compute the same raw update (no
 * inversions); see crc32c.h.  Nothing else lives here. */
#include "crc32c.h"
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#define POLY 0x82F63B78u
#define LONG_L 8192      /* bytes per chain in the 3-way loop, large inputs */
#define SHORT_L 256      /* and for what is left */

static uint32_t table[8][256];
#if defined(__x86_64__)
static uint32_t shift_long[4][256], shift_short[4][256];
static void build_shift(uint32_t t[4][256], size_t len);
#endif
static int ready = 0;
static int use_hw = 0;

static void init_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
#if defined(__x86_64__)
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2");
    {
        /* qemu's software emulation (TCG) emulates crc32 per byte: its
         * hypervisor leaf says "TCGTCGTCGTCG", and the table is faster there */
        unsigned a, b, c, d;
        __cpuid(0x40000000, a, b, c, d);
        if (b == 0x54474354 && c == 0x43544743 && d == 0x47435447)
            use_hw = 0;
    }
    if (use_hw) {
        build_shift(shift_long, LONG_L);
        build_shift(shift_short, SHORT_L);
    }
#endif
    ready = 1;
}

static uint32_t crc_table(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^
              table[5][(w >> 16) & 0xFF] ^ table[4][(w >> 24) & 0xFF] ^
              table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^
              table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
/* Three independent crc32 chains hide the instruction's 3-cycle latency.
 * The raw CRC is linear with no inversions, so
 *   crc(s, A|B|C) = shift_L(shift_L(crc(s,A)) ^ crc(0,B)) ^ crc(0,C)
 * where shift_L multiplies by x^(8L) mod P; shift tables are built once. */

__attribute__((target("sse4.2")))
static uint32_t crc_hw1(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

static void build_shift(uint32_t t[4][256], size_t len)
{
    static const unsigned char zeros[LONG_L];
    uint32_t bit[32];
    for (int k = 0; k < 32; k++)
        bit[k] = crc_hw1(1u << k, zeros, len);
    for (int j = 0; j < 4; j++)
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int k = 0; k < 8; k++)
                if (b & (1 << k))
                    v ^= bit[8 * j + k];
            t[j][b] = v;
        }
}

static inline uint32_t shift(uint32_t t[4][256], uint32_t c)
{
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc_3way(uint32_t crc, const unsigned char *p, size_t n, size_t L, uint32_t t[4][256])
{
    while (n >= 3 * L) {
        uint64_t a = crc, b = 0, c = 0;
        const unsigned char *q = p + L, *r = p + 2 * L;
        for (size_t i = 0; i < L; i += 8) {
            uint64_t wa, wb, wc;
            memcpy(&wa, p + i, 8);
            memcpy(&wb, q + i, 8);
            memcpy(&wc, r + i, 8);
            a = __builtin_ia32_crc32di(a, wa);
            b = __builtin_ia32_crc32di(b, wb);
            c = __builtin_ia32_crc32di(c, wc);
        }
        crc = shift(t, shift(t, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * L;
        n -= 3 * L;
    }
    return crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    size_t before = n;
    crc = crc_3way(crc, p, n, LONG_L, shift_long);
    p += before - (n % (3 * LONG_L));
    n %= 3 * LONG_L;
    before = n;
    crc = crc_3way(crc, p, n, SHORT_L, shift_short);
    p += before - (n % (3 * SHORT_L));
    n %= 3 * SHORT_L;
    return crc_hw1(crc, p, n);
}
#endif

uint32_t obd_crc32c(uint32_t seed, const void *data, size_t len)
{
    if (!ready)
        init_tables();
#if defined(__x86_64__)
    if (use_hw)
        return crc_hw(seed, (const unsigned char *)data, len);
#endif
    return crc_table(seed, (const unsigned char *)data, len);
}

int obd_crc32c_hw(void)
{
    if (!ready)
        init_tables();
    return use_hw;
}
