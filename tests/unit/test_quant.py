"""qatcifar.quant, fake quantization: int8 weights per channel, straight-through gradients, observers."""
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
import pytest

from conftest import ARCH
from qatcifar import networks, quant
from qatcifar.networks import ConvBN, ResidualAdd
from qatcifar.quant import ActQuant, QuantConfig, WeightQuant, fake_quant_weight, quantize

rng = np.random.default_rng(0)


def tensor(*shape, scale=1.0):
    return ms.Tensor((rng.normal(size=shape) * scale).astype(np.float32))


def observed(low, high, relu=False):
    """An ActQuant in eval mode whose observers hold [low, high] after one training step."""
    act = ActQuant(QuantConfig(), relu=relu)
    act.min_val.set_data(ms.Tensor(low, ms.float32))
    act.max_val.set_data(ms.Tensor(high, ms.float32))
    act.steps.set_data(ms.Tensor(1, ms.int32))
    act.set_train(False)
    return act


def fake_quant_activation(x, low, high, relu=False):
    return observed(low, high, relu)(x)


def test_rounding_is_to_nearest_with_ties_to_even():
    values = np.array([-254.5, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 3.49, 126.5, 127.0, 4e6 + 0.5],
                      np.float32)
    rounded = quant.round_half_even(ms.Tensor(values), ms.Tensor(quant.ROUNDING, ms.float32)).asnumpy()
    np.testing.assert_array_equal(rounded, np.round(values))


@pytest.mark.parametrize("bits", [7, 8])
def test_weights_take_at_most_2_to_the_bits_minus_1_symmetric_levels_per_channel(bits):
    weight = tensor(16, 8, 3, 3)
    quantized = fake_quant_weight(weight, bits=bits).asnumpy()
    original = weight.asnumpy()
    top = 2 ** (bits - 1) - 1  # 63, 127
    for channel, values in enumerate(quantized):
        scale = np.abs(original[channel]).max() / top
        levels = np.round(values / scale)
        assert len(np.unique(values)) <= 2 * top + 1
        np.testing.assert_allclose(levels * scale, values, rtol=1e-5, atol=1e-7)  # on the integer grid
        assert np.abs(levels).max() == top                                       # symmetric, full range
        assert np.abs(values - original[channel]).max() <= scale / 2 + 1e-6       # round to nearest


def test_weight_gradient_is_straight_through():
    weight = tensor(4, 3, 3, 3)
    quantizer = WeightQuant(8)
    def loss(w):  # a named function: MindSpore's graph mode cannot parse inline lambdas
        return (quantizer(w) * 3.0).sum()

    grad = ms.grad(loss)(weight)
    np.testing.assert_allclose(grad.asnumpy(), 3.0)


def test_activation_quantization_to_256_levels_with_exact_zero():
    x = ms.Tensor(np.linspace(-1.0, 3.0, 2000, dtype=np.float32))
    out = fake_quant_activation(x, -1.0, 3.0).asnumpy()
    assert len(np.unique(out)) <= 256
    assert np.abs(out - x.asnumpy()).max() <= 4.0 / 255 / 2 + 1e-6
    zero = fake_quant_activation(ms.Tensor(np.zeros(3, np.float32)), -1.0, 3.0)
    assert (zero.asnumpy() == 0).all()


def test_activation_gradient_passes_inside_range_only():
    x = ms.Tensor(np.array([-2.0, -0.5, 0.0, 0.7, 1.9, 5.0], np.float32))
    act = observed(-1.0, 2.0)
    def loss(v):
        return act(v).sum()

    grad = ms.grad(loss)(x).asnumpy()
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 0])


def test_relu_quantization_is_relu_then_quantization():
    x = ms.Tensor(np.array([-2.0, -0.5, 0.0, 0.7, 1.9, 5.0], np.float32))
    out = fake_quant_activation(x, 0.0, 2.0, relu=True).asnumpy()
    scale = 2.0 / 255
    np.testing.assert_allclose(out, np.round(np.clip(x.asnumpy(), 0, 2) / scale) * scale, rtol=1e-6)
    act = observed(0.0, 2.0, relu=True)
    def loss(v):
        return act(v).sum()

    np.testing.assert_array_equal(ms.grad(loss)(x).asnumpy(), [0, 0, 1, 1, 1, 0])


@pytest.mark.parametrize("relu", [False, True])
def test_training_quantization_agrees_with_eval(relu):
    """Training's ReLU6 clip (ClipQuant) computes what eval's FakeQuant does, with the same gradient."""
    act = ActQuant(QuantConfig(ema_decay=1.0), relu=relu)  # the first batch's range, kept
    act.set_train(True)
    act(ms.Tensor(np.array([-1.0, 3.0], np.float32)))
    x = ms.Tensor(np.linspace(-2.0, 5.0, 3001, dtype=np.float32))
    def loss(v):
        return (act(v) * 2.0).sum()

    trained, grad = act(x).asnumpy(), ms.grad(loss)(x).asnumpy()
    act.set_train(False)
    evaluated = act(x).asnumpy()
    scale = (3.0 if relu else 4.0) / 255
    lower = 0.0 if relu else -np.round(1.0 / scale) * scale  # the zero point is an integer
    upper = lower + 255 * scale
    levels = np.round((trained - lower) / scale)
    np.testing.assert_allclose(levels * scale + lower, trained, atol=1e-5)   # on the grid
    assert levels.min() == 0 and levels.max() == 255                         # clipped to 8 bits
    assert (trained == evaluated).mean() > 0.999                             # ties may round apart
    np.testing.assert_allclose(trained, evaluated, atol=scale * 1.001)
    inside = (x.asnumpy() >= lower) & (x.asnumpy() <= upper)
    np.testing.assert_array_equal(grad, 2.0 * inside)


def observer_state(cell):
    return cell.min_val.asnumpy().item(), cell.max_val.asnumpy().item(), cell.steps.asnumpy().item()


def test_observers_move_in_training_only():
    act = ActQuant(QuantConfig(ema_decay=0.5))
    act.set_train(True)
    act(ms.Tensor(np.array([-1.0, 2.0], np.float32)))
    assert observer_state(act) == (-1.0, 2.0, 1)          # the first batch sets the range
    act(ms.Tensor(np.array([-3.0, 4.0], np.float32)))
    assert observer_state(act) == (-2.0, 3.0, 2)          # then a moving average
    act.set_train(False)
    act(ms.Tensor(np.array([-30.0, 40.0], np.float32)))
    assert observer_state(act) == (-2.0, 3.0, 2)          # frozen in eval


def test_quant_delay_passes_activations_through():
    act = ActQuant(QuantConfig(quant_delay=2))
    act.set_train(True)
    x = ms.Tensor(np.linspace(-1, 1, 1001, dtype=np.float32))
    first, second, third = (act(x).asnumpy() for _ in range(3))
    np.testing.assert_array_equal(first, x.asnumpy())
    np.testing.assert_array_equal(second, x.asnumpy())
    assert len(np.unique(third)) <= 256 and not np.array_equal(third, x.asnumpy())


def test_quantize_wraps_every_layer_and_keeps_weights():
    float_net = networks.resnet(ARCH)
    weights = {p.name: p.asnumpy().copy() for p in float_net.get_parameters()}
    net = quantize(float_net)
    kinds = [type(cell) for _, cell in net.cells_and_names()]
    assert kinds.count(quant.QuantConvBN) == 9  # 7 3x3 convolutions and 2 1x1 shortcuts
    assert kinds.count(quant.QuantAdd) == 3 and kinds.count(quant.QuantDense) == 1
    assert ConvBN not in kinds and ResidualAdd not in kinds and nn.Dense not in kinds
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert all(np.array_equal(params[name], value) for name, value in weights.items())
    added = sorted(set(params) - set(weights))
    # observers: every ConvBN and ResidualAdd output, the network input and the classifier's input; and the weight
    # bits of every convolution and the classifier
    assert len(added) == (9 + 3 + 2) * 4 + 10 and all("_quant." in name for name in added)
    assert sum(name.endswith(quant.BITS_SUFFIX) for name in added) == 10
    assert [p.name for p in net.trainable_params()] == [n for n in weights if "moving_" not in n]
    assert quant.config_from_checkpoint(dict(net.parameters_and_names())) == QuantConfig()
    assert quant.config_from_checkpoint(weights) is None

    reference = networks.resnet(ARCH)
    ms.load_param_into_net(reference, {name: ms.Parameter(value, name=name) for name, value in weights.items()})
    reference.set_train(False)
    net.set_train(False)  # observers never trained: activations are not quantized yet, weights are
    x = tensor(2, 3, 32, 32)
    difference = np.abs(net(x).asnumpy() - reference(x).asnumpy()).max()
    assert 0 < difference < 0.2


def test_dense_with_activation_is_refused():
    with pytest.raises(ValueError, match="fused activation"):
        quantize(nn.SequentialCell([nn.Dense(4, 4, activation="relu")]))


def test_quantized_network_trains_a_step():
    net = quantize(networks.resnet(ARCH))
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Adam(net.trainable_params(), 1e-3))
    step.set_train()
    before = net.fc.weight.asnumpy().copy()
    value = step(tensor(4, 3, 32, 32), ms.Tensor(np.arange(4, dtype=np.int32)))
    assert np.isfinite(value.asnumpy())
    assert not np.array_equal(before, net.fc.weight.asnumpy())
    assert net.conv1.input_quant.steps.asnumpy() == 1 and net.fc.input_quant.max_val.asnumpy() > 0
    assert ops.isfinite(net.conv1.input_quant.min_val).asnumpy()


@pytest.mark.slow
def test_folded_and_frozen_inference_equal_unfolded(trained):
    """Freezing the quantized weights for inference changes nothing. Per-channel symmetric quantization
    commutes with BatchNorm's per-channel scale: in eval the folded network computes what the unfolded
    one does (up to float rounding). On the QAT checkpoint trained by train.py (4 epochs)."""
    params = ms.load_checkpoint(trained[0])

    def loaded(net):
        ms.load_param_into_net(net, {name: params[name] for name, _ in net.parameters_and_names() if name in params})
        return net

    unfolded = loaded(quantize(networks.resnet(ARCH)))
    folded = loaded(quantize(networks.resnet(ARCH), QuantConfig(bn_fold=True)))
    frozen = quant.freeze(loaded(quantize(networks.resnet(ARCH))))  # weights quantized once, for inference
    for net in unfolded, folded, frozen:
        net.set_train(False)
    x = tensor(4, 3, 32, 32)
    a, b = unfolded(x).asnumpy(), folded(x).asnumpy()
    np.testing.assert_array_equal(frozen(x).asnumpy(), a)
    # Not equal: float rounding moves some values across an activation rounding boundary, and a
    # step of 1/255 of the range passes on to the next layers (after 2 training steps: max error 4-9 %
    # of max |logit| and mean error 1-4 % of mean |logit| over six seeds, correlation >= 0.999; after
    # 12 and 64 steps: mean error 0.1-0.2 %, max 0.1-0.5 %, correlation 1.0000).
    assert np.abs(a - b).mean() < 0.08 * np.abs(a).mean()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995


def test_activations_of_fewer_bits_are_recorded_only_where_they_are_not_8(tmp_path):
    """The input image and the classifier's input keep 8 bits; the others --act_bits, each with a record; a default
    network has no record (its checkpoints are as they were) and reads back as 8-bit."""
    from qatcifar import checkpoint
    for act_bits in (8, 4):
        net = quantize(networks.resnet(ARCH), QuantConfig(act_bits=act_bits))
        quantizers = {name: cell for name, cell in net.cells_and_names() if isinstance(cell, ActQuant)}
        edges = {"conv1.input_quant", "fc.input_quant"}
        assert {name: cell.num_bits for name, cell in quantizers.items()} == {
            name: 8 if name in edges else act_bits for name in quantizers}
        records = [p.name for p in net.get_parameters() if p.name.endswith(quant.ACT_BITS_SUFFIX)]
        assert sorted(records) == ([] if act_bits == 8 else sorted(f"{name}.act_bits" for name in quantizers
                                                                   if name not in edges))
        path = str(tmp_path / f"a{act_bits}.ckpt")
        checkpoint.save(net, path, {})
        assert checkpoint.quant_config(path, checkpoint.read(path)).act_bits == act_bits


def test_min_max_layers_export_the_folded_weight_quantized_at_its_own_scales():
    """The default (min/max) export: each layer's folded weight quantized per channel at max|w| / (2^(bits-1) - 1),
    as before learned steps existed, so default int8 and ONNX files stay as they were."""
    net = quantize(networks.resnet(ARCH))
    for cell in (net.conv1, net.layer2[0].shortcut, net.fc):
        levels, scale, bias = quant.integer_weights(cell)
        weight = cell.weight if isinstance(cell, quant.QuantDense) else cell.folded_weight_and_bias()[0]
        expected_scale = quant.weight_scale(weight, 7)
        np.testing.assert_array_equal(scale.asnumpy(), expected_scale.asnumpy().reshape(-1))
        np.testing.assert_array_equal(levels.asnumpy(), quant.weight_levels(weight, expected_scale).asnumpy())
        np.testing.assert_array_equal(bias.asnumpy(), (cell.bias if isinstance(cell, quant.QuantDense)
                                                       else cell.folded_weight_and_bias()[1]).asnumpy())
