"""Nothing lost when a command is cut short or crowded: Ctrl-C and SIGTERM in eval.py, export.py and bench.py, a disk
that fills, two train.py runs into one folder. Each starts the commands as a user does, in a process of their own.
(Interrupted and killed training runs are in test_train_crash.py.)"""
import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from conftest import (
    ROOT,
    SMALL,
    UNBUFFERED,
    assert_interrupted,
    expect_error,
    interrupt,
    metric_records,
    run_script,
    start_script,
    wait_for_line,
    write_metrics,
)

pytestmark = pytest.mark.slow
RUN = [*SMALL, "-bsize", "16", "--num_samples", "64", "--eval_every", "0", "--quant_delay", "1"]  # 4 steps an epoch


SIGNALS = pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])


@SIGNALS
@pytest.mark.parametrize("model", ["checkpoint", "int8"])
def test_a_signal_ends_eval_with_one_line(model, signum, untrained, int8_file, synthetic_dir):
    """MindSpore would turn Ctrl-C into SIGTERM (status 143, no word) with a checkpoint; numpy's int8 inference
    would end in a KeyboardInterrupt traceback; SIGTERM ended both with 143 and no word."""
    path = untrained["QAT"] if model == "checkpoint" else int8_file
    process = start_script("eval.py", "-loc", path, "-data", synthetic_dir, env=UNBUFFERED)
    wait_for_line(process, "evaluating ")
    assert_interrupted(*interrupt(process, signum), "evaluation stopped; nothing was written")


@SIGNALS
def test_a_signal_ends_export_and_leaves_no_file(signum, untrained, tmp_path):
    """(SIGTERM left an empty .partial-<pid> folder beside the output.)"""
    output = str(tmp_path / "m.mindir")
    process = start_script("export.py", "-loc", untrained["QAT"], "--format", "mindir", "-o", output, env=UNBUFFERED)
    wait_for_line(process, "running on CPU")
    assert_interrupted(*interrupt(process, signum), "no file was written")
    assert os.listdir(tmp_path) == []


@SIGNALS
def test_a_signal_ends_bench_and_removes_its_data(signum, tmp_path):
    """A terminal's Ctrl-C reaches bench.py and the measurement it runs (one process group); so does a SIGTERM sent
    to the group (a container's stop). (SIGTERM left bench's data, 30 MB, in the temporary folder.)"""
    process = subprocess.Popen([sys.executable, "bench.py", "--steps", "1", "--repeats", "1"], cwd=ROOT,
                               env=dict(UNBUFFERED, TMPDIR=str(tmp_path)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / "*" / "data" / "test_batch.bin")) and time.time() < deadline:
        time.sleep(0.5)  # until the synthetic data is written and the first measurement starts
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=120)
    assert_interrupted(process.returncode, stderr, signum, "no figures (the temporary data folder is removed)")
    assert os.listdir(tmp_path) == []


# --- a disk that fills ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (a ResNet-8 QAT training checkpoint is about 1 MB), unmounted afterwards; the test is skipped where
    it cannot be mounted (mounting needs root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                                text=True)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small disk to fill")
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({result.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk):
    """Write a file that takes all the space left on the disk."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError as e:
                assert e.errno == errno.ENOSPC
    assert os.statvfs(disk).f_bavail == 0


def assert_whole(folder):
    """No partial or empty file, every checkpoint loads with its CRC, every metrics record is whole JSON."""
    assert not glob.glob(os.path.join(folder, ".partial-*"))
    for name in os.listdir(folder):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    for path in glob.glob(os.path.join(folder, "*.ckpt")):
        ms.load_checkpoint(path, crc_check=True)
    metrics = os.path.join(folder, "resnet8_qat-metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            return [json.loads(line) for line in f]
    return []


def test_a_full_disk_at_the_start_stops_train_with_1_before_training(small_disk, synthetic_dir):
    fill(small_disk)
    folder = small_disk / "run"
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", "1", *RUN)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: could not write {folder}/resnet8_qat-args.json (No space left on "
                                          "device); nothing was trained; free space or fix the save folder, then run "
                                          "again"]
    assert os.listdir(small_disk) == ["filler"]  # (the save folder the run made, empty, is removed)


def test_a_disk_that_fills_during_training_stops_it_with_1_and_keeps_what_was_saved(small_disk, synthetic_dir):
    folder = small_disk / "run"
    process = start_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", "30", *RUN, env=UNBUFFERED)
    wait_for_line(process, "epoch 1/30 done")  # its checkpoint is saved
    process.send_signal(signal.SIGSTOP)  # (a ResNet-8 epoch of 4 steps may end while the disk is being filled)
    fill(small_disk)
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    assert len(stderr.splitlines()) == 1, stderr
    [line] = stderr.splitlines()
    assert line.startswith(f"error: could not save {folder}/") and "(No space left on device)" in line
    saved = re.search(rf"the last checkpoint saved, {re.escape(str(folder))}/resnet8_qat-(\d+)_4.ckpt, is intact", line)
    assert saved, line
    last = int(saved.group(1))
    assert line.endswith("free space or fix the save folder, then continue with --resume auto")
    records = assert_whole(folder)
    assert [r["epoch"] for r in records] in (list(range(1, last)), list(range(1, last + 1)))  # filled before or after
    assert f"resnet8_qat-{last}_4.ckpt" in os.listdir(folder)
    assert f"resnet8_qat-{last + 1}_4.ckpt" not in os.listdir(folder)
    os.remove(small_disk / "filler")
    end = str(last + 2)
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", end, *RUN, "--resume", "auto",
                        "--keep", "1")  # (room for two checkpoints: the new one is written before the old goes)
    assert result.returncode == 0, result.stderr
    assert "checkpoint: " + str(folder / f"resnet8_qat-{end}_4.ckpt") in result.stdout
    assert [r["epoch"] for r in assert_whole(folder)][-2:] == [last + 1, last + 2]


def test_a_full_summary_disk_is_one_warning_and_training_goes_on(small_disk, synthetic_dir, tmp_path):
    """TensorBoard's event files are a view of the run's metrics: a full disk under --summary_dir ends them, not the
    run (tensorboardX's own writer thread died there in tracebacks, and took train.py with it)."""
    fill(small_disk)
    folder = tmp_path / "run"
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", "2", *RUN,
                        "--summary_dir", str(small_disk / "tb"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: stopped writing TensorBoard events into {small_disk / 'tb'} (No space left on "
                        f"device); training goes on, {folder / 'resnet8_qat-metrics.jsonl'} has the figures"]
    assert [r["epoch"] for r in assert_whole(folder)] == [1, 2]
    assert "resnet8_qat-2_4.ckpt" in os.listdir(folder)


OUTPUTS = {"--plot": "m.png", "--csv": "m.csv", "--save_predictions": "m.npy", "--save_adversarial": "adversarial"}


@pytest.mark.parametrize("flag", OUTPUTS)
def test_a_full_disk_is_one_line_for_every_output_of_eval(flag, small_disk, untrained, synthetic_dir, capsys):
    """(--plot and --csv ended in OSError tracebacks; --save_adversarial said "(None)": numpy's tofile gives no
    reason.)"""
    import eval as evaluate
    fill(small_disk)
    path = small_disk / OUTPUTS[flag]
    attack = ["--attack", "fgsm"] if flag == "--save_adversarial" else []
    line = expect_error(evaluate.main, ["-loc", untrained["QAT"], "-data", synthetic_dir, "--num_samples", "50",
                                        *attack, flag, str(path)], capsys, f"cannot write {path}")
    assert "(No space left on device)" in line
    assert os.listdir(small_disk) == ["filler"]


def test_a_full_disk_is_one_line_for_plot_py(small_disk, tmp_path, capsys):
    import plot
    write_metrics(tmp_path, [json.dumps(record) for record in metric_records(2)])
    fill(small_disk)
    expect_error(plot.main, [str(tmp_path), "-o", str(small_disk / "c.png")], capsys,
                 f"cannot write {small_disk / 'c.png'} (No space left on device)")
    assert os.listdir(small_disk) == ["filler"]


@pytest.mark.parametrize("form", ["int8", "onnx"])
def test_a_full_disk_is_one_line_for_export(form, small_disk, trained):
    """(An int8 export said it, then printed an "Exception ignored ... ZipFile.__del__" traceback.)"""
    fill(small_disk)
    output = small_disk / ("m.int8.npz" if form == "int8" else "m.onnx")
    result = run_script("export.py", "-loc", trained[0], "--format", form, "-o", str(output))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: cannot write {output} (No space left on device); free space or "
                                          "give another -o"]
    assert os.listdir(small_disk) == ["filler"]


# --- a reader that goes away --------------------------------------------------------------------------

def test_a_reader_that_goes_away_stops_no_command(float_onnx, synthetic_dir, tmp_path):
    """`command | head`: no BrokenPipeError traceback, and the command does its work (export.py writes its file) and
    ends with its usual status, 0; what it prints after the reader left is dropped. (Each ended in a traceback, with
    status 1; export.py could fail to write its file, as its first line comes before.)"""
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    output = tmp_path / "m.onnx"
    commands = [["predict.py", "-loc", float_onnx[1], str(image), "--json"],
                ["eval.py", "-loc", float_onnx[1], "-data", synthetic_dir, "--num_samples", "50", "--json"],
                ["doctor.py", "-data", synthetic_dir, "-dir", str(tmp_path)],
                ["export.py", "-loc", float_onnx[0], "--format", "onnx", "-o", str(output)]]
    for command in commands:
        read, write = os.pipe()
        os.close(read)
        result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=300)
        os.close(write)
        assert (result.returncode, result.stderr) == (0, ""), (command, result.stderr[-2000:])
    assert output.stat().st_size > 0 and sorted(os.listdir(tmp_path)) == ["cat.png", "m.onnx"]


# --- one run per save folder ------------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused_and_the_first_keeps_its_files(synthetic_dir, tmp_path):
    folder = str(tmp_path / "run")
    # 2 epochs of 128 steps: the first run is still training when the second, started after its first step, asks
    first = start_script("train.py", "-data", synthetic_dir, "-dir", folder, "-e", "2", *RUN, "--num_samples", "2048",
                         env=UNBUFFERED)
    wait_for_line(first, "first step done")
    second = run_script("train.py", "-data", synthetic_dir, "-dir", folder, "-e", "2", *RUN, "--seed", "7")
    assert second.returncode == 2
    assert second.stderr.splitlines() == [f"error: save directory {folder} is in use by another train.py run "
                                          f"(process {first.pid}); wait for it to end, or give another -dir"]
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert sorted(os.listdir(folder)) == ["resnet8_qat-1_128.ckpt", "resnet8_qat-2_128.ckpt", "resnet8_qat-args.json",
                                          "resnet8_qat-curves.png", "resnet8_qat-metrics.jsonl"]
    assert [r["epoch"] for r in assert_whole(folder)] == [1, 2]
    with open(os.path.join(folder, "resnet8_qat-args.json")) as f:
        assert json.load(f)["seed"] == 1  # the first run's
