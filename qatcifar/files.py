"""Writing files, atomically, and the save folder: everything the toolkit writes goes through here (no MindSpore).

- `write_atomically(path, write)`: write(tmp) into a hidden `.partial-<pid>` folder beside `path`,
  flush it to disk, rename it into place; a crash leaves the old file or the whole new one
  (`write_folder_atomically`: the same for a folder of files).
  Folders of writes a dead process left (`remove_stale_partials`) are removed by the next write there.
- `check_new_file`, `check_new_folder`, `check_save_dir`: an output checked before any work (never one of the
  command's inputs);
  `output(path, flag)`: a failure to write it (a full disk) as one InputError; `why(error)`: the few words that
  say why.
- `read_small`, `load_json`: the small files the toolkit reads, regular files only, bounded in size and nesting.
- `lock_save_dir`: one train.py run per save folder (flock, released when the process ends).
"""
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile

from qatcifar import cli, interrupts

PARTIAL = re.compile(r"\.partial-(?P<pid>\d+)")  # write_atomically's temporary folders
# train.py's checkpoints and best network, and the models export.py writes beside them under their names
MODEL_NAME = re.compile(r"^(?P<prefix>.+)-(?:\d+_\d+(?:-interrupt)?|best)"
                        r"(?:\.ckpt|\.int8\.npz|\.onnx|\.tflite|\.mindir|_c)$")  # (_c: a C folder)


class RunFiles:
    """The files of one train.py run in its save folder, named after the run's checkpoint prefix (resnet8_qat_1):
    `<prefix>-best.ckpt` (its best validated network), `<prefix>-metrics.jsonl` (a record per epoch),
    `<prefix>-curves.png` and `<prefix>-args.json`. A folder holds several runs; none reads or replaces another's."""
    SUFFIXES = {"best": "-best.ckpt", "metrics": "-metrics.jsonl", "curves": "-curves.png", "args": "-args.json"}

    def __init__(self, savedir, prefix):
        self.savedir, self.prefix = savedir, prefix
        for what, suffix in self.SUFFIXES.items():
            setattr(self, what, os.path.join(savedir, f"{prefix}{suffix}"))

    @classmethod
    def of_metrics(cls, path):
        """The run whose metrics file is `path`."""
        folder, name = os.path.split(path)
        return cls(folder, name[:-len(cls.SUFFIXES["metrics"])])

    @classmethod
    def of_model(cls, path):
        """The run that wrote a checkpoint (`<prefix>-<epoch>_<step>.ckpt`, `<prefix>-best.ckpt`) or a model exported
        beside it under its name (`<prefix>-2_32.int8.npz`, `.onnx`, `.mindir`, the C folder `_c`), or None."""
        folder, name = os.path.split(path.rstrip(os.sep) or path)
        match = MODEL_NAME.match(name)
        return cls(folder, match["prefix"]) if match else None

    def settings(self):
        """The run's settings (its args.json) as a dict; {} where it is missing or unreadable."""
        try:
            settings = load_json(self.args)
        except (OSError, ValueError):
            return {}
        return settings if isinstance(settings, dict) else {}

    @classmethod
    def in_folder(cls, savedir):
        """The runs of a save folder that have a metrics file, in the order their prefixes sort."""
        suffix = cls.SUFFIXES["metrics"]
        return [cls(savedir, name[:-len(suffix)]) for name in sorted(os.listdir(savedir))
                if name.endswith(suffix) and len(name) > len(suffix)]


def write_atomically(path, write, mode=None, overwrite=True):
    """Call write(tmp) to write a file at the path tmp, flush it to disk, then rename it to `path`.

    tmp lies in a hidden folder beside `path`, `.partial-<pid>`, which is removed afterwards,
    whatever happens: a crash leaves the previous file or the complete new one, never a partial
    file under the final name (and the folders dead processes left there are removed first).
    `mode`: the file's permissions, when not what `write` made. With overwrite=False the file is
    linked into place, which fails with FileExistsError if `path` exists, even when another
    process created it meanwhile. Raises what writing raises.
    """
    directory = os.path.dirname(path) or "."
    folder = os.path.join(directory, f".partial-{os.getpid()}")
    tmp = os.path.join(folder, os.path.basename(path))
    with contextlib.suppress(OSError):
        remove_stale_partials(directory)  # (left by a process killed while it wrote here)
    with interrupts.temporary(folder):  # (removed also when a signal must end a script at once: see interrupts.run)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)  # (not makedirs: a save folder removed meanwhile is an error, not made anew)
            with cli.mindspore_log_quiet(native=False):  # what fails is raised, and reported once by the caller
                write(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # the rename itself
            finally:
                os.close(descriptor)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_folder_atomically(path, write, overwrite=False):
    """write(tmp) fills a new folder tmp (in a `.partial-<pid>` folder beside `path`), whose files are flushed to disk
    and which is then renamed to `path`: a crash leaves no folder, or the previous one, or the whole new one. An
    existing `path` is replaced only with `overwrite` (moved aside, then removed; put back if the rename fails);
    without it, FileExistsError. Raises what writing raises."""
    directory = os.path.dirname(os.path.abspath(path))
    folder = os.path.join(directory, f".partial-{os.getpid()}")
    tmp, old = os.path.join(folder, os.path.basename(path)), os.path.join(folder, ".replaced")
    with contextlib.suppress(OSError):
        remove_stale_partials(directory)
    with interrupts.temporary(folder):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
            os.mkdir(tmp)
            write(tmp)
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o755)
            if os.path.lexists(path):
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "exists", path)
                os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                if os.path.lexists(old):
                    os.rename(old, path)
                raise
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_array(path, array):
    """An array's bytes into a new file (numpy's tofile says "N requested and 0 written" where the disk is full;
    this raises the OSError that says why)."""
    with open(path, "wb") as f:
        f.write(array.tobytes())


def why(error):
    """Why reading or writing failed, in a few words: the system's reason (No space left on device), else the
    message's first line."""
    return error.strerror if isinstance(error, OSError) and error.strerror else cli.first_line(error)


@contextlib.contextmanager
def output(path, flag):
    """Within the block, a failure to write the output file `path` (a full disk, a folder gone) is an InputError
    that names it and `flag`; nothing was written under its name (write_atomically)."""
    try:
        yield path
    except FileExistsError:
        raise cli.InputError(f"{path} appeared meanwhile; give another {flag}, or add --overwrite") from None
    except OSError as e:
        raise cli.InputError(f"cannot write {path} ({why(e)}); free space or give another {flag}") from None


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def append_line(path, line):
    """Append a line to a text file by writing the file anew, atomically: a full disk leaves the old file whole,
    never a partial line. (For small files: metrics.jsonl grows by one line an epoch.)"""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    if old and not old.endswith(b"\n"):
        old += b"\n"

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(old + line.encode() + b"\n")
    write_atomically(path, write)


def check_new_file(path, flag, overwrite, reads=(), suffix=None):
    """Before any work, for an output file given with `flag`: raise InputError unless `path` ends in `suffix` (when
    given), names a file (not a folder) in an existing, writable folder, is none of the inputs the command reads,
    and is new unless `overwrite`. `reads`: (path, what) pairs, `what` saying it ("the model file"); a folder among
    them (the -data folder) refuses every path inside it. The inputs are refused with --overwrite too: the one
    place where every command's outputs are kept off its inputs."""
    if os.path.isdir(path):
        raise cli.InputError(f"{flag} {path} is a folder; give a file name")
    check_not_input(path, flag, reads)
    if suffix and not path.endswith(suffix):
        raise cli.InputError(f"{flag} {path} must end in {suffix}; give a {suffix} file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise cli.InputError(f"{flag}: folder {folder} does not exist; create it or give another path")
    if os.path.lexists(path) and not overwrite:
        raise cli.InputError(f"{flag} {path} exists; give another {flag}, or add --overwrite to replace it")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise cli.InputError(f"cannot write into {folder} ({e.strerror}); give a writable {flag}") from None


def check_new_folder(path, flag, overwrite, reads=(), replaceable=lambda path: False):
    """Before any work, for an output folder given with `flag`: raise InputError unless `path` is none of the inputs
    (check_not_input), lies in an existing, writable folder, and is new, or with `overwrite` a folder that
    replaceable(path) says this command wrote (never one of other files)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise cli.InputError(f"{flag} {path} is a file; give the name of a new folder")
    check_not_input(path, flag, reads)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise cli.InputError(f"{flag}: folder {parent} does not exist; create it or give another path")
    if os.path.lexists(path) and not overwrite:
        raise cli.InputError(f"{flag} {path} exists; give another {flag}, or add --overwrite to replace it")
    if os.path.lexists(path) and not replaceable(path):
        raise cli.InputError(f"{flag} {path} is a folder this command did not write; --overwrite replaces only "
                             f"those: give another {flag}")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise cli.InputError(f"cannot write into {parent} ({e.strerror}); give a writable {flag}") from None


def check_not_input(path, flag, reads):
    """InputError if the output `path` (a file or a folder) is one of `reads` ((path, what) pairs), holds one, or lies
    inside one that is a folder; links followed, hard links recognized."""
    target = os.path.realpath(path)
    for source, what in reads:
        if not source:
            continue
        real = os.path.realpath(source)
        same = target == real or (os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source))
        if same:
            raise cli.InputError(f"{flag} {path} is {what}, which this command reads; give another path")
        if _inside(target, real) and os.path.isdir(source):
            raise cli.InputError(f"{flag} {path} lies inside {what} {source}, which this command reads; give a path "
                                 "outside it")
        if _inside(real, target):
            raise cli.InputError(f"{flag} {path} holds {what} {source}, which this command reads; give another "
                                 "folder")


def _inside(path, folder):
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_save_dir(path, flag="-dir"):
    """Raise InputError, before any work, if checkpoints (or, with `flag` --summary_dir, event files) cannot be
    written into the folder `path`; create it."""
    what = "save directory" if flag == "-dir" else flag
    if os.path.exists(path) and not os.path.isdir(path):
        raise cli.InputError(f"{what} {path} is a file; give a folder with {flag}")
    try:
        _make_folders(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise cli.InputError(f"cannot write to {what} {path} ({e.strerror}); "
                             f"give a writable folder with {flag}") from None


_created = []  # the folders check_save_dir made, parents first


def _make_folders(path):
    """os.makedirs(path), remembering the folders it makes for remove_created_folders."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    _created.extend(missing)


def remove_created_folders():
    """Remove the folders check_save_dir made that are still empty (a run refused or stopped before it wrote
    anything leaves nothing behind): train.main, at its end."""
    while _created:
        with contextlib.suppress(OSError):  # (not empty: kept)
            os.rmdir(_created.pop())


_locks = []  # the open save folders of this process: the OS releases their locks when it ends, however it ends


def lock_save_dir(folder):
    """Hold an exclusive lock (flock) on the save folder itself for the rest of this process's life: no file is
    written for it. InputError naming the holder's process id when another run has it."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise cli.InputError(f"save directory {folder} is in use by another train.py run (process "
                             f"{lock_holder(folder)}); wait for it to end, or give another -dir") from None
    except OSError as e:  # a file system without locks (some network ones)
        os.close(descriptor)
        print(f"warning: cannot lock save directory {folder} ({e.strerror}); nothing stops a second run into it")
        return
    _locks.append(descriptor)


def release_locks():
    """Release this process's save-folder locks (train.main, at its end: a test runs several in one process)."""
    while _locks:
        os.close(_locks.pop())


def lock_holder(folder):
    """The process id holding a flock on folder, from /proc/locks (Linux), or "unknown"."""
    status = os.stat(folder)
    key = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks") as f:
            for fields in map(str.split, f):
                if "FLOCK" in fields and key in fields:
                    return fields[fields.index(key) - 1]
    except OSError:
        pass
    return "unknown"


def remove_stale_partials(folder):
    """Remove the temporary folders of writes cut short by a crash (their process is gone)."""
    for name in os.listdir(folder):
        match = PARTIAL.fullmatch(name)
        if match and not _process_alive(int(match["pid"])):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_SMALL_FILE = 1_000_000  # bytes: the JSON and text files the toolkit reads (--layer_bits, args.json, ...)
MAX_METRICS_FILE = 50_000_000  # a metrics record is about 300 bytes: 150,000 epochs


def read_small(path, limit=MAX_SMALL_FILE):
    """The bytes of a regular file of at most `limit` bytes; OSError whose strerror says why for anything else (a
    FIFO, a device such as /dev/zero, a folder, a larger file). Never blocks in open() (O_NONBLOCK: a FIFO without
    a writer) and never reads more than limit + 1 bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(os.dup(descriptor), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes")
    return data


def load_json(path, limit=MAX_SMALL_FILE):
    """The JSON value of a small file (read_small); OSError as there, ValueError for text that is not JSON (UTF-8),
    nesting too deep included."""
    data = read_small(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def check_file(path, flag="-loc"):
    """Raise InputError unless `path` is a non-empty file."""
    for problem, found in (("does not exist", not os.path.exists(path)), ("is not a file", not os.path.isfile(path)),
                           ("is an empty file", os.path.isfile(path) and os.path.getsize(path) == 0)):
        if found:
            raise cli.InputError(f"model file {path} {problem}; give a checkpoint written by train.py (or a model "
                                 f"written by export.py) with {flag}")
