"""Checkpoint files: reading them safely, telling model kinds apart, naming series, resuming, writing atomically.

    >>> import checkpoint
    >>> net, config = checkpoint.load_network("checkpoints/resnet18_qat-40_1562.ckpt", num_classes=10)
    >>> checkpoint.kind(config)                       # "QAT", "QAT with --bn_fold" or "float32"
    >>> net.arch                                      # "resnet18": the network the checkpoint records

train.py names its checkpoints `<prefix>-<epoch>_<step of the epoch>[-interrupt].ckpt`, the
prefix `<arch>_qat` (QAT) or `<arch>` (float32), `resnet8_qat` say, with `_1`, `_2`, ... appended
when the save folder already holds another run's series. Every checkpoint records its network's
name (ARCH_RECORD; a file without it holds a resnet18). A training checkpoint holds the network,
the optimizer state and RUN_RECORDS; a run's `<prefix>-best.ckpt` holds the network only. Every file is written by
`write_atomically` and carries a CRC32 that `read` verifies.

Helpers raise `cli.InputError` for bad input (a missing, corrupt or foreign file); write
failures stay `OSError`/`RuntimeError` for the caller to report.
"""
import os
import re

import mindspore as ms
import numpy as np

from qatcifar import cli, files, networks, quant

NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)(?P<interrupt>-interrupt)?\.ckpt$")
RUN_RECORDS = ("epoch_num", "step_num", "steps_per_epoch", "learning_rate")  # besides the network and optimizer
OPTIMIZER_SLOTS = ("moment1", "moment2", "moments", "accum", "stat")  # Adam's, Momentum's, SGD's `<slot>.<name>`
TEACHER_PREFIX = "teacher."  # a distillation teacher's parameters (distill.py): in no checkpoint
ARCH_RECORD = "arch"  # the name of the network (networks.ARCHS), a string in every checkpoint train.py writes

# The kinds of model a checkpoint can hold: the one place for these labels.
FLOAT32, QAT, QAT_BN_FOLD = "float32", "QAT", "QAT with --bn_fold"


def kind(config):
    """The kind of model of a QuantConfig (None: float32)."""
    return FLOAT32 if config is None else QAT_BN_FOLD if config.bn_fold else QAT


def series_base(model_kind, arch=networks.DEFAULT_ARCH):
    """The checkpoint name prefix of a kind of model of a network, before any _1, _2 of later series."""
    return arch if model_kind == FLOAT32 else f"{arch}_qat"


def position(step, steps_per_epoch):
    """(epoch, step within the epoch), both counted from 1, of a step counted from 1 over the run."""
    return (step - 1) // steps_per_epoch + 1, (step - 1) % steps_per_epoch + 1


def file_name(prefix, step, steps_per_epoch, interrupt=False):
    epoch, step_in_epoch = position(step, steps_per_epoch)
    return f"{prefix}-{epoch}_{step_in_epoch}{'-interrupt' if interrupt else ''}.ckpt"


# --- reading ---------------------------------------------------------------------------------

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
    files.check_file(path, flag)
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


def load_network(path, num_classes, flag="-loc"):
    """The network a checkpoint given with `flag` holds (the one it records, QAT or float32 as its parameters say),
    loaded strictly, in eval mode; and its QuantConfig (None: float32)."""
    params = load(path, flag)
    if not params:
        raise cli.InputError(f"{path} holds no parameters; give a .ckpt file written by train.py")
    config = quant_config(path, params)
    name = arch(path, params)
    net = networks.resnet(name, num_classes)
    if config is not None:
        net = quant.quantize(net, config)
        quant.add_unrecorded_bits(params, net.get_parameters())
    own = dict(net.parameters_and_names())
    # Besides the network's parameters a training checkpoint holds optimizer state: slots named
    # `<slot>.<parameter>` (moment1.conv1.weight) and undotted scalars (global_step, epoch_num).
    # Any other dotted name belongs to another network.
    mismatch = describe_mismatch(own, params, ignored=lambda name: "." not in name or name.split(".", 1)[1] in own)
    if mismatch:
        raise cli.InputError(f"{path} does not match {name} ({kind(config)}), the network it records: {mismatch}; "
                             "give a checkpoint written by train.py")
    check_values(path, {name: params[name] for name in own}, "" if flag == "-loc" else flag)
    ms.load_param_into_net(net, params, strict_load=True)
    net.set_train(False)
    return net, config


def check_values(path, params, flag=""):
    """InputError, before use, for a network's parameters ({name: Parameter}) that cannot give finite class scores:
    values that are not finite, a learned step size outside quant.LOG_STEP_RANGE (its exponential is 0 or infinite,
    or no weight or activation here comes near it), a BatchNorm variance below 0 (its square root is NaN)."""
    low, high = quant.LOG_STEP_RANGE
    for name, param in params.items():
        values = param.asnumpy()
        if not np.issubdtype(values.dtype, np.floating):
            continue
        slot = name.split(".", 1)[0] in OPTIMIZER_SLOTS  # (an optimizer's state of the parameter, not the parameter)
        problem = ("holds values that are not finite (NaN or infinity)" if not np.isfinite(values).all() else
                   None if slot else
                   f"is a learned step size's logarithm outside [{low:g}, {high:g}] (step sizes "
                   f"{np.exp(low):.0e} to {np.exp(high):.0e})"
                   if name.endswith(quant.LSQ_SUFFIX) and ((values < low) | (values > high)).any() else
                   "is a BatchNorm variance below 0" if name.endswith("moving_variance") and (values < 0).any()
                   else None)
        if problem:
            raise cli.InputError(f"{flag}{' ' if flag else ''}{path}: parameter {name} {problem}; the file is damaged, "
                                 "or its run diverged: give a checkpoint saved before")


def arch(path, params):
    """The name of the network a checkpoint's parameters record (resnet18 when they record none); InputError for a
    record this version does not build."""
    name = params.get(ARCH_RECORD, networks.DEFAULT_ARCH)
    if not isinstance(name, str) or name not in networks.ARCHS:
        shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
        raise cli.InputError(f"{path} records the network {shown[:60]}, not one this version builds "
                             f"({', '.join(networks.ARCHS)}); give a checkpoint written by train.py")
    return name


def network_arch(cell):
    """The `arch` of the networks.ResNet inside a cell (a training step, say), or None."""
    return next((c.arch for name, c in cell.cells_and_names()
                 if isinstance(c, networks.ResNet) and "teacher" not in name.split(".")), None)


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
        raise cli.InputError(f"--resume {path} holds no training state (<prefix>-best.ckpt and exported models keep "
                             "only the network); resume from a periodic checkpoint, <prefix>-<epoch>_<step>.ckpt")
    settings = "resume with the checkpoint's settings (see its <prefix>-args.json beside it)"
    trained_as = kind(quant_config(path, params))
    if trained_as != model_kind:
        raise cli.InputError(f"--resume {path} was trained as {trained_as}, but this run trains {model_kind}; "
                             f"{settings}")
    delays = {int(value.asnumpy()) for name, value in params.items() if name.endswith(".quant_delay")}
    if delays and delays != {quant_delay}:
        raise cli.InputError(f"--resume {path} was trained with --quant_delay {min(delays)}, this run has "
                             f"{quant_delay}; {settings}")
    own = {p.name: p for p in train_net.get_parameters() if p.name != "learning_rate" and trained(p.name)}
    quant.add_unrecorded_bits(params, own.values())  # (not a distillation teacher's: it is in no checkpoint)
    mismatch = describe_mismatch(own, params, ignored=lambda name: name in RUN_RECORDS + (ARCH_RECORD,))
    if mismatch:
        raise cli.InputError(f"--resume {path} does not match this run's network and optimizer: {mismatch}; "
                             "resume with the checkpoint's -opt and settings (see args.json beside it)")
    check_values(path, {name: params[name] for name in own}, "--resume")
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

def save(net, path, records):
    """A checkpoint of `net` (its parameters, and an optimizer's when `net` is a training step) plus
    `records` ({name: number}) and the network's name (ARCH_RECORD), with a CRC32, written atomically; mode
    0400, as MindSpore writes it."""
    name = network_arch(net)
    records = {**records, ARCH_RECORD: name} if name else records
    files.write_atomically(path, lambda tmp: ms.save_checkpoint(net, tmp, append_dict=records, crc_check=True,
                                                                choice_func=trained))


def trained(name):
    """Whether a parameter of a training step is the run's own: not a distillation teacher's (distill.py)."""
    return not name.startswith(TEACHER_PREFIX)


def save_parameters(params, path):
    """Write parameters as `read` returns them ({name: Parameter, or a str record such as ARCH_RECORD}) to a
    checkpoint at `path` (for tools and tests that edit checkpoints)."""
    ms.save_checkpoint([{"name": name, "data": value} for name, value in params.items() if not isinstance(value, str)],
                       path, append_dict={name: value for name, value in params.items() if isinstance(value, str)})
