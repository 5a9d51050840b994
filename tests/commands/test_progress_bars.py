"""Live progress bars on a terminal (a pseudo-terminal here), log lines unchanged in files and pipes."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from conftest import ROOT, SMALL


def run_on_terminal(*argv, timeout=600):
    """`python argv...` with its stdout and stderr on a pseudo-terminal: (exit status, everything it wrote)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns (a new pty has 0)
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower,
                               stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_train_py_draws_one_live_bar_per_epoch_on_a_terminal(synthetic_dir, tmp_path):
    status, output = run_on_terminal("train.py", *SMALL, "-data", synthetic_dir, "-dir", str(tmp_path), "-e", "2",
                                     "-bsize", "16", "--num_samples", "64", "--val_samples", "100", "--log_every", "1")
    assert status == 0, output[-3000:]
    assert "\r" in output and "epoch 1/2" in output and "epoch 2/2" in output and "4/4" in output
    assert "images/s, run eta" in output
    assert "epoch 1/2 step " not in output  # the log lines are for files and pipes
    assert "epoch 2/2 done in" in output and "validation accuracy" in output and "checkpoint: " in output


@pytest.mark.slow
def test_eval_py_shows_a_bar_on_a_terminal_and_none_in_a_pipe(untrained, synthetic_dir):
    # 100 batches of 10: long enough for the bar to be redrawn (tqdm redraws it at most every 0.1 s)
    argv = ("eval.py", "-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples", "1000", "-bsize", "10")
    status, output = run_on_terminal(*argv)
    assert status == 0, output[-3000:]
    assert re.search(r"predicting: .*\d+/100 ", output) and "accuracy: " in output
    piped = subprocess.run([sys.executable, *argv[:-4], "--num_samples", "20", "-bsize", "10"], cwd=ROOT,
                           capture_output=True, text=True)
    assert piped.returncode == 0 and "predicting" not in piped.stdout + piped.stderr and "\r" not in piped.stdout


@pytest.mark.slow
def test_a_long_attack_shows_its_steps_on_a_terminal(untrained, synthetic_dir):
    """One batch under PGD-120: the bar moves within the batch, in steps (120 = 50 + 50 + 20), where a bar of batches
    would stand at 0/1 until the end (PGD-500 once ran for minutes with no word)."""
    status, output = run_on_terminal("eval.py", "-loc", untrained["float32"], "-data", synthetic_dir, "--num_samples",
                                     "4", "--attack", "pgd", "--steps", "120")
    assert status == 0, output[-3000:]
    assert re.search(r"attacking \(PGD-120, eps 8/255\): .*50/120 ", output), output[-3000:]
    assert "robust accuracy: " in output and "120 steps of" in output
