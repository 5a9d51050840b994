"""Train ResNet-18 on CIFAR-10 with quantization-aware training (QAT), in MindSpore, on CPU or GPU.

    python train.py                                              # the seed's run: QAT, Adam, 40 epochs
    python train.py -bsize 128 -e 40 -opt momentum -lr 0.05      # the seed's flags
    python train.py -data data/demo -e 2 --num_samples 1024      # a quick trial on synthetic data
    msrun --worker_num=4 --local_worker_num=4 --join=True train.py --scale_lr   # data parallel on 4 GPUs

Writes `<prefix>-<epoch>_<step>.ckpt` after every epoch into the save directory (-dir,
default checkpoints/), `args.json` with the resolved arguments, appends one line per epoch
to `metrics.jsonl`, and prints the final checkpoint's path; `python eval.py -loc <that path>`
evaluates it.
"""
import signal

if __name__ == "__main__":
    # Before MindSpore starts threads, which inherit this mask: Ctrl-C stays pending until Guard
    # takes it between steps. (MindSpore's graph runtime would turn SIGINT into SIGTERM.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import cli  # noqa: F401,E402  (first: quiets MindSpore's log before it loads)

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np
from mindspore.train import Callback, Model

import eval as evaluate
import parallel
import preprocess
import quant
from quant import QuantConfig, quantize
from resnetv2 import resnet18

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)(?P<interrupt>-interrupt)?\.ckpt$")
EXIT_SAVE_FAILED, EXIT_DIVERGED = 1, 3  # and 2 for bad input, 128 + the signal when interrupted
RUN_RECORDS = ("epoch_num", "step_num", "steps_per_epoch", "learning_rate")  # besides the network and optimizer
BEST_FILE = "best.ckpt"
VALIDATION_BATCH = 100


def adam(groups, lr, args):
    return nn.Adam(groups, learning_rate=lr)


def momentum(groups, lr, args):
    return nn.Momentum(groups, learning_rate=lr, momentum=args.momentum)


def sgd(groups, lr, args):
    return nn.SGD(groups, learning_rate=lr, momentum=args.momentum, nesterov=args.momentum > 0)


OPTIMIZERS = {"adam": adam, "momentum": momentum, "sgd": sgd}
SCHEDULES = ("constant", "cosine", "onecycle")


def get_args_parser():
    parser = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    # The seed's flags, both spellings, as in its usage text.
    parser.add_argument("-bsize", "--batchsize", type=cli.positive_int, default=32,
                        help="batch size per device: under msrun, per worker (the global batch is "
                             "workers x this)")
    parser.add_argument("-repeatNum", "--repeatNum", type=cli.positive_int, default=1,
                        help="repeat num: passes over the data in one epoch")
    parser.add_argument("-dir", "--savedir", default="checkpoints", help="save directory")
    parser.add_argument("-e", "--epoch", type=cli.positive_int, default=40, help="no of epochs")
    parser.add_argument("-opt", "--optimizer", type=str.lower, choices=sorted(OPTIMIZERS), default="adam",
                        metavar="OPTIMIZER", help="optimizer: adam, momentum, or sgd (Nesterov SGD)")
    parser.add_argument("-lr", "--learningRate", type=cli.positive_float, default=0.001, help="learning rate")
    parser.add_argument("-m", "--momentum", type=cli.unit_interval, default=0.9,
                        help="momentum of -opt momentum and sgd, in [0, 1)")
    parser.add_argument("-wDecay", "--weightDecay", type=cli.non_negative_float, default=1e-4,
                        help="weight decay (L2) of conv and dense weights")
    # Ours.
    parser.add_argument("-data", "--data_dir", default=preprocess.DEFAULT_DATA_DIR,
                        help="CIFAR-10 binary folder (see preprocess.py --download / --synthetic)")
    parser.add_argument("--device", choices=cli.DEVICES, default="auto",
                        help="auto: GPU when MindSpore has a GPU backend, else CPU")
    parser.add_argument("--qat", action=argparse.BooleanOptionalAction, default=True,
                        help="quantization-aware training (int8 weights and activations); --no-qat trains float32")
    parser.add_argument("--quant_delay", type=cli.non_negative_int, default=QuantConfig.quant_delay,
                        help="training steps before activations are quantized")
    parser.add_argument("--bn_fold", action=argparse.BooleanOptionalAction, default=False,
                        help="QAT with BatchNorm folded into the quantized weights, as the int8 model runs "
                             "(about 2x slower per step: a second convolution measures batch statistics)")
    parser.add_argument("--freeze_bn", type=cli.non_negative_int, default=None, metavar="EPOCHS",
                        help="with --bn_fold: after EPOCHS epochs BatchNorm stops updating its statistics "
                             "and normalizes with them (default: never)")
    parser.add_argument("--lr_schedule", choices=SCHEDULES, default="constant",
                        help="learning rate over the run: constant, cosine (to 0), or onecycle")
    parser.add_argument("--warmup_epochs", type=cli.non_negative_float, default=0.0,
                        help="epochs of linear learning-rate warmup (onecycle: of its rising phase)")
    parser.add_argument("--label_smoothing", type=cli.unit_interval, default=0.0,
                        help="label smoothing of the cross-entropy loss, in [0, 1)")
    parser.add_argument("--eval_every", type=cli.non_negative_int, default=None, metavar="N",
                        help="validate on the test split every N epochs and keep best.ckpt; 0: never "
                             "(default: 1 when the data folder has test_batch.bin, else 0)")
    parser.add_argument("--val_samples", type=cli.positive_int, default=None, metavar="N",
                        help="validate on the first N test images (default: all)")
    parser.add_argument("--keep", type=cli.positive_int, default=5, metavar="N",
                        help="keep the newest N periodic checkpoints (best.ckpt is kept besides)")
    parser.add_argument("--log_every", type=cli.positive_int, default=50, metavar="N",
                        help="print a progress line every N steps (and at the end of each epoch)")
    parser.add_argument("--save_steps", type=cli.non_negative_int, default=0, metavar="N",
                        help="also save a checkpoint every N steps, so that a crash loses less than an epoch; "
                             "0: after each epoch only")
    parser.add_argument("--resume", metavar="CKPT", default=None,
                        help="continue a run from a checkpoint it saved (network, optimizer, QAT observers, "
                             "step count and schedule) up to -e epochs in all; auto: the newest loadable "
                             "checkpoint in the save directory (none: start from the beginning)")
    parser.add_argument("--amp", choices=("O0", "O1", "O2"), default="O0",
                        help="mixed precision (MindSpore AMP levels), GPU only: O2 float16 except BatchNorm "
                             "and the QAT observers, with dynamic loss scaling; O1 float network only")
    parser.add_argument("--pynative", action="store_true",
                        help="run op by op (PYNATIVE_MODE) instead of as a compiled graph: slower, for debugging")
    parser.add_argument("--distributed", action="store_true",
                        help="require data-parallel training under msrun, and fail if not started by msrun "
                             "(under msrun train.py trains data-parallel without this flag too)")
    parser.add_argument("--scale_lr", action="store_true",
                        help="multiply -lr by the number of workers (linear scaling for the larger global "
                             "batch); without it -lr is used as given")
    parser.add_argument("--seed", type=int, default=1, help="random seed (weights, data order, augmentation)")
    parser.add_argument("--num_samples", type=cli.positive_int, default=None,
                        help="use N training images per epoch, drawn at random each epoch (default: all)")
    return parser


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.bn_fold or args.freeze_bn is not None) and not args.qat:
        parser.error("--bn_fold and --freeze_bn need QAT; drop --no-qat")
    if args.freeze_bn is not None and not args.bn_fold:
        parser.error("--freeze_bn needs --bn_fold")
    args.device = cli.setup_device(args.device, pynative=args.pynative)
    rank, args.workers = parallel.init(args.distributed)  # msrun's scheduler process ends in there
    writer = rank == 0  # only the first worker writes into the save directory and prints progress
    if writer:
        check_save_dir(args.savedir)
    check_amp(args)
    ms.set_seed(args.seed)  # the same seed on every worker: the same initial weights
    ds.config.set_seed(args.seed)  # and the same shuffle, of which each worker takes its own shard
    dataset = load_data(args, rank)
    steps_per_epoch = dataset.get_dataset_size()
    validation = load_validation_data(args)
    args.global_batch = args.batchsize * args.workers
    scale_learning_rate(args, writer)

    net = build_network(args, steps_per_epoch)
    optimizer = make_optimizer(net, args, steps_per_epoch)
    train_net = build_train_network(net, optimizer, args)
    if args.workers > 1:
        train_net = parallel.DataParallelStep(train_net, net, args.workers)
    resumed = find_resume_checkpoint(args.resume, args.savedir) if args.resume else None
    start_step = resume(train_net, resumed, steps_per_epoch, args) if resumed else 0
    parallel.check_same_step(start_step, args.workers)
    if start_step:
        # Replay the data pipeline up to the resumed step, so that data order and augmentation
        # continue as in an uninterrupted run (fast recovery would re-seed, not replay).
        ds.config.set_fast_recovery(False)
        dataset.set_init_step(start_step)

    base = "resnet18_qat" if args.qat else "resnet18"
    if writer:
        print("arguments: " + json.dumps(vars(args), sort_keys=True))
        if preprocess.is_synthetic(args.data_dir):
            print(f"note: {args.data_dir} holds synthetic data, not CIFAR-10")
        if args.workers > 1:
            print(f"data parallel: {args.workers} workers, batch {args.batchsize} per worker, global batch "
                  f"{args.global_batch}; each worker trains on its own 1/{args.workers} of every epoch", flush=True)
        with open(os.path.join(args.savedir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        remove_stale_partials(args.savedir)
    guard = Guard(start_step)
    prefix = checkpoint_prefix(args.savedir, base, resumed) if writer else None
    checkpoints = Checkpointer(train_net, args.savedir, prefix,
                               steps_per_epoch, args.save_steps, args.keep, start_step, guard, writer)
    checkpoints.latest = resumed[0] if resumed else None
    # Every worker validates (the same network on the same images: the same accuracy; a worker that
    # waited for another's validation in its next all-reduce could time out); the first one reports it.
    validate = Validator(net, validation, args.eval_every, args.savedir, writer) if validation else None
    progress = Progress(args.global_batch, steps_per_epoch, args.epoch, start_step, args.log_every,
                        os.path.join(args.savedir, METRICS_FILE), optimizer, guard, validate, writer)
    Model(train_net).train(args.epoch, dataset, callbacks=[guard, progress, checkpoints],
                           dataset_sink_mode=False, initial_epoch=start_step // steps_per_epoch)
    if args.workers > 1:  # in each worker's own log: the workers' networks (and validations) must agree
        validated = f", validation accuracy {100 * validate.last:.2f}%" if validate and validate.last is not None else ""
        print(f"worker {rank} of {args.workers}: {dataset.get_dataset_size() * args.batchsize} training images "
              f"per epoch, parameter checksum {parallel.checksum(net)}{validated}", flush=True)
    report_stop(guard, checkpoints, steps_per_epoch, validate)
    if writer:
        print(f"checkpoint: {checkpoints.latest}")
    return checkpoints.latest


def report_stop(guard, checkpoints, steps_per_epoch, validate=None):
    """Exit as the documented code says when training did not run to the end."""
    last = checkpoints.latest or "none (train again from the start)"
    if not checkpoints.writer:  # another worker of a data-parallel run; worker 0 saves and names them
        last = "worker 0's latest"
    failure = checkpoints.failure or (validate.failure if validate else None)
    if failure:
        path, reason = failure
        cli.fail(f"could not save checkpoint {path} ({reason}); training stopped; the last checkpoint saved, {last}, "
                 "is intact; free space or fix the save folder, then continue with --resume auto",
                 code=EXIT_SAVE_FAILED)
    if guard.diverged is not None:
        step, what = guard.diverged
        cli.fail(f"training diverged at step {step} (epoch {(step - 1) // steps_per_epoch + 1}): {what}; it stopped "
                 f"and saved nothing from that state; the last good checkpoint is {last}; lower -lr "
                 "(or add --warmup_epochs) and continue with --resume auto", code=EXIT_DIVERGED)
    if guard.signal is not None:
        name = signal.Signals(guard.signal).name
        print(f"interrupted by {name}; checkpoint: {last}", flush=True)
        print("to continue, run the same command with --resume auto", flush=True)
        raise SystemExit(128 + guard.signal)


def build_network(args, steps_per_epoch):
    net = resnet18(preprocess.NUM_CLASSES)
    if args.qat:
        freeze_step = -1 if args.freeze_bn is None else args.freeze_bn * steps_per_epoch
        net = quantize(net, QuantConfig(quant_delay=args.quant_delay, bn_fold=args.bn_fold, freeze_bn=freeze_step))
    return net


def check_amp(args):
    """--amp O1/O2 only where it can help and where it works with the network."""
    if args.amp == "O0":
        return
    if args.device == "CPU":
        cli.fail(f"--amp {args.amp} needs a GPU: on CPU MindSpore's float16 kernels make a training step "
                 "about 1.8x slower than float32; drop --amp")
    if args.amp == "O1" and args.qat:
        cli.fail("--amp O1 rewrites the network's Python code and cannot rewrite the QAT cells; "
                 "use --amp O2 (or --no-qat)")
    if args.bn_fold:
        cli.fail("--bn_fold trains in float32 only; drop --amp or --bn_fold")


def build_train_network(net, optimizer, args):
    """One training step (loss, gradients, optimizer update) as a Cell, in mixed precision with --amp.

    O2 keeps BatchNorm and the QAT quantizers in float32 and scales the loss, dynamically on GPU
    (MindSpore's default). CPU, where main() refuses --amp as slower but the tests build it,
    only takes a fixed scale.
    """
    if args.amp == "O0":
        return nn.TrainOneStepCell(nn.WithLossCell(net, make_loss(args)), optimizer)
    options = {}
    if ms.get_context("device_target") == "CPU":
        options["loss_scale_manager"] = ms.FixedLossScaleManager(1024.0, drop_overflow_update=False)
    train_net = ms.amp.build_train_network(net, optimizer, make_loss(args), level=args.amp, **options)
    # O2 marks every cell but BatchNorm float16; the quantizers compute in float32 (their rounding
    # constant, 1.5 * 2^23, is beyond float16's range).
    for _, cell in net.cells_and_names():
        if isinstance(cell, (quant.ActQuant, quant.WeightQuant)):
            cell.to_float(ms.float32)
    return train_net


def remove_stale_partials(savedir):
    """Remove the temporary folders of checkpoint saves cut short by a crash (their process is gone)."""
    for name in os.listdir(savedir):
        match = re.fullmatch(r"\.partial-(\d+)", name)
        if match and not process_alive(int(match[1])):
            shutil.rmtree(os.path.join(savedir, name), ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_save_dir(path):
    """Fail before any work if checkpoints cannot be written there."""
    if os.path.exists(path) and not os.path.isdir(path):
        cli.fail(f"save directory {path} is a file; give a folder with -dir")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        cli.fail(f"cannot write to save directory {path} ({e.strerror}); give a writable folder with -dir")


def load_data(args, rank=0):
    """The training pipeline; with several workers, this worker's shard: 1/workers of the images
    of each epoch (of --num_samples, when given, which counts all workers' images)."""
    workers = args.workers
    if args.num_samples is not None and args.num_samples < workers:
        cli.fail(f"--num_samples {args.num_samples} cannot be shared among {workers} workers; "
                 f"give at least {workers * args.batchsize} (workers x -bsize)")
    per_worker = None if args.num_samples is None else args.num_samples // workers
    try:
        dataset = preprocess.create_dataset(args.data_dir, training=True, batch_size=args.batchsize,
                                            repeat_num=args.repeatNum, num_samples=per_worker,
                                            num_shards=workers if workers > 1 else None,
                                            shard_id=rank if workers > 1 else None)
    except preprocess.DatasetError as e:
        cli.fail(str(e))
    if dataset.get_dataset_size() == 0:
        images = args.num_samples or "the"
        if workers > 1:
            cli.fail(f"{workers} workers x batch size {args.batchsize} is more than {images} training images per "
                     "epoch: each worker gets less than one batch; use fewer workers, a lower -bsize or more "
                     "--num_samples")
        cli.fail(f"batch size {args.batchsize} is larger than {images} training images per epoch; "
                 "lower -bsize or raise --num_samples")
    return dataset


def scale_learning_rate(args, verbose):
    """--scale_lr: -lr times the number of workers (Goyal et al. 2017's linear scaling rule); say what was done."""
    if args.scale_lr:
        base = args.learningRate
        args.learningRate = base * args.workers
        if verbose:
            print(f"--scale_lr: learning rate {base:g} x {args.workers} worker(s) = {args.learningRate:g}")
    elif args.workers > 1 and verbose:
        print(f"note: learning rate {args.learningRate:g} is not scaled for the {args.workers}x larger global batch "
              f"(--scale_lr multiplies it by {args.workers})")


def load_validation_data(args):
    """The test split for validation during training, or None when --eval_every is 0 or there is none."""
    has_test = os.path.exists(os.path.join(args.data_dir, preprocess.TEST_FILE))
    if args.eval_every is None:
        args.eval_every = 1 if has_test else 0
    if not args.eval_every:
        return None
    try:
        return preprocess.create_dataset(args.data_dir, training=False, batch_size=VALIDATION_BATCH,
                                         num_samples=args.val_samples)
    except preprocess.DatasetError as e:
        cli.fail(f"{e} (for --eval_every; --eval_every 0 trains without validation)")


class Validator:
    """Accuracy on the test split every `every` epochs (and after the last); keeps the best network as best.ckpt."""

    def __init__(self, net, dataset, every, savedir, writer=True):
        self.net, self.dataset, self.every, self.writer = net, dataset, every, writer
        self.path = os.path.join(savedir, BEST_FILE)
        self.best = previous_best(self.path) if writer else None  # an earlier run's better model here is kept
        self.failure = None  # (path, reason) when best.ckpt could not be written
        self.last = None  # the latest accuracy

    def __call__(self, epoch, last):
        if epoch % self.every and not last:
            return None
        self.net.set_train(False)
        predictions, labels = evaluate.predict(self.net, self.dataset)
        self.net.set_train(True)
        accuracy = self.last = float((predictions == labels).mean())
        if not self.writer:
            return accuracy
        better = self.best is None or accuracy > self.best
        print(f"validation accuracy {100 * accuracy:.2f}% on {len(labels)} test images"
              + (f" (best so far: {self.path})" if better else f" (best: {100 * self.best:.2f}%)"), flush=True)
        if better:
            try:
                save_atomically(self.net, self.path, {"epoch_num": epoch, "val_accuracy": accuracy})
                self.best = accuracy
            except (OSError, RuntimeError) as e:
                self.failure = (self.path, save_error(e))
        return accuracy


def previous_best(path):
    if not os.path.exists(path):
        return None
    try:
        params = evaluate.read_checkpoint(path, choice_func=lambda name: name == "val_accuracy")
        return float(params["val_accuracy"].asnumpy())
    except (ValueError, RuntimeError, KeyError, OSError):
        print(f"warning: {path} is unreadable or has no val_accuracy; this run's best model will replace it")
        return None


class Checkpointer(Callback):
    """The training state as <prefix>-<epoch>_<step of the epoch>.ckpt after every epoch, every `save_steps`
    steps, and (named ...-interrupt.ckpt) when `guard` caught a signal; the newest `keep` are kept.

    The training state is everything --resume needs: the network with its QAT observers, the
    optimizer's moments and step count (hence the learning-rate schedule's position), and
    epoch_num, step_num and steps_per_epoch. Nothing is saved once the loss has diverged. A
    save that fails (disk full) stops training; `failure` says which file and why. Only a
    `writer` saves; the other workers of a data-parallel run check the weights as it does.
    """

    def __init__(self, train_net, savedir, prefix, steps_per_epoch, save_steps, keep, first_step, guard,
                 writer=True):
        super().__init__()
        self.train_net, self.savedir, self.prefix = train_net, savedir, prefix
        self.steps_per_epoch, self.save_steps, self.keep = steps_per_epoch, save_steps, keep
        self.first_step, self.guard, self.writer = first_step, guard, writer
        self.latest, self.failure = None, None

    def on_train_step_end(self, run_context):
        if self.guard.diverged is not None or self.failure:
            return
        step = self.first_step + run_context.original_args().cur_step_num
        due = step % self.steps_per_epoch == 0 or (self.save_steps and step % self.save_steps == 0)
        if not (due or self.guard.signal is not None):
            return
        if not all(np.isfinite(p.asnumpy()).all() for p in self.train_net.trainable_params()):
            self.guard.diverged = (step, "the updated weights are not finite")
        elif self.writer:
            self.save(step, interrupt=self.guard.signal is not None)
        if self.failure or self.guard.diverged is not None:
            run_context.request_stop()

    def save(self, step, interrupt=False):
        epoch, step_in_epoch = (step - 1) // self.steps_per_epoch + 1, (step - 1) % self.steps_per_epoch + 1
        name = f"{self.prefix}-{epoch}_{step_in_epoch}{'-interrupt' if interrupt else ''}.ckpt"
        path = os.path.join(self.savedir, name)
        try:
            save_atomically(self.train_net, path,
                            {"epoch_num": epoch, "step_num": step, "steps_per_epoch": self.steps_per_epoch})
        except (OSError, RuntimeError) as e:
            self.failure = (path, save_error(e))
            return
        self.latest = path
        for old in checkpoint_series(self.savedir, self.prefix)[:-self.keep]:
            os.remove(os.path.join(self.savedir, old))


class Guard(Callback):
    """Stops training cleanly: at a non-finite loss, and after the current step on Ctrl-C or SIGTERM.

    `diverged` is (step, what went wrong) once the loss was NaN or infinite (Checkpointer also
    sets it when the weights are not finite); `signal` is the signal caught. SIGTERM has a handler;
    a second one quits at once, without saving (checkpoints on disk stay whole: they are renamed
    into place only when complete). SIGINT (Ctrl-C) is blocked when train.py runs as a script
    and taken here from the pending signals after each step.
    """

    def __init__(self, first_step):
        super().__init__()
        self.first_step = first_step
        self.diverged, self.signal = None, None

    def on_train_begin(self, run_context):
        self.previous = signal.signal(signal.SIGTERM, self.on_signal)

    def on_train_end(self, run_context):
        signal.signal(signal.SIGTERM, self.previous)
        self.take_pending_sigint()

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            print(f"\n{name} again: quitting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n{name}: stopping after this step and saving a checkpoint", flush=True)

    def take_pending_sigint(self):
        if signal.SIGINT in signal.sigpending():
            signal.sigwait({signal.SIGINT})
            self.on_signal(signal.SIGINT, None)

    @property
    def stopped(self):
        return self.diverged is not None or self.signal is not None

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        loss = loss_value(cb.net_outputs)
        if not math.isfinite(loss):
            self.diverged = (self.first_step + cb.cur_step_num, f"the loss is {loss}")
        self.take_pending_sigint()
        if self.stopped:
            run_context.request_stop()


def loss_value(outputs):
    """The loss of a training step's outputs: the loss, or with --amp O2 (loss, overflow, loss scale)."""
    return float((outputs[0] if isinstance(outputs, (tuple, list)) else outputs).asnumpy())


def checkpoint_series(savedir, prefix):
    """The names of <prefix>-<epoch>_<step>.ckpt files in savedir, oldest first."""
    series = [(int(m["epoch"]), int(m["step"]), name) for name in os.listdir(savedir)
              for m in [CHECKPOINT_NAME.match(name)] if m and m["prefix"] == prefix]
    return [name for _, _, name in sorted(series)]


def checkpoint_prefix(savedir, base, resumed=None):
    """The file-name prefix of this run's checkpoints.

    A run resumed from the newest checkpoint of a series in the save directory continues that
    series. Otherwise, as MindSpore's ModelCheckpoint does, a folder that already holds
    <base>-* files gets base_1, base_2, ...: an earlier run's checkpoints are never overwritten.
    """
    if resumed:
        folder, name = os.path.split(os.path.abspath(resumed[0]))
        match = CHECKPOINT_NAME.match(name)
        if match and folder == os.path.abspath(savedir) and checkpoint_series(savedir, match["prefix"])[-1] == name:
            return match["prefix"]
    names, prefix, n = os.listdir(savedir), base, 0
    while any(name.startswith(prefix + "-") for name in names):
        n += 1
        prefix = f"{base}_{n}"
    return prefix


def find_resume_checkpoint(spec, savedir):
    """(path, parameters) of --resume PATH, or with `auto` of the newest loadable training checkpoint in savedir.

    `auto` skips, with a warning, checkpoints that do not load; with none to resume it returns None
    and training starts from the beginning.
    """
    if spec != "auto":
        evaluate.check_file(spec, "--resume")
        try:
            return spec, evaluate.read_checkpoint(spec)
        except (ValueError, RuntimeError, TypeError, OSError) as e:
            cli.fail(f"--resume {spec} is not a readable MindSpore checkpoint ({evaluate.first_line(e)}); "
                     "give a checkpoint written by train.py")
    names = os.listdir(savedir) if os.path.isdir(savedir) else []  # (a data-parallel worker on another host)
    paths = [os.path.join(savedir, name) for name in names if CHECKPOINT_NAME.match(name)]
    for path in sorted(paths, key=os.path.getmtime, reverse=True):
        try:
            return path, evaluate.read_checkpoint(path)
        except (ValueError, RuntimeError, TypeError, OSError) as e:
            print(f"warning: --resume auto skips {path}: it does not load ({evaluate.first_line(e)})", flush=True)
    print(f"note: --resume auto found no checkpoint to resume in {savedir}; training from the start", flush=True)
    return None


def resume(train_net, resumed, steps_per_epoch, args):
    """Load the training state of a checkpoint into train_net after checking that it is this run's; return its step."""
    path, params = resumed
    if "step_num" not in params or "steps_per_epoch" not in params:
        cli.fail(f"--resume {path} holds no training state (best.ckpt and exported models keep only the network); "
                 "resume from a periodic checkpoint, <prefix>-<epoch>_<step>.ckpt")
    config = quant.config_from_checkpoint(params)
    trained_as = "float32" if config is None else "QAT with --bn_fold" if config.bn_fold else "QAT"
    this_run = "float32" if not args.qat else "QAT with --bn_fold" if args.bn_fold else "QAT"
    if trained_as != this_run:
        cli.fail(f"--resume {path} was trained as {trained_as}, but this run trains {this_run}; "
                 "resume with the checkpoint's settings (see args.json beside it)")
    delays = {int(value.asnumpy()) for name, value in params.items() if name.endswith(".quant_delay")}
    if delays and delays != {args.quant_delay}:
        cli.fail(f"--resume {path} was trained with --quant_delay {min(delays)}, this run has {args.quant_delay}; "
                 "resume with the checkpoint's settings (see args.json beside it)")
    own = {p.name: p.shape for p in train_net.get_parameters() if p.name != "learning_rate"}
    mismatch = evaluate.describe_mismatch(own, params, ignored=lambda name: name in RUN_RECORDS)
    if mismatch:
        cli.fail(f"--resume {path} does not match this run's network and optimizer: {mismatch}; resume with the "
                 "checkpoint's -opt and settings (see args.json beside it)")
    step, saved_steps = int(params["step_num"].asnumpy()), int(params["steps_per_epoch"].asnumpy())
    if saved_steps != steps_per_epoch:
        cli.fail(f"--resume {path} was trained with {saved_steps} steps per epoch, this run has {steps_per_epoch}; "
                 "resume with the checkpoint's -bsize, -repeatNum, --num_samples and number of workers")
    if step >= args.epoch * steps_per_epoch:
        cli.fail(f"--resume {path} has already trained {step // steps_per_epoch} epochs; ask for more with -e")
    ms.load_param_into_net(train_net, {name: params[name] for name in own}, strict_load=True)
    print(f"resuming from {path}: after step {step} of {args.epoch * steps_per_epoch} (epoch "
          f"{(step - 1) // steps_per_epoch + 1}, step {(step - 1) % steps_per_epoch + 1} of {steps_per_epoch})", flush=True)
    return step


def save_error(error):
    """Why a save failed, in a few words ("No space left on device")."""
    return error.strerror if isinstance(error, OSError) and error.strerror else evaluate.first_line(error)


def save_atomically(net, path, append_dict):
    """Write a checkpoint into a hidden folder beside `path`, flush it to disk, then rename it into place.

    A crash leaves the previous file or the complete new one, never a partial file named .ckpt.
    The file carries a CRC32 of its contents, which --resume and eval.py verify.
    """
    folder = os.path.join(os.path.dirname(path) or ".", f".partial-{os.getpid()}")
    tmp = os.path.join(folder, os.path.basename(path))
    try:
        os.makedirs(folder, exist_ok=True)
        ms.save_checkpoint(net, tmp, append_dict=append_dict, crc_check=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_optimizer(net, args, steps_per_epoch):
    """Weight decay on conv and dense weights only, not on BatchNorm's gamma/beta or biases."""
    params = net.trainable_params()
    decayed = [p for p in params if p.name.endswith(".weight")]
    others = [p for p in params if not p.name.endswith(".weight")]
    groups = [{"params": decayed, "weight_decay": args.weightDecay}, {"params": others, "weight_decay": 0.0}]
    return OPTIMIZERS[args.optimizer](groups, learning_rates(args, steps_per_epoch), args)


def learning_rates(args, steps_per_epoch):
    """The learning rate: a float when constant, else one value per training step.

    constant and cosine (to 0) start with a linear warmup of --warmup_epochs; onecycle rises
    linearly from lr/25 to lr over --warmup_epochs (default 30 % of the run), then anneals to
    lr/10^4 along a cosine (Smith & Topin 2019).
    """
    lr, total = args.learningRate, args.epoch * steps_per_epoch
    if args.lr_schedule == "constant" and not args.warmup_epochs:
        return lr
    warmup = min(round(args.warmup_epochs * steps_per_epoch), total)
    if args.lr_schedule == "onecycle" and not args.warmup_epochs:
        warmup = round(0.3 * total)
    rates = []
    for step in range(total):
        if step < warmup:
            start = lr / 25 if args.lr_schedule == "onecycle" else 0.0
            rates.append(start + (lr - start) * (step + 1) / warmup)
            continue
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        rates.append({"constant": lr, "cosine": lr * cosine, "onecycle": lr / 1e4 + (lr - lr / 1e4) * cosine}
                     [args.lr_schedule])
    return rates


def make_loss(args):
    if args.label_smoothing:
        return nn.CrossEntropyLoss(reduction="mean", label_smoothing=args.label_smoothing)
    return nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")  # the seed's loss


class Progress(Callback):
    """Progress lines every `every` steps and per epoch; one JSON record per epoch appended to `metrics_path`,
    with the validation accuracy when `validate(epoch, last)` gives one.

    A line: epoch and step (of the epoch and of the run), loss, learning rate, images/s of the
    epoch's training steps (leaving out the run's first step, the graph compilation, and the
    validation), time elapsed and the estimated time left.
    Steps count from the start of the run, also when it was resumed at `first_step`.
    `batch_size` is the global batch (all workers'). Only a `writer` prints and logs; the
    other workers of a data-parallel run only validate along.
    """

    def __init__(self, batch_size, steps_per_epoch, epochs, first_step, every, metrics_path, optimizer, guard,
                 validate=None, writer=True):
        super().__init__()
        self.batch_size, self.steps_per_epoch, self.epochs = batch_size, steps_per_epoch, epochs
        self.first_step, self.every, self.metrics_path = first_step, every, metrics_path
        self.optimizer, self.guard, self.validate, self.writer = optimizer, guard, validate, writer
        self.total = epochs * steps_per_epoch

    def on_train_begin(self, run_context):
        self.start = time.time()
        self.timed_start, self.timed_steps = None, 0  # measured from the end of the first step

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = self.last = time.time()  # the last epoch's validation and save are not a step's time
        self.epoch_timed_steps, self.epoch_timed_time = 0, 0.0
        self.losses = []

    def on_train_step_end(self, run_context):
        if not self.writer:
            return
        cb = run_context.original_args()
        self.losses.append(loss_value(cb.net_outputs))
        now = time.time()
        if self.timed_start is None:
            print(f"first step done in {now - self.start:.1f} s (includes graph compilation)", flush=True)
            self.timed_start = self.last = now
            return
        self.timed_steps += 1
        self.epoch_timed_steps += 1
        self.epoch_timed_time += now - self.last
        self.last = now
        step = self.first_step + cb.cur_step_num
        step_in_epoch = (step - 1) % self.steps_per_epoch + 1
        if step_in_epoch % self.every == 0 or step_in_epoch == self.steps_per_epoch:
            speed = self.epoch_timed_steps * self.batch_size / self.epoch_timed_time if self.epoch_timed_steps else 0
            wall_per_step = (now - self.timed_start) / self.timed_steps  # with validations and saves, for the ETA
            print(f"epoch {cb.cur_epoch_num}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
                  f"({step}/{self.total}) loss {self.losses[-1]:.4f} lr {learning_rate(self.optimizer, step):.3g} "
                  f"{speed:.1f} images/s elapsed {clock(now - self.start)} "
                  f"eta {clock(wall_per_step * (self.total - step))}", flush=True)

    def on_train_epoch_end(self, run_context):
        if self.guard.stopped:  # an interrupted or diverged epoch is neither validated nor logged
            return
        cb = run_context.original_args()
        if not self.writer:
            if self.validate:
                self.validate(cb.cur_epoch_num, cb.cur_epoch_num == self.epochs)
            return
        now = time.time()
        step = self.first_step + cb.cur_step_num
        speed = self.epoch_timed_steps * self.batch_size / self.epoch_timed_time if self.epoch_timed_steps else None
        record = {"epoch": cb.cur_epoch_num, "step": step, "loss": sum(self.losses) / len(self.losses),
                  "lr": learning_rate(self.optimizer, step), "images_per_s": speed, "epoch_s": now - self.epoch_start,
                  "elapsed_s": now - self.start, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(f"epoch {cb.cur_epoch_num}/{self.epochs} done in {record['epoch_s']:.1f} s, "
              f"mean loss {record['loss']:.4f}", flush=True)
        accuracy = self.validate(cb.cur_epoch_num, cb.cur_epoch_num == self.epochs) if self.validate else None
        if accuracy is not None:
            record.update(val_accuracy=accuracy, val_s=time.time() - now)
        if self.validate and self.validate.failure:
            run_context.request_stop()
        with open(self.metrics_path, "a") as f:  # append: an earlier run's records stay
            f.write(json.dumps(record) + "\n")


def learning_rate(optimizer, step):
    """The optimizer's learning rate at a step (1-based) of the run (a constant, or one value per step)."""
    rate = optimizer.learning_rate
    rate = getattr(rate, "learning_rate", rate)  # a per-step schedule is a Cell holding the Parameter
    rates = np.asarray(rate.asnumpy()).reshape(-1)
    return float(rates[min(step - 1, rates.size - 1)])


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"

if __name__ == "__main__":
    main()
