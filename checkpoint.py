"""Checkpoint files: reading them safely, telling model kinds apart, naming series, resuming, writing atomically.

    >>> import checkpoint
    >>> net, config = checkpoint.load_network("checkpoints/resnet18_qat-40_1562.ckpt", num_classes=10)
    >>> checkpoint.kind(config)                       # "QAT", "QAT with --bn_fold" or "float32"
    >>> net.arch                                      # "resnet18": the network the checkpoint records

train.py names its checkpoints `<prefix>-<epoch>_<step of the epoch>[-interrupt].ckpt`, the
prefix `<arch>_qat` (QAT) or `<arch>` (float32), `resnet8_qat` say, with `_1`, `_2`, ... appended
when the save folder already holds another run's series. Every checkpoint records its network's
name (ARCH_RECORD; a file without it holds a resnet18). A training checkpoint holds the network,
the optimizer state and RUN_RECORDS; `best.ckpt` holds the network only. Every file is written by
`write_atomically` and carries a CRC32 that `read` verifies.

Helpers raise `cli.InputError` for bad input (a missing, corrupt or foreign file); write
failures stay `OSError`/`RuntimeError` for the caller to report.
"""
import contextlib
import fcntl
import os
import re
import shutil
import tempfile

import mindspore as ms

import cli
import quant
import resnetv2

NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)(?P<interrupt>-interrupt)?\.ckpt$")
BEST_FILE = "best.ckpt"
RUN_RECORDS = ("epoch_num", "step_num", "steps_per_epoch", "learning_rate")  # besides the network and optimizer
ARCH_RECORD = "arch"  # the name of the network (resnetv2.ARCHS), a string in every checkpoint train.py writes
PARTIAL = re.compile(r"\.partial-(?P<pid>\d+)")  # write_atomically's temporary folders

# The kinds of model a checkpoint can hold: the one place for these labels.
FLOAT32, QAT, QAT_BN_FOLD = "float32", "QAT", "QAT with --bn_fold"


def kind(config):
    """The kind of model of a QuantConfig (None: float32)."""
    return FLOAT32 if config is None else QAT_BN_FOLD if config.bn_fold else QAT


def series_base(model_kind, arch=resnetv2.DEFAULT_ARCH):
    """The checkpoint name prefix of a kind of model of a network, before any _1, _2 of later series."""
    return arch if model_kind == FLOAT32 else f"{arch}_qat"


def position(step, steps_per_epoch):
    """(epoch, step within the epoch), both counted from 1, of a step counted from 1 over the run."""
    return (step - 1) // steps_per_epoch + 1, (step - 1) % steps_per_epoch + 1


def file_name(prefix, step, steps_per_epoch, interrupt=False):
    epoch, step_in_epoch = position(step, steps_per_epoch)
    return f"{prefix}-{epoch}_{step_in_epoch}{'-interrupt' if interrupt else ''}.ckpt"


# --- reading ---------------------------------------------------------------------------------

def check_file(path, flag="-loc"):
    """Raise InputError unless `path` is a non-empty file."""
    for problem, found in (("does not exist", not os.path.exists(path)), ("is not a file", not os.path.isfile(path)),
                           ("is an empty file", os.path.isfile(path) and os.path.getsize(path) == 0)):
        if found:
            raise cli.InputError(f"model file {path} {problem}; give a checkpoint written by train.py (or a model "
                                 f"written by export.py) with {flag}")


UNREADABLE = (ValueError, RuntimeError, TypeError, OSError)  # what `read` raises for a file that does not load


def read(path, **options):
    """ms.load_checkpoint, verifying the file's CRC32 when it has one (train.py writes one).

    MindSpore reports a wrong CRC as a failed read ("may not have permission"); this says so.
    Raises one of UNREADABLE for a file that does not load.
    """
    with cli.mindspore_log_quiet():  # MindSpore logs each failed read as an ERROR line; the caller reports it
        try:
            return ms.load_checkpoint(path, crc_check=True, **options)
        except ValueError as error:
            try:
                ms.load_checkpoint(path, **options)
            except UNREADABLE:
                raise error from None
            raise ValueError("its CRC32 does not match its contents: the file is corrupt") from None


def load(path, flag="-loc"):
    """The parameters of a checkpoint given with `flag`; InputError if it is missing or does not load."""
    check_file(path, flag)
    try:
        return read(path)
    except UNREADABLE as e:
        raise cli.InputError(f"{flag} {path} is not a readable MindSpore checkpoint ({cli.first_line(e)}); "
                             "give a .ckpt file written by train.py") from None


def describe_mismatch(own, params, ignored):
    """'' when every parameter of `own` ({name: Parameter}) is in the checkpoint with its shape and dtype and the
    checkpoint holds nothing else but names that `ignored(name)` accepts; else what differs."""
    missing = [name for name in own if name not in params]
    reshaped = [f"{name} {tuple(params[name].shape)} instead of {tuple(param.shape)}" for name, param in own.items()
                if name in params and tuple(params[name].shape) != tuple(param.shape)]
    reshaped += [f"{name} {params[name].dtype} instead of {param.dtype}" for name, param in own.items()
                 if name in params and tuple(params[name].shape) == tuple(param.shape)
                 and params[name].dtype != param.dtype]
    unexpected = [name for name in params if name not in own and not ignored(name)]
    problems = []
    for label, names in (("missing", missing), ("of another shape or type", reshaped), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} parameters {label} (e.g. {', '.join(names[:3])})")
    return "; ".join(problems)


def load_network(path, num_classes):
    """The network a checkpoint holds (the one it records, QAT or float32 as its parameters say), loaded strictly,
    in eval mode; and its QuantConfig (None: float32)."""
    params = load(path)
    if not params:
        raise cli.InputError(f"{path} holds no parameters; give a .ckpt file written by train.py")
    config = quant_config(path, params)
    name = arch(path, params)
    net = resnetv2.resnet(name, num_classes)
    if config is not None:
        net = quant.quantize(net, config)
        quant.add_unrecorded_bits(params, net)
    own = dict(net.parameters_and_names())
    # Besides the network's parameters a training checkpoint holds optimizer state: slots named
    # `<slot>.<parameter>` (moment1.conv1.weight) and undotted scalars (global_step, epoch_num).
    # Any other dotted name belongs to another network.
    mismatch = describe_mismatch(own, params, ignored=lambda name: "." not in name or name.split(".", 1)[1] in own)
    if mismatch:
        raise cli.InputError(f"{path} does not match {name} ({kind(config)}), the network it records: {mismatch}; "
                             "give a checkpoint written by train.py")
    ms.load_param_into_net(net, params, strict_load=True)
    net.set_train(False)
    return net, config


def arch(path, params):
    """The name of the network a checkpoint's parameters record (resnet18 when they record none); InputError for a
    record this version does not build."""
    name = params.get(ARCH_RECORD, resnetv2.DEFAULT_ARCH)
    if not isinstance(name, str) or name not in resnetv2.ARCHS:
        shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
        raise cli.InputError(f"{path} records the network {shown[:60]}, not one this version builds "
                             f"({', '.join(resnetv2.ARCHS)}); give a checkpoint written by train.py")
    return name


def network_arch(cell):
    """The `arch` of the resnetv2.ResNet inside a cell (a training step, say), or None."""
    return next((c.arch for _, c in cell.cells_and_names() if isinstance(c, resnetv2.ResNet)), None)


def quant_config(path, params):
    """quant.config_from_checkpoint, its ValueError an InputError naming the file."""
    try:
        return quant.config_from_checkpoint(params)
    except ValueError as e:
        raise cli.InputError(f"{path} cannot be loaded: {e}; give a checkpoint written by train.py") from None


# --- series and resuming ---------------------------------------------------------------------

def series(savedir, prefix):
    """The names of <prefix>-<epoch>_<step>.ckpt files in savedir, oldest first."""
    found = [(int(m["epoch"]), int(m["step"]), name) for name in os.listdir(savedir)
             for m in [NAME.match(name)] if m and m["prefix"] == prefix]
    return [name for _, _, name in sorted(found)]


def series_prefix(savedir, base, resumed=None):
    """The file-name prefix of a run's checkpoints.

    A run resumed from the newest checkpoint of a series in the save directory (`resumed`, its
    path) continues that series. Otherwise, as MindSpore's ModelCheckpoint does, a folder that
    already holds <base>-* files gets base_1, base_2, ...: an earlier run's checkpoints are never
    overwritten.
    """
    if resumed:
        folder, name = os.path.split(os.path.abspath(resumed))
        match = NAME.match(name)
        if match and folder == os.path.abspath(savedir) and series(savedir, match["prefix"])[-1] == name:
            return match["prefix"]
    names, prefix, n = os.listdir(savedir), base, 0
    while any(name.startswith(prefix + "-") for name in names):
        n += 1
        prefix = f"{base}_{n}"
    return prefix


def newest_first(folder):
    """The paths of the periodic and interrupt checkpoints in folder (files, not broken links), newest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []  # (a data-parallel worker on another host)
    paths = [os.path.join(folder, name) for name in names if NAME.match(name)]
    return sorted((path for path in paths if os.path.isfile(path)), key=os.path.getmtime, reverse=True)


def find_resume(spec, savedir):
    """(path, parameters) of --resume PATH, or with `auto` of the newest loadable training checkpoint in savedir.

    `auto` skips, with a warning, checkpoints that do not load; with none to resume it returns None
    and training starts from the beginning.
    """
    if spec != "auto":
        return spec, load(spec, "--resume")
    for path in newest_first(savedir):
        try:
            return path, read(path)
        except UNREADABLE as e:
            print(f"warning: --resume auto skips {path}: it does not load ({cli.first_line(e)})", flush=True)
    print(f"note: --resume auto found no checkpoint to resume in {savedir}; training from the start", flush=True)
    return None


def load_training_state(train_net, path, params, model_kind, quant_delay, steps_per_epoch, epochs):
    """Load a checkpoint's training state into train_net after checking that it is this run's; return its step.

    This run: a `model_kind` network trained with `quant_delay`, `steps_per_epoch` steps per epoch
    for `epochs` epochs in all, and train_net's optimizer.
    """
    if "step_num" not in params or "steps_per_epoch" not in params:
        raise cli.InputError(f"--resume {path} holds no training state (best.ckpt and exported models keep only the "
                             "network); resume from a periodic checkpoint, <prefix>-<epoch>_<step>.ckpt")
    settings = "resume with the checkpoint's settings (see args.json beside it)"
    trained_as = kind(quant_config(path, params))
    if trained_as != model_kind:
        raise cli.InputError(f"--resume {path} was trained as {trained_as}, but this run trains {model_kind}; "
                             f"{settings}")
    delays = {int(value.asnumpy()) for name, value in params.items() if name.endswith(".quant_delay")}
    if delays and delays != {quant_delay}:
        raise cli.InputError(f"--resume {path} was trained with --quant_delay {min(delays)}, this run has "
                             f"{quant_delay}; {settings}")
    own = {p.name: p for p in train_net.get_parameters() if p.name != "learning_rate"}
    quant.add_unrecorded_bits(params, train_net)
    mismatch = describe_mismatch(own, params, ignored=lambda name: name in RUN_RECORDS + (ARCH_RECORD,))
    if mismatch:
        raise cli.InputError(f"--resume {path} does not match this run's network and optimizer: {mismatch}; "
                             "resume with the checkpoint's -opt and settings (see args.json beside it)")
    step, saved_steps = int(params["step_num"].asnumpy()), int(params["steps_per_epoch"].asnumpy())
    if saved_steps != steps_per_epoch:
        raise cli.InputError(f"--resume {path} was trained with {saved_steps} steps per epoch, this run has "
                             f"{steps_per_epoch}; resume with the checkpoint's -bsize, -repeatNum, --num_samples "
                             "and number of workers")
    if step >= epochs * steps_per_epoch:
        raise cli.InputError(f"--resume {path} has already trained {step // steps_per_epoch} epochs; "
                             "ask for more with -e")
    ms.load_param_into_net(train_net, {name: params[name] for name in own}, strict_load=True)
    return step


# --- writing ---------------------------------------------------------------------------------

def write_atomically(path, write, mode=None, overwrite=True):
    """Call write(tmp) to write a file at the path tmp, flush it to disk, then rename it to `path`.

    tmp lies in a hidden folder beside `path`, `.partial-<pid>`, which is removed afterwards,
    whatever happens: a crash leaves the previous file or the complete new one, never a partial
    file under the final name (and `remove_stale_partials` clears a dead process's folder).
    `mode`: the file's permissions, when not what `write` made. With overwrite=False the file is
    linked into place, which fails with FileExistsError if `path` exists, even when another
    process created it meanwhile. Raises what writing raises.
    """
    directory = os.path.dirname(path) or "."
    folder = os.path.join(directory, f".partial-{os.getpid()}")
    tmp = os.path.join(folder, os.path.basename(path))
    with cli.temporary(folder):  # (removed also when Ctrl-C must end a script at once: see cli.run)
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


def save(net, path, records):
    """A checkpoint of `net` (its parameters, and an optimizer's when `net` is a training step) plus
    `records` ({name: number}) and the network's name (ARCH_RECORD), with a CRC32, written atomically; mode
    0400, as MindSpore writes it."""
    name = network_arch(net)
    records = {**records, ARCH_RECORD: name} if name else records
    write_atomically(path, lambda tmp: ms.save_checkpoint(net, tmp, append_dict=records, crc_check=True))


def save_parameters(params, path):
    """Write parameters as `read` returns them ({name: Parameter, or a str record such as ARCH_RECORD}) to a
    checkpoint at `path` (for tools and tests that edit checkpoints)."""
    ms.save_checkpoint([{"name": name, "data": value} for name, value in params.items() if not isinstance(value, str)],
                       path, append_dict={name: value for name, value in params.items() if isinstance(value, str)})


def check_new_file(path, flag, overwrite, source=None, source_label=""):
    """Before any work, for an output file given with `flag`: raise InputError unless `path` names a file (not a
    folder) in an existing, writable folder, is not `source` (a file being read, if any: `source_label`), and is
    new unless `overwrite`."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise cli.InputError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise cli.InputError(f"{flag}: folder {folder} does not exist; create it or give another path")
    if source and os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise cli.InputError(f"{flag} {path} is {source_label}; give another path")
    if os.path.lexists(path) and not overwrite:
        raise cli.InputError(f"{flag} {path} exists; give another {flag}, or add --overwrite to replace it")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise cli.InputError(f"cannot write into {folder} ({e.strerror}); give a writable {flag}") from None


def check_save_dir(path, flag="-dir"):
    """Raise InputError, before any work, if checkpoints (or, with `flag` --summary_dir, event files) cannot be
    written into the folder `path`; create it."""
    what = "save directory" if flag == "-dir" else flag
    if os.path.exists(path) and not os.path.isdir(path):
        raise cli.InputError(f"{what} {path} is a file; give a folder with {flag}")
    for name in ("args.json", "metrics.jsonl", BEST_FILE):  # files train.py writes, folders here by mistake
        if os.path.isdir(os.path.join(path, name)):
            raise cli.InputError(f"{os.path.join(path, name)} is a folder, where train.py writes a file; move it away "
                                 "or give another -dir")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise cli.InputError(f"cannot write to {what} {path} ({e.strerror}); "
                             f"give a writable folder with {flag}") from None


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
