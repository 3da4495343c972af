/* The byte layout of the legacy GGML blocks' codes, shared by core.c (gguf-py-exact codecs) and
 * kquants.c (llama.cpp's weighted quantizers): one definition of where each bit of a code goes. */
#ifndef SWTOOL_GGML_BLOCKS_H
#define SWTOOL_GGML_BLOCKS_H

#include <stdint.h>
#include <string.h>

#define GGML_BLOCK 32 /* values per Q4_0/Q4_1/Q5_0/Q5_1 block */

static inline void nibbles(const uint8_t *restrict q, uint8_t *restrict out) {
    for (int i = 0; i < GGML_BLOCK / 2; i++) out[i] = (uint8_t)((q[i] & 0x0F) | (q[i + GGML_BLOCK / 2] << 4));
}

static inline void high_bits(const uint8_t *restrict q, uint8_t *restrict out) {
    uint32_t h = 0;
    for (int i = 0; i < GGML_BLOCK; i++) h |= (uint32_t)(q[i] >> 4) << i;
    memcpy(out, &h, 4);
}

/* A block's codes (each in [0, levels)) after its scale (and min): 4-bit ones as nibbles; 5-bit ones
 * as the fifth bits (qh, 4 bytes) then the low nibbles, as in ggml's block_q5_0 / block_q5_1. */
static inline void put_codes(const uint8_t *q, uint8_t *out, int levels) {
    if (levels == 32) {
        high_bits(q, out);
        out += 4;
    }
    nibbles(q, out);
}

#endif
