"""ResNet for 32x32 images (CIFAR-10), in MindSpore.

The CIFAR variant of He et al. 2016: a 3x3 stride-1 stem and no max-pool, so the
four stages work on 32, 16, 8 and 4 pixel feature maps. The network knows nothing
of data, training or quantization; `quant.quantize(net)` turns it into a QAT model.

    >>> from resnetv2 import resnet18
    >>> net = resnet18(num_classes=10)      # 11,173,962 trainable parameters
"""
import mindspore.nn as nn
import mindspore.ops as ops


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, pad_mode="pad", padding=1, has_bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, has_bias=False)


class BasicBlock(nn.Cell):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
    expansion = 1

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Cell):
    """1x1 reduce, 3x3, 1x1 expand (x4), for ResNet-50 and deeper."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else a strided 1x1 projection with BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.SequentialCell([conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)])


class ResNet(nn.Cell):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_channels = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
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
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = ops.mean(out, axis=(2, 3))  # global average pool
        return self.fc(out)


def resnet18(num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes=10):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes=10):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
