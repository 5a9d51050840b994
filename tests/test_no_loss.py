"""Nothing lost when a run is cut short or crowded: Ctrl-C in every script, a disk that fills, two train.py runs
into one folder. Each starts the scripts as a user does, in a process of their own.
(Interrupted and killed training runs are in test_crash.py.)"""
import errno
import glob
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time

import mindspore as ms
import pytest

from conftest import ROOT, SMALL, run_script, start_script
from qatcifar import files, interrupts

pytestmark = pytest.mark.slow
UNBUFFERED = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they are printed
RUN = [*SMALL, "-bsize", "16", "--num_samples", "64", "--eval_every", "0", "--quant_delay", "1"]  # 4 steps an epoch


def wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"{process.args} ended without a line {text!r}: {process.stderr.read()[-2000:]}")


def interrupt(process, signum=signal.SIGINT):
    """Ctrl-C (or `signum`), and what the process then says: (exit status, stderr, the signal)."""
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stderr, signum


def assert_interrupted(status, stderr, signum, said):
    """One line, and the status of the signal: 130 (Ctrl-C) or 143 (SIGTERM)."""
    assert status == 128 + signum, stderr
    by = "" if signum == signal.SIGINT else " by SIGTERM"
    assert stderr.splitlines() == [f"interrupted{by}: {said}"], stderr


SIGNALS = pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])


@SIGNALS
@pytest.mark.parametrize("model", ["checkpoint", "int8"])
def test_a_signal_ends_eval_with_one_line(model, signum, untrained, int8_file, synthetic_dir):
    """MindSpore would turn Ctrl-C into SIGTERM (status 143, no word) with a checkpoint; numpy's int8 inference
    would end in a KeyboardInterrupt traceback; SIGTERM ended both with 143 and no word."""
    path = untrained["QAT"] if model == "checkpoint" else int8_file
    process = start_script("eval.py", "-loc", path, "-data", synthetic_dir, env=UNBUFFERED)
    wait_for_line(process, "running on CPU")
    assert_interrupted(*interrupt(process, signum), "evaluation stopped; nothing was written")


QUIET_HARD_STOP = """
import time
from qatcifar import cli, interrupts
interrupts.block()  # as the commands do
interrupts.MINDSPORE_DIR = ""  # every frame counts as MindSpore's: Ctrl-C must end the process at once


def work(args):
    with cli.mindspore_log_quiet():  # fd 2 closed off, as around a checkpoint's load
        print("loading", flush=True)
        time.sleep(60)


interrupts.run(work, None, "nothing was written")
"""


def test_ctrl_c_is_said_while_mindspore_is_quieted():
    """Ctrl-C while MindSpore holds the main thread with fd 2 closed off (eval.py loading a checkpoint): the one
    line still reaches stderr."""
    process = start_script("-c", QUIET_HARD_STOP, env=UNBUFFERED)
    wait_for_line(process, "loading")
    assert_interrupted(*interrupt(process), "nothing was written")


def test_ctrl_c_at_any_line_of_a_quieted_block_leaves_stderr_open():
    """Ctrl-C's KeyboardInterrupt (interrupts._raise_interrupt, run by a signal between two lines) arriving at each
    line of mindspore_log_quiet in turn, entering and leaving: fd 2 is the same file afterwards. (Broken off before fd 2
    was restored, the one line Ctrl-C prints went nowhere: eval.py ended 130 in silence, now and then.)"""
    from qatcifar import cli
    code = inspect.unwrap(cli.mindspore_log_quiet).__code__
    lines = sorted({line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno})
    stderr, saved, closed_off = os.fstat(2), os.dup(2), []
    for target in lines:
        def trace(frame, event, arg, target=target):
            if frame.f_code is code and event == "line" and frame.f_lineno == target:
                sys.settrace(None)
                interrupts._raise_interrupt(interrupts.WAKE_SIGNAL, frame)
            return trace
        interrupts._raised.clear()
        sys.settrace(trace)
        try:
            with cli.mindspore_log_quiet():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
            interrupts._raised.clear()
        now = os.fstat(2)
        if (now.st_dev, now.st_ino) != (stderr.st_dev, stderr.st_ino):
            closed_off.append(target)
            os.dup2(saved, 2)
    os.close(saved)
    assert closed_off == [], f"fd 2 left closed off by Ctrl-C at lines {closed_off} of cli.py"


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


def test_the_partial_folder_of_a_killed_write_is_removed_by_the_next_write_there(tmp_path):
    """What SIGKILL leaves (export.py's .partial-<pid>/ folder, plot.py's half-written PNG in one) goes at the next
    write into that folder, by any command; a living process's stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".partial-{dead.pid}"
    stale.mkdir()
    (stale / "curves.png").write_bytes(b"")
    living = tmp_path / f".partial-{os.getppid()}"
    living.mkdir()
    files.write_text(str(tmp_path / "args.json"), "{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["args.json", living.name])


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
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    return []


def test_a_full_disk_at_the_start_stops_train_with_1_before_training(small_disk, synthetic_dir):
    fill(small_disk)
    folder = small_disk / "run"
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", "1", *RUN)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: could not write {folder}/args.json (No space left on device); "
                                          "nothing was trained; free space or fix the save folder, then run again"]
    assert os.listdir(folder) == []


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
    """TensorBoard's event files are a view of metrics.jsonl: a full disk under --summary_dir ends them, not the
    run (tensorboardX's own writer thread died there in tracebacks, and took train.py with it)."""
    fill(small_disk)
    folder = tmp_path / "run"
    result = run_script("train.py", "-data", synthetic_dir, "-dir", str(folder), "-e", "2", *RUN,
                        "--summary_dir", str(small_disk / "tb"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: stopped writing TensorBoard events into {small_disk / 'tb'} (No space left on "
                        "device); training goes on, metrics.jsonl has the figures"]
    assert [r["epoch"] for r in assert_whole(folder)] == [1, 2]
    assert "resnet8_qat-2_4.ckpt" in os.listdir(folder)


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
    assert sorted(os.listdir(folder)) == ["args.json", "curves.png", "metrics.jsonl", "resnet8_qat-1_128.ckpt",
                                          "resnet8_qat-2_128.ckpt"]
    assert [r["epoch"] for r in assert_whole(folder)] == [1, 2]
    with open(os.path.join(folder, "args.json")) as f:
        assert json.load(f)["seed"] == 1  # the first run's
