"""The network: output shape and size."""
import mindspore as ms
import numpy as np

from resnetv2 import resnet18, resnet34, resnet50


def count(net):
    return sum(p.size for p in net.trainable_params())


def test_resnet18_output_shape():
    net = resnet18(num_classes=10)
    net.set_train(False)
    logits = net(ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)))
    assert logits.shape == (2, 10)
    assert np.isfinite(logits.asnumpy()).all()


def test_parameter_counts():
    assert count(resnet18()) == 11_173_962   # the CIFAR ResNet-18 everyone reports
    assert count(resnet34()) == 21_282_122
    assert count(resnet50()) == 23_520_842
    assert count(resnet18(num_classes=100)) == 11_173_962 + 90 * 513
