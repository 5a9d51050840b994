"""export.py and the int8 reference inference: MindIR and int8 files against the QAT checkpoint."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

import eval as evaluate
import export
from conftest import SMALL, expect_error, observed_qat_net, run_script, snapshot, train_in_subprocess
from qatcifar import inference, int8, int8_export, networks, quant

SAMPLES = "500"
INT8_SAMPLES = 100  # eval.py on the int8 file (the numpy reference runs about 10 images/s)


def predictions(path, data, tmp_path, capsys, samples=SAMPLES):
    out = str(tmp_path / (os.path.basename(path) + ".npy"))
    evaluate.main(["-loc", path, "-data", data, "--num_samples", samples, "--json", "--save_predictions", out])
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    result["printed"] = printed
    return np.load(out), result


@pytest.fixture(scope="module")
def checkpoint_predictions(trained_evaluation):
    return trained_evaluation[2]  # of the first 500 test images


@pytest.mark.slow
def test_mindir_predicts_as_the_checkpoint(trained, synthetic_dir, checkpoint_predictions, tmp_path, capsys):
    path = export.main(["-loc", trained[0], "--format", "mindir", "--batch", "64", "-o", str(tmp_path / "m.mindir")])
    assert "% of the 312 KB of resnet8's float32 parameters" in capsys.readouterr().out
    predicted, result = predictions(path, synthetic_dir, tmp_path, capsys)
    assert result["model"] == "MindIR" and result["total"] == 500  # 500 = 7 x 64 + a padded batch of 52
    assert "has a fixed batch size of 64 (export.py --batch 64): it runs on batches of 64, not -bsize 100" in \
        result["printed"]
    assert (predicted == checkpoint_predictions).mean() >= 0.999


@pytest.mark.slow
def test_int8_file_is_small_integer_and_agrees(trained_exports, synthetic_dir, tmp_path, capsys):
    path = trained_exports["int8"]
    assert os.path.getsize(path) < 100_000  # resnet8: MLPerf Tiny's "under 100 KB"
    model = int8.load(path)
    arrays, graph = model["arrays"], model["header"]["graph"]
    assert [node["op"] for node in graph].count("conv") == 9 and not any("bn" in name for name in arrays)
    assert model["header"]["weight_bits"] == 7
    for node in graph:
        if "weight" in node:
            weight = arrays[node["weight"]]
            assert weight.dtype == np.int8 and np.abs(weight).max() == 63  # 7 bits (ort_kernels.py)
            assert arrays[node["weight_scale"]].shape == (weight.shape[0],)
            assert arrays[node["bias"]].dtype == np.int32

    predicted, expected = trained_exports["predictions"]["int8"], trained_exports["predictions"]["checkpoint"]
    assert (predicted == expected).mean() >= 0.99  # of AGREEMENT_IMAGES
    labels = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8).reshape(-1, 3073)[:len(expected), 0]
    assert abs((predicted == labels).mean() - (expected == labels).mean()) <= 0.005
    evaluated, result = predictions(path, synthetic_dir, tmp_path, capsys, samples=str(INT8_SAMPLES))
    assert result["model"] == "int8 (integer inference)" and result["total"] == INT8_SAMPLES
    assert (evaluated == predicted[:INT8_SAMPLES]).all()
    assert (result["arch"], result["params"], result["macs"]) == ("resnet8", 78_042, 12_501_632)


@pytest.mark.parametrize("arch", ["resnet8", "resnet20"])
def test_the_int8_file_is_the_size_train_py_announces(arch, tmp_path):
    net = observed_qat_net(arch)
    path = str(tmp_path / "m.int8.npz")
    int8.save(path, *int8_export.int8_model(net, quant.QuantConfig()))
    assert abs(os.path.getsize(path) / int8.expected_size(networks.profile(net)) - 1) < 0.01


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
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "earlier.npz").write_bytes(b"an earlier export")
    before = snapshot(tmp_path)
    expect_error(export.main, ["-loc", str(tmp_path / "none.ckpt")], capsys, "does not exist")
    expect_error(export.main, ["-loc", str(tmp_path / "none.ckpt"), "-o", str(tmp_path / "earlier.npz")], capsys,
                 "none.ckpt does not exist")
    expect_error(export.main, ["-loc", str(garbage), "-o", str(tmp_path / "x.npz")], capsys,
                 "not a readable MindSpore checkpoint")
    expect_error(export.main, ["-loc", str(tmp_path / "model.mindir")], capsys, "is not a .ckpt file")
    expect_error(export.main, ["-loc", ckpt, "--format", "tflite"], capsys, "invalid choice: 'tflite'")
    expect_error(export.main, ["-loc", ckpt, "-o", str(tmp_path / "missing" / "x.npz")], capsys, "does not exist")
    expect_error(export.main, ["-loc", ckpt, "-o", str(tmp_path / "folder.npz")], capsys, "is a folder")
    expect_error(export.main, ["-loc", ckpt, "-o", str(garbage / "x.npz")], capsys, "does not exist")
    expect_error(export.main, ["-loc", ckpt, "--format", "mindir", "--batch", "0"], capsys,
                 "argument --batch: must be an integer from 1 to 65536, got 0")
    assert snapshot(tmp_path) == before  # no partial or temporary file left behind


def test_export_never_clobbers(untrained, tmp_path, capsys):
    """-o must carry the format's suffix, must not be the checkpoint itself (or a link to it) and must not exist
    unless --overwrite: all refused before any work, every file left as it was."""
    ckpt = tmp_path / "resnet8_qat-2_2.ckpt"
    ckpt.write_bytes(open(untrained["QAT"], "rb").read())
    (tmp_path / "best.ckpt").write_bytes(b"the best network")
    (tmp_path / "resnet8_qat-2_2.int8.npz").write_bytes(b"an earlier export")
    os.symlink(ckpt, tmp_path / "link.npz")
    before = snapshot(tmp_path)
    for flags, fragment in [
        (["--format", "mindir", "-o", str(tmp_path / "best.ckpt")], "does not end in .mindir, the suffix of --format "
                                                                    "mindir; give a -o ending in .mindir"),
        (["--format", "mindir", "-o", str(tmp_path / "m.npz")], "does not end in .mindir"),
        (["--format", "int8", "-o", str(ckpt)], "does not end in .npz, the suffix of --format int8"),
        (["--format", "int8", "-o", str(tmp_path / "link.npz")], "is the checkpoint being exported"),
        (["--format", "int8", "-o", str(tmp_path / "link.npz"), "--overwrite"], "is the checkpoint being exported"),
        (["--format", "int8"], "resnet8_qat-2_2.int8.npz exists; give another -o, or add --overwrite"),
    ]:
        expect_error(export.main, ["-loc", str(ckpt), *flags], capsys, fragment)
    assert snapshot(tmp_path) == before


def test_mindir_takes_any_batch_size_and_is_replaced_only_with_overwrite(untrained, tmp_path, capsys):
    output = str(tmp_path / "m.mindir")
    export.main(["-loc", untrained["float32"], "--format", "mindir", "-o", output])
    model = inference.load_model(output)
    assert model.fixed_batch is None
    for batch in (1, 3):
        assert model.logits(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 10)
    expect_error(export.main, ["-loc", untrained["float32"], "--format", "mindir", "-o", output], capsys, "exists")
    export.main(["-loc", untrained["float32"], "--format", "mindir", "--batch", "2", "-o", output, "--overwrite"])
    assert inference.load_model(output).fixed_batch == 2 and os.listdir(tmp_path) == ["m.mindir"]


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
    ckpt = train_in_subprocess(*SMALL, "-data", synthetic_dir, "-dir", str(tmp_path), "-e", "2", "-bsize", "16",
                               "--num_samples", "32", "--bn_fold", "--freeze_bn", "1", "--save_steps", "1",
                               "--eval_every", "0")
    assert os.path.basename(ckpt) == "resnet8_qat-2_2.ckpt"
    means = [np.zeros(16, np.float32)] + [  # the moving mean starts at 0
        ms.load_checkpoint(str(tmp_path / f"resnet8_qat-{name}.ckpt"))["layer1.0.conv1.bn.moving_mean"].asnumpy()
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


# --- tampered and foreign model files: refused before the evaluation -------------------------------

def tampered(int8_file, tmp_path, change):
    """A copy of a valid int8 file with change(header, arrays) applied (a header it returns replaces it)."""
    model = int8.load(int8_file)
    header, arrays = model["header"], dict(model["arrays"])
    replaced = change(header, arrays)
    header = replaced if isinstance(replaced, list) else header
    path = str(tmp_path / "tampered.int8.npz")
    int8.save(path, header, arrays)
    return path


def node(header, name):
    return next(n for n in header["graph"] if n.get("name") == name)


def set_key(mapping, key, value):
    mapping[key] = value


TAMPERINGS = {
    "header a list": (lambda h, a: [h], "(format list, expected 'qat-resnet-int8' version 1)"),
    "stride 0": (lambda h, a: set_key(node(h, "layer2.0.conv1"), "stride", 0),
                 "operation 5 ('conv', 'layer2.0.conv1'): weight (32, 16, 3, 3), stride 0"),
    "empty graph": (lambda h, a: set_key(h, "graph", []), "the header has no graph"),
    "weight removed": (lambda h, a: a.pop("layer3.0.conv2.weight"), "array 'layer3.0.conv2.weight' is not in the file"),
    "weight reshaped": (lambda h, a: set_key(a, "layer1.0.conv1.weight", a["layer1.0.conv1.weight"][:, :8]),
                        "weight (16, 8, 3, 3), stride 1 and padding 1 do not fit an input of shape (16, 32, 32)"),
    "unknown op": (lambda h, a: set_key(node(h, "layer3.0.add"), "op", "mul"), "unknown operation 'mul'"),
    "100 outputs": (lambda h, a: a.update({"fc.weight": np.zeros((100, 64), np.int8),
                                           "fc.weight_scale": np.ones(100, np.float32),
                                           "fc.bias": np.zeros(100, np.int32)}),
                    "num_classes 10 is not the logits' (100,)"),
    "100 classes": (lambda h, a: a.update({"fc.weight": np.zeros((100, 64), np.int8),
                                           "fc.weight_scale": np.ones(100, np.float32),
                                           "fc.bias": np.zeros(100, np.int32)}) or set_key(h, "num_classes", 100),
                    "is a model for other data: input [3, 32, 32], 100 classes"),
    "zero scale": (lambda h, a: set_key(h["tensors"]["t5"], "scale", 0.0), "tensor 't5' has no scale > 0"),
    "used before defined": (lambda h, a: h["graph"].insert(1, h["graph"].pop(5)), "is not an earlier operation's"),
    "pickled weight": (lambda h, a: set_key(a, "fc.bias", np.array([object()] * 10)), "not an .npz archive of arrays"),
    "endless graph": (lambda h, a: set_key(h, "graph", h["graph"][:1] + [h["graph"][1]] * 2000),
                      "the graph has 2001 operations, more than the 1000"),
    "huge layer": (lambda h, a: a.update({"conv1.weight": np.zeros((2048, 3, 3, 3), np.int8),
                                          "conv1.weight_scale": np.ones(2048, np.float32),
                                          "conv1.bias": np.zeros(2048, np.int32)}),
                   "a 32x32 output of 2048 channels from 3x3x3 windows is more than the 1048576 values per image"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_eval_refuses_a_tampered_int8_file_before_evaluating(case, int8_file, synthetic_dir, tmp_path, capsys,
                                                             monkeypatch):
    change, fragment = TAMPERINGS[case]
    if case == "pickled weight":  # int8.save cannot write one: np.savez with pickling
        monkeypatch.setattr(int8.np, "savez", lambda f, **arrays: np.lib.npyio._savez(f, (), arrays, False, True))
    path = tampered(int8_file, tmp_path, change)
    monkeypatch.setattr(inference, "predict", lambda *args: pytest.fail("evaluated a tampered file"))
    expect_error(evaluate.main, ["-loc", path, "-data", synthetic_dir], capsys, fragment)


def test_the_untampered_int8_file_loads(int8_file):
    assert int8.load(int8_file)["header"]["num_classes"] == 10


def test_oversized_npz_members_are_refused_before_they_are_read(int8_file, tmp_path):
    """A member larger than an int8 ResNet-18 (declared, not read: compressed zeros), and a member whose array
    header claims more data than the member holds."""
    import zipfile

    big = str(tmp_path / "big.int8.npz")
    with zipfile.ZipFile(int8_file) as source, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        with target.open("extra.npy", "w", force_zip64=True) as f:  # (the limit's double; 3 GiB is as refused)
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (128 << 20,)})
            f.write(bytes(128 << 20))
    assert os.path.getsize(big) < 20 << 20
    with pytest.raises(ValueError, match=r"bytes: more than an int8 ResNet-18 holds"):
        int8.load(big)
    lying = str(tmp_path / "lying.int8.npz")
    with zipfile.ZipFile(lying, "w") as target:
        with target.open("header.json.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (1 << 40,)})
    with pytest.raises(ValueError, match=r"claims shape \(1099511627776,\), more than its"):
        int8.load(lying)


@pytest.mark.parametrize("shape, classes", [((1, 3, 64, 64), 10), ((1, 3, 32, 32), 100)])
def test_eval_refuses_a_mindir_of_another_network(shape, classes, synthetic_dir, tmp_path, capsys, monkeypatch):
    import mindspore.nn as nn

    net = nn.SequentialCell([nn.Flatten(), nn.Dense(int(np.prod(shape[1:])), classes)])
    path = str(tmp_path / "other")
    ms.export(net, ms.Tensor(np.zeros(shape, np.float32)), file_name=path, file_format="MINDIR")
    monkeypatch.setattr(inference, "predict", lambda *args: pytest.fail("evaluated a foreign MindIR"))
    expect_error(evaluate.main, ["-loc", path + ".mindir", "-data", synthetic_dir], capsys,
                 f"is a MindIR of another network: inputs [{list(shape)}], outputs [[1, {classes}]]")


def test_an_int8_header_nested_too_deep_is_refused(tmp_path):
    path = tmp_path / "deep.int8.npz"
    np.savez(path, **{"header.json": np.frombuffer(b"[" * 100000 + b"]" * 100000, np.uint8)})
    with pytest.raises(ValueError, match="header.json is not JSON"):
        int8.load(str(path))


def test_a_mindir_that_does_not_load_gets_one_line_from_the_script(untrained, synthetic_dir, tmp_path):
    """Its graph's input and output are right, its nodes gone: MindSpore's C++ loader logs ERROR lines of its own
    to file descriptor 2 (not seen by capsys: checked in a process)."""
    from mindspore.train import mind_ir_pb2

    good = export.main(["-loc", untrained["float32"], "--format", "mindir", "-o", str(tmp_path / "good.mindir")])
    proto = mind_ir_pb2.ModelProto()
    with open(good, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.graph.node[:]
    (tmp_path / "hollow.mindir").write_bytes(proto.SerializeToString())
    result = run_script("eval.py", "-loc", str(tmp_path / "hollow.mindir"), "-data", synthetic_dir, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'hollow.mindir'} is not a MindIR file MindSpore can "
                                          "load (Load MindIR failed.)"]
