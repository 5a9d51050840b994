"""qatcifar.checkpoint: --resume refuses a checkpoint of another run; checkpoint names; 8-bit checkpoints resume as
8-bit. (That a resumed run ends exactly as an uninterrupted one is in commands/test_train_crash.py.)"""
import os

import mindspore as ms
import numpy as np
import pytest

import train
from conftest import SMALL, expect_error, snapshot, train_in_subprocess
from qatcifar import callbacks, checkpoint, files, quant, training


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The save folder of a QAT run of 4 epochs of 12 steps (384 images, batch 32), as train.py's Checkpointer
    and Validator write it, without the training: (its last checkpoint, the folder)."""
    folder = str(tmp_path_factory.mktemp("finished"))
    path, net = training_checkpoint(folder, ["-e", "4", "-bsize", "32", "--num_samples", "384"], 12, 48)
    checkpoint.save(net, files.RunFiles(folder, "resnet8_qat").best, {"epoch_num": 4, "val_accuracy": 0.5})
    return path, folder


def training_checkpoint(folder, flags, steps_per_epoch, step, resumed=None):
    """A training checkpoint of a run of train.py's `flags` (resnet8) at `step`, as its Checkpointer writes it
    (without training), into `folder`: (its path, the network)."""
    args = train.get_args_parser().parse_args([*SMALL, *flags])
    net = training.build_network(args, steps_per_epoch, resumed)
    train_net = training.build_train_network(net, training.make_optimizer(net, args, steps_per_epoch), args)
    saver = callbacks.Checkpointer(train_net, folder, "resnet8_qat", steps_per_epoch, save_steps=0, keep=5,
                                   first_step=0, guard=callbacks.Guard(0, steps_per_epoch))
    saver.save(step)
    return saver.latest, net


@pytest.mark.parametrize("case, flags, fragments", [
    ("finished", [], ["has already trained 4 epochs", "ask for more with -e"]),
    ("batch size", ["-e", "5", "-bsize", "16"], ["12 steps per epoch, this run has 24", "-bsize"]),
    ("float", ["-e", "5", "--no-qat"], ["was trained as QAT, but this run trains float32"]),
    ("bn_fold", ["-e", "5", "--bn_fold"], ["was trained as QAT, but this run trains QAT with --bn_fold"]),
    ("optimizer", ["-e", "5", "-opt", "momentum"],
     ["does not match this run's network and optimizer", "parameters missing (e.g. momentum, moments.conv1", "-opt"]),
    ("quant_delay", ["-e", "5", "--quant_delay", "3"], ["was trained with --quant_delay 0, this run has 3"]),
    ("arch", ["-e", "5", "--arch", "resnet18"], ["trained resnet8, but this run asks for --arch resnet18",
                                                 "resume with --arch resnet8 (or without --arch)"]),
    ("network only", ["-e", "5"], ["holds no training state", "best.ckpt"]),
    ("missing", [], ["does not exist", "--resume"]),
    ("garbage", [], ["is not a readable MindSpore checkpoint"]),
])
def test_resume_refuses_another_runs_checkpoint(case, flags, fragments, finished, synthetic_dir, tmp_path, capsys):
    final, folder = finished
    checkpoint = {"network only": files.RunFiles(folder, "resnet8_qat").best, "missing": str(tmp_path / "none.ckpt"),
                  "garbage": str(tmp_path / "garbage.ckpt")}.get(case, final)
    (tmp_path / "garbage.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    savedir = tmp_path / "saved"
    savedir.mkdir()
    (savedir / "resnet8_qat-args.json").write_text("{}")
    before = snapshot(savedir), snapshot(folder)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", str(savedir), "-e", "4", "-bsize", "32",
                              "--num_samples", "384", "--resume", checkpoint] + flags, capsys, *fragments)
    assert (snapshot(savedir), snapshot(folder)) == before


def test_checkpoint_names_never_overwrite_another_series(tmp_path):
    for name in ("resnet18_qat-1_5.ckpt", "resnet18_qat-2_3-interrupt.ckpt", "resnet18_qat-2_5.ckpt",
                 "resnet18_qat_1-1_5.ckpt", "resnet18_qat_1-best.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    folder = str(tmp_path)
    assert checkpoint.series(folder, "resnet18_qat") == [
        "resnet18_qat-1_5.ckpt", "resnet18_qat-2_3-interrupt.ckpt", "resnet18_qat-2_5.ckpt"]
    assert checkpoint.series_prefix(folder, "resnet18_qat") == "resnet18_qat_2"
    assert checkpoint.series_prefix(folder, "resnet18") == "resnet18"
    # Resuming the newest of a series continues it; resuming an older one starts a new series.
    assert checkpoint.series_prefix(folder, "resnet18_qat", str(tmp_path / "resnet18_qat-2_5.ckpt")) == "resnet18_qat"
    assert checkpoint.series_prefix(folder, "resnet18_qat", str(tmp_path / "resnet18_qat-1_5.ckpt")) == "resnet18_qat_2"
    # A run's other files (or a folder under such a name) count as well: a new run never shares them.
    (tmp_path / "resnet18-best.ckpt").mkdir()
    assert checkpoint.series_prefix(folder, "resnet18") == "resnet18_1"
    (tmp_path / "resnet20_qat-metrics.jsonl").write_text("")
    assert checkpoint.series_prefix(folder, "resnet20_qat") == "resnet20_qat_1"


@pytest.mark.slow
def test_a_run_of_8_bit_weights_resumes_with_them(synthetic_dir, tmp_path):
    """A checkpoint written before layers recorded their weight bits (they were 8) resumes as the 8-bit run it is,
    and its checkpoints then record 8 bits."""
    folder = tmp_path / "run"
    folder.mkdir()
    path, _ = training_checkpoint(str(folder), ["-e", "1", "-bsize", "16", "--num_samples", "32"], 2, 1,
                                  resumed={"weight_bits": 8, "layer_bits": (), "act_bits": 8, "quantizer": "minmax"})
    params = checkpoint.read(path)
    os.chmod(path, 0o600)
    checkpoint.save_parameters({name: value for name, value in params.items()
                                if not name.endswith(quant.BITS_SUFFIX)}, path)
    # No --arch: a resumed run trains the network its checkpoint records.
    final, stdout = train_in_subprocess("-data", synthetic_dir, "-dir", str(folder), "-e", "1", "-bsize", "16",
                                        "--num_samples", "32", "--eval_every", "0", "--resume", "auto", output=True)
    assert "was trained with 8-bit weights, and the run goes on with them" in stdout
    assert {int(value.asnumpy()) for name, value in checkpoint.read(final).items()
            if name.endswith(quant.BITS_SUFFIX)} == {8}
    assert os.path.basename(final) == "resnet8_qat-1_2.ckpt" and checkpoint.read(final)["arch"] == "resnet8"


@pytest.mark.parametrize("name, value, fragment", [
    ("layer1.0.conv1.weight_quant.log_step", 1000.0, "is a learned step size's logarithm outside [-20, 20]"),
    ("layer1.0.conv1.weight_quant.log_step", np.nan, "holds values that are not finite"),
    ("moment1.conv1.conv.weight", np.inf, "holds values that are not finite"),
    ("conv1.bn.moving_variance", -1.0, "is a BatchNorm variance below 0")])
def test_resume_refuses_a_checkpoint_that_cannot_train(name, value, fragment, synthetic_dir, tmp_path, capsys):
    """Step sizes whose exponential is infinite or 0, values that are not finite (the optimizer's too), a negative
    variance: refused before training, naming the parameter; once such a run started, "diverged at step 3" and
    called that checkpoint "the last good checkpoint"."""
    folder = tmp_path / "run"
    folder.mkdir()
    flags = ["--quantizer", "lsq", "-e", "2", "-bsize", "32", "--num_samples", "384"]
    path, _ = training_checkpoint(str(folder), flags, 12, 12)
    params = checkpoint.read(path)
    params[name] = ms.Parameter(ms.Tensor(np.full(params[name].shape, value, np.float32)), name=name)
    damaged = str(folder / "resnet8_qat-1_12-damaged.ckpt")
    checkpoint.save_parameters(params, damaged)
    before = snapshot(folder)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", str(folder), "-e", "2", "-bsize", "32",
                              "--num_samples", "384", "--resume", damaged], capsys,
                 f"--resume {damaged}: parameter {name} {fragment}")
    assert snapshot(folder) == before
