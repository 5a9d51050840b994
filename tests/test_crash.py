"""When training stops early: kill -9, Ctrl-C, SIGTERM, a diverged loss, a failed save."""
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import train
from conftest import ROOT, SHORT_RUN, snapshot, train_in_subprocess

FINAL = "resnet18_qat-3_4.ckpt"  # SHORT_RUN's last checkpoint, step 12


def start(data, folder, *flags):
    return subprocess.Popen([sys.executable, "train.py", "-data", data, "-dir", folder, *SHORT_RUN, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"train.py ended without a line {text!r}: {process.stderr.read()[-2000:]}")


def wait_for_save(folder, timeout=300):
    """Until a checkpoint is being written (a file in its hidden temporary folder)."""
    end = time.time() + timeout
    while time.time() < end:
        if glob.glob(os.path.join(folder, ".partial-*", "*")):
            return
        time.sleep(0.002)
    raise AssertionError("no checkpoint save seen")


def assert_same_parameters(path, expected_path):
    got, expected = ms.load_checkpoint(path), ms.load_checkpoint(expected_path)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name].asnumpy(), expected[name].asnumpy(), err_msg=name)


def checkpoints_by_step(folder):
    """{step_num: path} of the training checkpoints in the folder; every .ckpt must load, its CRC checked."""
    steps = {}
    for path in glob.glob(os.path.join(folder, "*.ckpt")):
        params = ms.load_checkpoint(path, crc_check=True)
        if os.path.basename(path) != "best.ckpt":
            steps[int(params["step_num"].asnumpy())] = path
    return steps


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(uninterrupted, synthetic_dir, tmp_path):
    folder = str(tmp_path)
    expected = checkpoints_by_step(uninterrupted)
    # kill -9 while a checkpoint is being written; then 0.5 s after a resumed run's first step.
    process = start(synthetic_dir, folder)
    wait_for_save(folder)
    process.kill()
    process.wait()
    saved = checkpoints_by_step(folder)
    for step, path in saved.items():  # a fresh run with the same --seed: the same parameters
        assert_same_parameters(path, expected[step])
    process = start(synthetic_dir, folder, "--resume", "auto")
    wait_for_line(process, "first step done")
    time.sleep(0.5)
    process.kill()
    process.wait()
    assert set(saved) <= set(checkpoints_by_step(folder))  # every checkpoint loads, none was lost

    # SIGTERM, then Ctrl-C (SIGINT): an interrupt checkpoint, the documented exit code, a hint.
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = max(checkpoints_by_step(folder), default=0)
        process = start(synthetic_dir, folder, "--resume", "auto")
        wait_for_line(process, "first step done")
        process.send_signal(signum)
        out, err = process.communicate(timeout=300)
        assert process.returncode == code, err[-2000:]
        assert err == "" and "to continue, run the same command with --resume auto" in out
        [path] = [line.split("checkpoint: ")[1] for line in out.splitlines() if line.startswith("interrupted by")]
        assert path.endswith("-interrupt.ckpt") and max(checkpoints_by_step(folder)) > before

    # Two newer files that --resume auto must skip: one cut short, one with a flipped bit (its CRC).
    newest = checkpoints_by_step(folder)[max(checkpoints_by_step(folder))]
    data = open(newest, "rb").read()
    with open(os.path.join(folder, "resnet18_qat_7-3_4.ckpt"), "wb") as f:
        f.write(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with open(os.path.join(folder, "resnet18_qat_8-3_4.ckpt"), "wb") as f:
        f.write(flipped)
    path, out = train_in_subprocess("-data", synthetic_dir, "-dir", folder, *SHORT_RUN, "--resume", "auto",
                                    output=True)
    assert "resnet18_qat_7-3_4.ckpt: it does not load" in out
    assert "resnet18_qat_8-3_4.ckpt: it does not load (its CRC32 does not match its contents" in out
    assert f"resuming from {newest}" in out
    # It ends as the uninterrupted run: network, observers, optimizer moments and step count, bit for bit.
    assert os.path.basename(path) == FINAL
    assert_same_parameters(path, os.path.join(uninterrupted, FINAL))
    state = ms.load_checkpoint(path)
    assert state["global_step"].asnumpy().item() == 12 and state["layer1.0.conv1.output_quant.steps"].asnumpy() == 12
    with open(os.path.join(folder, "metrics.jsonl")) as f, open(os.path.join(uninterrupted, "metrics.jsonl")) as g:
        last, expected = json.loads(f.readlines()[-1]), json.loads(g.readlines()[-1])
    assert (last["step"], last["lr"]) == (expected["step"], expected["lr"])
    assert not glob.glob(os.path.join(folder, ".partial-*"))  # the killed saves' leftovers are gone


def test_diverged_training_stops_with_exit_3_and_saves_nothing(uninterrupted, synthetic_dir, tmp_path):
    final = os.path.join(uninterrupted, FINAL)
    before = snapshot(uninterrupted)
    # Adam moves every weight by about -lr per step: after step 13 (the first) they are near 1e30,
    # and the next step overflows. Checkpoints only at the epoch's end (step 16), which never comes.
    result = subprocess.run([sys.executable, "train.py", "-data", synthetic_dir, "-dir", str(tmp_path), *SHORT_RUN,
                             "-e", "4", "--resume", final, "-lr", "1e30", "--save_steps", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: training diverged at step 14 "), \
        result.stderr
    assert f"the last good checkpoint is {final}" in result.stderr
    assert not glob.glob(str(tmp_path / "*.ckpt")) and snapshot(uninterrupted) == before


class FakeRunContext:
    """What a callback sees of Model.train: the step count, and the stop request."""

    def __init__(self, step):
        self.args = type("CallbackParams", (), {"cur_step_num": step})()
        self.stop_requested = False

    def original_args(self):
        return self.args

    def request_stop(self):
        self.stop_requested = True


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    net = nn.Dense(3, 2)
    guard = train.Guard(first_step=0)
    saver = train.Checkpointer(net, str(tmp_path), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                               keep=5, first_step=0, guard=guard)
    net.weight.set_data(ms.Tensor([[1.0, float("inf"), 0.0], [0.0, 0.0, 0.0]], ms.float32))
    context = FakeRunContext(step=2)
    saver.on_train_step_end(context)
    assert guard.diverged == (2, "the updated weights are not finite") and context.stop_requested
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    guard = train.Guard(first_step=0)
    saver = train.Checkpointer(nn.Dense(3, 2), str(tmp_path), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                               keep=5, first_step=0, guard=guard)
    saver.save(2)
    good = tmp_path / "resnet18_qat-1_2.ckpt"
    before = good.read_bytes()

    def disk_full(net, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ms, "save_checkpoint", disk_full)
    saver.save(4)
    assert saver.failure == (str(tmp_path / "resnet18_qat-2_2.ckpt"), "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["resnet18_qat-1_2.ckpt"] and good.read_bytes() == before
    with pytest.raises(SystemExit) as exit_info:
        train.report_stop(guard, saver, steps_per_epoch=2)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and f"{good}, is intact" in err


def test_an_interrupted_worker_that_does_not_save_names_worker_0s_checkpoint(tmp_path, capsys):
    """In a data-parallel run only worker 0 saves: the others point to its checkpoint, not to 'None'."""
    guard = train.Guard(first_step=0)
    saver = train.Checkpointer(nn.Dense(3, 2), str(tmp_path), None, steps_per_epoch=2, save_steps=0,
                               keep=5, first_step=0, guard=guard, writer=False)
    guard.signal = signal.SIGINT
    with pytest.raises(SystemExit) as exit_info:
        train.report_stop(guard, saver, steps_per_epoch=2)
    assert exit_info.value.code == 128 + signal.SIGINT
    out = capsys.readouterr().out
    assert "interrupted by SIGINT; checkpoint: worker 0's latest" in out and "None" not in out
