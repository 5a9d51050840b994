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

static int64_t requantize(int32_t x, int32_t m0, int shift, int tflite)
{
    return tflite ? tflite_multiply(x, m0, shift) : reference_multiply(x, m0, shift);
}

/* The output's zero point added, saturated at 0 (or at the zero point after a ReLU) and at the top level. */
static uint8_t saturate(int64_t q, int zero, int relu, int top)
{
    int64_t low = relu ? zero : 0;
    q += zero;
    return (uint8_t)(q < low ? low : q > top ? top : q);
}

/* The residual addition of one value of each input (index 0: a, 1: b), without the output's zero point. */
static int64_t add_values(const qat_add *layer, int a, int b)
{
    int32_t x = a - layer->zero[0], y = b - layer->zero[1];
    if (layer->tflite) {
        const int32_t shifted = (int32_t)1 << 20;  /* TFLite's int8 ADD: both inputs shifted left by 20 bits */
        int32_t sum = tflite_multiply(x * shifted, layer->m0[0], layer->shift[0])
                      + tflite_multiply(y * shifted, layer->m0[1], layer->shift[1]);
        return tflite_multiply(sum, layer->out_m0, layer->out_shift);
    }
    {
        const int64_t precision = (int64_t)1 << 16;  /* 16 extra fraction bits, rounded away once */
        int64_t sum = reference_multiply(x * precision, layer->m0[0], layer->shift[0])
                      + reference_multiply(y * precision, layer->m0[1], layer->shift[1]);
        return floor_shift(sum + ((int64_t)1 << 15), 16);
    }
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

/* The products of n inputs x (the channels of consecutive pixels, n a multiple of 4) and the weights of one block
 * of four output channels, grouped by four input channels: [group][output][input of the group], 16 a group. */
static void grouped_products(const uint8_t *x, const int8_t *w, int n, int32_t acc[4])
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (; n > 0; n -= 4, x += 4, w += 16) {
#ifdef QAT_SMLAD  /* the M4's dual 16-bit multiply-accumulate: two products an instruction, exact */
        uint32_t v = word(x), even = __uxtb16(v), odd = uxtb16_odd(v), k;
        k = word(w);
        a0 = __smlad(even, __sxtb16(k), a0);
        a0 = __smlad(odd, sxtb16_odd(k), a0);
        k = word(w + 4);
        a1 = __smlad(even, __sxtb16(k), a1);
        a1 = __smlad(odd, sxtb16_odd(k), a1);
        k = word(w + 8);
        a2 = __smlad(even, __sxtb16(k), a2);
        a2 = __smlad(odd, sxtb16_odd(k), a2);
        k = word(w + 12);
        a3 = __smlad(even, __sxtb16(k), a3);
        a3 = __smlad(odd, sxtb16_odd(k), a3);
#else
        int32_t v0 = x[0], v1 = x[1], v2 = x[2], v3 = x[3];
        a0 += v0 * w[0] + v1 * w[1] + v2 * w[2] + v3 * w[3];
        a1 += v0 * w[4] + v1 * w[5] + v2 * w[6] + v3 * w[7];
        a2 += v0 * w[8] + v1 * w[9] + v2 * w[10] + v3 * w[11];
        a3 += v0 * w[12] + v1 * w[13] + v2 * w[14] + v3 * w[15];
#endif
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

/* The same for two pixels at once (inputs x and y), each weight loaded once for both. */
static void grouped_products2(const uint8_t *x, const uint8_t *y, const int8_t *w, int n, int32_t a[4], int32_t b[4])
{
    int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    for (; n > 0; n -= 4, x += 4, y += 4, w += 16) {
#ifdef QAT_SMLAD
        uint32_t u = word(x), v = word(y), ue = __uxtb16(u), uo = uxtb16_odd(u), ve = __uxtb16(v),
                 vo = uxtb16_odd(v), k, even, odd;
        k = word(w);
        even = __sxtb16(k);
        odd = sxtb16_odd(k);
        a0 = __smlad(uo, odd, __smlad(ue, even, a0));
        b0 = __smlad(vo, odd, __smlad(ve, even, b0));
        k = word(w + 4);
        even = __sxtb16(k);
        odd = sxtb16_odd(k);
        a1 = __smlad(uo, odd, __smlad(ue, even, a1));
        b1 = __smlad(vo, odd, __smlad(ve, even, b1));
        k = word(w + 8);
        even = __sxtb16(k);
        odd = sxtb16_odd(k);
        a2 = __smlad(uo, odd, __smlad(ue, even, a2));
        b2 = __smlad(vo, odd, __smlad(ve, even, b2));
        k = word(w + 12);
        even = __sxtb16(k);
        odd = sxtb16_odd(k);
        a3 = __smlad(uo, odd, __smlad(ue, even, a3));
        b3 = __smlad(vo, odd, __smlad(ve, even, b3));
#else
        int i;
        for (i = 0; i < 4; i++) {
            int32_t u = x[i], v = y[i], k;
            k = w[i];
            a0 += u * k;
            b0 += v * k;
            k = w[4 + i];
            a1 += u * k;
            b1 += v * k;
            k = w[8 + i];
            a2 += u * k;
            b2 += v * k;
            k = w[12 + i];
            a3 += u * k;
            b3 += v * k;
        }
#endif
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
    b[0] = b0; b[1] = b1; b[2] = b2; b[3] = b3;
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
    int j, o;
    for (j = 0; j < n; j++)
        for (o = 0; o < 4; o++)
            wsum[o] += w[grouped ? (j & ~3) * 4 + o * 4 + (j & 3) : j * 4 + o];
}

/* The weights of one block's window row from the row's first (count of them, even): the layer's own, or where they
 * are packed, unpacked into the layer's scratch. */
static const int8_t *row_weights(const qat_conv *c, uint32_t first, int count)
{
    const uint8_t *packed = (const uint8_t *)c->weight + first / 2;
    int j;
    if (!c->packed)
        return c->weight + first;
    for (j = 0; j < count; j += 2, packed++) {
        int32_t low = *packed & 15, high = *packed >> 4;
        c->scratch[j] = (int8_t)(low - ((low & 8) << 1));
        c->scratch[j + 1] = (int8_t)(high - ((high & 8) << 1));
    }
    return c->scratch;
}

/* The products, and where `wsum` is not NULL the weights summed, of one block over the window rows ky0..ky1-1,
 * columns kx0..kx1-1 (the part of the window inside the input). */
static void window(const qat_conv *c, const uint8_t *in, int iy, int ix, uint32_t block, int ky0, int ky1,
                   int kx0, int kx1, int32_t acc[4], int32_t *wsum)
{
    int ky, n = (kx1 - kx0) * c->in_c, grouped = c->in_c % 4 == 0;
    for (ky = ky0; ky < ky1; ky++) {
        const uint8_t *x = in + ((uint32_t)(iy + ky) * c->in_w + (uint32_t)(ix + kx0)) * c->in_c;
        const int8_t *w = row_weights(c, ((block * c->k + (uint32_t)ky) * c->k + (uint32_t)kx0) * c->in_c * 4, 4 * n);
        if (grouped)
            grouped_products(x, w, n, acc);
        else
            interleaved_products(x, w, n, acc);
        if (wsum)
            weight_sums(w, n, grouped, wsum);
    }
}

/* Requantize a block's four accumulators (less the zero point's share: the weights inside the window, `wsum`,
 * where it is clipped, else all of them) to out[0..3], each followed at once by the residual addition if any. */
static void finish(const qat_conv *c, uint32_t block, const int32_t acc[4], const int32_t *wsum, uint8_t *out,
                   const qat_add *add, const uint8_t *other)
{
    uint32_t i, o;
    for (i = 0; i < 4 && (o = block * 4 + i) < c->out_c; i++) {
        /* padding is the input's zero point (real zero): the products less zero point x weights */
        int32_t centered = acc[i] - (int32_t)c->in_zero * (wsum ? wsum[i] : c->weight_sum[o]);
        int32_t total = centered * ((int32_t)1 << c->bias_bits) + c->bias[o];  /* (within int32) */
        uint8_t q = saturate(requantize(total, c->scale.m0[o], c->scale.shift[o], c->tflite), c->out_zero, c->relu,
                             c->out_max);
        out[o] = add ? saturate(add_values(add, q, other[o]), add->out_zero, add->relu, add->out_max) : q;
    }
}

/* Two horizontally adjacent output pixels whose windows lie inside the input's columns, each weight loaded once:
 * the convolutions of grouped weights. */
static void pair(const qat_conv *c, const uint8_t *in, int iy, int ix, int ky0, int ky1, uint32_t at, uint8_t *out,
                 const qat_add *add, const uint8_t *other)
{
    uint32_t block, blocks = (c->out_c + 3u) / 4u, step = (uint32_t)c->stride * c->in_c;
    int ky, clipped = (ky0 > 0 || ky1 < c->k) && c->in_zero, n = c->k * c->in_c;
    for (block = 0; block < blocks; block++) {
        int32_t a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0}, wsum[4] = {0, 0, 0, 0};
        for (ky = ky0; ky < ky1; ky++) {
            const uint8_t *x = in + ((uint32_t)(iy + ky) * c->in_w + (uint32_t)ix) * c->in_c;
            const int8_t *w = row_weights(c, ((block * c->k + (uint32_t)ky) * c->k) * c->in_c * 4, 4 * n);
            grouped_products2(x, x + step, w, n, a, b);
            if (clipped)
                weight_sums(w, n, 1, wsum);
        }
        finish(c, block, a, clipped ? wsum : 0, out + at, add, other + at);
        finish(c, block, b, clipped ? wsum : 0, out + at + c->out_c, add, other + at + c->out_c);
    }
}

void qat_conv_run(const qat_conv *c, const uint8_t *in, uint8_t *out, const qat_add *add, const uint8_t *other)
{
    uint32_t oy, ox, block, blocks = (c->out_c + 3u) / 4u;
    int k = c->k, pairs = c->in_c % 4 == 0;
    if (!add)
        other = out;  /* (finish reads `other` only with `add`) */
    for (oy = 0; oy < c->out_h; oy++) {
        int iy = (int)(oy * c->stride) - c->pad;
        int ky0 = iy < 0 ? -iy : 0, ky1 = iy + k > c->in_h ? c->in_h - iy : k;
        for (ox = 0; ox < c->out_w; ox++) {
            int ix = (int)(ox * c->stride) - c->pad;
            int kx0 = ix < 0 ? -ix : 0, kx1 = ix + k > c->in_w ? c->in_w - ix : k;
            /* (after a ReLU the input's zero point is 0: nothing to correct) */
            int clipped = (ky0 > 0 || kx0 > 0 || ky1 < k || kx1 < k) && c->in_zero;
            uint32_t at = (oy * c->out_w + ox) * c->out_c;
            if (pairs && ix >= 0 && ox + 1 < c->out_w && ix + c->stride + k <= c->in_w) {
                pair(c, in, iy, ix, ky0, ky1, at, out, add, other);
                ox++;
                continue;
            }
            for (block = 0; block < blocks; block++) {
                int32_t acc[4] = {0, 0, 0, 0}, wsum[4] = {0, 0, 0, 0};
                window(c, in, iy, ix, block, ky0, ky1, kx0, kx1, acc, clipped ? wsum : 0);
                finish(c, block, acc, clipped ? wsum : 0, out + at, add, other + at);
            }
        }
    }
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
