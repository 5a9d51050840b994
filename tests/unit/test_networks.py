"""qatcifar.networks: output shape, parameters and multiply-accumulates, against counts made by hand."""
import mindspore as ms
import numpy as np
import pytest

from conftest import ARCH
from qatcifar import networks


def test_output_shape():
    net = networks.resnet(ARCH, num_classes=10)
    net.set_train(False)
    logits = net(ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)))
    assert logits.shape == (2, 10)
    assert np.isfinite(logits.asnumpy()).all()


def by_hand(stem, stages, classes=10):
    """(parameters, MACs per 32x32 image) of a CIFAR ResNet of BasicBlocks, written out layer by layer: a 3x3
    stem, stages of (channels, blocks), the first block of stages 2 and up at stride 2 with a 1x1 projection
    (every projection with BatchNorm), global average pool, dense. BatchNorm: 2 trainable numbers a channel."""
    params = 3 * 3 * 3 * stem + 2 * stem
    macs = 32 * 32 * 3 * 3 * 3 * stem
    size, before = 32, stem
    for stage, (channels, blocks) in enumerate(stages):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            size //= stride
            inputs = before if block == 0 else channels
            params += 9 * inputs * channels + 2 * channels + 9 * channels * channels + 2 * channels
            macs += size * size * (9 * inputs * channels + 9 * channels * channels)
            if stride == 2 or inputs != channels:
                params += inputs * channels + 2 * channels
                macs += size * size * inputs * channels
        before = channels
    return params + before * classes + classes, macs + before * classes


@pytest.mark.parametrize("arch, stem, stages, params", [
    ("resnet8", 16, [(16, 1), (32, 1), (64, 1)], 78_042),        # MLPerf Tiny: "about 78 k"
    ("resnet20", 16, [(16, 3), (32, 3), (64, 3)], 272_474),      # He et al. 2016: 0.27 M
    ("resnet18", 64, [(64, 2), (128, 2), (256, 2), (512, 2)], 11_173_962),  # the CIFAR ResNet-18 everyone reports
])
def test_parameters_and_macs_as_counted_by_hand(arch, stem, stages, params):
    profile = networks.profile(networks.resnet(arch))
    assert (profile["params"], profile["macs"]) == by_hand(stem, stages) and profile["params"] == params
    assert profile["arch"] == arch


def test_published_sizes():
    macs = {name: networks.profile(networks.resnet(name))["macs"] for name in networks.ARCHS}
    assert macs["resnet8"] == 12_501_632  # MLPerf Tiny: about 12.5 M
    assert abs(macs["resnet20"] / 41e6 - 1) < 0.01  # He et al.'s ResNet-20: about 41 M
    assert abs(macs["resnet18"] / 0.56e9 - 1) < 0.01
    assert networks.profile(networks.resnet("resnet18", num_classes=100))["params"] == 11_173_962 + 90 * 513


def test_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown network 'resnet9'"):
        networks.resnet("resnet9")
