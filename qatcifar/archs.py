"""The networks' names and shapes (no MindSpore: commands that only read model files know them too);
networks.py builds them."""

# name: (stem channels, channels of each stage, BasicBlocks of each stage)
ARCHS = {
    "resnet8": (16, (16, 32, 64), (1, 1, 1)),  # MLPerf Tiny's image-classification network
    "resnet20": (16, (16, 32, 64), (3, 3, 3)),  # He et al. 2016's CIFAR ResNet-20
    "resnet18": (64, (64, 128, 256, 512), (2, 2, 2, 2)),  # the seed's
}
DEFAULT_ARCH = "resnet18"  # the seed's
