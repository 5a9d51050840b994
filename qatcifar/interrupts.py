"""How a command ends: bad input, Ctrl-C and SIGTERM, exit statuses. The one place, besides each command's main,
that ends the process.

- `block()`: each command's first call, run as a script: Ctrl-C (SIGINT) and SIGTERM wait for `run`.
- `fail(message)`: one `error:` line on stderr, exit status 2 (or `code`), no traceback.
- `run(work, args, interrupted)`: a command's main around its work: bad input (`cli.InputError`) reported with
  `fail`; Ctrl-C or SIGTERM with one line, `interrupted: <interrupted>`, and exit status 128 + the signal
  (130, 143). Standard output (or error) that its reader closed (`| head`) does not stop the work: what is printed
  after is dropped, the files are written, the status is the work's. With `deferred=True`
  (train.py) signals are not raised but handed to `defer`'s handler.
- `defer(handler)`: from now on, hand each signal to handler(signum) (train.py's Guard, which stops after
  the current step and saves); `defer(None)`: hold them again.
- `temporary(path)`: a temporary folder removed if a signal must end the process at once.
- `quit_now(status)`: end at once (a second signal in training).

Why: MindSpore's runtime turns SIGINT into SIGTERM, which by default ends the process with status
143 and no word. So each command blocks both signals before it imports MindSpore (whose threads
inherit the mask), and `run` waits for them on a thread of its own. That thread raises
KeyboardInterrupt in the main thread (by SIGUSR1, which also breaks off a blocking call): `finally`
blocks clean up, and the command says what was left. Where MindSpore holds the main thread
(compiling a graph) the process ends at once instead, after removing the temporary files in flight.
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

SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
EXIT_INTERRUPTED = 128 + signal.SIGINT  # and 128 + SIGTERM = 143
WAKE_SIGNAL = signal.SIGUSR1  # how run's signal thread reaches the main thread, where the signals are blocked


def block():
    """Block Ctrl-C and SIGTERM in this thread and every thread started after (MindSpore's): `run` waits for them.
    A command's first call when it runs as a script, before it imports MindSpore."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def fail(message, code=2):
    """Report a problem the way every script does: one `error:` line, exit status 2 (bad input) or `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run(work, args, interrupted="", deferred=False):
    """work(args), as a command's main runs it: InputError as one `error:` line and exit status 2; Ctrl-C or
    SIGTERM as one line, `interrupted: <interrupted>` (what was kept or left), and exit status 128 + the signal.
    `deferred`: signals are handed to `defer`'s handler instead (held until one is given). Returns what work
    returns."""
    global _message, _deferred
    _message, _deferred = interrupted, deferred
    try:  # (a signal pending since the command started may be raised as soon as the thread runs)
        watched = SIGNALS & signal.pthread_sigmask(signal.SIG_BLOCK, [])
        if watched:
            signal.signal(WAKE_SIGNAL, _raise_interrupt)
            # (its line goes to the stderr of now: mindspore_log_quiet may have closed off fd 2 when it must be said)
            threading.Thread(target=_watch, args=(watched, threading.get_ident(), os.dup(2)), daemon=True,
                             name="signals").start()
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Discarding(sys.stdout), _Discarding(sys.stderr)
        try:
            result = work(args)
            sys.stdout.flush()  # (a reader gone away shows here, not in a traceback at exit)
        except cli.InputError as e:
            if not _interrupt.is_set():
                _raised.set()  # (the signal thread stands down: the error is reported, whole)
                fail(str(e))
        except Exception:
            if not _interrupt.is_set():
                _raised.set()
                raise
            # else: a library call broken off by the interrupt raised something of its own
        else:
            _raised.set()  # finished before a signal could stop it: nothing more to interrupt
            return result
        finally:
            sys.stdout, sys.stderr = streams
    except KeyboardInterrupt:
        pass
    _raised.set()
    print(_said(_message), file=_Discarding(sys.stderr), flush=True)
    raise SystemExit(128 + _signum)


class _Discarding:
    """sys.stdout or sys.stderr, as `run` wraps them: once the reader has gone away (`| head`), what is written is
    dropped (the file descriptor points to /dev/null), and the work goes on."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())
        os.close(null)
        self._stream.flush()  # (what was buffered goes to /dev/null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def defer(handler):
    """Hand each signal, from now on, to handler(signum), on the signal thread (None: hold them); signals held so
    far are handed over at once. For `run(..., deferred=True)`."""
    global _handler
    with _lock:
        _handler = handler
        held = list(_held) if handler else []
        _held.clear()
    for signum in held:
        handler(signum)


@contextlib.contextmanager
def temporary(path):
    """Within the block, the temporary folder `path` is removed if a signal must end the process at once."""
    _temporary.add(path)
    try:
        yield path
    finally:
        _temporary.discard(path)


_interrupt, _raised = threading.Event(), threading.Event()  # a signal stops the work; KeyboardInterrupt was raised
_message, _temporary, _signum = "", set(), signal.SIGINT
_deferred, _handler, _held, _lock = False, None, [], threading.Lock()
_spec = importlib.util.find_spec("mindspore")  # its folder, without importing it
MINDSPORE_DIR = os.path.dirname(_spec.origin) + os.sep if _spec and _spec.origin else "\0"  # ("\0": no file's)
PATIENCE_S = 1.0  # how long a signal waits for the main thread to leave MindSpore's code


def _said(message):
    """The one line a command ends with when a signal stopped it."""
    return f"interrupted: {message}" if _signum == signal.SIGINT else f"interrupted by SIGTERM: {message}"


def _watch(watched, main_thread, stderr):
    """Wait for a signal. Deferred, hand it to the handler (or hold it). Else signal the main thread every 0.1 s until
    it raised KeyboardInterrupt (each signal also breaks off a blocking call, a download's). If MindSpore keeps it for
    PATIENCE_S (compiling a graph, which cannot be broken off cleanly), remove the temporary files in flight and end
    the process at once."""
    global _signum
    while True:
        signum = signal.sigwait(watched)
        if not _deferred:
            break
        with _lock:
            handler = _handler
            if handler is None:
                _held.append(signum)
        if handler is not None:
            handler(signum)
    _signum = signum
    _interrupt.set()
    deadline = time.monotonic() + PATIENCE_S
    while not _raised.is_set():
        if time.monotonic() > deadline:
            for path in list(_temporary):
                shutil.rmtree(path, ignore_errors=True)
            sys.stderr.flush()
            with contextlib.suppress(OSError):  # (a reader gone away)
                os.write(stderr, f"{_said(_message)}\n".encode())
            os._exit(128 + signum)
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
