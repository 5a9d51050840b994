"""train.py end to end on tiny synthetic data (and the seed's ResNet-18 through export and predict.py), and every bad
input it must refuse."""
import json
import os
import re

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

import eval as evaluate
import export
import train
from conftest import ARCH, SMALL, expect_error, run_script, snapshot, train_in_subprocess
from qatcifar import checkpoint, cli, files, int8, networks, quant


@pytest.mark.slow
def test_train_writes_checkpoints_and_arguments(trained, synthetic_dir):
    path, savedir = trained
    assert os.path.basename(path) == "resnet8_qat-4_12.ckpt" and os.path.isfile(path)
    record = files.RunFiles(savedir, "resnet8_qat")
    assert sorted(f for f in os.listdir(savedir) if f.endswith(".ckpt")) == [
        f"resnet8_qat-{epoch}_12.ckpt" for epoch in range(1, 5)] + ["resnet8_qat-best.ckpt"]
    args = record.settings()
    assert args["epoch"] == 4 and args["qat"] is True and args["device"] == "CPU" and args["arch"] == "resnet8"
    assert (args["weight_bits"], args["first_last_bits"], args["act_bits"], args["quantizer"]) == (7, 7, 8, "minmax")
    for name in (record.best, path):  # every checkpoint records its network
        assert ms.load_checkpoint(name)["arch"] == "resnet8"
    assert args["data_dir"] == synthetic_dir and args["optimizer"] == "adam"
    with open(record.metrics) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and records[-1]["step"] == 48
    assert records[-1]["lr"] == pytest.approx(0.001) and records[-1]["images_per_s"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert ["val_accuracy" in r for r in records] == [False, True, False, True]  # --eval_every 2
    assert all(0 <= r["val_accuracy"] <= 1 for r in records if "val_accuracy" in r)


@pytest.mark.slow
def test_training_learns_and_eval_reports_json(trained_evaluation, synthetic_dir):
    accuracy, result, predictions = trained_evaluation
    assert result["total"] == 500 and result["model"] == "QAT (int8 fake-quant)"
    assert (result["arch"], result["params"], result["macs"]) == ("resnet8", 78_042, 12_501_632)
    assert result["accuracy"] == accuracy == result["correct"] / 500
    assert accuracy > 0.5, f"4 short epochs on the learnable set should beat chance (0.1) by far, got {accuracy}"
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 500 and np.trace(confusion) == result["correct"]
    labels = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8).reshape(-1, 3073)[:500, 0]
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=10))
    assert list(result["per_class"]) == [f"synthetic_{i}" for i in range(10)]
    assert (predictions == labels).sum() == result["correct"]  # --save_predictions, in dataset order
    assert result["per_class"]["synthetic_3"] == confusion[3, 3] / confusion[3].sum()


@pytest.mark.slow
def test_float_training_and_eval(synthetic_dir, tmp_path, capsys):
    path = train.main([*SMALL, "-data", synthetic_dir, "-dir", str(tmp_path), "-e", "2", "-bsize", "16",
                       "--num_samples", "32", "--no-qat", "-opt", "momentum", "-lr", "0.01", "--eval_every", "0",
                       "--lr_schedule", "cosine", "--warmup_epochs", "1", "--label_smoothing", "0.1"])
    assert os.path.basename(path) == "resnet8-2_2.ckpt"
    with open(tmp_path / "resnet8-metrics.jsonl") as f:
        rates = [json.loads(line)["lr"] for line in f]
    assert rates == pytest.approx([0.01, 0.005])  # warmup 0.005, 0.01; cosine 0.01, 0.005
    out = capsys.readouterr().out
    assert f"checkpoint: {path}" in out
    assert ("network: resnet8, 78,042 parameters, 12.5 M multiply-accumulates per 32x32 image; its int8 file "
            "(export.py --format int8) will be about 92 KB") in out
    accuracy = evaluate.main(["-loc", path, "-data", synthetic_dir, "--num_samples", "10", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "float32" and result["total"] == 10 and 0 <= accuracy <= 1


@pytest.mark.slow
def test_the_seeds_resnet18_trains_exports_and_predicts(synthetic_dir, tmp_path):
    """The default network, the seed's ResNet-18, with the seed's flags in both spellings: train.py, then its int8
    ONNX model (export.py) classifies an image file (predict.py), with no --arch anywhere."""
    path, stdout = train_in_subprocess("-data", synthetic_dir, "--savedir", str(tmp_path), "--epoch", "1",
                                       "-bsize", "16", "--optimizer", "adam", "-lr", "0.001", "--weightDecay", "0.0001",
                                       "-repeatNum", "1", "--num_samples", "32", "--eval_every", "0", output=True)
    assert os.path.basename(path) == "resnet18_qat-1_2.ckpt"
    assert ("network: resnet18, 11,173,962 parameters, 555.4 M multiply-accumulates per 32x32 image; its int8 file "
            "(export.py --format int8) will be about 11.2 MB") in stdout
    exported = run_script("export.py", "-loc", path, "--format", "onnx", "-data", synthetic_dir)
    model = path[:-len(".ckpt")] + ".onnx"
    assert exported.returncode == 0 and f"wrote {model}: 11.3 MB" in exported.stdout, exported.stderr
    assert os.path.getsize(model) <= 0.27 * 4 * 11_173_962  # int8 weights: about a quarter of the float32 ones
    image = str(tmp_path / "image.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    predicted = run_script("predict.py", "-loc", model, image, "--json")
    assert predicted.returncode == 0, predicted.stderr
    result = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert [p["image"] for p in result["predictions"]] == [image] and result["model"] == "ONNX int8 QDQ (ONNX Runtime)"


@pytest.mark.slow
def test_4_bit_weights_train_export_packed_agree_and_resume(synthetic_dir, tmp_path, capsys):
    """--weight_bits 4: the first convolution and the classifier keep 7 bits (recorded per layer in the checkpoint);
    the int8 file packs the 4-bit weights (at most 70 % of the 7-bit file, and the size train.py announced); the int8
    file and the ONNX model agree with the checkpoint; a resumed run keeps the widths, and refuses others."""
    folder = str(tmp_path / "w4")
    run = [*SMALL, "-data", synthetic_dir, "-dir", folder, "-bsize", "32", "--num_samples", "256", "--eval_every", "0"]
    path, out = train_in_subprocess(*run, "-e", "1", "--weight_bits", "4", output=True)
    net, config = checkpoint.load_network(path, 10)
    assert (config.weight_bits, config.layer_bits) == (4, (("conv1", 7), ("fc", 7)))
    assert [net.conv1.weight_quant.num_bits, net.layer1[0].conv1.weight_quant.num_bits, net.fc.weight_quant.num_bits] \
        == [7, 4, 7]
    files = {form: export.main(["-loc", path, "--format", form, "-o", str(tmp_path / f"m.{suffix}")])
             for form, suffix in (("int8", "int8.npz"), ("onnx", "onnx"))}
    size = os.path.getsize(files["int8"])  # against the 7-bit file's (test_export.py checks that estimate)
    assert size <= 0.7 * int8.expected_size(networks.profile(quant.quantize(networks.resnet(ARCH))))
    announced = re.search(r"int8 file \(export.py --format int8\) will be about (\d+) KB", out)
    assert announced and abs(int(announced.group(1)) - size / 1e3) <= 1
    model = int8.load(files["int8"])
    assert {k: int(np.abs(v).max()) <= 7 for k, v in model["arrays"].items() if k.endswith(".weight")} == {
        k: k not in ("conv1.weight", "fc.weight") for k in model["arrays"] if k.endswith(".weight")}
    capsys.readouterr()
    results = {}
    for name, model_path in (("checkpoint", path), *files.items()):
        evaluate.main(["-loc", model_path, "-data", synthetic_dir, "--num_samples", "200", "--json",
                       "--save_predictions", str(tmp_path / f"{name}.npy")])
        results[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_array_equal(results["int8"], results["onnx"])
    assert (results["int8"] == results["checkpoint"]).mean() >= 0.99
    result = run_script("train.py", *run, "-e", "2", "--resume", "auto", "--weight_bits", "2")
    assert result.returncode == 2 and "trained 4-bit weights (conv1 7, fc 7), not what --weight_bits" in result.stderr
    path = train_in_subprocess(*run, "-e", "2", "--resume", "auto")
    assert (checkpoint.load_network(path, 10)[1].layer_bits, checkpoint.load_network(path, 10)[1].weight_bits) == \
        ((("conv1", 7), ("fc", 7)), 4)


@pytest.mark.slow
def test_4_bit_activations_train_and_run_in_the_int8_file(synthetic_dir, tmp_path, capsys):
    """--weight_bits 4 --act_bits 4 (W4A4; the input image and the classifier's input keep 8 bits): the int8 file
    saturates those tensors at 15 and agrees with the checkpoint; ONNX, which cannot, refuses with the reason; a
    resumed run refuses another width (and keeps this one as it keeps weight bits, above)."""
    folder = str(tmp_path / "w4a4")
    run = [*SMALL, "-data", synthetic_dir, "-dir", folder, "-bsize", "32", "--num_samples", "256", "--eval_every", "0"]
    path = train_in_subprocess(*run, "-e", "1", "--weight_bits", "4", "--act_bits", "4", "--bn_fold")
    net, config = checkpoint.load_network(path, 10)
    assert config.act_bits == 4 and net.conv1.input_quant.num_bits == net.fc.input_quant.num_bits == 8
    assert net.conv1.output_quant.levels == net.layer3[0].add.output_quant.levels == 15
    output = export.main(["-loc", path, "--format", "int8", "-o", str(tmp_path / "m.int8.npz")])
    tensors = int8.load(output)["header"]["tensors"]
    assert sorted({t.get("bits", 8) for t in tensors.values()}) == [4, 8]
    expect_error(export.main, ["-loc", path, "--format", "onnx", "-o", str(tmp_path / "m.onnx")], capsys,
                 "has 4-bit activations, which an ONNX model cannot hold", "saturate at level 255, not at 15")
    expect_error(export.main, ["-loc", path, "--format", "tflite", "-o", str(tmp_path / "m.tflite")], capsys,
                 "has 4-bit activations, which a TFLite model cannot hold")
    predictions = {}
    for name, model_path in (("checkpoint", path), ("int8", output)):
        evaluate.main(["-loc", model_path, "-data", synthetic_dir, "--num_samples", "200",
                       "--save_predictions", str(tmp_path / f"{name}.npy")])
        predictions[name] = np.load(tmp_path / f"{name}.npy")
    # Biases with 8 fraction bits (int8.py): rounded to the accumulator's step, they moved one value in a few hundred
    # by a level, one fifteenth of a range among 15 levels, compounding over the layers (92.5-98 % agreement).
    assert int8.load(output)["header"]["version"] == int8.VERSION
    assert (predictions["int8"] == predictions["checkpoint"]).mean() >= 0.99
    result = run_script("train.py", *run, "-e", "2", "--resume", "auto", "--act_bits", "6", "--bn_fold")
    assert result.returncode == 2 and "trained 4-bit activations, not --act_bits 6" in result.stderr


@pytest.mark.slow
def test_lsq_w4a4_trains_exports_agrees_and_resumes(synthetic_dir, tmp_path, capsys):
    """--quantizer lsq --weight_bits 4 --act_bits 4: the checkpoint holds the learned steps and reads back as LSQ's;
    its int8 file (biases with fraction bits) agrees with it; a run resumed from it keeps the quantizer (and refuses
    another) and goes on with the trained steps and counters."""
    folder = str(tmp_path / "lsq")
    run = [*SMALL, "-data", synthetic_dir, "-dir", folder, "-bsize", "32", "--num_samples", "256", "--eval_every", "0"]
    path = train_in_subprocess(*run, "-e", "1", "--quantizer", "lsq", "--weight_bits", "4", "--act_bits", "4")
    net, config = checkpoint.load_network(path, 10)
    assert (config.quantizer, config.weight_bits, config.act_bits) == ("lsq", 4, 4)
    steps = {name: p.asnumpy().copy() for name, p in net.parameters_and_names() if name.endswith(quant.LSQ_SUFFIX)}
    assert len(steps) == 2 * 9 + 4 and all(np.isfinite(value).all() for value in steps.values())  # 9 conv, fc, joins
    output = export.main(["-loc", path, "--format", "int8", "-o", str(tmp_path / "m.int8.npz")])
    header = int8.load(output)["header"]
    assert header["version"] == int8.VERSION and all(n.get("bias_bits") == 8 for n in header["graph"] if "bias" in n)
    predictions = {}
    for name, model_path in (("checkpoint", path), ("int8", output)):
        evaluate.main(["-loc", model_path, "-data", synthetic_dir, "--num_samples", "200",
                       "--save_predictions", str(tmp_path / f"{name}.npy")])
        predictions[name] = np.load(tmp_path / f"{name}.npy")
    assert (predictions["int8"] == predictions["checkpoint"]).mean() >= 0.99
    found = (path, checkpoint.read(path))
    with pytest.raises(cli.InputError, match="trained with --quantizer lsq, not minmax; resume without --quantizer,"):
        train.resumed_quantization(train.get_args_parser().parse_args(["--quantizer", "minmax"]), found)
    assert train.resumed_quantization(train.get_args_parser().parse_args([]), found)["quantizer"] == "lsq"
    resumed, _ = checkpoint.load_network(train_in_subprocess(*run, "-e", "2", "--resume", "auto"), 10)
    assert int(resumed.layer1[0].add.output_quant.steps.asnumpy()) == 16  # 8 steps an epoch, counted on from 8
    after = {name: p.asnumpy() for name, p in resumed.parameters_and_names() if name.endswith(quant.LSQ_SUFFIX)}
    assert after.keys() == steps.keys() and any(not np.array_equal(after[k], steps[k]) for k in steps)


@pytest.mark.slow
def test_a_second_run_into_the_folder_keeps_its_own_record_and_touches_none_of_the_first(trained, synthetic_dir):
    """One run, one record: the second run's best checkpoint, metrics, curves and args.json are its own (its best is
    compared with nothing of the first run's, whose 4 epochs it cannot beat in one step), and every file of the first
    run stays as it was."""
    _, savedir = trained
    before = snapshot(savedir)
    # --pynative: the QAT cells also run op by op.
    path, out = train_in_subprocess(*SMALL, "-data", synthetic_dir, "-dir", savedir, "-e", "1", "-bsize", "16",
                                    "--num_samples", "16", "--val_samples", "20", "--pynative", "--weight_bits", "5",
                                    output=True)
    assert os.path.basename(path) == "resnet8_qat_1-1_1.ckpt"
    after = snapshot(savedir)
    assert all(after[name] == stamp for name, stamp in before.items())
    second = files.RunFiles(savedir, "resnet8_qat_1")
    assert f"(best so far: {second.best})" in out and os.path.isfile(second.best) and os.path.isfile(second.curves)
    with open(second.metrics) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]
    assert second.settings()["weight_bits"] == 5 and files.RunFiles(savedir, "resnet8_qat").settings()["epoch"] == 4


# --- bad input: one `error:` line, exit 2, nothing in the save directory touched -------------


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
    (["-bsize", "0"], "--batchsize: must be an integer from 1 to 2147483647, got 0"),
    (["--batchsize", "-4"], "--batchsize: must be an integer from 1 to 2147483647, got -4"),
    (["-e", "0"], "--epoch: must be an integer from 1 to 2147483647"),
    (["-e", "2147483648"], "--epoch: must be an integer from 1 to 2147483647, got 2147483648"),
    (["-e", "100000000", "--lr_schedule", "cosine"], "-e 100000000 x 312 steps per epoch is more than the 100000000 "
                                                     "steps a run can count; give at most 320512 epochs"),
    (["-e", "10000000"], "-e 10000000 x 312 steps per epoch is more than the 2147483647 steps"),
    (["--bn_fold", "--freeze_bn", "10000000"], "--freeze_bn 10000000 x 312 steps per epoch is more than"),
    (["-repeatNum", "0"], "--repeatNum: must be an integer from 1"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295, got -1"),
    (["--quant_delay", "2147483648"], "--quant_delay: must be an integer from 0 to 2147483647"),
    (["-lr", "0"], "--learningRate: must be a positive finite number"),
    (["-lr", "-0.1"], "--learningRate: must be a positive finite number"),
    (["-lr", "nan"], "--learningRate: must be a positive finite number, got nan"),
    (["-wDecay", "-0.0001"], "--weightDecay: must be a finite number >= 0"),
    (["-m", "1.5"], "--momentum: must be in [0, 1)"),
    (["-opt", "adagrad"], "--optimizer: invalid choice: 'adagrad'"),
    (["-bsize", "many"], "not a valid int: 'many'"),
    (["--device", "GPU"], "--device GPU: this MindSpore has no usable GPU backend"),
    (["-bsize", "64", "--num_samples", "32"], "batch size 64 is larger than 32 training images"),
    (["--keep", "0"], "--keep: must be an integer from 1 to 2147483647"),
    (["--eval_every", "-1"], "--eval_every: must be an integer from 0 to 2147483647"),
    (["--amp", "O2"], "--amp O2 needs a GPU"),
    (["--amp", "O3"], "--amp: invalid choice: 'O3'"),
    (["--distributed"], "--distributed: this process was not started by msrun (MS_ROLE"),
    (["--weight_bits", "1"], "--weight_bits: must be an integer from 2 to 8, got 1"),
    (["--first_last_bits", "9"], "--first_last_bits: must be an integer from 2 to 8, got 9"),
    (["--weight_bits", "4", "--no-qat"], "--act_bits and --quantizer are QAT's; drop --no-qat"),
    (["--quantizer", "lsq", "--bn_fold"], "--quantizer lsq learns the steps of unfolded weights; drop --bn_fold"),
    (["--quantizer", "lsq", "--amp", "O2"], "--amp O2 needs a GPU"),
    (["--quantizer", "adaround"], "--quantizer: invalid choice: 'adaround'"),
    (["--act_bits", "9"], "--act_bits: must be an integer from 2 to 8, got 9"),
])
def test_train_refuses_bad_flags(flags, fragment, synthetic_dir, savedir, capsys):
    before = snapshot(savedir)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", savedir, "-e", "1"] + flags, capsys, fragment)
    assert snapshot(savedir) == before


def test_train_refuses_a_stray_test_file_before_writing_anything(synthetic_dir, tmp_path, capsys):
    """A stray *test_batch*.bin would double (or break) the validation split; the save folder is not even made."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("data_batch_1.bin", "test_batch.bin", "old_test_batch.bin"):
        os.symlink(os.path.join(synthetic_dir, name.replace("old_", "")), data / name)
    savedir = tmp_path / "run"
    expect_error(train.main, ["-data", str(data), "-dir", str(savedir)], capsys,
                 f"{data}/old_test_batch.bin is not a CIFAR-10 file name", "move it out of")
    assert not savedir.exists()


def test_validation_needs_the_test_file(synthetic_dir, tmp_path, savedir, capsys):
    data = tmp_path / "train_only"
    data.mkdir()
    os.symlink(os.path.join(synthetic_dir, "data_batch_1.bin"), data / "data_batch_1.bin")
    before = snapshot(savedir)
    expect_error(train.main, ["-data", str(data), "-dir", savedir, "--eval_every", "1"], capsys,
                 "no test_batch.bin", "--eval_every 0 trains without validation")
    assert snapshot(savedir) == before


def test_train_refuses_unusable_save_directory(synthetic_dir, savedir, capsys):
    a_file = os.path.join(savedir, "resnet18_qat-args.json")
    before = snapshot(savedir)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", a_file], capsys, "is a file")
    expect_error(train.main, ["-data", synthetic_dir, "-dir", os.path.join(a_file, "sub")], capsys,
                 "cannot write to save directory", "Not a directory")
    assert snapshot(savedir) == before


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root may write into a read-only folder; covered above by a path under a file")
def test_train_refuses_read_only_save_directory(synthetic_dir, savedir, capsys):
    os.chmod(savedir, 0o500)
    try:
        expect_error(train.main, ["-data", synthetic_dir, "-dir", savedir], capsys, "Permission denied")
    finally:
        os.chmod(savedir, 0o700)


@pytest.mark.slow  # (a process each, which imports MindSpore; the same errors are tested in this one above)
@pytest.mark.parametrize("argv", [
    ["train.py", "-data", "/nonexistent/cifar", "-dir", "{tmp}"],
    ["eval.py", "-loc", "/nonexistent.ckpt"],
    ["export.py", "-loc", "/nonexistent.ckpt", "--format", "int8"],
    ["preprocess.py", "--download", "-data", "{tmp}/cifar", "--url", "http://127.0.0.1:9/x.tar.gz"],
])
def test_scripts_fail_with_one_line_and_no_traceback(argv, tmp_path):
    result = run_script(*[arg.replace("{tmp}", str(tmp_path)) for arg in argv], timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


