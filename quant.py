"""Quantization-aware training (QAT) as a transform of a built network.

    >>> from resnetv2 import resnet18
    >>> from quant import quantize, QuantConfig
    >>> net = quantize(resnet18(), QuantConfig(quant_delay=100))

Every nn.Conv2d and nn.Dense is replaced by a subclass that fake-quantizes
- its weights: int8, symmetric, one scale per output channel (range [-127, 127]);
- its input activations: 8-bit, asymmetric, per tensor, with the range tracked by
  min/max observers (exponential moving average while training, frozen in eval).

Why our own fake-quant: `mindspore.compression` (the API the 2021 seed used) is gone
since MindSpore 2.0, Golden Stick's SimQAT is GPU-only, and the FakeQuant* primitives
have no CPU kernels. This module uses only standard ops (round, clip, min/max,
stop_gradient, assign), so the same model trains in GRAPH_MODE on CPU and GPU.
Rounding uses the straight-through estimator: the gradient of fake-quant is 1 inside
the quantization range and 0 outside (as TensorFlow's FakeQuantWithMinMaxVars).

The observers are non-trainable Parameters, so they are saved in every checkpoint and
restored by `load_checkpoint`, and a checkpoint tells by its parameter names whether
it is a QAT model (see `is_qat_checkpoint`).
"""
from dataclasses import dataclass

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Parameter, Tensor

# Suffix of the parameters that only a quantized network has; used to tell QAT checkpoints apart.
OBSERVER_SUFFIX = ".input_quant.steps"
EPS = 1e-8


@dataclass(frozen=True)
class QuantConfig:
    """All choices of the quantization scheme, named once."""
    weight_bits: int = 8        # symmetric, per output channel
    act_bits: int = 8           # asymmetric, per tensor
    ema_decay: float = 0.99     # observer moving average; high enough to smooth batches, low enough for short runs
    quant_delay: int = 0        # training steps before activations are quantized (observers warm up meanwhile)


def fake_quant_weight(weight, bits):
    """Symmetric per-output-channel fake quantization (axis 0) with the straight-through estimator."""
    qmax = 2 ** (bits - 1) - 1
    reduce_axes = tuple(range(1, weight.ndim))
    amax = ops.stop_gradient(ops.amax(ops.abs(weight), reduce_axes, keepdims=True))
    scale = ops.maximum(amax, EPS) / qmax
    quantized = ops.round(weight / scale) * scale  # |weight| <= amax, so no clip is needed
    return weight + ops.stop_gradient(quantized - weight)


def fake_quant_activation(x, low, high, bits):
    """Asymmetric per-tensor fake quantization of x to the observed range [low, high].

    The range is widened to hold 0 and nudged so that 0 is exactly representable (zero
    padding and ReLU outputs stay exact). Gradient: 1 inside the range, 0 outside.
    """
    levels = 2 ** bits - 1
    low = ops.minimum(low, 0.0)
    high = ops.maximum(high, 0.0)
    scale = ops.maximum((high - low) / levels, EPS)
    zero_point = ops.round(-low / scale)
    low = -zero_point * scale
    high = (levels - zero_point) * scale
    clipped = ops.clamp(x, low, high)
    quantized = ops.round(clipped / scale) * scale
    return clipped + ops.stop_gradient(quantized - clipped)


class ActQuant(nn.Cell):
    """Observer plus fake quantization of one activation tensor."""

    def __init__(self, config):
        super().__init__()
        self.bits = config.act_bits
        self.decay = config.ema_decay
        # A Parameter, not an attribute, so that a checkpoint carries it and eval quantizes as training did.
        self.quant_delay = Parameter(Tensor(config.quant_delay, ms.int32), name="quant_delay", requires_grad=False)
        self.min_val = Parameter(Tensor(0.0, ms.float32), name="min_val", requires_grad=False)
        self.max_val = Parameter(Tensor(0.0, ms.float32), name="max_val", requires_grad=False)
        self.steps = Parameter(Tensor(0, ms.int32), name="steps", requires_grad=False)

    def construct(self, x):
        if self.training:
            low, high = self._observe(ops.stop_gradient(x))
            # Step k (0-based) is quantized when k >= quant_delay.
            active = self.steps >= self.quant_delay
            ops.assign_add(self.steps, ops.ones((), ms.int32))
        else:
            low, high = self.min_val, self.max_val
            # After n training steps, eval matches the last of them: quantized when n > quant_delay.
            active = self.steps > self.quant_delay
        quantized = fake_quant_activation(x, low, high, self.bits)
        return ops.where(active, quantized, x)

    def _observe(self, x):
        first = self.steps == 0
        low = ops.where(first, x.min(), self.decay * self.min_val + (1 - self.decay) * x.min())
        high = ops.where(first, x.max(), self.decay * self.max_val + (1 - self.decay) * x.max())
        ops.assign(self.min_val, low)
        ops.assign(self.max_val, high)
        return low, high


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with fake-quantized input and per-channel fake-quantized weights."""

    def __init__(self, conv, config):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         pad_mode=conv.pad_mode, padding=conv.padding, dilation=conv.dilation,
                         group=conv.group, has_bias=conv.has_bias, weight_init=conv.weight.value(),
                         bias_init=conv.bias.value() if conv.has_bias else None, data_format=conv.data_format, dtype=conv.weight.dtype)
        self.weight_bits = config.weight_bits
        self.input_quant = ActQuant(config)

    def construct(self, x):
        x = self.input_quant(x)
        output = self.conv2d(x, fake_quant_weight(self.weight, self.weight_bits))
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output


class QuantDense(nn.Dense):
    """nn.Dense (2-D input, no activation) with fake-quantized input and per-row weights."""

    def __init__(self, dense, config):
        if dense.activation_flag:
            raise ValueError("quantize: nn.Dense with a fused activation is not supported")
        super().__init__(dense.in_channels, dense.out_channels, weight_init=dense.weight.value(),
                         bias_init=dense.bias.value() if dense.has_bias else None, has_bias=dense.has_bias)
        self.weight_bits = config.weight_bits
        self.input_quant = ActQuant(config)

    def construct(self, x):
        x = self.input_quant(x)
        x = self.matmul(x, fake_quant_weight(self.weight, self.weight_bits))
        if self.has_bias:
            x = self.bias_add(x, self.bias)
        return x


QUANTIZED = {nn.Conv2d: QuantConv2d, nn.Dense: QuantDense}


def quantize(net, config=QuantConfig()):
    """Replace, in place, every nn.Conv2d and nn.Dense of `net` by its QAT version; return `net`.

    The float weights are carried over, so a float checkpoint can be loaded first and fine-tuned.
    Parameter names stay those of the float network, plus
    `<layer>.input_quant.{min_val,max_val,steps,quant_delay}`.
    """
    for _, parent in list(net.cells_and_names()):
        for child_name, child in list(parent.name_cells().items()):
            if type(child) in QUANTIZED:  # exact type: never wrap an already quantized layer
                _replace_child(parent, child_name, QUANTIZED[type(child)](child, config))
    # Replacing a child renames its parameters relative to the parent only; give them full names.
    for name, param in net.parameters_and_names():
        param.name = name
    return net


def _replace_child(parent, name, cell):
    if isinstance(parent, nn.SequentialCell):
        parent[int(name)] = cell  # keeps SequentialCell's cell_list in step
    else:
        setattr(parent, name, cell)


def is_qat_checkpoint(param_names):
    return any(name.endswith(OBSERVER_SUFFIX) for name in param_names)
