"""qatcifar.lsq and quant's LSQ quantizers: the paper's gradients, the first step from the first batch, training
from then on, exact export of the learned steps, and checkpoints that say they are LSQ's."""
import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

from conftest import ARCH
from qatcifar import checkpoint, lsq, networks, quant
from qatcifar.quant import LearnedActQuant, LearnedWeightQuant, QuantConfig, quantize

rng = np.random.default_rng(0)
LSQ = QuantConfig(quantizer="lsq", weight_bits=4, act_bits=4)
ROUNDING = ms.Tensor(quant.ROUNDING, ms.float32)


def test_gradients_are_the_papers():
    """dy/dx: 1 inside [-Qn, Qp] x s, else 0; dy/ds: round(x/s) - x/s inside, -Qn below, Qp above, times
    1 / sqrt(N Qp) with N the values per image (Esser et al. 2020, equations 3-5)."""
    x = np.array([[-9.0, -3.3, -0.2, 0.0, 1.26, 2.5, 6.9, 7.6]], np.float32)  # one image of 8 values
    step, lowest, highest = 0.5, -8, 7
    fake_quant = lsq.LsqQuant(lowest, highest)

    def loss(v, s):
        return (fake_quant(v, s, ROUNDING)[0] * ms.Tensor(np.arange(1, 9, dtype=np.float32))).sum()

    dx, ds = ms.grad(loss, grad_position=(0, 1))(ms.Tensor(x), ms.Tensor(step, ms.float32))
    weights = np.arange(1, 9, dtype=np.float32)
    scaled = x[0] / step
    inside = (scaled >= lowest) & (scaled <= highest)
    np.testing.assert_array_equal(dx.asnumpy()[0], weights * inside)
    per_value = np.where(inside, np.round(scaled) - scaled, np.where(scaled < lowest, lowest, highest))
    np.testing.assert_allclose(float(ds.asnumpy()), (weights * per_value).sum() / np.sqrt(8 * highest), rtol=1e-5)
    out = fake_quant(ms.Tensor(x), ms.Tensor(step, ms.float32), ROUNDING)[0].asnumpy()
    np.testing.assert_array_equal(out[0], np.clip(np.round(scaled), lowest, highest) * step)


def test_per_channel_step_gradient_sums_each_channel():
    weight = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    steps = np.array([0.2, 0.5, 1.0], np.float32).reshape(3, 1, 1, 1)
    fake_quant = lsq.LsqQuant(-7, 7, per_channel=True)

    def loss(w, s):
        return fake_quant(w, s, ROUNDING)[0].sum()

    ds = ms.grad(loss, grad_position=1)(ms.Tensor(weight), ms.Tensor(steps)).asnumpy()
    scaled = weight / steps
    per_value = np.clip(np.round(scaled), -7, 7) - np.where(np.abs(scaled) <= 7, scaled, 0)
    np.testing.assert_allclose(ds, per_value.sum(axis=(1, 2, 3), keepdims=True) / np.sqrt(18 * 7), rtol=1e-4,
                               atol=1e-6)


def test_activation_step_starts_from_the_first_batch_and_is_then_trained():
    act = LearnedActQuant(LSQ, relu=True)
    act.set_train(True)
    first = rng.normal(size=(4, 8, 5, 5)).astype(np.float32)
    act(ms.Tensor(first))
    expected = 2 * np.maximum(first, 0).mean() / np.sqrt(15)
    np.testing.assert_allclose(np.exp(act.log_step.asnumpy()), expected, rtol=1e-5)  # trained as its logarithm
    act.log_step.set_data(ms.Tensor(np.log(0.25), ms.float32))  # as an optimizer would change it
    act(ms.Tensor(first * 3))
    assert float(act.log_step.asnumpy()) == np.float32(np.log(0.25))  # kept: initialized once
    act.set_train(False)
    x = np.linspace(-1, 5, 50, dtype=np.float32)
    scale, zero_point = act.qparams()
    np.testing.assert_allclose(float(scale.asnumpy()), 0.25, rtol=1e-6)
    assert float(zero_point.asnumpy()) == 0
    np.testing.assert_allclose(act(ms.Tensor(x)).asnumpy(), np.clip(np.round(x / 0.25), 0, 15) * 0.25, rtol=1e-6)
    signed = LearnedActQuant(LSQ)  # no ReLU before it: levels -8..7, stored around zero point 8
    assert (signed.zero_point, signed.highest, signed.levels) == (8, 7, 15)


def test_weight_steps_start_per_channel_and_export_as_the_forward_pass_quantizes():
    quantizer = LearnedWeightQuant(4, channels=6)
    quantizer.set_train(True)
    weight = ms.Tensor(rng.normal(size=(6, 3, 3, 3)).astype(np.float32))
    out = quantizer(weight).asnumpy()
    expected = 2 * np.abs(weight.asnumpy()).reshape(6, -1).mean(1) / np.sqrt(7)
    np.testing.assert_allclose(np.exp(quantizer.log_step.asnumpy()), expected, rtol=1e-5)
    assert int(quantizer.initialized.asnumpy()) == 1
    levels, scale = quantizer.levels_and_scale(weight)
    assert np.abs(levels.asnumpy()).max() <= 7
    np.testing.assert_allclose(levels.asnumpy() * scale.asnumpy(), out, rtol=1e-6)


def trained_lsq_net(steps=2):
    ms.set_seed(0)
    net = quantize(networks.resnet(ARCH), LSQ)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Adam(net.trainable_params(), 1e-2))
    step.set_train()
    images = ms.Tensor(rng.normal(size=(8, 3, 32, 32)).astype(np.float32))
    for _ in range(steps):
        step(images, ms.Tensor(np.arange(8, dtype=np.int32) % 10))
    net.set_train(False)
    return net, images


def test_a_network_trains_its_steps_and_exports_them_exactly(tmp_path):
    """The steps move in training; export's integer weights times their scales are the trained fake-quant
    weights with BatchNorm folded in, exactly (no second quantization, unlike min/max's); the checkpoint reads back
    as LSQ's, and the 8-bit input and classifier-input quantizers keep min/max observers."""
    net, _ = trained_lsq_net()
    first = 2 * np.abs(net.conv1.conv.weight.asnumpy()).reshape(net.conv1.conv.out_channels, -1).mean(1) / np.sqrt(7)
    assert not np.allclose(np.exp(net.conv1.weight_quant.log_step.asnumpy()), first)  # trained (the weights moved too)
    assert isinstance(net.conv1.input_quant, quant.ActQuant) and isinstance(net.fc.input_quant, quant.ActQuant)
    for cell in (net.layer1[0].conv1, net.layer2[0].conv2, net.fc):
        levels, scale, _ = quant.integer_weights(cell)
        if isinstance(cell, quant.QuantDense):
            expected = cell.weight_quant(cell.weight).asnumpy()
        else:
            bn = cell.bn
            factor = (bn.gamma / (bn.moving_variance + bn.eps).sqrt()).asnumpy().reshape(-1, 1, 1, 1)
            expected = cell.weight_quant(cell.conv.weight).asnumpy() * factor
        quantized = levels.asnumpy() * scale.asnumpy().reshape((-1,) + (1,) * (levels.ndim - 1))
        np.testing.assert_allclose(quantized, expected, rtol=1e-5, atol=1e-8)
        assert np.abs(levels.asnumpy()).max() <= 7 and (scale.asnumpy() > 0).all()
    path = str(tmp_path / "lsq.ckpt")
    checkpoint.save(net, path, {})
    config = checkpoint.quant_config(path, checkpoint.read(path))
    assert (config.quantizer, config.act_bits) == ("lsq", 4)
    assert networks.profile(net)["params"] == networks.profile(networks.resnet(ARCH))["params"]  # steps not counted


def test_a_default_network_has_no_lsq_parameters():
    """Min/max (the default) checkpoints hold what they held before LSQ: no step and no initialized flag."""
    names = [p.name for p in quantize(networks.resnet(ARCH)).get_parameters()]
    assert not [name for name in names if name.endswith((quant.LSQ_SUFFIX, ".initialized"))]


@pytest.mark.parametrize("relu", [False, True])
def test_quant_delay_passes_activations_through_until_quantization_starts(relu):
    act = LearnedActQuant(QuantConfig(quantizer="lsq", quant_delay=2), relu=relu)
    act.set_train(True)
    x = ms.Tensor(np.linspace(-2, 2, 9, dtype=np.float32))
    np.testing.assert_allclose(act(x).asnumpy(), np.maximum(x.asnumpy(), 0) if relu else x.asnumpy())
    act(x)
    assert not np.allclose(act(x * 1.01).asnumpy(), (x * 1.01).asnumpy())  # step 2: quantized
