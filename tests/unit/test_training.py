"""qatcifar.training and qatcifar.schedules: learning-rate schedules, label smoothing, mixed precision."""
import json
import os
import re

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import train
from conftest import SMALL, expect_error
from qatcifar import checkpoint, cli, networks, schedules, training


def schedule(*flags, steps_per_epoch=10):
    run = train.get_args_parser().parse_args(["-lr", "0.1", "-e", "5", *flags])
    return schedules.learning_rates(run, steps_per_epoch)


def test_learning_rate_schedules():
    assert schedule() == 0.1  # constant: a plain float, as the seed
    warm = schedule("--warmup_epochs", "1")
    assert len(warm) == 50 and warm[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])
    assert set(warm[10:]) == {0.1}
    cosine = schedule("--lr_schedule", "cosine", "--warmup_epochs", "1")
    assert cosine[9] == pytest.approx(0.1) and cosine[10] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(cosine[10:-1], cosine[11:], strict=True)) and cosine[-1] < 0.001
    onecycle = schedule("--lr_schedule", "onecycle")
    assert onecycle[0] == pytest.approx(0.004 + 0.096 / 15) and max(onecycle) == pytest.approx(0.1)
    assert onecycle.index(max(onecycle)) == 14 and onecycle[-1] < 0.001
    endless = schedule("--warmup_epochs", "1e308")  # longer than the run: a warmup over the whole run
    assert len(endless) == 50 and endless[-1] == pytest.approx(0.1) and endless[0] == pytest.approx(0.002)


def test_label_smoothing_loss():
    assert isinstance(training.make_loss(train.get_args_parser().parse_args([])), nn.SoftmaxCrossEntropyWithLogits)
    loss = training.make_loss(train.get_args_parser().parse_args(["--label_smoothing", "0.2"]))
    logits = np.array([[2.0, 0.5, -1.0]], np.float32)
    log_p = logits - np.log(np.exp(logits).sum())
    expected = -(0.8 * log_p[0, 0] + 0.2 * log_p[0].mean())
    value = float(loss(ms.Tensor(logits), ms.Tensor(np.array([0], np.int32))).asnumpy())
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_mixed_precision_trains_the_qat_network_in_float16():
    """--amp O2 (refused on CPU, where it is slower) builds a float16 QAT step; run one step here to check it."""
    args = train.get_args_parser().parse_args([*SMALL, "--amp", "O2"])
    net = training.build_network(args, steps_per_epoch=1)
    step = training.build_train_network(net, training.make_optimizer(net, args, 1), args)
    step.set_train()
    rng = np.random.default_rng(0)
    loss = step(ms.Tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32)), ms.Tensor(np.arange(4, dtype=np.int32)))
    assert np.isfinite(float(loss.asnumpy()))
    assert net.conv1.output_quant.max_val.dtype == ms.float32 and net.fc.weight.dtype == ms.float32
    assert int(net.conv1.output_quant.steps.asnumpy()) == 1


def test_weight_bits_per_layer_from_the_flags_and_a_file_reach_the_checkpoint(tmp_path):
    """--weight_bits for the body, --first_last_bits for conv1 and fc, --layer_bits' file over both; the checkpoint
    records each layer's and reads back as the same QuantConfig."""
    (tmp_path / "bits.json").write_text(json.dumps({"layer3.0.conv2": 3, "fc": 8}))
    args = train.get_args_parser().parse_args([*SMALL, "--weight_bits", "4", "--first_last_bits", "6",
                                               "--layer_bits", str(tmp_path / "bits.json")])
    net = training.build_network(args, steps_per_epoch=1)
    layers = networks.weighted_layers(net)
    assert list(layers)[:2] == ["conv1", "layer1.0.conv1"] and list(layers)[-1] == "fc"
    expected = {name: 4 for name in layers} | {"conv1": 6, "fc": 8, "layer3.0.conv2": 3}
    assert {name: cell.weight_quant.num_bits for name, cell in layers.items()} == expected
    checkpoint.save(net, str(tmp_path / "m.ckpt"), {})
    config = checkpoint.quant_config("m.ckpt", checkpoint.read(str(tmp_path / "m.ckpt")))
    assert config.weight_bits == 4 and dict(config.layer_bits) == {"conv1": 6, "fc": 8, "layer3.0.conv2": 3}


@pytest.mark.parametrize("content, fragment", [
    ("{", "--layer_bits {path}: "), ("[4]", "is not a JSON object of layer names and bits from 2 to 8"),
    ('{"fc": 9}', "bits from 2 to 8"), ('{"fc": "4"}', "bits from 2 to 8"),
    ('{"layer9.conv": 4}', "names layer9.conv, which is not a layer of this network; its layers: conv1, layer1.0")])
def test_a_bad_layer_bits_file_is_one_line(content, fragment, tmp_path):
    path = tmp_path / "bits.json"
    path.write_text(content)
    args = train.get_args_parser().parse_args([*SMALL, "--layer_bits", str(path)])
    with pytest.raises(cli.InputError, match=re.escape(fragment.format(path=path))):
        training.build_network(args, steps_per_epoch=1)



@pytest.mark.parametrize("kind, fragment", [
    ("fifo", "--layer_bits {path}: not a regular file"), ("device", "--layer_bits /dev/zero: not a regular file"),
    ("deep", "--layer_bits {path}: JSON nested too deeply"),
    ("big", "--layer_bits {path}: larger than 1,000,000 bytes")])
def test_a_layer_bits_file_is_read_bounded_and_once(kind, fragment, tmp_path, synthetic_dir, capsys, monkeypatch):
    """A FIFO (open() blocked with Ctrl-C masked), /dev/zero (22 GB read), '[' x 100,000 (a RecursionError) and a
    44 MB file (1 GB of memory): each one line, at once, and the file is opened once."""
    path = {"device": "/dev/zero"}.get(kind, str(tmp_path / "bits.json"))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "deep":
        with open(path, "w") as f:
            f.write("[" * 100_000)
    elif kind == "big":
        with open(path, "w") as f:
            f.write('{"fc": 4' + " " * 44_000_000 + "}")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda name, *args: opened.append(name) or real_open(name, *args))
    expect_error(train.main, [*SMALL, "-data", synthetic_dir, "-dir", str(tmp_path / "run"), "-e", "1",
                              "--layer_bits", path], capsys, fragment.format(path=path))
    assert opened.count(path) == 1 and not (tmp_path / "run").exists()
