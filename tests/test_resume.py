"""--resume refuses a checkpoint of another run; checkpoint names. (That a resumed run ends exactly
as an uninterrupted one is tested in test_crash.py, after kills and interrupts.)"""
import os

import numpy as np
import pytest

import train
from conftest import snapshot
from test_train_eval import expect_error


@pytest.mark.parametrize("case, flags, fragments", [
    ("finished", [], ["has already trained 4 epochs", "ask for more with -e"]),
    ("batch size", ["-e", "5", "-bsize", "16"], ["12 steps per epoch, this run has 24", "-bsize"]),
    ("float", ["-e", "5", "--no-qat"], ["was trained as QAT, but this run trains float32"]),
    ("bn_fold", ["-e", "5", "--bn_fold"], ["was trained as QAT, but this run trains QAT with --bn_fold"]),
    ("optimizer", ["-e", "5", "-opt", "momentum"],
     ["does not match this run's network and optimizer", "parameters missing (e.g. momentum, moments.conv1", "-opt"]),
    ("quant_delay", ["-e", "5", "--quant_delay", "3"], ["was trained with --quant_delay 0, this run has 3"]),
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
    for name in ("resnet18_qat-1_5.ckpt", "resnet18_qat-2_3-interrupt.ckpt", "resnet18_qat-2_5.ckpt",
                 "resnet18_qat_1-1_5.ckpt", "best.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    folder = str(tmp_path)
    assert train.checkpoint_series(folder, "resnet18_qat") == [
        "resnet18_qat-1_5.ckpt", "resnet18_qat-2_3-interrupt.ckpt", "resnet18_qat-2_5.ckpt"]
    assert train.checkpoint_prefix(folder, "resnet18_qat") == "resnet18_qat_2"
    assert train.checkpoint_prefix(folder, "resnet18") == "resnet18"
    # Resuming the newest of a series continues it; resuming an older one starts a new series.
    assert train.checkpoint_prefix(folder, "resnet18_qat", (str(tmp_path / "resnet18_qat-2_5.ckpt"), {})) == "resnet18_qat"
    assert train.checkpoint_prefix(folder, "resnet18_qat", (str(tmp_path / "resnet18_qat-1_5.ckpt"), {})) == "resnet18_qat_2"
