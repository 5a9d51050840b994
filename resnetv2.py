"""The seed's network module: the ResNets for 32x32 images, from `qatcifar.networks`.

    >>> from resnetv2 import resnet18
    >>> net = resnet18(num_classes=10)      # 11,173,962 trainable parameters

`qatcifar/networks.py` holds them: resnet8 (MLPerf Tiny's), resnet20 and resnet18 (the default),
built by `resnet(arch)`, and `profile`, their parameters and multiply-accumulates.
"""
from qatcifar.networks import ARCHS, DEFAULT_ARCH, ResNet, profile, resnet, resnet8, resnet18, resnet20  # noqa: F401
