"""ResNet for 32x32 images (CIFAR-10), in MindSpore.

The CIFAR variant of He et al. 2016: a 3x3 stride-1 stem and no max-pool, so the
four stages work on 32, 16, 8 and 4 pixel feature maps. The network knows nothing
of data, training or quantization; `quant.quantize(net)` turns it into a QAT model.

    >>> from resnetv2 import resnet18
    >>> net = resnet18(num_classes=10)      # 11,173,962 trainable parameters

Convolutions come with their BatchNorm (and ReLU) as one `ConvBN` cell and residual joins
are `ResidualAdd` cells, so that a quantizer can fold BatchNorm and place its observers
without tracing the graph.
"""
import mindspore.nn as nn
import mindspore.ops as ops


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
    expansion = 1

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = ConvBN(in_channels, channels, 3, stride)
        self.conv2 = ConvBN(channels, out_channels, 3, relu=False)
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.add = ResidualAdd()

    def construct(self, x):
        return self.add(self.conv2(self.conv1(x)), self.shortcut(x))


class Bottleneck(nn.Cell):
    """1x1 reduce, 3x3, 1x1 expand (x4), for ResNet-50 and deeper."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = ConvBN(in_channels, channels, 1)
        self.conv2 = ConvBN(channels, channels, 3, stride)
        self.conv3 = ConvBN(channels, out_channels, 1, relu=False)
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.add = ResidualAdd()

    def construct(self, x):
        return self.add(self.conv3(self.conv2(self.conv1(x))), self.shortcut(x))


def shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else a strided 1x1 projection with BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvBN(in_channels, out_channels, 1, stride, relu=False)


class ResNet(nn.Cell):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_channels = 64
        self.conv1 = ConvBN(3, 64, 3)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.fc = nn.Dense(512 * block.expansion, num_classes)

    def _make_layer(self, block, channels, count, stride):
        layers = []
        for layer_stride in [stride] + [1] * (count - 1):
            layers.append(block(self.in_channels, channels, layer_stride))
            self.in_channels = channels * block.expansion
        return nn.SequentialCell(layers)

    def construct(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = ops.mean(out, axis=(2, 3))  # global average pool
        return self.fc(out)


def walk(net, graph):
    """The network's dataflow in order, for exporters: calls graph.input(net), graph.conv(unit, source),
    graph.add(cell, [branch, shortcut]), graph.mean(source, fc) and graph.dense(fc, source), each returning the
    name of the tensor it produced, on a ResNet or its quantized version; returns the logits' name."""
    t = graph.conv(net.conv1, graph.input(net))
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            branch = t
            for unit in (block.conv1, block.conv2, getattr(block, "conv3", None)):
                branch = graph.conv(unit, branch) if unit is not None else branch
            shortcut = t if isinstance(block.shortcut, nn.Identity) else graph.conv(block.shortcut, t)
            t = graph.add(block.add, [branch, shortcut])
    return graph.dense(net.fc, graph.mean(t, net.fc))


def resnet18(num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes=10):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes=10):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
