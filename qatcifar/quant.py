"""Quantization-aware training (QAT) as a transform of a built network.

    >>> from resnetv2 import resnet18
    >>> from quant import quantize, QuantConfig
    >>> net = quantize(resnet18(), QuantConfig(quant_delay=100))

The transform simulates, in training, what an integer-only runtime computes (Jacob et al.
2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"): every tensor that flows between layers is 8-bit, every layer computes in
integers. It replaces
- each `ConvBN` (conv, BatchNorm, optional ReLU) by `QuantConvBN`: weights fake-quantized to
  7 bits, symmetric, one scale per output channel (range [-63, 63], stored as int8; why 7:
  `QuantConfig.weight_bits`); the output (after ReLU)
  fake-quantized to 8 bits, asymmetric, per tensor. The first one also quantizes the
  network's input. With `bn_fold`, BatchNorm is folded into the weights before they are
  quantized, in training too (the paper's section 3.2; batch statistics as in Krishnamoorthi
  2018, arXiv 1806.08342, section 3.2, until BatchNorm is frozen);
- each `ResidualAdd` by `QuantAdd`: its output fake-quantized;
- each `nn.Dense` by `QuantDense`: its input (the pooled features) fake-quantized, weights
  per output row.
Activation ranges come from min/max observers: an exponential moving average while training,
frozen in eval. Observers, counters and each layer's weight bits are non-trainable Parameters,
so they are in every checkpoint, and a checkpoint says by its parameters how it was quantized
(`config_from_checkpoint`). Rounding uses the straight-through estimator: the gradient of
fake-quant is 1 inside the quantization range and 0 outside (as TensorFlow's
FakeQuantWithMinMaxVars).

Cost (bench.py): the activation quantizers are cells with their own backward pass, which keeps
only the quantized output and a one-byte mask; a ConvBN's or residual join's ReLU is the lower
clip of its output quantizer; in training, the clip is one ReLU6 of x mapped to [0, 6]
(`ClipQuant`); rounding is two additions; min/max use ops.aminmax and ops.max, several times as
fast as ReduceMin/ReduceMax on CPU. `freeze(net)` quantizes the weights once for inference
(eval.py), instead of on every batch.

Why our own fake-quant: `mindspore.compression` (the API the 2021 seed used) is gone since
MindSpore 2.0, Golden Stick's SimQAT is GPU-only, and the FakeQuant* primitives have no CPU
kernels. This module uses only standard ops (round, clip, min/max, stop_gradient, assign),
so the same model trains in GRAPH_MODE on CPU and GPU.
"""
import collections
from dataclasses import dataclass

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
from mindspore import Parameter, Tensor

from qatcifar import lsq
from qatcifar.networks import ConvBN, ResidualAdd

# Suffixes of parameters that only quantized networks have: they tell checkpoints apart.
OBSERVER_SUFFIX = "_quant.steps"
FOLD_SUFFIX = ".freeze_bn_step"
BITS_SUFFIX = ".weight_quant.bits"
ACT_BITS_SUFFIX = "_quant.act_bits"  # an activation quantizer of other than ACT_BITS bits
LSQ_SUFFIX = "_quant.log_step"  # a learned step size, as its logarithm (quantizer lsq)
# The logarithms of step sizes a checkpoint may hold, 2e-9 to 5e8: weights and activations here lie far within
# +-1e4, and a step beyond these gives levels of 0 or beyond 2^31 for every value (exp(+-88) is float32's 0 or inf).
LOG_STEP_RANGE = (-20.0, 20.0)
QUANTIZERS = ("minmax", "lsq")
ACT_BITS = 8  # activations, but where --act_bits says otherwise; the network's input and the classifier's always
# Checkpoints written before each layer recorded its weight bits were all trained with 8-bit weights.
UNRECORDED_WEIGHT_BITS = 8
EPS = 1e-8


@dataclass(frozen=True)
class QuantConfig:
    """All choices of the quantization scheme, named once."""
    # Weights: symmetric, per output channel, 7 bits ([-63, 63]) and not 8, so that the int8 ONNX model is exact on
    # every CPU: without VNNI, ONNX Runtime's integer kernels add pairs of uint8 x int8 products in 16 bits, and
    # 255 x 63 x 2 fits where 255 x 127 x 2 does not (ort_kernels.py, docs/deployment.md).
    weight_bits: int = 7
    act_bits: int = 8           # asymmetric, per tensor
    ema_decay: float = 0.99     # observer moving average; high enough to smooth batches, low enough for short runs
    quant_delay: int = 0        # training steps before activations are quantized (observers warm up meanwhile)
    bn_fold: bool = False       # fold BatchNorm into the weights before quantizing them, in training too
    freeze_bn: int = -1         # with bn_fold: the step from which BatchNorm uses its moving statistics (-1: never)
    layer_bits: tuple = ()      # ((layer name, weight bits), ...): layers whose weights differ from weight_bits
    # minmax: ranges from min/max observers (the default); lsq: learned step sizes (LSQ, lsq.py) for the weights and
    # the act_bits activations (the network's input and the classifier's input keep their 8-bit min/max observers)
    quantizer: str = "minmax"

    def bits_of(self, layer):
        """The weight bits of the layer named `layer` (`conv1`, `layer2.0.conv1`, `fc`)."""
        return dict(self.layer_bits).get(layer, self.weight_bits)


# Adding and then subtracting 1.5 * 2^23 rounds a float32 of magnitude below 2^22 to the nearest
# integer, ties to even, as ops.round does: the sum lies in [2^23, 2^24), where float32 holds whole
# numbers only. Two additions cost a third of ops.round's CPU kernel.
ROUNDING = 1.5 * 2 ** 23


def round_half_even(x, rounding):
    """x rounded to integers (|x| < 2^22, float32) where `rounding` is ROUNDING; x unchanged where it is 0."""
    return (x + rounding) - rounding


def weight_scale(weight, bits):
    """Per-output-channel (axis 0) scale of symmetric quantization to [-(2^(bits-1) - 1), 2^(bits-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    # ops.max along an axis (ArgMaxWithValue) is five times as fast as ops.amax (ReduceMax) on CPU.
    amax = ops.max(ops.abs(weight).reshape(weight.shape[0], -1), 1)[0]
    return (ops.maximum(amax, EPS) / qmax).reshape((-1,) + (1,) * (weight.ndim - 1))


def weight_levels(weight, scale):
    """The integers that `weight` is quantized to, as float32 (|weight| <= max |weight|: no clip needed)."""
    return round_half_even(weight * (1 / scale), ROUNDING)


def fake_quant_weight(weight, bits):
    """Symmetric per-output-channel fake quantization of a weight."""
    scale = weight_scale(weight, bits)
    return weight_levels(weight, scale) * scale


class WeightQuant(nn.Cell):
    """fake_quant_weight with the straight-through gradient; after `freeze`, in eval mode, a constant.
    Its bits are also a Parameter (`<layer>.weight_quant.bits`), so that every checkpoint records them."""

    def __init__(self, bits):
        super().__init__()
        self.num_bits = bits  # what the graph computes with (a Python int: a constant)
        self.bits = Parameter(Tensor(bits, ms.int32), name="bits", requires_grad=False)
        self.frozen = None

    def construct(self, weight):
        if self.frozen is not None and not self.training:
            return self.frozen
        return fake_quant_weight(weight, self.num_bits)

    def bprop(self, weight, out, dout):
        return (dout,)

    def freeze(self, weight):
        """Quantize `weight` now, for inference: eval mode then uses the result for every batch."""
        self.frozen = fake_quant_weight(weight, self.num_bits)

    def levels_and_scale(self, weight):
        """The integers `weight` is quantized to (as float32) and its per-channel scale, shaped to broadcast."""
        scale = weight_scale(weight, self.num_bits)
        return weight_levels(weight, scale), scale


class LearnedWeightQuant(nn.Cell):
    """WeightQuant's LSQ counterpart (quantizer lsq): symmetric per-channel quantization with a learned step per
    output channel (its logarithm `<layer>.weight_quant.log_step`), set from the weights at the first training step
    (`.weight_quant.initialized`), trained from then on."""

    def __init__(self, bits, channels):
        super().__init__()
        self.num_bits = self.trained_bits = bits
        self.bits = Parameter(Tensor(bits, ms.int32), name="bits", requires_grad=False)
        self.qmax = 2 ** (bits - 1) - 1
        self.log_step = Parameter(Tensor(np.zeros(channels, np.float32)), name="log_step")  # (lsq.py: why a log)
        self.initialized = Parameter(Tensor(0, ms.int32), name="initialized", requires_grad=False)
        self.fake_quant = lsq.LsqQuant(-self.qmax, self.qmax, per_channel=True)
        self.rounding = Tensor(ROUNDING, ms.float32)
        self.frozen = None

    def construct(self, weight):
        if self.frozen is not None and not self.training:
            return self.frozen
        return self.fake_quant(weight, self._step(weight), self.rounding)[0]

    def _step(self, weight):
        first = ops.log(lsq.initial_step(ops.stop_gradient(weight), self.qmax, per_channel=True))
        log_step = ops.where(self.initialized > 0, self.log_step, first)  # (weights are small: both cost little)
        if self.training:
            ops.assign(self.log_step, log_step)
            ops.assign(self.initialized, ops.ones((), ms.int32))
        return ops.exp(log_step).reshape((-1,) + (1,) * (weight.ndim - 1))

    def freeze(self, weight):
        """As WeightQuant.freeze; at other bits than trained (sensitivity.py sets num_bits), with min/max scales."""
        self.frozen = (self._quantized(weight, self._step(weight)) if self.num_bits == self.trained_bits
                       else fake_quant_weight(weight, self.num_bits))

    def levels_and_scale(self, weight):
        """As WeightQuant.levels_and_scale, with the learned steps."""
        step = self._step(weight)
        return ops.round(self._quantized(weight, step) / step), step

    def _quantized(self, weight, step):  # (a function, not the cell: called outside a graph, it compiles none)
        return lsq.fake_quantize(weight, step, self.rounding, -self.qmax, 2 * self.qmax)[0]


def activation_qparams(low, high, levels):
    """Scale and zero point of asymmetric quantization of [low, high] to [0, levels] (2^bits - 1).

    The range is widened to hold 0 and the zero point is an integer, so that 0 is exactly
    representable (zero padding and ReLU outputs stay exact).
    """
    low = ops.minimum(low, 0.0)
    high = ops.maximum(high, 0.0)
    scale = ops.maximum((high - low) / levels, EPS)
    return scale, ops.round(-low / scale)


class FakeQuant(nn.Cell):
    """Asymmetric per-tensor fake quantization of x: clip to [lower, upper], round to multiples of scale.

    Gradient (straight-through): 1 inside [lower, upper], 0 outside. A cell with its own bprop,
    because autodiff through the ops would keep x and each intermediate for the backward pass;
    this one keeps the output and a one-byte mask of the elements inside the range, which it
    returns as a second output. With bounds -inf, inf, scale 1 and rounding 0, x passes through
    unchanged.
    """

    def __init__(self, relu=False):
        super().__init__()
        self.relu = relu  # lower is 0: ops.relu is the faster kernel

    def construct(self, x, lower, upper, scale, rounding):
        clipped = ops.minimum(ops.relu(x) if self.relu else ops.maximum(x, lower), upper)
        return round_half_even(clipped * (1 / scale), rounding) * scale, clipped == x

    def bprop(self, x, lower, upper, scale, rounding, out, dout):
        no_gradient = ops.zeros_like(scale)
        return straight_through(out, dout), no_gradient, no_gradient, no_gradient, no_gradient


def straight_through(out, dout):
    """The gradient of a fake quantization (output, mask) = out: dout inside the range, 0 outside."""
    # dout times the mask as 0/1 floats: MaskedFill's CPU kernel branches on every element and is
    # several times as slow on a mask that is true half the time (a ReLU's). The depend makes the
    # float mask only when the gradient arrives, not all of them at once after the forward pass.
    inside = ops.depend(out[1], dout[0]).astype(dout[0].dtype)
    return dout[0] * inside


class ClipQuant(nn.Cell):
    """FakeQuant, always active, for training: x mapped to [0, 6] so that ReLU6 clips it.

    ReLU6 is one fast CPU kernel, where ReLU (or Maximum) and Minimum are two slow ones; the
    mapping costs one multiplication (and an addition where the zero point is not 0).
    Quantization to integer levels 0..`levels` with this zero point and scale:
    [lower, upper] = [-zero_point, levels - zero_point] * scale maps to [0, 6], and the clipped
    value times levels / 6, minus the zero point, is rounded. Same results as FakeQuant but
    where the two float computations round a tie differently; same gradient.
    """

    def __init__(self, levels, relu=False):
        super().__init__()
        self.levels = levels
        self.relu = relu  # the zero point is 0: no addition
        self.rounding = Tensor(ROUNDING, ms.float32)

    def construct(self, x, zero_point, scale):
        to_six = 6.0 / (self.levels * scale)
        mapped = x * to_six if self.relu else x * to_six + zero_point * (6.0 / self.levels)
        clipped = ops.relu6(mapped)
        shifted = clipped * (self.levels / 6.0) + (self.rounding - zero_point)  # rounded to an integer
        return (shifted - self.rounding) * scale, clipped == mapped

    def bprop(self, x, zero_point, scale, out, dout):
        no_gradient = ops.zeros_like(scale)
        return straight_through(out, dout), no_gradient, no_gradient


class ActQuant(nn.Cell):
    """Observer plus fake quantization of one activation tensor.

    `relu=True` applies a ReLU first, as part of the quantization: the range starts at 0, so the
    clip at 0 is the ReLU (and the float ReLU's own output need not be kept for its gradient).
    """

    def __init__(self, config, relu=False, bits=None):
        super().__init__()
        self.num_bits = bits or config.act_bits
        self.levels = 2 ** self.num_bits - 1
        if self.num_bits != ACT_BITS:  # (recorded where it is not 8, so that 8-bit checkpoints stay as they were)
            self.act_bits = Parameter(Tensor(self.num_bits, ms.int32), name="act_bits", requires_grad=False)
        self.relu = relu
        self.fake_quant = FakeQuant(relu)
        self.clip_quant = ClipQuant(self.levels, relu)
        self.decay = config.ema_decay
        # A Parameter, not an attribute, so that a checkpoint carries it and eval quantizes as training did.
        self.quant_delay = Parameter(Tensor(config.quant_delay, ms.int32), name="quant_delay", requires_grad=False)
        # Without a delay, training quantizes from the first step, and its graph needs no switch
        # (five scalar ops fewer per quantizer: about 60 MB less memory for the compiled step).
        self.delayed = config.quant_delay > 0
        self.min_val = Parameter(Tensor(0.0, ms.float32), name="min_val", requires_grad=False)
        self.max_val = Parameter(Tensor(0.0, ms.float32), name="max_val", requires_grad=False)
        self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)
        self.infinity = Tensor(float("inf"), ms.float32)
        self.no_bound = Tensor(0.0 if relu else -float("inf"), ms.float32)  # inactive: ReLU or nothing
        self.one = Tensor(1.0, ms.float32)
        self.rounding = Tensor(ROUNDING, ms.float32)
        self.no_rounding = Tensor(0.0, ms.float32)

    def construct(self, x):
        dtype = x.dtype  # observe and quantize in float32 even if given float16
        x = x.astype(ms.float32)
        if self.training:
            low, high = self._observe(ops.stop_gradient(x))
            # Step k (0-based) is quantized when k >= quant_delay.
            active = self.steps >= self.quant_delay
            ops.assign_add(self.steps, ops.ones((), ms.int32))
        else:
            low, high = self.min_val, self.max_val
            # After n training steps, eval matches the last of them: quantized when n > quant_delay.
            active = self.steps > self.quant_delay
        scale, zero_point = activation_qparams(low, high, self.levels)
        if self.training and not self.delayed:  # always active: the faster clip
            return self.clip_quant(x, zero_point, scale)[0].astype(dtype)
        # Inactive: no bounds (but the ReLU's), scale 1, no rounding, so x passes through.
        lower = ops.select(active, -zero_point * scale, self.no_bound)
        upper = ops.select(active, (self.levels - zero_point) * scale, self.infinity)
        scale = ops.select(active, scale, self.one)
        rounding = ops.select(active, self.rounding, self.no_rounding)
        return self.fake_quant(x, lower, upper, scale, rounding)[0].astype(dtype)

    def qparams(self):
        """Scale and zero point of the quantized tensor (trained)."""
        return activation_qparams(self.min_val.value(), self.max_val.value(), self.levels)

    def _observe(self, x):
        # ops.aminmax and ops.max (ArgM*WithValue) are several times as fast as x.min(), x.max() on CPU.
        if self.relu:  # the range of ReLU(x)
            batch_min, batch_max = ops.zeros((), ms.float32), ops.maximum(ops.max(x.reshape(-1), 0)[0], 0.0)
        else:
            batch_min, batch_max = ops.aminmax(x.reshape(-1), axis=0)
        first = self.steps == 0
        low = ops.where(first, batch_min, self.decay * self.min_val + (1 - self.decay) * batch_min)
        high = ops.where(first, batch_max, self.decay * self.max_val + (1 - self.decay) * batch_max)
        ops.assign(self.min_val, low)
        ops.assign(self.max_val, high)
        return low, high


class LearnedActQuant(nn.Cell):
    """ActQuant's LSQ counterpart (quantizer lsq): a learned step (its logarithm `<cell>.<x>_quant.log_step`), set
    from the batch at the first quantized training step; after a ReLU the levels are 0..2^bits - 1 (and their clip
    at 0 is the ReLU), else -2^(bits-1)..2^(bits-1) - 1, stored with that zero point. Parameters as ActQuant's but
    the range (`steps`, `quant_delay`, `act_bits`), so that the checks of resume and export read them alike."""

    def __init__(self, config, relu=False, bits=None):
        super().__init__()
        self.num_bits = bits or config.act_bits
        self.levels = 2 ** self.num_bits - 1
        self.zero_point = 0 if relu else 2 ** (self.num_bits - 1)
        self.highest = self.levels - self.zero_point
        if self.num_bits != ACT_BITS:
            self.act_bits = Parameter(Tensor(self.num_bits, ms.int32), name="act_bits", requires_grad=False)
        self.relu = relu
        self.quant_delay = Parameter(Tensor(config.quant_delay, ms.int32), name="quant_delay", requires_grad=False)
        self.delayed = config.quant_delay > 0
        self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)
        self.log_step = Parameter(Tensor(0.0, ms.float32), name="log_step")  # (lsq.py: why a log)
        self.fake_quant = lsq.LsqQuant(-self.zero_point, self.highest)
        self.rounding = Tensor(ROUNDING, ms.float32)

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        if self.training:
            # Until quantization starts (quant_delay), the step follows the batches; then it is trained.
            if self.steps <= self.quant_delay:
                first = lsq.initial_step(ops.stop_gradient(ops.relu(x) if self.relu else x), self.highest)
                ops.assign(self.log_step, ops.log(first))
            step = ops.exp(self.log_step)
            active = self.steps >= self.quant_delay
            ops.assign_add(self.steps, ops.ones((), ms.int32))
        else:
            step = ops.exp(self.log_step)
            active = self.steps > self.quant_delay
        y = self.fake_quant(x, step, self.rounding)[0]
        if self.delayed:
            y = ops.where(active, y, ops.relu(x) if self.relu else x)
        return y.astype(dtype)

    def qparams(self):
        """Scale and zero point of the quantized tensor (trained)."""
        return ops.exp(self.log_step.value()), Tensor(float(self.zero_point), ms.float32)


def weight_quantizer(config, bits, channels):
    """The weight quantizer of a layer of `channels` outputs at `bits` bits."""
    return LearnedWeightQuant(bits, channels) if config.quantizer == "lsq" else WeightQuant(bits)


def act_quantizer(config, relu=False):
    """The quantizer of an activation at config.act_bits (min/max or learned)."""
    return LearnedActQuant(config, relu) if config.quantizer == "lsq" else ActQuant(config, relu)


def fold_batchnorm(weight, bn):
    """A convolution's weight and a bias with BatchNorm `bn`'s moving statistics folded in (inference only)."""
    sigma = ops.sqrt(bn.moving_variance + bn.eps)
    return weight * (bn.gamma / sigma).reshape(-1, 1, 1, 1), bn.beta - bn.gamma * bn.moving_mean / sigma


class QuantConvBN(nn.Cell):
    """ConvBN with int8 per-channel weights and an 8-bit output; keeps the float cell's parameter names."""

    def __init__(self, unit, config, quantize_input=False, weight_bits=None):
        super().__init__()
        self.conv = unit.conv
        self.bn = unit.bn
        self.relu = unit.relu
        self.input_quant = ActQuant(config, bits=ACT_BITS) if quantize_input else None  # (the image: 8 bits)
        self.output_quant = act_quantizer(config, relu=unit.relu)
        self.weight_quant = weight_quantizer(config, weight_bits or config.weight_bits, unit.conv.out_channels)
        self.bn_fold = config.bn_fold
        if self.bn_fold:
            self.freeze_bn_step = Parameter(Tensor(config.freeze_bn, ms.int32), name="freeze_bn_step",
                                            requires_grad=False)
            self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)

    def construct(self, x):
        if self.input_quant is not None:
            x = self.input_quant(x).astype(x.dtype)  # float16 under --amp O2, where quantizers run in float32
        if self.bn_fold:
            x = self._folded(x)
        else:
            x = self.bn(self.conv.conv2d(x, self.weight_quant(self.conv.weight).astype(x.dtype)))
        return self.output_quant(x)  # and the ReLU, if any

    def folded_weight_and_bias(self):
        """Conv weight and bias with BatchNorm's moving statistics folded in (what inference runs)."""
        return fold_batchnorm(self.conv.weight, self.bn)

    def _folded(self, x):
        weight, bias = self.folded_weight_and_bias()
        y = self.conv.conv2d(x, self.weight_quant(weight))
        if not self.training:
            return y + bias.reshape(1, -1, 1, 1)
        # Until BatchNorm is frozen, normalize with the batch's statistics, as BatchNorm does. As in
        # PyTorch's QAT ConvBn2d, the quantized output is unscaled and batch-normalized: one convolution,
        # and the gradient is BatchNorm's. Frozen, this is exactly the inference above.
        bn = self.bn
        sigma = ops.sqrt(bn.moving_variance + bn.eps)
        raw = y * (sigma / bn.gamma).reshape(1, -1, 1, 1)
        batch_mean = raw.mean(axis=(0, 2, 3))
        batch_var = raw.var(axis=(0, 2, 3))
        frozen = ops.logical_and(self.freeze_bn_step >= 0, self.steps >= self.freeze_bn_step)
        mean = ops.where(frozen, bn.moving_mean, batch_mean)
        var = ops.where(frozen, bn.moving_variance, batch_var)
        out = (raw - mean.reshape(1, -1, 1, 1)) * (bn.gamma / ops.sqrt(var + bn.eps)).reshape(1, -1, 1, 1)
        # BatchNorm's moving averages (bn.momentum is the batch's weight, unbiased variance), until frozen.
        rate = bn.momentum * (1.0 - frozen.astype(ms.float32))
        count = raw.size // raw.shape[1]
        batch_var = ops.stop_gradient(batch_var) * count / max(count - 1, 1)
        ops.assign(bn.moving_mean, bn.moving_mean + rate * (ops.stop_gradient(batch_mean) - bn.moving_mean))
        ops.assign(bn.moving_variance, bn.moving_variance + rate * (batch_var - bn.moving_variance))
        ops.assign_add(self.steps, ops.ones((), ms.int32))
        return out + bn.beta.reshape(1, -1, 1, 1)


class QuantAdd(nn.Cell):
    """ResidualAdd with an 8-bit output."""

    def __init__(self, config):
        super().__init__()
        self.output_quant = act_quantizer(config, relu=True)

    def construct(self, branch, shortcut):
        return self.output_quant(branch + shortcut)  # and the ReLU


class QuantDense(nn.Dense):
    """nn.Dense (2-D input, no activation) with fake-quantized input and per-row weights."""

    def __init__(self, dense, config, weight_bits=None):
        if dense.activation_flag:
            raise ValueError("quantize: nn.Dense with a fused activation is not supported")
        super().__init__(dense.in_channels, dense.out_channels, weight_init=dense.weight.value(),
                         bias_init=dense.bias.value() if dense.has_bias else None, has_bias=dense.has_bias)
        self.input_quant = ActQuant(config, bits=ACT_BITS)  # (the classifier's input: 8 bits)
        self.weight_quant = weight_quantizer(config, weight_bits or config.weight_bits, dense.out_channels)

    def construct(self, x):
        x = self.input_quant(x).astype(x.dtype)  # float16 under --amp O2, where quantizers run in float32
        x = self.matmul(x, self.weight_quant(self.weight).astype(x.dtype))
        if self.has_bias:
            x = self.bias_add(x, self.bias)
        return x


def quantize(net, config=QuantConfig()):
    """Replace, in place, the ConvBN, ResidualAdd and nn.Dense cells of `net` by QAT versions; return `net`.

    The float weights are carried over and parameter names stay those of the float network (plus
    observers, `<cell>.{input,output}_quant.{min_val,max_val,steps,quant_delay}`), so a float
    checkpoint can be loaded into the result and fine-tuned.
    """
    first = True
    for parent_name, parent in list(net.cells_and_names()):
        for child_name, child in list(parent.name_cells().items()):
            bits = config.bits_of(f"{parent_name}.{child_name}" if parent_name else child_name)
            if type(child) is ConvBN:  # exact types: never wrap an already quantized cell
                _replace_child(parent, child_name, QuantConvBN(child, config, quantize_input=first, weight_bits=bits))
                first = False
            elif type(child) is ResidualAdd:
                _replace_child(parent, child_name, QuantAdd(config))
            elif type(child) is nn.Dense:
                _replace_child(parent, child_name, QuantDense(child, config, weight_bits=bits))
    # Replacing a child renames its parameters relative to the parent only; give them full names.
    for name, param in net.parameters_and_names():
        param.name = name
    return net


def freeze(net):
    """For inference only, before the first batch: quantize every layer's weights once, not on every batch.

    The network keeps its float weights; the quantized ones become constants of its eval graph,
    so a network that trains again needs a fresh copy.
    """
    for _, cell in net.cells_and_names():
        if isinstance(cell, QuantConvBN):
            cell.weight_quant.freeze(cell.folded_weight_and_bias()[0] if cell.bn_fold else cell.conv.weight)
        elif isinstance(cell, QuantDense):
            cell.weight_quant.freeze(cell.weight)
    return net


def integer_weights(cell):
    """(integer levels as float32, per-channel scale as a vector, float bias) of a QuantConvBN's or QuantDense's
    weights as the int8 model computes with them: BatchNorm's moving statistics folded in. With min/max scales the
    folded weight is quantized; learned steps are those of the unfolded weight, scaled by BatchNorm's per-channel
    factor, so the int8 weights are exactly the ones QAT trained."""
    if isinstance(cell, QuantDense):
        levels, scale = cell.weight_quant.levels_and_scale(cell.weight.value())
        return levels, scale.reshape(-1), cell.bias.value()
    weight, bias = cell.folded_weight_and_bias()
    if isinstance(cell.weight_quant, LearnedWeightQuant) and not cell.bn_fold:
        levels, step = cell.weight_quant.levels_and_scale(cell.conv.weight.value())
        factor = (cell.bn.gamma / ops.sqrt(cell.bn.moving_variance + cell.bn.eps)).reshape(-1, 1, 1, 1)
        return levels * ops.sign(factor), ops.maximum(step * ops.abs(factor), EPS).reshape(-1), bias
    levels, scale = cell.weight_quant.levels_and_scale(weight)
    return levels, scale.reshape(-1), bias


def _replace_child(parent, name, cell):
    if isinstance(parent, nn.SequentialCell):
        parent[int(name)] = cell  # keeps SequentialCell's cell_list in step
    else:
        setattr(parent, name, cell)


def config_from_checkpoint(params):
    """The QuantConfig a checkpoint's parameters ({name: Parameter}) were trained with (its counters and delays come
    from the checkpoint itself when loaded), or None for a float checkpoint. ValueError for weight bits that this
    module does not train: other than 2 to 8, or not the same in every layer."""
    if not any(name.endswith(OBSERVER_SUFFIX) for name in params):
        return None
    records = {name[:-len(BITS_SUFFIX)]: value.asnumpy() for name, value in params.items()
               if name.endswith(BITS_SUFFIX)}
    if any(record.shape != () or record.dtype != np.int32 for record in records.values()):
        raise ValueError("a weight-bits record is not one int32 number")
    bits = {layer: int(record) for layer, record in records.items()}
    if not set(bits.values()) <= set(range(2, 9)):
        raise ValueError(f"its layers record weight bits {sorted(set(bits.values()))}: this version trains 2 to 8 bits")
    counts = collections.Counter(bits.values())
    common = max(counts, key=lambda b: (counts[b], b)) if bits else UNRECORDED_WEIGHT_BITS  # (the most layers have)
    acts = {int(value.asnumpy()) for name, value in params.items()
            if name.endswith(ACT_BITS_SUFFIX) and value.asnumpy().shape == () and value.asnumpy().dtype == np.int32}
    if len(acts) > 1 or not acts <= set(range(2, 8)):
        raise ValueError(f"its activations record bits {sorted(acts)}: this version trains one width, 2 to 8 bits")
    return QuantConfig(bn_fold=any(name.endswith(FOLD_SUFFIX) for name in params), weight_bits=common,
                       quantizer="lsq" if any(name.endswith(LSQ_SUFFIX) for name in params) else "minmax",
                       layer_bits=tuple(sorted((layer, b) for layer, b in bits.items() if b != common)),
                       act_bits=acts.pop() if acts else ACT_BITS)


def bits_per_layer(params):
    """{layer name: weight bits} of a QAT network's or checkpoint's parameters ({name: Parameter})."""
    return {name[:-len(BITS_SUFFIX)]: int(value.asnumpy()) for name, value in params.items()
            if name.endswith(BITS_SUFFIX)}


def add_unrecorded_bits(params, parameters):
    """Give a checkpoint's parameters ({name: Parameter}, changed in place) the weight-bits records among
    `parameters` (a network's, as it was built) that they lack: a checkpoint written before layers recorded their
    bits has 8-bit weights (config_from_checkpoint)."""
    for param in parameters:
        if param.name.endswith(BITS_SUFFIX) and param.name not in params:
            params[param.name] = Parameter(param.value().copy(), name=param.name, requires_grad=False)
    return params
