"""train.main and eval.main end to end on tiny synthetic data, and every bad input they must refuse."""
import json
import os
import subprocess
import sys

import numpy as np
import mindspore as ms
import mindspore.nn as nn
import pytest

import eval as evaluate
import train
from conftest import snapshot, train_in_subprocess
from quant import quantize
from resnetv2 import resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_writes_checkpoints_and_arguments(trained, synthetic_dir):
    path, savedir = trained
    assert os.path.basename(path) == "resnet18_qat-4_12.ckpt" and os.path.isfile(path)
    assert sorted(f for f in os.listdir(savedir) if f.endswith(".ckpt")) == [
        f"resnet18_qat-{epoch}_12.ckpt" for epoch in range(1, 5)]
    with open(os.path.join(savedir, "args.json")) as f:
        args = json.load(f)
    assert args["epoch"] == 4 and args["qat"] is True and args["device"] == "CPU"
    assert args["data_dir"] == synthetic_dir and args["optimizer"] == "adam"


def test_training_learns_and_eval_reports_json(trained, synthetic_dir, capsys):
    path, _ = trained
    accuracy = evaluate.main(["-loc", path, "-data", synthetic_dir, "--num_samples", "500", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 500 and result["model"] == "QAT (int8 fake-quant)"
    assert result["accuracy"] == accuracy == result["correct"] / 500
    assert accuracy > 0.5, f"4 short epochs on the learnable set should beat chance (0.1) by far, got {accuracy}"


def test_float_training_and_eval(synthetic_dir, tmp_path, capsys):
    path = train.main(["-data", synthetic_dir, "-dir", str(tmp_path), "-e", "1", "-bsize", "16",
                       "--num_samples", "32", "--no-qat", "-opt", "momentum", "-lr", "0.01"])
    assert os.path.basename(path) == "resnet18-1_2.ckpt"
    assert f"checkpoint: {path}" in capsys.readouterr().out
    accuracy = evaluate.main(["-loc", path, "-data", synthetic_dir, "--num_samples", "10", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "float32" and result["total"] == 10 and 0 <= accuracy <= 1


def test_rerun_into_same_folder_keeps_earlier_checkpoints(trained, synthetic_dir):
    _, savedir = trained
    before = snapshot(savedir)
    path = train_in_subprocess("-data", synthetic_dir, "-dir", savedir, "-e", "1", "-bsize", "16", "--num_samples", "16")
    assert os.path.basename(path) == "resnet18_qat_1-1_1.ckpt"
    after = snapshot(savedir)
    assert all(after[name] == stamp for name, stamp in before.items() if name.endswith(".ckpt"))


def test_qat_checkpoint_reloads_with_identical_logits(tmp_path):
    net = quantize(resnet18())
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Adam(net.trainable_params(), 1e-3))
    step.set_train()
    rng = np.random.default_rng(0)
    for _ in range(3):  # moves weights, BatchNorm statistics and the observers away from their initial values
        step(ms.Tensor(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)),
             ms.Tensor(rng.integers(0, 10, 8).astype(np.int32)))
    path = str(tmp_path / "qat.ckpt")
    ms.save_checkpoint(net, path)
    net.set_train(False)
    x = ms.Tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    restored, config = evaluate.load_network(path)
    assert config is not None
    assert restored.layer2[0].conv1.output_quant.steps.asnumpy() == 3
    np.testing.assert_array_equal(restored(x).asnumpy(), net(x).asnumpy())


# --- bad input: one `error:` line, exit 2, nothing in the save directory touched -------------

def expect_error(main, argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def savedir(tmp_path):
    """A save directory that already holds a run's files, which no failed run may touch."""
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "resnet18_qat-1_1.ckpt").write_bytes(b"earlier run")
    (folder / "args.json").write_text("{}")
    return str(folder)


def bad_data(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "truncated":
        (folder / "data_batch_1.bin").write_bytes(bytes(3073 * 10))
    elif kind == "label":
        records = np.zeros((10000, 3073), np.uint8)
        records[5, 0] = 10
        records.tofile(folder / "data_batch_1.bin")
    return str(folder)


@pytest.mark.parametrize("kind, fragments", [
    ("missing", ["does not exist", "--download"]),
    ("empty", [r"no data_batch_*.bin", "--synthetic"]),
    ("truncated", ["30730 bytes", "10000 records"]),
    ("label", ["record 5 has label 10"]),
])
def test_train_refuses_bad_data(kind, fragments, tmp_path, savedir, capsys):
    data = str(tmp_path / "nope") if kind == "missing" else bad_data(tmp_path, kind)
    before = snapshot(savedir)
    expect_error(train.main, ["-data", data, "-dir", savedir, "-e", "1"], capsys, *fragments)
    assert snapshot(savedir) == before


@pytest.mark.parametrize("flags, fragment", [
    (["-bsize", "0"], "--batchsize: must be a positive integer"),
    (["--batchsize", "-4"], "--batchsize: must be a positive integer"),
    (["-e", "0"], "--epoch: must be a positive integer"),
    (["-repeatNum", "0"], "--repeatNum: must be a positive integer"),
    (["-lr", "0"], "--learningRate: must be a positive finite number"),
    (["-lr", "-0.1"], "--learningRate: must be a positive finite number"),
    (["-lr", "nan"], "--learningRate: must be a positive finite number, got nan"),
    (["-wDecay", "-0.0001"], "--weightDecay: must be a finite number >= 0"),
    (["-m", "1.5"], "--momentum: must be in [0, 1)"),
    (["-opt", "adagrad"], "--optimizer: invalid choice: 'adagrad'"),
    (["-bsize", "many"], "not a valid int: 'many'"),
    (["--device", "GPU"], "--device GPU: this MindSpore has no usable GPU backend"),
    (["-bsize", "64", "--num_samples", "32"], "batch size 64 is larger than 32 training images"),
])
def test_train_refuses_bad_flags(flags, fragment, synthetic_dir, savedir, capsys):
    before = snapshot(savedir)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", savedir, "-e", "1"] + flags, capsys, fragment)
    assert snapshot(savedir) == before


def test_train_refuses_unusable_save_directory(synthetic_dir, savedir, capsys):
    a_file = os.path.join(savedir, "args.json")
    before = snapshot(savedir)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", a_file], capsys, "is a file")
    expect_error(train.main, ["-data", synthetic_dir, "-dir", os.path.join(a_file, "sub")], capsys,
                 "cannot write to save directory", "Not a directory")
    assert snapshot(savedir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder; covered above by a path under a file")
def test_train_refuses_read_only_save_directory(synthetic_dir, savedir, capsys):
    os.chmod(savedir, 0o500)
    try:
        expect_error(train.main, ["-data", synthetic_dir, "-dir", savedir], capsys, "Permission denied")
    finally:
        os.chmod(savedir, 0o700)


def foreign_checkpoints(tmp_path):
    wide = str(tmp_path / "resnet18_100_classes.ckpt")
    ms.save_checkpoint(resnet18(num_classes=100), wide)
    tiny = str(tmp_path / "dense.ckpt")
    ms.save_checkpoint(nn.SequentialCell([nn.Dense(4, 2)]), tiny)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    return {"wide": wide, "tiny": tiny, "garbage": str(garbage), "empty": str(tmp_path / "empty.ckpt")}


@pytest.mark.parametrize("which, fragments", [
    ("missing", ["does not exist"]),
    ("folder", ["is not a file"]),
    ("empty", ["is an empty file"]),
    ("garbage", ["is not a readable MindSpore checkpoint"]),
    ("wide", ["does not match ResNet-18 (float32)", "fc.weight (100, 512) instead of (10, 512)"]),
    ("tiny", ["does not match ResNet-18 (float32)", "parameters missing (e.g. conv1.conv.weight",
              "parameters unexpected (e.g. 0.weight"]),
])
def test_eval_refuses_bad_checkpoints(which, fragments, tmp_path, synthetic_dir, capsys):
    paths = foreign_checkpoints(tmp_path)
    paths.update(missing=str(tmp_path / "none.ckpt"), folder=str(tmp_path))
    expect_error(evaluate.main, ["-loc", paths[which], "-data", synthetic_dir], capsys, *fragments)


def test_eval_defaults_to_the_newest_checkpoint(trained, synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    expect_error(evaluate.main, ["-data", synthetic_dir], capsys, "no checkpoint given and no .ckpt in checkpoints/")
    path, _ = trained
    os.mkdir("checkpoints")
    os.symlink(path, os.path.join("checkpoints", "latest.ckpt"))
    evaluate.main(["-data", synthetic_dir, "--num_samples", "5"])
    assert "checkpoints/latest.ckpt" in capsys.readouterr().out


def test_eval_needs_the_test_file(trained, tmp_path, capsys):
    path, _ = trained
    expect_error(evaluate.main, ["-loc", path, "-data", str(tmp_path)], capsys, "no test_batch.bin")


@pytest.mark.parametrize("argv", [
    ["train.py", "-data", "/nonexistent/cifar", "-dir", "{tmp}"],
    ["eval.py", "-loc", "/nonexistent.ckpt"],
    ["export.py", "-loc", "/nonexistent.ckpt", "--format", "int8"],
    ["preprocess.py", "--download", "-data", "{tmp}/cifar", "--url", "http://127.0.0.1:9/x.tar.gz"],
])
def test_scripts_fail_with_one_line_and_no_traceback(argv, tmp_path):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
