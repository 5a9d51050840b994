"""qatcifar.interrupts: the one line a signal leaves even while MindSpore's log is quieted (fd 2 closed off)."""
import inspect
import os
import subprocess
import sys

import pytest

from conftest import ROOT, UNBUFFERED, assert_interrupted, interrupt, start_script, wait_for_line
from qatcifar import interrupts

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


CLOSED_PIPE = """
import sys
from qatcifar import interrupts


def work(args):
    for line in range(int(args)):
        print(f"line {line}")
    open(sys.argv[1], "w").write("done")


interrupts.run(work, sys.argv[2])
"""


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_goes_away_does_not_stop_the_work(buffered, tmp_path):
    """`command | head`: head reads what it wants and closes the pipe; the command's work goes on, what it prints
    after is dropped, and it ends as it would have (Python would end it in a BrokenPipeError traceback at the first
    write that fails, then another at exit, status 1, and a file written after that would be missing)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    process = subprocess.run([sys.executable, "-c", CLOSED_PIPE, str(tmp_path / "done"), "3"], cwd=ROOT,
                             env=env if buffered else UNBUFFERED, stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=60)
    os.close(write)
    assert (process.returncode, process.stderr) == (0, "")
    assert (tmp_path / "done").read_text() == "done"


def test_a_broken_pipe_of_the_work_s_own_is_not_taken_for_a_closed_stdout():
    """A BrokenPipeError from a pipe or socket the work uses (a worker that died) is the work's failure, raised."""
    def work(args):
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(BrokenPipeError):
        interrupts.run(work, None)
