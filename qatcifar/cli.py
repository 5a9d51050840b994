"""Command-line plumbing shared by every command: bad input, argument types, progress bars, the device.

- `InputError`: what helpers raise for bad input (a missing file, a foreign checkpoint, a
  flag that cannot work); its message says what is wrong and how to fix it. A command's main
  reports it with `interrupts.fail` (or `interrupts.run`), the one place that ends the process.
- `ArgumentParser`: argparse with that same one-line error, and defaults in -h;
  `add_device_argument(parser)` gives every command the same `--device`.
- `setup_device(name)`: picks CPU or GPU and sets MindSpore's context.
- `progress`, `bar`: a live bar on a terminal, nothing in a file or a pipe.

Import this module before MindSpore: it quiets MindSpore's log (GLOG_v), which is read once,
when MindSpore is first imported. It does not import MindSpore itself until a function needs
it, so that doctor.py (which checks MindSpore) and the latency worker (which measures a
runtime's memory alone) share its argument parsing.
"""
import argparse
import contextlib
import math
import os
import sys

# MindSpore's INFO and WARNING lines (plugin probing, deprecations) would bury our output
# and our error lines; the user can still ask for them with GLOG_v=1 or 2.
os.environ.setdefault("GLOG_v", "3")

DEVICES = ("auto", "CPU", "GPU")
# Measured on AVX-512 CPUs with MindSpore 2.10: oneDNN otherwise picks a reference
# convolution (0.6 training images/s for ResNet-18); with AVX2 it uses jit GEMM (40 images/s).
ONEDNN_ISA = "AVX2"
INT32_MAX = 2 ** 31 - 1  # step counters and observer counts are int32 Parameters
SEED_MAX = 2 ** 32 - 1   # mindspore.dataset.config.set_seed's range


class InputError(Exception):
    """Bad input; the message names the problem and the fix. A script's main reports it with `fail`."""


def first_line(error):
    """The first line of an exception's message (MindSpore's run to dozens of lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (the help says what happens then) and for a switch that
    is off unless given (store_true)."""

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False
        return super()._get_help_string(action) if shown else action.help


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        from qatcifar import interrupts  # (which imports this module)
        interrupts.fail(f"{message} (see: python {self.prog} -h)")


def interactive():
    """Whether standard output is a terminal someone watches: live progress bars there, log lines elsewhere."""
    return sys.stdout.isatty()


def progress(iterable, total, what, unit="batch"):
    """`iterable` with a live progress bar (tqdm) on an interactive terminal, which it leaves when done; the iterable
    itself for a file or a pipe, so that logs stay as they are."""
    if not interactive():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=what, unit=unit, file=sys.stdout, leave=False, dynamic_ncols=True)


def bar(total, what, unit):
    """A live progress bar (tqdm) advanced by hand, `.update(n)`, then `.close()`, on an interactive terminal; one that
    shows nothing for a file or a pipe."""
    if not interactive():
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit=unit, file=sys.stdout, leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def printable(text):
    """`text` with every character a terminal would act on (a newline, an ANSI escape) written as its Python escape:
    for names read from files, which could otherwise forge an `error:` line or colour the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def size_text(size):
    """A file size for people: 93 KB, 11.3 MB (decimal units, as file managers show them)."""
    return f"{size / 1e3:.0f} KB" if size < 1e6 else f"{size / 1e6:.1f} MB"


def add_device_argument(parser, help="auto: GPU when MindSpore has a GPU backend, else CPU"):
    parser.add_argument("--device", choices=DEVICES, default="auto", help=help)


def int_range(low, high):
    """An argparse type: an integer from low to high; the error says the range."""
    return _in_range(int, "an integer", low, high)


def float_range(low, high):
    """An argparse type: a number from low to high (NaN and infinities outside); the error says the range."""
    return _in_range(float, "a number", low, high)


def _in_range(kind, what, low, high):
    def parse(text):
        value = _parse(kind, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} from {low:g} to {high:g}, got {text}" if kind is float
                                             else f"must be {what} from {low} to {high}, got {text}")
        return value
    parse.__name__ = what.split()[-1]
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


def share(text):
    """An argparse type: a share in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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


@contextlib.contextmanager
def mindspore_log_quiet(native=True):
    """Within the block MindSpore logs nothing: for calls whose failure the caller reports itself, in one line (a
    failed save_checkpoint logs a CRITICAL line from Python). With `native`, for short calls only, also nothing
    from C++ (a failed mindspore.load logs three ERROR lines straight to file descriptor 2, which is closed off
    meanwhile for every thread)."""
    if "mindspore" not in sys.modules:  # (writing a file in a command without MindSpore: nothing to quiet)
        yield
        return
    import mindspore as ms
    logger = ms.log._get_logger()  # (private: MindSpore's logger is named after the process id)
    disabled, logger.disabled = logger.disabled, True
    try:
        if native:
            with native_quiet():
                yield
        else:
            yield
    finally:
        logger.disabled = disabled


@contextlib.contextmanager
def native_quiet():
    """Within the block nothing reaches file descriptor 2 (what C++ libraries log there: MindSpore's, LiteRT's INFO
    line on its CPU delegate), for every thread: for short calls only."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def setup_device(name="auto", pynative=False):
    """Resolve `auto`, check that the device exists, set GRAPH_MODE (or PYNATIVE_MODE) on it; return "CPU" or "GPU"."""
    import mindspore as ms
    gpu = ms.hal.is_available("GPU")
    if name == "GPU" and not gpu:
        raise InputError("--device GPU: this MindSpore has no usable GPU backend (it needs an NVIDIA driver "
                         "and the CUDA 11.1 or 11.6 libraries with cuDNN; `python doctor.py` names those missing); "
                         "use --device CPU")
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
