"""qatcifar.sensitivity and eval.py --sensitivity: each layer at fewer weight bits in turn, the network put back as it
was, the layers ranked by what they lose, and the --layer_bits file suggested for a size budget."""
import json

import numpy as np
import pytest

import eval as evaluate
from conftest import ARCH, assert_png, expect_error, observed_qat_net
from qatcifar import cifar, inference, networks, plots, quant, sensitivity, training


@pytest.mark.slow
def test_each_layer_in_turn_and_the_network_put_back(synthetic_dir):
    net = quant.freeze(observed_qat_net())
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=20, num_samples=20)
    before, labels = inference.predict(net, dataset)
    baseline = float((before == labels).mean())
    same = sensitivity.measure(net, dataset, 7, baseline)  # the bits it was trained with: nothing changes
    assert [r["layer"] for r in sorted(same, key=lambda r: r["layer"])] == sorted(networks.weighted_layers(net))
    assert all(r["drop"] == 0 and r["bits"] == r["trained_bits"] == 7 for r in same)
    fewer = sensitivity.measure(net, dataset, 2, baseline)
    assert [r["drop"] for r in fewer] == sorted((r["drop"] for r in fewer), reverse=True)
    assert any(r["drop"] != 0 for r in fewer)  # 2-bit weights change a random network's answers somewhere
    np.testing.assert_array_equal(inference.predict(net, dataset)[0], before)
    assert all(cell.weight_quant.num_bits == 7 for cell in networks.weighted_layers(net).values())


def test_the_suggestion_lowers_the_least_sensitive_layers_until_the_file_fits():
    records = [{"layer": name, "bits": 4, "trained_bits": 7, "weights": weights, "drop": drop}
               for name, weights, drop in (("conv1", 1000, -0.5), ("a", 1000, 0.2), ("b", 2000, 0.0),
                                           ("c", 4000, 0.01), ("fc", 1000, -0.1))]
    assert sensitivity.suggest(records, 10_000, 10_000) == ({}, 10_000)
    assert sensitivity.suggest(records, 10_000, 9_000) == ({"b": 4}, 9_000)  # conv1 and fc stay: train.py's
    assert sensitivity.suggest(records, 10_000, 8_500) == ({"b": 4, "c": 4}, 7_000)
    assert sensitivity.suggest(records, 10_000, 1) == ({"b": 4, "c": 4, "a": 4}, 6_500)  # as far as it goes


@pytest.mark.slow
def test_eval_ranks_the_layers_suggests_a_file_train_py_reads_and_draws_them(untrained, synthetic_dir, tmp_path,
                                                                              capsys):
    suggestion, plot = tmp_path / "bits.json", tmp_path / "m.png"
    evaluate.main(["-loc", untrained["QAT"], "-data", synthetic_dir, "--num_samples", "100", "--sensitivity",
                   "--suggest_layer_bits", str(suggestion), "--size_budget", "60", "--plot", str(plot), "--json"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    records = result["sensitivity"]
    assert len(records) == len(networks.weighted_layers(networks.resnet(ARCH)))
    assert {key for r in records for key in r} == {"layer", "bits", "trained_bits", "weights", "accuracy", "drop"}
    assert all(r["bits"] == 4 and r["drop"] == pytest.approx(result["accuracy"] - r["accuracy"]) for r in records)
    assert "sensitivity: the accuracy with one layer's weights at 4 bits" in out
    chosen = json.loads(suggestion.read_text())
    assert chosen and set(chosen.values()) == {4} and not set(chosen) & set(networks.EDGE_LAYERS)
    layers = networks.weighted_layers(networks.resnet(ARCH))
    assert training.check_layer_names(str(suggestion), training.read_layer_bits(str(suggestion)), layers) == chosen
    if any(r["drop"] > 0 for r in records):
        assert_png(str(tmp_path / "m-sensitivity.png"), 900, round(100 * (1.2 + 0.32 * len(records))))
    else:  # (an empty chart is a sentence instead)
        assert "no layer lost accuracy" in out and not (tmp_path / "m-sensitivity.png").exists()
    assert plot.exists()  # (the confusion matrix: test_eval.py looks at it)


def test_the_sensitivity_chart_labels_each_bar_with_its_drop(tmp_path, monkeypatch):
    records = [{"layer": "layer1.0.conv1", "weights": 2304, "accuracy": 0.80, "drop": 0.05},
               {"layer": "fc", "weights": 640, "accuracy": 0.86, "drop": -0.01}]
    texts = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda figure, path: texts.extend(
        [t.get_text() for t in figure.axes[0].texts] + [t.get_text() for t in figure.axes[0].get_yticklabels()])
        or real_save(figure, path))
    plots.save_sensitivity(records, 0.85, str(tmp_path / "s.png"), "title")
    assert texts == ["+5.00 points (80.00%)", "-1.00 points (86.00%)", "layer1.0.conv1 (2,304 weights)",
                     "fc (640 weights)"]
    assert_png(str(tmp_path / "s.png"), 900, round(100 * (1.2 + 0.32 * 2)))


@pytest.mark.parametrize("flags, fragment", [
    (["--size_budget", "50"], "--size_budget comes from the layers' sensitivity; add --sensitivity"),
    (["--sensitivity", "--size_budget", "50"], "--suggest_layer_bits FILE and --size_budget KB go together"),
    (["--sensitivity", "--sensitivity_bits", "1"], "--sensitivity_bits: must be an integer from 2 to 8"),
    (["--sensitivity_bits", "3"], "--sensitivity_bits comes from the layers' sensitivity; add --sensitivity"),
    (["--sensitivity", "--sensitivity_bits", "8", "--suggest_layer_bits", "never.json", "--size_budget", "50"],
     "--sensitivity_bits 8 lowers no layer's bits (QAT trains at most 8), so no suggestion can shrink the file"),
])
def test_bad_sensitivity_flags_are_one_line(flags, fragment, untrained, synthetic_dir, capsys):
    expect_error(evaluate.main, ["-loc", untrained["QAT"], "-data", synthetic_dir, *flags], capsys, fragment)


def test_sensitivity_needs_a_qat_checkpoint(untrained, float_onnx, synthetic_dir, capsys):
    expect_error(evaluate.main, ["-loc", float_onnx[1], "-data", synthetic_dir, "--sensitivity"], capsys,
                 "only a QAT checkpoint can", "give the .ckpt it was exported from")
    expect_error(evaluate.main, ["-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples", "10",
                                 "--sensitivity"], capsys, "is a float32 checkpoint, which has none")
