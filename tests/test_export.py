"""export.py and the int8 reference inference: MindIR and int8 files against the QAT checkpoint."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

import eval as evaluate
import export
import int8
import quant
from conftest import expect_error, snapshot, train_in_subprocess

FLOAT32_BYTES = 4 * 11_173_962
SAMPLES = "500"
INT8_SAMPLES = 300  # the first 300 of the 500: the numpy reference runs about 10 images/s


def predictions(path, data, tmp_path, capsys, samples=SAMPLES):
    out = str(tmp_path / (os.path.basename(path) + ".npy"))
    evaluate.main(["-loc", path, "-data", data, "--num_samples", samples, "--json", "--save_predictions", out])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return np.load(out), result


@pytest.fixture(scope="module")
def checkpoint_predictions(trained_evaluation):
    return trained_evaluation[2]  # of the first 500 test images


@pytest.mark.slow
def test_mindir_predicts_as_the_checkpoint(trained, synthetic_dir, checkpoint_predictions, tmp_path, capsys):
    path = export.main(["-loc", trained[0], "--format", "mindir", "--batch", "64", "-o", str(tmp_path / "m.mindir")])
    assert "% of the 44.7 MB of float32 parameters" in capsys.readouterr().out
    predicted, result = predictions(path, synthetic_dir, tmp_path, capsys)
    assert result["model"] == "MindIR" and result["total"] == 500  # 500 = 7 x 64 + a padded batch of 52
    assert (predicted == checkpoint_predictions).mean() >= 0.999


@pytest.mark.slow
def test_int8_file_is_small_integer_and_agrees(trained, synthetic_dir, checkpoint_predictions, tmp_path, capsys):
    path = export.main(["-loc", trained[0], "--format", "int8", "-o", str(tmp_path / "m.int8.npz")])
    assert os.path.getsize(path) <= 0.27 * FLOAT32_BYTES
    model = int8.load(path)
    arrays, graph = model["arrays"], model["header"]["graph"]
    assert [node["op"] for node in graph].count("conv") == 20 and not any("bn" in name for name in arrays)
    for node in graph:
        if "weight" in node:
            weight = arrays[node["weight"]]
            assert weight.dtype == np.int8 and np.abs(weight).max() <= 127
            assert arrays[node["weight_scale"]].shape == (weight.shape[0],)
            assert arrays[node["bias"]].dtype == np.int32

    predicted, result = predictions(path, synthetic_dir, tmp_path, capsys, samples=str(INT8_SAMPLES))
    assert result["model"] == "int8 (integer inference)" and result["total"] == INT8_SAMPLES
    expected = checkpoint_predictions[:INT8_SAMPLES]
    assert (predicted == expected).mean() >= 0.99
    labels = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8).reshape(-1, 3073)[:INT8_SAMPLES, 0]
    assert abs((predicted == labels).mean() - (expected == labels).mean()) <= 0.005


def test_requantize_rounds_like_real_arithmetic():
    rng = np.random.default_rng(0)
    values = rng.integers(-2 ** 27, 2 ** 27, size=1000).astype(np.int64)
    multipliers = rng.uniform(1e-6, 0.9, size=1000)
    expected = np.floor(values * multipliers + 0.5)
    assert np.abs(int8.requantize(values, multipliers) - expected).max() <= 1
    assert (int8.requantize(values, multipliers) == expected).mean() > 0.99
    m0, shift = int8.quantize_multiplier(multipliers)
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all()
    np.testing.assert_allclose(m0 * 2.0 ** (shift - 31), multipliers, rtol=1e-9)


def test_integer_convolution_is_exact():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, size=(2, 64, 6, 6)).astype(np.uint8)
    weight = rng.integers(-127, 128, size=(8, 64, 3, 3)).astype(np.int8)
    bias = rng.integers(-1000, 1000, size=8).astype(np.int64)
    acc = int8.conv(q, 17, weight, bias, stride=2, padding=1)
    padded = np.pad(q.astype(np.int64) - 17, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 8, 3, 3), np.int64)
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[:, :, i, j] = np.einsum("nckl,ockl->no", patch, weight.astype(np.int64)) + bias
    np.testing.assert_array_equal(acc, expected)


# --- bad input -------------------------------------------------------------------------------

def test_export_rejects_bad_input(untrained, tmp_path, capsys):
    ckpt = untrained["QAT"]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 1000)
    before = snapshot(tmp_path)
    expect_error(export.main, ["-loc", str(tmp_path / "none.ckpt")], capsys, "does not exist")
    expect_error(export.main, ["-loc", str(garbage), "-o", str(tmp_path / "x.npz")], capsys,
                 "not a readable MindSpore checkpoint")
    expect_error(export.main, ["-loc", str(tmp_path / "model.mindir")], capsys, "is not a .ckpt file")
    expect_error(export.main, ["-loc", ckpt, "--format", "onnx"], capsys, "invalid choice: 'onnx'")
    expect_error(export.main, ["-loc", ckpt, "-o", str(tmp_path / "missing" / "x.npz")], capsys, "does not exist")
    expect_error(export.main, ["-loc", ckpt, "-o", str(tmp_path)], capsys, "is a folder")
    expect_error(export.main, ["-loc", ckpt, "-o", str(garbage / "x.npz")], capsys, "does not exist")
    assert snapshot(tmp_path) == before  # no partial or temporary file left behind


def test_int8_export_needs_a_qat_checkpoint(untrained, tmp_path, capsys):
    output = str(tmp_path / "m.int8.npz")
    expect_error(export.main, ["-loc", untrained["float32"], "--format", "int8", "-o", output], capsys,
                 "float32 checkpoint; int8 export needs a QAT one")
    assert os.listdir(tmp_path) == []


def test_int8_export_needs_quantized_activations(untrained, tmp_path, capsys):
    output = str(tmp_path / "m.int8.npz")
    expect_error(export.main, ["-loc", untrained["QAT"], "--format", "int8", "-o", output], capsys,
                 "activations are not quantized yet")
    assert os.listdir(tmp_path) == []


def test_eval_rejects_foreign_npz_and_mindir(synthetic_dir, tmp_path, capsys):
    foreign = tmp_path / "weights.npz"
    np.savez(foreign, a=np.zeros(3))
    bogus = tmp_path / "bogus.mindir"
    bogus.write_bytes(b"not a graph" * 10)
    for path, fragment in ((foreign, "is not an int8 model written by export.py"),
                           (bogus, "is not a MindIR file written by export.py")):
        expect_error(evaluate.main, ["-loc", str(path), "-data", synthetic_dir], capsys, fragment)


@pytest.mark.slow
def test_bn_fold_training_freezes_batchnorm_and_exports_an_equivalent_int8_model(synthetic_dir, tmp_path, capsys):
    """train.py --bn_fold --freeze_bn 1 end to end (2 epochs of 2 steps, a checkpoint after each step):
    BatchNorm's statistics move in epoch 1 and stay in epoch 2; then the int8 export predicts as the
    checkpoint.

    That BN-folded QAT learns is measured, not tested here (too slow for the suite: 1.7x the
    QAT step): 24 steps of 32 reached 50-60 %, 36 steps 79 % on the synthetic set (chance 10 %).
    """
    ckpt = train_in_subprocess("-data", synthetic_dir, "-dir", str(tmp_path), "-e", "2", "-bsize", "16",
                               "--num_samples", "32", "--bn_fold", "--freeze_bn", "1", "--save_steps", "1",
                               "--eval_every", "0")
    assert os.path.basename(ckpt) == "resnet18_qat-2_2.ckpt"
    means = [np.zeros(64, np.float32)] + [  # the moving mean starts at 0
        ms.load_checkpoint(str(tmp_path / f"resnet18_qat-{name}.ckpt"))["layer1.0.conv1.bn.moving_mean"].asnumpy()
        for name in ("1_1", "1_2", "2_1", "2_2")]
    assert not np.array_equal(means[0], means[1]) and not np.array_equal(means[1], means[2])  # epoch 1
    np.testing.assert_array_equal(means[2], means[3])  # frozen from epoch 2 on
    np.testing.assert_array_equal(means[3], means[4])
    assert quant.config_from_checkpoint(ms.load_checkpoint(ckpt)).bn_fold
    checkpoint_predicted, _ = predictions(ckpt, synthetic_dir, tmp_path, capsys, samples="100")
    path = export.main(["-loc", ckpt, "--format", "int8"])
    assert path == ckpt[: -len(".ckpt")] + ".int8.npz"
    predicted, _ = predictions(path, synthetic_dir, tmp_path, capsys, samples="100")
    # Lower than the trained model's 99 %: after 4 steps many images are near-ties between classes,
    # which one rounding step decides (96 % of 500 here).
    assert (predicted == checkpoint_predicted).mean() >= 0.9
