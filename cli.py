"""Command-line plumbing shared by every script: bad input, argument types, the device.

- `InputError`: what helpers raise for bad input (a missing file, a foreign checkpoint, a
  flag that cannot work); its message says what is wrong and how to fix it.
- `fail(message)`: how a script's `main` reports it: one `error:` line on stderr, exit
  status 2 (or `code`), no traceback.
- `ArgumentParser`: argparse with that same one-line error, and defaults in -h;
  `add_device_argument(parser)` gives every script the same `--device`.
- `setup_device(name)`: picks CPU or GPU and sets MindSpore's context.
- `run(work, args, interrupted)`: a script's main around its work: bad input reported with
  `fail`, Ctrl-C with one line and exit status 130.

Ctrl-C: MindSpore's runtime turns SIGINT into SIGTERM (exit status 143, no message), so each
script, run as a script, blocks SIGINT before it imports this module (and MindSpore starts
threads, which inherit the mask); `run` takes it on a thread of its own, which raises
KeyboardInterrupt in the main thread: `finally` blocks clean up, and the script says what
was left. train.py takes it between steps instead (callbacks.Guard).

Import this module before MindSpore: it quiets MindSpore's log (GLOG_v), which is
read once, when MindSpore is first imported.
"""
import _thread
import argparse
import math
import os
import signal
import sys
import threading

# MindSpore's INFO and WARNING lines (plugin probing, deprecations) would bury our output
# and our error lines; the user can still ask for them with GLOG_v=1 or 2.
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402  (after GLOG_v on purpose)

DEVICES = ("auto", "CPU", "GPU")
# Measured on AVX-512 CPUs with MindSpore 2.10: oneDNN otherwise picks a reference
# convolution (0.6 training images/s for ResNet-18); with AVX2 it uses jit GEMM (40 images/s).
ONEDNN_ISA = "AVX2"
INT32_MAX = 2 ** 31 - 1  # step counters and observer counts are int32 Parameters
SEED_MAX = 2 ** 32 - 1   # mindspore.dataset.config.set_seed's range
EXIT_INTERRUPTED = 128 + signal.SIGINT


class InputError(Exception):
    """Bad input; the message names the problem and the fix. A script's main reports it with `fail`."""


def fail(message, code=2):
    """Report a problem the way every script does: one `error:` line, exit status 2 (bad input) or `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def first_line(error):
    """The first line of an exception's message (MindSpore's run to dozens of lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (the help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(f"{message} (see: python {self.prog} -h)")


def add_device_argument(parser, help="auto: GPU when MindSpore has a GPU backend, else CPU"):
    parser.add_argument("--device", choices=DEVICES, default="auto", help=help)


def int_range(low, high):
    """An argparse type: an integer from low to high; the error says the range."""
    def parse(text):
        value = _parse(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


positive_int = int_range(1, INT32_MAX)
non_negative_int = int_range(0, INT32_MAX)
seed = int_range(0, SEED_MAX)


def positive_float(text):
    value = _parse(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text):
    value = _parse(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_interval(text):
    value = _parse(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _parse(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def run(work, args, interrupted):
    """work(args), as a script's main runs it: InputError as one `error:` line and exit status 2; Ctrl-C as one
    line, `interrupted: <interrupted>` (what was kept or left), and exit status 130. Returns what work returns."""
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        threading.Thread(target=_forward_interrupt, daemon=True, name="ctrl-c").start()
    try:
        return work(args)
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def _forward_interrupt():
    signal.sigwait({signal.SIGINT})
    _thread.interrupt_main(signal.SIGINT)  # KeyboardInterrupt in the main thread, at its next Python line


def setup_device(name="auto", pynative=False):
    """Resolve `auto`, check that the device exists, set GRAPH_MODE (or PYNATIVE_MODE) on it; return "CPU" or "GPU"."""
    gpu = ms.hal.is_available("GPU")
    if name == "GPU" and not gpu:
        raise InputError("--device GPU: this MindSpore has no usable GPU backend (it needs an NVIDIA driver "
                         "and the CUDA 11.1 or 11.6 libraries with cuDNN, see docs/devices.md); use --device CPU")
    if name == "auto":
        name = "GPU" if gpu else "CPU"
        if name == "CPU":
            print("note: no GPU backend available, running on CPU")
    if name == "CPU":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA)
    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)
    # set_device refuses any call, even a same-target one, once kernels have run in this process
    # (a second main() in one process, as in the tests).
    if ms.get_context("device_target") != name:
        ms.set_device(name)
    return name
