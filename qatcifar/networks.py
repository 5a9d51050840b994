"""ResNets for 32x32 images (CIFAR-10), in MindSpore: one network shape, three sizes.

The CIFAR variant of He et al. 2016: a 3x3 stride-1 stem and no max-pool; stages of BasicBlocks, each
stage after the first halving the feature map with a stride-2 first block; global average pool; one
dense layer. The networks know nothing of data, training or quantization; `quant.quantize(net)` turns
one into a QAT model.

    >>> import resnetv2
    >>> net = networks.resnet("resnet8")          # 78,042 trainable parameters
    >>> networks.profile(net)["macs"]             # 12,501,632 multiply-accumulates per image

| name | stem | stages (channels x blocks) | parameters | what it is |
|---|---|---|---|---|
| `resnet8` | 16 | 16x1, 32x1, 64x1 | 78,042 | MLPerf Tiny's image-classification network |
| `resnet20` | 16 | 16x3, 32x3, 64x3 | 272,474 | He et al. 2016's CIFAR ResNet-20 |
| `resnet18` | 64 | 64x2, 128x2, 256x2, 512x2 | 11,173,962 | the seed's network, the default |

Where a block changes the shape (stride 2 or more channels), its shortcut is a 1x1 convolution with
BatchNorm (He et al.'s option B), in all three: MLPerf Tiny's Keras ResNet-8 has the 1x1 convolution with
a bias and no BatchNorm, and He et al.'s ResNet-20 pads with zeros (option A, no parameters).

Convolutions come with their BatchNorm (and ReLU) as one `ConvBN` cell and residual joins are
`ResidualAdd` cells, so that a quantizer can fold BatchNorm and place its observers without
tracing the graph. `walk` gives the dataflow to exporters and to `profile`, which counts
parameters and multiply-accumulates from the layers themselves.
"""
import mindspore.nn as nn
import mindspore.ops as ops

from qatcifar.archs import ARCHS, DEFAULT_ARCH

EDGE_LAYERS = ("conv1", "fc")  # a ResNet's first and last layer, by name


class ConvBN(nn.Cell):
    """Convolution, BatchNorm and an optional ReLU: the unit an int8 runtime executes as one fused layer."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, relu=True):
        super().__init__()
        padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              pad_mode="pad" if padding else "valid", padding=padding, has_bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def construct(self, x):
        x = self.bn(self.conv(x))
        if self.relu:
            x = ops.relu(x)
        return x


class ResidualAdd(nn.Cell):
    """The join of a residual block: ReLU(branch + shortcut). A cell, so that it can be quantized."""

    def construct(self, branch, shortcut):
        return ops.relu(branch + shortcut)


class BasicBlock(nn.Cell):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = ConvBN(in_channels, channels, 3, stride)
        self.conv2 = ConvBN(channels, channels, 3, relu=False)
        self.shortcut = shortcut(in_channels, channels, stride)
        self.add = ResidualAdd()

    def construct(self, x):
        return self.add(self.conv2(self.conv1(x)), self.shortcut(x))


def shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else a strided 1x1 projection with BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvBN(in_channels, out_channels, 1, stride, relu=False)


class ResNet(nn.Cell):
    """A stem, stages `layer1`, `layer2`, ... of BasicBlocks, global average pool and a dense layer; `arch` is the
    name it was built as (ARCHS), or None."""

    def __init__(self, stem, widths, blocks, num_classes=10, arch=None):
        super().__init__()
        self.arch = arch
        self.conv1 = ConvBN(3, stem, 3)
        stages, in_channels = [], stem
        for i, (channels, count) in enumerate(zip(widths, blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            stage = nn.SequentialCell([BasicBlock(c_in, channels, s) for c_in, s in
                                       zip([in_channels] + [channels] * (count - 1), strides, strict=True)])
            setattr(self, f"layer{i + 1}", stage)  # the parameter names of the seed's ResNet-18: layer1.0.conv1...
            stages.append(stage)
            in_channels = channels
        self.stages = tuple(stages)
        self.fc = nn.Dense(in_channels, num_classes)

    def construct(self, x):
        out = self.conv1(x)
        for stage in self.stages:
            out = stage(out)
        out = ops.mean(out, axis=(2, 3))  # global average pool
        return self.fc(out)


def resnet(arch=DEFAULT_ARCH, num_classes=10):
    """The network named `arch` (a key of ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown network {arch!r}: one of {', '.join(ARCHS)}")
    return ResNet(*ARCHS[arch], num_classes=num_classes, arch=arch)


def resnet8(num_classes=10):
    return resnet("resnet8", num_classes)


def resnet20(num_classes=10):
    return resnet("resnet20", num_classes)


def resnet18(num_classes=10):
    return resnet("resnet18", num_classes)


def walk(net, graph):
    """The network's dataflow in order, for exporters: calls graph.input(net), graph.conv(unit, source),
    graph.add(cell, [branch, shortcut]), graph.mean(source, fc) and graph.dense(fc, source), each returning the
    name of the tensor it produced, on a ResNet or its quantized version; returns the logits' name."""
    t = graph.conv(net.conv1, graph.input(net))
    for stage in net.stages:
        for block in stage:
            branch = graph.conv(block.conv2, graph.conv(block.conv1, t))
            shortcut = t if isinstance(block.shortcut, nn.Identity) else graph.conv(block.shortcut, t)
            t = graph.add(block.add, [branch, shortcut])
    return graph.dense(net.fc, graph.mean(t, net.fc))


def weighted_layers(net):
    """{name: cell} of the network's convolution units and dense layers (float or quantized), in dataflow order:
    the layers that have weights to quantize (`conv1`, `layer1.0.conv1`, ..., `fc`)."""
    names = {id(cell): name for name, cell in net.cells_and_names()}
    layers = {}

    class Collect:
        def input(self, net):
            return None

        def conv(self, unit, source):
            layers[names[id(unit)]] = unit

        def add(self, cell, sources):
            return None

        def mean(self, source, fc):
            return None

        def dense(self, fc, source):
            layers[names[id(fc)]] = fc
    walk(net, Collect())
    return layers


def profile(net, image_size=32):
    """What a network (float or quantized) costs, counted from its layers: {"arch", "params" (trained: the float
    network's, not a quantizer's learned steps),
    "macs" (multiply-accumulates per image), "weights" (conv and dense weights), "weight_bytes" (their bytes in an
    int8 file: one a weight, half of one for a quantized layer of at most 4 bits), "channels" (their output
    channels: a bias and a scale each in an int8 file), "layers" (conv and dense layers), "packed_layers" (those of
    at most 4 bits)}."""
    counter = _Counter(image_size)
    walk(net, counter)
    trained = [p for p in net.trainable_params() if not p.name.endswith("_quant.log_step")]  # (quant.LSQ_SUFFIX)
    return {"arch": getattr(net, "arch", None), "params": sum(p.size for p in trained),
            "macs": counter.macs, "weights": counter.weights, "weight_bytes": counter.weight_bytes,
            "channels": counter.channels, "layers": counter.layers, "packed_layers": counter.packed_layers}


class _Counter:
    """walk's calls as shapes (channels, height, width) and counts."""

    def __init__(self, image_size):
        self.shapes = {"image": (3, image_size, image_size)}
        self.macs = self.weights = self.weight_bytes = self.channels = self.layers = self.packed_layers = 0

    def _layer(self, shape, weights, out_channels, cell):
        name = f"t{len(self.shapes)}"
        self.shapes[name] = shape
        height, width = shape[1:] if len(shape) == 3 else (1, 1)
        self.macs += weights * height * width  # each weight is used once per output position
        self.weights += weights
        bits = getattr(getattr(cell, "weight_quant", None), "num_bits", 8)  # (a quantized layer's)
        self.weight_bytes += (weights + 1) // 2 if bits <= 4 else weights
        self.packed_layers += bits <= 4
        self.channels += out_channels
        self.layers += 1
        return name

    def input(self, net):
        return "image"

    def conv(self, unit, source):
        conv = unit.conv
        (k, _), (s, _) = conv.kernel_size, conv.stride
        pad = conv.padding if conv.pad_mode == "pad" else 0
        _, height, width = self.shapes[source]
        shape = (conv.out_channels, (height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1)
        return self._layer(shape, conv.out_channels * conv.in_channels * k * k, conv.out_channels, unit)

    def add(self, cell, sources):
        return sources[0]

    def mean(self, source, fc):
        return source

    def dense(self, fc, source):
        return self._layer((fc.out_channels,), fc.in_channels * fc.out_channels, fc.out_channels, fc)
