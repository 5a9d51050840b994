/* The int8 network's kernels: qat_kernels.h says what each computes. */
#include "qat_kernels.h"

#include <string.h>

/* x / 2^n rounded down, for any sign (a right shift of a negative value is implementation-defined in C). */
static int64_t floor_shift(int64_t x, int n)
{
    return x >= 0 ? x >> n : -((-x - 1) >> n) - 1;
}

/* x / 2^n rounded half away from zero (TFLite's RoundingDivideByPOT); |x| < 2^31. */
static int32_t rounding_shift(int32_t x, int n)
{
    uint32_t half = n > 0 ? 1u << (n - 1) : 0u;
    return x >= 0 ? (int32_t)(((uint32_t)x + half) >> n) : -(int32_t)((0u - (uint32_t)x + half) >> n);
}

/* TFLite's MultiplyByQuantizedMultiplier: x * m0 * 2^(shift - 31), a left shift first where shift > 0, the
 * rounding doubling high multiply (the product plus 2^30, or 1 - 2^30 below zero, divided by 2^31 toward zero),
 * then a rounding right shift. export.py keeps |x| * 2^shift below 2^31, as TFLite's int32 arithmetic needs. */
static inline int32_t tflite_multiply(int32_t x, int32_t m0, int shift)
{
    int64_t product = (int64_t)(x * (shift > 0 ? 1 << shift : 1)) * m0;
    int64_t nudged = product + (product >= 0 ? (int64_t)1 << 30 : 1 - ((int64_t)1 << 30));
    return rounding_shift((int32_t)(nudged / ((int64_t)1 << 31)), shift > 0 ? 0 : -shift);  /* (division: toward 0) */
}

/* Versions 1 and 2: x * m0 / 2^right rounded once, halves up (|x| m0 < 2^63). */
static int64_t reference_multiply(int64_t x, int32_t m0, int right)
{
    return floor_shift(x * m0 + ((int64_t)1 << (right - 1)), right);
}

/* (versions 1 and 2: beyond int32 only where the output saturates anyway) */
static int32_t requantize(int32_t x, int32_t m0, int shift, int tflite)
{
    int64_t q;
    if (tflite)
        return tflite_multiply(x, m0, shift);
    q = reference_multiply(x, m0, shift);
    return q > INT32_MAX ? INT32_MAX : q < INT32_MIN ? INT32_MIN : (int32_t)q;
}

/* The output's zero point added, saturated at 0 (or at the zero point after a ReLU) and at the top level. */
static uint8_t saturate(int32_t q, int zero, int relu, int top)
{
    int32_t low = relu ? 0 : -zero, high = top - zero;  /* (no overflow: the bounds move, not q) */
    return (uint8_t)((q < low ? low : q > high ? high : q) + zero);
}

/* The residual addition of one value of each input (index 0: a, 1: b), without the output's zero point. */
static int32_t add_values(const qat_add *layer, int a, int b)
{
    int32_t sum = layer->term[0][a] + layer->term[1][b];  /* (export.py keeps it within int32) */
    return layer->tflite ? tflite_multiply(sum, layer->out_m0, layer->out_shift)
                         : (int32_t)floor_shift((int64_t)sum + ((int64_t)1 << 15), 16);
}

void qat_add_run(const qat_add *layer, const uint8_t *a, const uint8_t *b, uint8_t *out, uint32_t count)
{
    uint32_t i;
    for (i = 0; i < count; i++)
        out[i] = saturate(add_values(layer, a[i], b[i]), layer->out_zero, layer->relu, layer->out_max);
}

/* A weight of a packed layer: the 4-bit value at index i, sign extended. */
static int32_t nibble(const int8_t *packed, uint32_t i)
{
    int32_t v = ((uint8_t)packed[i >> 1] >> ((i & 1) * 4)) & 15;
    return v - ((v & 8) << 1);
}

#if defined(__ARM_FEATURE_DSP) && !defined(QAT_PLAIN_C)
#include <arm_acle.h>
#define QAT_SMLAD 1

static uint32_t word(const void *p)  /* four bytes in one load (memcpy: no alignment or aliasing assumed) */
{
    uint32_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

/* The odd bytes of w sign-extended to two halves: SXTB16 of w rotated by 8 bits, one instruction (ACLE has no
 * rotating form; a rotation written in C costs one more). */
static uint32_t sxtb16_odd(uint32_t w)
{
    uint32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
}

static uint32_t uxtb16_odd(uint32_t w)
{
    uint32_t r;
    __asm__("uxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
}
#endif

/* One group: four inputs x[0..3] times the block's 16 weights w[0..15] ([output][input]) into a0..a3. */
#ifdef QAT_SMLAD  /* the M4's dual 16-bit multiply-accumulate: two products an instruction, exact */
#define GROUP(x, w)                                                                  \
    do {                                                                             \
        uint32_t v_ = word(x), even_ = __uxtb16(v_), odd_ = uxtb16_odd(v_), k_;      \
        k_ = word(w);                                                                \
        a0 = __smlad(odd_, sxtb16_odd(k_), __smlad(even_, __sxtb16(k_), a0));        \
        k_ = word((w) + 4);                                                          \
        a1 = __smlad(odd_, sxtb16_odd(k_), __smlad(even_, __sxtb16(k_), a1));        \
        k_ = word((w) + 8);                                                          \
        a2 = __smlad(odd_, sxtb16_odd(k_), __smlad(even_, __sxtb16(k_), a2));        \
        k_ = word((w) + 12);                                                         \
        a3 = __smlad(odd_, sxtb16_odd(k_), __smlad(even_, __sxtb16(k_), a3));        \
    } while (0)
#else  /* (one input at a time: four accumulators and one value live, no spill) */
#define GROUP(x, w)                                                                  \
    do {                                                                             \
        int32_t v_ = (x)[0];                                                         \
        a0 += v_ * (w)[0]; a1 += v_ * (w)[4]; a2 += v_ * (w)[8]; a3 += v_ * (w)[12];  \
        v_ = (x)[1];                                                                 \
        a0 += v_ * (w)[1]; a1 += v_ * (w)[5]; a2 += v_ * (w)[9]; a3 += v_ * (w)[13];  \
        v_ = (x)[2];                                                                 \
        a0 += v_ * (w)[2]; a1 += v_ * (w)[6]; a2 += v_ * (w)[10]; a3 += v_ * (w)[14]; \
        v_ = (x)[3];                                                                 \
        a0 += v_ * (w)[3]; a1 += v_ * (w)[7]; a2 += v_ * (w)[11]; a3 += v_ * (w)[15]; \
    } while (0)
#endif

/* The products of n inputs x (the channels of consecutive pixels, n a multiple of 4) and the weights of one block
 * of four output channels, grouped by four input channels: [group][output][input of the group], 16 a group. Plain
 * C takes two groups a turn (the loop's own instructions halved); SMLAD's code is fastest one a turn (measured). */
static void grouped_products(const uint8_t *x, const int8_t *w, int n, int32_t acc[4])
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
#ifdef QAT_SMLAD
    for (; n > 0; n -= 4, x += 4, w += 16)
        GROUP(x, w);
#else
    for (; n >= 8; n -= 8, x += 8, w += 32) {
        GROUP(x, w);
        GROUP(x + 4, w + 16);
    }
    if (n)
        GROUP(x, w);
#endif
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

/* The same with the weights [input][output] (4 an input): any number of input channels. */
static void interleaved_products(const uint8_t *x, const int8_t *w, int n, int32_t acc[4])
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (; n > 0; n--, x++, w += 4) {
        int32_t v = *x;
        a0 += v * w[0]; a1 += v * w[1]; a2 += v * w[2]; a3 += v * w[3];
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

/* Each output's weights summed over n inputs of a window row, in the layouts of the two functions above. */
static void weight_sums(const int8_t *w, int n, int grouped, int32_t wsum[4])
{
    int j;
    for (j = 0; j < n; j += grouped ? 4 : 1, w += grouped ? 16 : 4) {
        if (grouped) {
            wsum[0] += w[0] + w[1] + w[2] + w[3];
            wsum[1] += w[4] + w[5] + w[6] + w[7];
            wsum[2] += w[8] + w[9] + w[10] + w[11];
            wsum[3] += w[12] + w[13] + w[14] + w[15];
        } else {
            wsum[0] += w[0];
            wsum[1] += w[1];
            wsum[2] += w[2];
            wsum[3] += w[3];
        }
    }
}

/* The weights of one block of four output channels (k k C 4 of them): the layer's own, or where they are packed,
 * unpacked into the layer's scratch once for all the output's pixels. */
static const int8_t *block_weights(const qat_conv *c, uint32_t block)
{
    uint32_t count = (uint32_t)c->k * c->k * c->in_c * 4, j;
    const uint8_t *packed = (const uint8_t *)c->weight + block * count / 2;
    if (!c->packed)
        return c->weight + block * count;
    for (j = 0; j < count; j += 2, packed++) {
        int32_t low = *packed & 15, high = *packed >> 4;
        c->scratch[j] = (int8_t)(low - ((low & 8) << 1));
        c->scratch[j + 1] = (int8_t)(high - ((high & 8) << 1));
    }
    return c->scratch;
}

/* The products, and where `wsum` is not NULL the weights summed, of a block's weights w over the window rows
 * ky0..ky1-1, columns kx0..kx1-1 (the part of the window inside the input). */
static void window(const qat_conv *c, const int8_t *w, const uint8_t *in, int iy, int ix, int ky0, int ky1, int kx0,
                   int kx1, int32_t acc[4], int32_t *wsum)
{
    int ky, n = (kx1 - kx0) * c->in_c, grouped = c->in_c % 4 == 0;
    for (ky = ky0; ky < ky1; ky++) {
        const uint8_t *x = in + ((uint32_t)(iy + ky) * c->in_w + (uint32_t)(ix + kx0)) * c->in_c;
        const int8_t *row = w + ((uint32_t)ky * c->k + (uint32_t)kx0) * c->in_c * 4;
        if (grouped)
            grouped_products(x, row, n, acc);
        else
            interleaved_products(x, row, n, acc);
        if (wsum)
            weight_sums(row, n, grouped, wsum);
    }
}

/* Requantize a block's four accumulators (less the zero point's share: the weights inside the window, `wsum`,
 * where it is clipped, else all of them) to out[0..3], each followed at once by the residual addition if any. */
static void finish(const qat_conv *c, uint32_t block, const int32_t acc[4], const int32_t *wsum, uint8_t *out,
                   const qat_add *add, const uint8_t *other)
{
    uint32_t i, o, last = c->out_c - block * 4 < 4 ? c->out_c - block * 4 : 4;
    for (i = 0, o = block * 4; i < last; i++, o++) {
        /* padding is the input's zero point (real zero): the products less zero point x weights */
        int32_t centered = c->in_zero ? acc[i] - (int32_t)c->in_zero * (wsum ? wsum[i] : c->weight_sum[o]) : acc[i];
        int32_t total = (c->bias_bits ? centered * ((int32_t)1 << c->bias_bits) : centered) + c->bias[o];
        uint8_t q = saturate(requantize(total, c->scale.m0[o], c->scale.shift[o], c->tflite), c->out_zero, c->relu,
                             c->out_max);
        out[o] = add ? saturate(add_values(add, q, other[o]), add->out_zero, add->relu, add->out_max) : q;
    }
}

/* One block of four output channels at every output pixel. */
static void conv_block(const qat_conv *c, uint32_t block, const uint8_t *in, uint8_t *out, const qat_add *add,
                       const uint8_t *other)
{
    const int8_t *w = block_weights(c, block);
    uint32_t oy, ox;
    int k = c->k;
    for (oy = 0; oy < c->out_h; oy++) {
        int iy = (int)(oy * c->stride) - c->pad;
        int ky0 = iy < 0 ? -iy : 0, ky1 = iy + k > c->in_h ? c->in_h - iy : k;
        for (ox = 0; ox < c->out_w; ox++) {
            int ix = (int)(ox * c->stride) - c->pad;
            int kx0 = ix < 0 ? -ix : 0, kx1 = ix + k > c->in_w ? c->in_w - ix : k;
            /* (after a ReLU the input's zero point is 0: nothing to correct) */
            int clipped = (ky0 > 0 || kx0 > 0 || ky1 < k || kx1 < k) && c->in_zero;
            uint32_t at = (oy * c->out_w + ox) * c->out_c;
            int32_t acc[4] = {0, 0, 0, 0}, wsum[4] = {0, 0, 0, 0};
            window(c, w, in, iy, ix, ky0, ky1, kx0, kx1, acc, clipped ? wsum : 0);
            finish(c, block, acc, clipped ? wsum : 0, out + at, add, other + at);
        }
    }
}

void qat_conv_run(const qat_conv *c, const uint8_t *in, uint8_t *out, const qat_add *add, const uint8_t *other)
{
    uint32_t block, blocks = (c->out_c + 3u) / 4u;
    for (block = 0; block < blocks; block++)
        conv_block(c, block, in, out, add, add ? other : out);  /* (finish reads `other` only with `add`) */
}

void qat_pad_channels(const uint8_t *in, uint8_t *out, uint32_t pixels, uint16_t channels, uint16_t padded,
                      uint8_t zero)
{
    uint32_t p, c;
    for (p = 0; p < pixels; p++)
        for (c = 0; c < padded; c++)
            out[p * padded + c] = c < channels ? in[p * channels + c] : zero;
}

void qat_mean_run(const qat_mean *layer, const uint8_t *in, uint8_t *out)
{
    uint32_t c, p;
    for (c = 0; c < layer->channels; c++) {
        int32_t sum = 0;  /* (below 2^24) */
        for (p = 0; p < layer->pixels; p++)
            sum += in[p * layer->channels + c];
        sum -= (int32_t)layer->in_zero * layer->pixels;
        out[c] = saturate(requantize(sum, layer->m0, layer->shift, layer->tflite), layer->out_zero, 0,
                          layer->out_max);
    }
}

void qat_dense_run(const qat_dense *layer, const uint8_t *in, int32_t *logits)
{
    uint32_t o, c;
    for (o = 0; o < layer->out_c; o++) {
        int32_t acc = 0;
        for (c = 0; c < layer->in_c; c++) {
            uint32_t i = o * layer->in_c + c;
            acc += ((int32_t)in[c] - layer->in_zero) * (layer->packed ? nibble(layer->weight, i) : layer->weight[i]);
        }
        logits[o] = (int32_t)((int64_t)acc * ((int64_t)1 << layer->bias_bits) + layer->bias[o]);
    }
}
