"""eval.py end to end: the best network kept by validation, exact reloads, every bad checkpoint refused, the
default checkpoint, --save_predictions, --plot and --csv."""
import json
import os
import shutil

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import eval as evaluate
from conftest import ARCH, assert_png, expect_error, run_script, snapshot
from qatcifar import checkpoint, files, networks
from qatcifar.quant import quantize


@pytest.mark.slow
def test_validation_keeps_the_best_network(trained, synthetic_dir):
    _, savedir = trained
    record = files.RunFiles(savedir, "resnet8_qat")
    with open(record.metrics) as f:
        best = max(line["val_accuracy"] for line in map(json.loads, f) if "val_accuracy" in line)
    path = record.best
    accuracy = evaluate.main(["-loc", path, "-data", synthetic_dir, "--num_samples", "200"])
    assert accuracy == pytest.approx(best)
    assert float(ms.load_checkpoint(path)["val_accuracy"].asnumpy()) == pytest.approx(best)


@pytest.mark.slow
def test_qat_checkpoint_reloads_with_identical_logits(tmp_path):
    net = quantize(networks.resnet(ARCH))
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Adam(net.trainable_params(), 1e-3))
    step.set_train()
    rng = np.random.default_rng(0)
    for _ in range(3):  # moves weights, BatchNorm statistics and the observers away from their initial values
        step(ms.Tensor(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)),
             ms.Tensor(rng.integers(0, 10, 8).astype(np.int32)))
    path = str(tmp_path / "qat.ckpt")
    checkpoint.save(net, path, {})
    net.set_train(False)
    x = ms.Tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    restored, config = checkpoint.load_network(path, num_classes=10)
    assert config is not None and restored.arch == ARCH
    assert restored.layer2[0].conv1.output_quant.steps.asnumpy() == 3
    np.testing.assert_array_equal(restored(x).asnumpy(), net(x).asnumpy())


def foreign_checkpoints(tmp_path):
    wide = str(tmp_path / "resnet8_100_classes.ckpt")
    checkpoint.save(networks.resnet(ARCH, num_classes=100), wide, {})
    unknown = str(tmp_path / "unknown_arch.ckpt")
    ms.save_checkpoint(nn.Dense(4, 2), unknown, append_dict={"arch": "resnet1000"})
    untagged = str(tmp_path / "untagged.ckpt")  # a resnet8 saved without the record: read as a resnet18
    ms.save_checkpoint(networks.resnet(ARCH), untagged)
    tiny = str(tmp_path / "dense.ckpt")
    ms.save_checkpoint(nn.SequentialCell([nn.Dense(4, 2)]), tiny)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    flipped = tmp_path / "flipped.ckpt"
    ms.save_checkpoint(nn.Dense(300, 300), str(flipped), crc_check=True)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a weight: only the CRC tells
    flipped.write_bytes(bytes(data))
    return {"wide": wide, "tiny": tiny, "garbage": str(garbage), "empty": str(tmp_path / "empty.ckpt"),
            "flipped": str(flipped), "unknown": unknown, "untagged": untagged}


@pytest.mark.parametrize("which, fragments", [
    ("missing", ["does not exist"]),
    ("folder", ["is a folder without model.json", "export.py --format c"]),
    ("empty", ["is an empty file"]),
    ("garbage", ["is not a readable MindSpore checkpoint"]),
    ("flipped", ["is not a readable MindSpore checkpoint (its CRC32 does not match its contents"]),
    ("wide", ["does not match resnet8 (float32), the network it records", "fc.weight (100, 64) instead of (10, 64)"]),
    ("tiny", ["does not match resnet18 (float32)", "parameters missing (e.g. conv1.conv.weight",
              "parameters unexpected (e.g. 0.weight"]),
    ("unknown", ["records the network 'resnet1000', not one this version builds (resnet8, resnet20, resnet18)"]),
    ("untagged", ["does not match resnet18 (float32)", "conv1.conv.weight (16, 3, 3, 3) instead of (64, 3, 3, 3)"]),
])
def test_eval_refuses_bad_checkpoints(which, fragments, tmp_path, synthetic_dir, capsys):
    paths = foreign_checkpoints(tmp_path)
    paths.update(missing=str(tmp_path / "none.ckpt"), folder=str(tmp_path))
    expect_error(evaluate.main, ["-loc", paths[which], "-data", synthetic_dir], capsys, *fragments)


@pytest.mark.slow  # (a process each, which imports MindSpore)
@pytest.mark.parametrize("which", ["flipped", "garbage"])
def test_a_corrupt_checkpoint_gets_one_line_from_the_script(which, tmp_path, synthetic_dir):
    """MindSpore logs a failed read as an ERROR line of its own, through a logging handler that neither capsys nor
    capfd sees in pytest's process: checked in a process of its own."""
    result = run_script("eval.py", "-loc", foreign_checkpoints(tmp_path)[which], "-data", synthetic_dir, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def test_eval_defaults_to_the_checkpoint_train_printed_last(untrained, synthetic_dir, tmp_path, monkeypatch, capsys):
    """The newest periodic or interrupt checkpoint in checkpoints/, not best.ckpt even when it is newer; named."""
    monkeypatch.chdir(tmp_path)
    expect_error(evaluate.main, ["-data", synthetic_dir], capsys, "no checkpoint given and no "
                 "<prefix>-<epoch>_<step>.ckpt in checkpoints/")
    os.mkdir("checkpoints")
    for age, name in enumerate(["resnet18-1_4.ckpt", "resnet18-2_1-interrupt.ckpt", "resnet18-best.ckpt"]):
        shutil.copy(untrained["float32"], os.path.join("checkpoints", name))
        os.utime(os.path.join("checkpoints", name), (1000 + age, 1000 + age))
    os.symlink("gone.ckpt", os.path.join("checkpoints", "resnet18-3_1.ckpt"))  # a broken link is no checkpoint
    evaluate.main(["-data", synthetic_dir, "--num_samples", "5"])
    out = capsys.readouterr().out
    assert "note: evaluating checkpoints/resnet18-2_1-interrupt.ckpt, the newest checkpoint in checkpoints/" in out
    assert "float32 checkpoints/resnet18-2_1-interrupt.ckpt on" in out


def test_eval_checks_the_predictions_path_before_evaluating(untrained, synthetic_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "earlier.npy").write_bytes(b"kept")
    os.symlink(untrained["QAT"], tmp_path / "model.npy")
    before = snapshot(tmp_path)
    monkeypatch.setattr(evaluate.inference, "load_model", lambda path: pytest.fail("loaded the model"))
    for path, fragment in [(tmp_path, "is a folder; give a file name"),
                           (tmp_path / "missing" / "p.npy", "does not exist; create it or give another path"),
                           (tmp_path / "earlier.npy", "exists; give another --save_predictions, or add --overwrite"),
                           (tmp_path / "model.npy", "is the model file, which this command reads; give another path")]:
        expect_error(evaluate.main, ["-loc", str(tmp_path / "model.npy"), "-data", synthetic_dir,
                                     "--save_predictions", str(path)], capsys, "--save_predictions", fragment)
    assert snapshot(tmp_path) == before


def test_no_output_of_eval_is_an_input_even_with_overwrite(untrained, synthetic_dir, tmp_path, capsys, monkeypatch):
    """Every output flag, --overwrite or not: never the model file, nor a file in the -data folder (its test split,
    its class names), nor that folder; and each its own suffix."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    model = tmp_path / "model.ckpt"
    shutil.copy(untrained["QAT"], model)
    before = snapshot(tmp_path), snapshot(data)
    monkeypatch.setattr(evaluate.inference, "load_model", lambda path: pytest.fail("loaded the model"))
    base = ["-loc", str(model), "-data", str(data), "--overwrite"]
    for flags, fragments in [
            (["--save_predictions", str(data / "test_batch.bin")], ["lies inside the data folder (-data)"]),
            (["--save_predictions", str(data / "batches.meta.txt")], ["lies inside the data folder (-data)"]),
            (["--plot", str(data / "new.png")], ["--plot", "lies inside the data folder"]),
            (["--csv", str(model)], ["--csv", "is the model file, which this command reads"]),
            (["--sensitivity", "--suggest_layer_bits", str(model), "--size_budget", "50"], ["is the model file"]),
            (["--sensitivity", "--suggest_layer_bits", str(tmp_path / "bits.txt"), "--size_budget", "50"],
             ["--suggest_layer_bits", "must end in .json"]),
            (["--save_predictions", str(tmp_path / "p.txt")], ["must end in .npy"]),
            (["--attack", "fgsm", "--save_adversarial", str(data)], ["--save_adversarial", "is the data folder"]),
            (["--attack", "fgsm", "--save_adversarial", str(data / "adv")], ["lies inside the data folder"]),
            (["--attack", "fgsm", "--save_adversarial", str(tmp_path)], ["holds the model file"])]:
        expect_error(evaluate.main, base + flags, capsys, *fragments)
    assert (snapshot(tmp_path), snapshot(data)) == before


def test_eval_needs_the_test_file(untrained, tmp_path, capsys):
    expect_error(evaluate.main, ["-loc", untrained["QAT"], "-data", str(tmp_path)], capsys, "no test_batch.bin")


def test_eval_plot_draws_the_confusion_matrix(untrained, synthetic_dir, tmp_path, capsys):
    path = tmp_path / "confusion.png"
    evaluate.main(["-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples", "100", "--plot", str(path)])
    assert_png(path, 1500, 650)
    assert f"wrote {path}" in capsys.readouterr().out


def test_eval_plot_is_checked_before_the_evaluation(untrained, synthetic_dir, tmp_path, capsys):
    base = ["-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples", "100"]
    (tmp_path / "old.png").write_bytes(b"old")
    before = snapshot(tmp_path)
    expect_error(evaluate.main, base + ["--plot", str(tmp_path / "c.jpg")], capsys, "--plot", "must end in .png")
    expect_error(evaluate.main, base + ["--plot", str(tmp_path / "old.png")], capsys, "exists", "--overwrite")
    expect_error(evaluate.main, base + ["--plot", str(tmp_path / "none" / "c.png")], capsys, "does not exist")
    assert snapshot(tmp_path) == before


def test_eval_csv_opens_as_a_table_of_the_report(untrained, synthetic_dir, tmp_path, capsys):
    import csv
    path = tmp_path / "report.csv"
    evaluate.main(["-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples", "100", "--csv", str(path),
                   "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = list(csv.reader(path.open()))
    assert rows[0][:4] == ["class", "images", "correct", "accuracy_percent"] and len(rows) == 11
    assert [[int(x) for x in row[4:]] for row in rows[1:]] == result["confusion"]
    assert sum(int(row[1]) for row in rows[1:]) == 100 and sum(int(row[2]) for row in rows[1:]) == result["correct"]
    bad = str(tmp_path / "r.txt")
    expect_error(evaluate.main, ["-loc", untrained["float32"], "-data", synthetic_dir, "--csv", bad], capsys, "--csv",
                 "must end in .csv")


def test_eval_reads_the_data_folder_of_the_models_run(untrained, synthetic_dir, tmp_path, capsys, monkeypatch):
    """Without -data, the folder the checkpoint's run trained on (its args.json), also for an export named after it;
    a missing data folder is an error that names -data."""
    ckpt = tmp_path / "resnet8_qat-2_16.ckpt"
    shutil.copy(untrained["float32"], ckpt)
    (tmp_path / "resnet8_qat-args.json").write_text(json.dumps({"data_dir": synthetic_dir}))
    evaluate.main(["-loc", str(ckpt), "--num_samples", "5"])
    out = capsys.readouterr().out
    assert f"note: data folder {synthetic_dir}, the one resnet8_qat's run trained on" in out
    assert f"float32 {ckpt} on {synthetic_dir}" in out
    (tmp_path / "resnet8_qat-args.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    monkeypatch.chdir(tmp_path)  # (where no data/cifar-10-batches-bin is)
    expect_error(evaluate.main, ["-loc", str(ckpt)], capsys, "data folder data/cifar-10-batches-bin does not exist",
                 "give the folder of CIFAR-10's .bin files with -data")


def test_eval_of_an_int8_file_says_nothing_of_gpus(int8_file, synthetic_dir, capsys):
    """The int8 reference and ONNX Runtime never use a GPU: no "no GPU backend" note for them."""
    evaluate.main(["-loc", int8_file, "-data", synthetic_dir, "--num_samples", "5"])
    out = capsys.readouterr().out
    assert "GPU" not in out and f"evaluating int8 (integer inference) {int8_file} on the first 5 test images" in out
