"""--resume: a stopped run continues where it stopped, exactly; a checkpoint of another run is refused."""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest

import train
from conftest import snapshot, train_in_subprocess
from test_train_eval import expect_error

# Two steps per epoch, a schedule that changes every step, and observers that start quantizing
# at step 1: a resumed run only matches if it restores all of them.
RUN = ["-bsize", "16", "--num_samples", "32", "--val_samples", "20", "--lr_schedule", "cosine",
       "--quant_delay", "1", "--seed", "3", "-e", "2"]


def load(path):
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(path).items()}


def records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resumed_run_ends_as_the_uninterrupted_one(synthetic_dir, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    final = train_in_subprocess("-data", synthetic_dir, "-dir", str(whole), *RUN)
    assert os.path.basename(final) == "resnet18_qat-2_2.ckpt"
    # The run "stopped" after epoch 1: its folder holds that epoch's checkpoint, and two newer
    # files that --resume auto must skip: one cut short, one with a flipped bit (caught by its CRC).
    resumed.mkdir()
    shutil.copy(whole / "resnet18_qat-1_2.ckpt", resumed)
    data = (whole / "resnet18_qat-1_2.ckpt").read_bytes()
    (resumed / "resnet18_qat_7-1_2.ckpt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (resumed / "resnet18_qat_8-1_2.ckpt").write_bytes(bytes(flipped))
    os.utime(resumed / "resnet18_qat-1_2.ckpt", (1, 1))  # the oldest
    path, out = train_in_subprocess("-data", synthetic_dir, "-dir", str(resumed), *RUN, "--resume", "auto",
                                    output=True)
    assert path == str(resumed / "resnet18_qat-2_2.ckpt")  # the series continues under its own name
    assert "warning: --resume auto skips" in out and "resnet18_qat_7-1_2.ckpt" in out
    assert "resnet18_qat_8-1_2.ckpt: it does not load (its CRC32 does not match its contents" in out

    expected, got = load(final), load(path)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert got["global_step"] == 4 and got["step_num"] == 4 and got["epoch_num"] == 2
    assert got["layer1.0.conv1.output_quant.steps"] == 4
    # The resumed run logs epoch 2 only, with the uninterrupted run's loss and learning rate.
    [record] = records(resumed)
    assert record["epoch"] == 2 and record["step"] == 4
    assert record["loss"] == pytest.approx(records(whole)[1]["loss"], rel=1e-6)
    assert record["lr"] == pytest.approx(records(whole)[1]["lr"])


@pytest.mark.parametrize("case, flags, fragments", [
    ("finished", [], ["has already trained 4 epochs", "ask for more with -e"]),
    ("batch size", ["-e", "5", "-bsize", "16"], ["12 steps per epoch, this run has 24", "-bsize"]),
    ("float", ["-e", "5", "--no-qat"], ["was trained as QAT, but this run trains float32"]),
    ("bn_fold", ["-e", "5", "--bn_fold"], ["was trained as QAT, but this run trains QAT with --bn_fold"]),
    ("optimizer", ["-e", "5", "-opt", "momentum"],
     ["does not match this run's network and optimizer", "parameters missing (e.g. momentum, moments.conv1", "-opt"]),
    ("network only", ["-e", "5"], ["holds no training state", "best.ckpt"]),
    ("missing", [], ["does not exist", "--resume"]),
    ("garbage", [], ["is not a readable MindSpore checkpoint"]),
])
def test_resume_refuses_another_runs_checkpoint(case, flags, fragments, trained, synthetic_dir, tmp_path, capsys):
    final, folder = trained  # 4 epochs of 12 steps (384 images, batch 32), QAT
    checkpoint = {"network only": os.path.join(folder, "best.ckpt"), "missing": str(tmp_path / "none.ckpt"),
                  "garbage": str(tmp_path / "garbage.ckpt")}.get(case, final)
    (tmp_path / "garbage.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    savedir = tmp_path / "saved"
    savedir.mkdir()
    (savedir / "args.json").write_text("{}")
    before = snapshot(savedir), snapshot(folder)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", str(savedir), "-e", "4", "-bsize", "32",
                              "--num_samples", "384", "--resume", checkpoint] + flags, capsys, *fragments)
    assert (snapshot(savedir), snapshot(folder)) == before


def test_checkpoint_names_never_overwrite_another_series(tmp_path):
    for name in ("resnet18_qat-1_5.ckpt", "resnet18_qat-2_5.ckpt", "resnet18_qat_1-1_5.ckpt", "best.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    folder = str(tmp_path)
    assert train.checkpoint_series(folder, "resnet18_qat") == ["resnet18_qat-1_5.ckpt", "resnet18_qat-2_5.ckpt"]
    assert train.checkpoint_prefix(folder, "resnet18_qat") == "resnet18_qat_2"
    assert train.checkpoint_prefix(folder, "resnet18") == "resnet18"
    # Resuming the newest of a series continues it; resuming an older one starts a new series.
    assert train.checkpoint_prefix(folder, "resnet18_qat", (str(tmp_path / "resnet18_qat-2_5.ckpt"), {})) == "resnet18_qat"
    assert train.checkpoint_prefix(folder, "resnet18_qat", (str(tmp_path / "resnet18_qat-1_5.ckpt"), {})) == "resnet18_qat_2"
