"""How a command ends: bad input, Ctrl-C and SIGTERM, exit statuses. The one place, besides each command's main,
that ends the process.

- `fail(message)`: one `error:` line on stderr, exit status 2 (or `code`), no traceback.
- `run(work, args, interrupted)`: a command's main around its work: bad input (`cli.InputError`) reported with
  `fail`, Ctrl-C with one line and exit status 130.
- `temporary(path)`: a temporary folder removed if Ctrl-C must end the process at once.
- `quit_now(status)`: end at once (a second SIGTERM or Ctrl-C in training).

Ctrl-C: MindSpore's runtime turns SIGINT into SIGTERM (exit status 143, no message), so each
command, run as a script, blocks SIGINT before it imports MindSpore (and MindSpore starts
threads, which inherit the mask); `run` waits for it on a thread of its own, which then
raises KeyboardInterrupt in the main thread (by SIGUSR1, which also breaks off a blocking
call): `finally` blocks clean up, and the command says what was left. Where MindSpore holds
the main thread (compiling a graph) the process ends at once instead, after removing the
temporary files in flight (`temporary`). train.py takes Ctrl-C between steps instead
(callbacks.Guard).
"""
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import threading
import time

from qatcifar import cli

EXIT_INTERRUPTED = 128 + signal.SIGINT
WAKE_SIGNAL = signal.SIGUSR1  # how run's Ctrl-C thread reaches the main thread, where SIGINT is blocked


def fail(message, code=2):
    """Report a problem the way every script does: one `error:` line, exit status 2 (bad input) or `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run(work, args, interrupted):
    """work(args), as a script's main runs it: InputError as one `error:` line and exit status 2; Ctrl-C as one
    line, `interrupted: <interrupted>` (what was kept or left), and exit status 130. Returns what work returns."""
    global _message
    _message = interrupted
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        signal.signal(WAKE_SIGNAL, _raise_interrupt)
        # (its line goes to the stderr of now: mindspore_log_quiet may have closed off fd 2 when it must be said)
        threading.Thread(target=_forward_interrupt, args=(threading.get_ident(), os.dup(2)), daemon=True,
                         name="ctrl-c").start()
    try:
        result = work(args)
        _raised.set()  # finished before Ctrl-C could stop it: nothing more to interrupt
        return result
    except cli.InputError as e:
        if not _interrupt.is_set():
            fail(str(e))
    except KeyboardInterrupt:
        pass
    except Exception:
        if not _interrupt.is_set():
            raise
        # else: a library call broken off by the interrupt raised something of its own
    _raised.set()  # (the Ctrl-C thread stands down)
    print(f"interrupted: {interrupted}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def temporary(path):
    """Within the block, the temporary folder `path` is removed if Ctrl-C must end the process at once."""
    _temporary.add(path)
    try:
        yield path
    finally:
        _temporary.discard(path)


_interrupt, _raised = threading.Event(), threading.Event()  # Ctrl-C was pressed; KeyboardInterrupt was raised
_message, _temporary = "", set()
_spec = importlib.util.find_spec("mindspore")  # its folder, without importing it
MINDSPORE_DIR = os.path.dirname(_spec.origin) + os.sep if _spec and _spec.origin else "\0"  # ("\0": no file's)
PATIENCE_S = 1.0  # how long Ctrl-C waits for the main thread to leave MindSpore's code


def _forward_interrupt(main_thread, stderr):
    """Wait for Ctrl-C; then signal the main thread every 0.1 s until it raised KeyboardInterrupt (each signal
    also breaks off a blocking call, a download's). If MindSpore keeps it for PATIENCE_S (compiling a graph, which
    cannot be broken off cleanly), remove the temporary files in flight and end the process at once."""
    signal.sigwait({signal.SIGINT})
    _interrupt.set()
    deadline = time.monotonic() + PATIENCE_S
    while not _raised.is_set():
        if time.monotonic() > deadline:
            for path in list(_temporary):
                shutil.rmtree(path, ignore_errors=True)
            sys.stderr.flush()
            os.write(stderr, f"interrupted: {_message}\n".encode())
            os._exit(EXIT_INTERRUPTED)
        signal.pthread_kill(main_thread, WAKE_SIGNAL)
        time.sleep(0.1)


def _raise_interrupt(signum, frame):
    """KeyboardInterrupt, unless MindSpore's own Python code is running: broken off there (in a graph compilation)
    its C++ side logs pages of errors. Nor while a `with` block is entered or left (contextlib's frames): broken
    off there, mindspore_log_quiet would leave fd 2 closed off, and the line that says what was kept with it."""
    if _raised.is_set():
        return
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(MINDSPORE_DIR) or filename == contextlib.__file__:
            return
        frame = frame.f_back
    _raised.set()
    raise KeyboardInterrupt


def quit_now(status):
    """End the process at once, without unwinding (MindSpore's threads would hold it): a second SIGTERM or Ctrl-C
    while training stops for the first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
