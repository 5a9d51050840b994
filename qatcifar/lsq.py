"""Learned step size quantization (LSQ; Esser et al. 2020, "Learned Step Size Quantization", ICLR): the step of a
quantizer (its scale) is a trained parameter with a gradient of its own (quant.py builds the quantizers with it).

    >>> fake_quant = lsq.LsqQuant(lowest=0, highest=15)     # 4 bits after a ReLU: levels 0..15
    >>> y, inside = fake_quant(x, step, quant.ROUNDING)    # round(clip(x / step, 0, 15)) * step

Forward: y = round(clip(x / s, -Qn, Qp)) * s. Backward, the paper's equations 3 and 5: dy/dx is 1 where
-Qn <= x / s <= Qp and 0 elsewhere (straight-through), dy/ds is round(x / s) - x / s inside, -Qn below and Qp
above; the step's gradient is scaled by g = 1 / sqrt(N Qp), N the values one step quantizes (per image for an
activation, per output channel for a weight), so that its updates keep in proportion to its size (section 2.2).
The first step size is 2 mean|x| / sqrt(Qp) (`initial_step`), from the first batch the quantizer sees.

quant.py trains the logarithm of each step, not the step: Adam, the default optimizer, moves every
parameter by about the learning rate a step whatever its gradient's size (the gradient scale g then
changes nothing), which pushed steps of 0.01 through zero within a few epochs (measured: one channel's
step ended at -0.008, and the int8 file then disagreed with its checkpoint). Moved in its logarithm, a step
changes in proportion to its size, as g intends under SGD, and stays positive.

Cost: as quant.ClipQuant, x is mapped so that [-Qn, Qp] x s becomes [0, 6] and clipped by one ReLU6, rounding is
two additions of `rounding` (quant.ROUNDING), and the backward pass keeps x, the output and a one-byte mask.
"""
import mindspore.nn as nn
import mindspore.ops as ops

EPS = 1e-8


class LsqQuant(nn.Cell):
    """Fake quantization of x to the integers lowest..highest times `step`: a scalar, or with `per_channel` one
    step per output channel (x's axis 0), shaped to broadcast against x ((C, 1, 1, 1) for a convolution's weight).
    Returns the quantized x and the mask of the values inside the range."""

    def __init__(self, lowest, highest, per_channel=False):
        super().__init__()
        self.lowest, self.levels = float(lowest), float(highest - lowest)
        self.highest = float(highest)
        self.per_channel = per_channel

    def construct(self, x, step, rounding):
        return fake_quantize(x, step, rounding, self.lowest, self.levels)

    def bprop(self, x, step, rounding, out, dout):
        inside = ops.depend(out[1], dout[0]).astype(x.dtype)
        # (round(x / s) - x / s inside, the bound outside) times s is the output less x inside.
        per_value = dout[0] * (out[0] - x * inside)
        count = x.size // x.shape[0]  # per image, or per output channel
        scale = 1.0 / (count * self.highest) ** 0.5
        if self.per_channel:
            step_gradient = per_value.reshape(x.shape[0], -1).sum(1).reshape(step.shape) * scale / step
        else:
            step_gradient = per_value.sum() * scale / step
        return dout[0] * inside, step_gradient, ops.zeros_like(rounding)


def fake_quantize(x, step, rounding, lowest, levels):
    """LsqQuant's forward pass, as a function (for quantizing weights once, outside a graph): (round(clip(x / step,
    lowest, lowest + levels)) * step, the mask of the values inside)."""
    to_six = 6.0 / (levels * step)
    mapped = x * to_six - lowest * (6.0 / levels) if lowest else x * to_six
    clipped = ops.relu6(mapped)
    shifted = clipped * (levels / 6.0) + (rounding + lowest)  # rounded to an integer
    return (shifted - rounding) * step, clipped == mapped


def initial_step(x, highest, per_channel=False):
    """LSQ's first step size, 2 mean|x| / sqrt(Qp): of all of x, or per output channel (x's axis 0, as a vector)."""
    magnitude = ops.abs(x)
    mean = magnitude.reshape(x.shape[0], -1).mean(1) if per_channel else magnitude.mean()
    return ops.maximum(mean * (2.0 / highest ** 0.5), EPS)
