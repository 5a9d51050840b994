/* The int8 network's kernels in portable C99: the integer arithmetic of qatcifar/int8.py, bit for bit.
 *
 * Written by export.py --format c beside model.c, the same for every model. No heap, no stdio, no libm,
 * no floating point; every shift is of a non-negative value and every product that can leave int32 is
 * taken in int64. Activations are uint8, channels last (HWC); a tensor's real value is
 * scale * (q - zero_point), its levels 0 .. max (255, or 2^bits - 1 for activations of fewer bits).
 *
 * Two arithmetics, chosen per model by the int8 file's version (QAT_TFLITE in a layer):
 *   TFLite's (version 3): the rounding doubling high multiply by m0, then a rounding right shift
 *   (MultiplyByQuantizedMultiplier), and TFLite's int8 ADD and MEAN: what TensorFlow Lite Micro's
 *   reference kernels compute;
 *   versions 1 and 2: the product by m0 rounded once, halves up, and the residual addition with 16
 *   extra fraction bits.
 */
#ifndef QAT_KERNELS_H
#define QAT_KERNELS_H

#include <stdint.h>

/* A requantization multiplier: m0 * 2^(shift - 31), m0 in [2^30, 2^31). Versions 1 and 2 store
 * right = 31 - shift (15 .. 62) in `shift` instead (see qat_requantize). */
typedef struct {
    const int32_t *m0;
    const int8_t *shift;
} qat_multiplier;

typedef struct {
    const int8_t *weight;      /* blocks of 4 output channels, [ceil(O/4)][k][k] then, where C is a multiple of 4,
                                  [C/4][4 outputs][4 inputs], else [C][4 outputs]; int8, or packed: the same order,
                                  two 4-bit values a byte, the first in the low half */
    int8_t *scratch;           /* packed: room for one block's weights unpacked (k k C 4 bytes), else 0 */
    const int32_t *bias;       /* [O], with bias_bits fraction bits */
    const int32_t *weight_sum; /* [O], each output channel's weights summed (the input's zero point times it) */
    qat_multiplier scale;      /* [O], input scale x weight scale / output scale / 2^bias_bits */
    uint16_t in_h, in_w, in_c, out_h, out_w, out_c;
    uint8_t k, stride, pad, packed, bias_bits, relu, tflite;
    uint8_t in_zero, out_zero, out_max;
} qat_conv;

/* A residual addition of two inputs: each input's level rescaled by a table computed at export (TFLite's: the
 * centered level shifted left by 20 bits times input scale / twice the larger input scale; versions 1 and 2: with 16
 * fraction bits, times input scale / output scale), the sum then rescaled once (TFLite: out_m0 and out_shift;
 * versions 1 and 2: the 16 fraction bits rounded away). */
typedef struct {
    const int32_t *term[2];    /* [256] each */
    uint8_t tflite, relu, out_zero, out_max;
    int32_t out_m0;
    int8_t out_shift;
} qat_add;

typedef struct {
    uint16_t pixels, channels;
    uint8_t tflite, in_zero, out_zero, out_max;
    int32_t m0;                /* TFLite: the division by `pixels` taken into m0 and shift (TFLite's MEAN) */
    int8_t shift;
} qat_mean;

typedef struct {
    const int8_t *weight;      /* [O][C] int8, or packed two a byte */
    const int32_t *bias;       /* [O] */
    uint16_t in_c, out_c;
    uint8_t packed, bias_bits, in_zero;
} qat_dense;

/* out = conv(in), requantized and saturated; with `add` (not NULL), the residual addition of `other` (the
 * addition's other input, same shape as out) follows each output value at once, and out may be `other`. */
void qat_conv_run(const qat_conv *layer, const uint8_t *in, uint8_t *out, const qat_add *add, const uint8_t *other);
/* A copy of `pixels` pixels of `channels` channels with `padded` channels, the new ones the zero point (real 0). */
void qat_pad_channels(const uint8_t *in, uint8_t *out, uint32_t pixels, uint16_t channels, uint16_t padded,
                      uint8_t zero);
void qat_add_run(const qat_add *layer, const uint8_t *a, const uint8_t *b, uint8_t *out, uint32_t count);
void qat_mean_run(const qat_mean *layer, const uint8_t *in, uint8_t *out);
/* The int32 accumulators of the classifier, bias included: the logits before dequantization. */
void qat_dense_run(const qat_dense *layer, const uint8_t *in, int32_t *logits);

#endif
