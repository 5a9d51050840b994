"""When training stops early: kill -9, Ctrl-C, SIGTERM, a diverged loss, a failed save.

One save folder goes through the phases in order, each a fixture that the next builds on: a run
killed during a save, its resumption killed during a step, resumptions stopped by SIGTERM and by
Ctrl-C, and a last resumption past two corrupt checkpoints to the end, which must be bit-identical
to an uninterrupted run with the same --seed.
"""
import glob
import json
import os
import signal
import time

import mindspore as ms
import numpy as np
import pytest

from conftest import SHORT_RUN, run_script, snapshot, start_script, train_in_subprocess, wait_for_line
from qatcifar import files

FINAL = "resnet8_qat-3_4.ckpt"  # SHORT_RUN's last checkpoint, step 12
METRICS = "resnet8_qat-metrics.jsonl"  # its metrics, in a folder of its own
pytestmark = pytest.mark.slow


def start(data, folder, *flags):
    return start_script("train.py", "-data", data, "-dir", folder, *SHORT_RUN, *flags)


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
    for name, value in expected.items():
        if isinstance(value, str):  # the network's name
            assert got[name] == value
        else:
            np.testing.assert_array_equal(got[name].asnumpy(), value.asnumpy(), err_msg=name)


def checkpoints_by_step(folder):
    """{step_num: path} of the training checkpoints in the folder; every .ckpt must load, its CRC checked."""
    steps = {}
    for path in glob.glob(os.path.join(folder, "*.ckpt")):
        params = ms.load_checkpoint(path, crc_check=True)
        if not path.endswith("-best.ckpt"):
            steps[int(params["step_num"].asnumpy())] = path
    return steps


@pytest.fixture(scope="module")
def killed_during_save(synthetic_dir, tmp_path_factory):
    """A run killed (SIGKILL) while it writes a checkpoint: (its folder, {step: checkpoint} left)."""
    folder = str(tmp_path_factory.mktemp("crash"))
    process = start(synthetic_dir, folder)
    wait_for_save(folder)
    process.kill()
    process.wait()
    return folder, checkpoints_by_step(folder)


@pytest.fixture(scope="module")
def killed_during_step(killed_during_save, synthetic_dir):
    """Its resumption, killed during a training step (after the progress line of the step before):
    (folder, {step: checkpoint} before, {step: checkpoint} after)."""
    folder, before = killed_during_save
    process = start(synthetic_dir, folder, "--resume", "auto", "--log_every", "1")
    wait_for_line(process, "first step done")
    wait_for_line(process, " step ")  # a progress line: the next step is running now
    process.kill()
    process.wait()
    return folder, before, checkpoints_by_step(folder)


@pytest.fixture(scope="module")
def interrupted(killed_during_step, synthetic_dir):
    """Resumptions stopped by SIGTERM, then by Ctrl-C (SIGINT) after their first step:
    {signal: (exit status, stdout, stderr, newest step before, newest step after)}."""
    folder = killed_during_step[0]
    outcomes = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        before = max(checkpoints_by_step(folder), default=0)
        process = start(synthetic_dir, folder, "--resume", "auto")
        wait_for_line(process, "first step done")
        process.send_signal(signum)
        out, err = process.communicate(timeout=300)
        outcomes[signum] = (process.returncode, out, err, before, max(checkpoints_by_step(folder)))
    return outcomes


@pytest.fixture(scope="module")
def resumed_to_the_end(interrupted, killed_during_step, synthetic_dir):
    """Two newer files that --resume auto must skip, one cut short and one with a flipped bit (its CRC), a line of
    the run's metrics cut short and a record of epoch 3 (as when epoch 3's checkpoint was deleted), then a resumption to
    the end: (folder, the newest good checkpoint before, final checkpoint, stdout)."""
    folder = killed_during_step[0]
    newest = checkpoints_by_step(folder)[max(checkpoints_by_step(folder))]
    data = open(newest, "rb").read()
    with open(os.path.join(folder, "resnet8_qat_7-3_4.ckpt"), "wb") as f:
        f.write(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with open(os.path.join(folder, "resnet8_qat_8-3_4.ckpt"), "wb") as f:
        f.write(flipped)
    with open(files.RunFiles.of_model(newest).metrics, "a") as f:  # (the run of the checkpoint to resume)
        stale = {"epoch": 3, "step": 12, "loss": 0.5, "lr": 0.001, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "stale": True}
        f.write(json.dumps(stale) + '\n{"epoch": 3, "st\n')
    path, out = train_in_subprocess("-data", synthetic_dir, "-dir", folder, *SHORT_RUN, "--resume", "auto",
                                    output=True)
    return folder, newest, path, out


def test_a_run_killed_during_a_save_leaves_whole_checkpoints(killed_during_save, uninterrupted):
    _, saved = killed_during_save
    expected = checkpoints_by_step(uninterrupted)
    for step, path in saved.items():  # a fresh run with the same --seed: the same parameters
        assert_same_parameters(path, expected[step])


def test_a_run_killed_during_a_step_loses_no_checkpoint(killed_during_step):
    _, before, after = killed_during_step
    assert set(before) <= set(after)  # every checkpoint loads (CRC checked), none was lost


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_an_interrupt_checkpoint_and_says_how_to_continue(interrupted, signum, code):
    status, out, err, before, after = interrupted[signum]
    assert status == code, err[-2000:]
    assert err == "" and "to continue, run the same command with --resume auto" in out
    [path] = [line.split("checkpoint: ")[1] for line in out.splitlines() if line.startswith("interrupted by")]
    assert path.endswith("-interrupt.ckpt") and after > before


def test_resume_auto_skips_corrupt_checkpoints(resumed_to_the_end):
    _, newest, _, out = resumed_to_the_end
    assert "resnet8_qat_7-3_4.ckpt: it does not load" in out
    assert "resnet8_qat_8-3_4.ckpt: it does not load (its CRC32 does not match its contents" in out
    assert f"resuming from {newest}" in out
    metrics = files.RunFiles.of_model(newest).metrics
    assert f"{metrics}: removed 1 line(s) cut short (not whole JSON records)" in out
    assert f"{metrics}: removed 1 record(s) of epochs after" in out


def test_the_resumed_run_ends_as_the_uninterrupted_one(resumed_to_the_end, uninterrupted):
    folder, newest, path, _ = resumed_to_the_end
    record = files.RunFiles.of_model(newest)  # (resnet8_qat_1 where the first run was killed before a checkpoint)
    # Network, observers, optimizer moments and step count, bit for bit.
    assert os.path.basename(path) == f"{record.prefix}-3_4.ckpt"
    assert_same_parameters(path, os.path.join(uninterrupted, FINAL))
    state = ms.load_checkpoint(path)
    assert state["global_step"].asnumpy().item() == 12 and state["layer1.0.conv1.output_quant.steps"].asnumpy() == 12
    with open(record.metrics) as f, open(os.path.join(uninterrupted, METRICS)) as g:
        last, expected = json.loads(f.readlines()[-1]), json.loads(g.readlines()[-1])
    assert (last["step"], last["lr"]) == (expected["step"], expected["lr"])
    with open(record.metrics) as f:  # each epoch once, the run's own; the cut line gone
        records = [json.loads(line) for line in f]
    epochs = [r["epoch"] for r in records]  # (an epoch whose last step was interrupted has no record)
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3 and not any("stale" in r for r in records)
    assert not glob.glob(os.path.join(folder, ".partial-*"))  # the killed saves' leftovers are gone


def test_diverged_training_stops_with_exit_3_and_saves_nothing(uninterrupted, synthetic_dir, tmp_path):
    final = os.path.join(uninterrupted, FINAL)
    before = snapshot(uninterrupted)
    # Adam moves every weight by about -lr per step: after step 13 (the first) they are near 1e30,
    # and the next step overflows. Checkpoints only at the epoch's end (step 16), which never comes.
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(tmp_path), *SHORT_RUN, "-e", "4",
                        "--resume", final, "-lr", "1e30", "--save_steps", "0", timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: training diverged at step 14 "), \
        result.stderr
    assert f"2 step(s) after resuming from {final}" in result.stderr and "good" not in result.stderr
    assert not glob.glob(str(tmp_path / "*.ckpt")) and snapshot(uninterrupted) == before
