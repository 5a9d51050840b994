"""Train a ResNet on CIFAR-10 with quantization-aware training (QAT), in MindSpore, on CPU or GPU.

    python train.py                                              # the seed's run: ResNet-18, QAT, Adam, 40 epochs
    python train.py -bsize 128 -e 40 -opt momentum -lr 0.05      # the seed's flags
    python train.py --arch resnet8 -e 40                         # MLPerf Tiny's 78 k-parameter ResNet-8
    python train.py -data data/demo -e 2 --num_samples 1024      # a quick trial on synthetic data
    msrun --worker_num=4 --local_worker_num=4 --join=True train.py --scale_lr   # data parallel on 4 GPUs

Writes `<prefix>-<epoch>_<step>.ckpt` after every epoch into the save directory (-dir,
default checkpoints/), `args.json` with the resolved arguments, appends one line per epoch
to `metrics.jsonl`, and prints the final checkpoint's path; `python eval.py -loc <that path>`
evaluates it. The callbacks (stopping, saving, validating, progress) are in callbacks.py, the
checkpoint files in checkpoint.py; docs/training.md explains the run.
"""
import signal

if __name__ == "__main__":
    # Before MindSpore starts threads, which inherit this mask: Ctrl-C stays pending until the Guard
    # takes it between steps. (MindSpore's graph runtime would turn SIGINT into SIGTERM.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import cli  # noqa: E402, I001  (first: quiets MindSpore's log before it loads)

import argparse
import json
import os

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
from mindspore.train import Model

import adversarial
import callbacks
import checkpoint
import parallel
import preprocess
import quant
import schedules
from quant import QuantConfig, quantize
import int8
import resnetv2

METRICS_FILE = "metrics.jsonl"
VALIDATION_BATCH = 100
OPTIMIZERS = {  # name: (parameter groups, learning rate, run) -> optimizer
    "adam": lambda groups, lr, run: nn.Adam(groups, learning_rate=lr),
    "momentum": lambda groups, lr, run: nn.Momentum(groups, learning_rate=lr, momentum=run.momentum),
    "sgd": lambda groups, lr, run: nn.SGD(groups, learning_rate=lr, momentum=run.momentum,
                                          nesterov=run.momentum > 0),
}


def get_args_parser():
    parser = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    # The seed's flags, both spellings, as in its usage text.
    parser.add_argument("-bsize", "--batchsize", type=cli.positive_int, default=32,
                        help="batch size per device: under msrun, per worker (the global batch: workers x this)")
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
    parser.add_argument("--arch", choices=tuple(resnetv2.ARCHS), default=None,
                        help=f"the network: resnet8 (MLPerf Tiny's, 78 k parameters), resnet20 (0.27 M) or resnet18 "
                             f"(11.2 M, the seed's); default: the checkpoint's with --resume, else "
                             f"{resnetv2.DEFAULT_ARCH}")
    parser.add_argument("-data", "--data_dir", default=preprocess.DEFAULT_DATA_DIR,
                        help="CIFAR-10 binary folder (see preprocess.py --download / --synthetic)")
    cli.add_device_argument(parser)
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
    parser.add_argument("--lr_schedule", choices=schedules.SCHEDULES, default="constant",
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
    parser.add_argument("--summary_dir", metavar="DIR", help="write the run's scalars as TensorBoard events into DIR")
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
    parser.add_argument("--seed", type=cli.seed, default=1, help="random seed (weights, data order, augmentation)")
    parser.add_argument("--num_samples", type=cli.positive_int, default=None,
                        help="use N training images per epoch, drawn at random each epoch (default: all)")
    adversarial.add_arguments(parser)
    return parser


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.bn_fold or args.freeze_bn is not None) and not args.qat:
        parser.error("--bn_fold and --freeze_bn need QAT; drop --no-qat")
    if args.freeze_bn is not None and not args.bn_fold:
        parser.error("--freeze_bn needs --bn_fold")
    try:
        return train(args)
    except cli.InputError as e:
        cli.fail(str(e))
    finally:
        checkpoint.release_locks()


def train(args):
    """Train as the flags say; return the last checkpoint's path (None on workers that do not save)."""
    run, rank = resolve(args)
    writer = rank == 0  # only the first worker writes into the save directory and prints progress
    ms.set_seed(run.seed)  # the same seed on every worker: the same initial weights
    ds.config.set_seed(run.seed)  # and the same shuffle, of which each worker takes its own shard
    dataset = load_data(run, rank)  # the data folder is checked before anything is written
    steps_per_epoch = dataset.get_dataset_size()
    schedules.check_step_count(run, steps_per_epoch)
    validation = load_validation_data(run)
    if writer:
        checkpoint.check_save_dir(run.savedir)
        if run.summary_dir:
            checkpoint.check_save_dir(run.summary_dir, "--summary_dir")
        checkpoint.lock_save_dir(run.savedir)  # one run per save folder, held until this process ends

    found = checkpoint.find_resume(run.resume, run.savedir) if run.resume else None
    run.arch = resumed_arch(run, found)
    net = build_network(run, steps_per_epoch, resumed_weight_bits(found))
    optimizer = make_optimizer(net, run, steps_per_epoch)
    train_net = build_train_network(net, optimizer, run, rank)
    if run.workers > 1:
        train_net = parallel.DataParallelStep(train_net, net, run.workers)
    resumed, start_step = resume(run, found, train_net, dataset, steps_per_epoch)

    prefix = start_save_dir(args, run, resumed, net) if writer else None
    guard = callbacks.Guard(start_step, steps_per_epoch)
    saver = callbacks.Checkpointer(train_net, run.savedir, prefix, steps_per_epoch, run.save_steps, run.keep,
                                   start_step, guard, latest=resumed, writer=writer)
    validator = progress = None
    if validation:
        validator = callbacks.Validator(net, validation, run.eval_every, run.epoch, run.savedir, guard, writer,
                                        attack=adversarial.validation_attack(net, run))
    if writer:
        progress = callbacks.Progress(run.global_batch, steps_per_epoch, run.epoch, start_step, run.log_every,
                                      os.path.join(run.savedir, METRICS_FILE), optimizer, guard, validator,
                                      run.summary_dir)
    Model(train_net).train(run.epoch, dataset, callbacks=[cb for cb in (guard, saver, validator, progress) if cb],
                           dataset_sink_mode=False, initial_epoch=start_step // steps_per_epoch)
    if run.workers > 1:  # in each worker's own log: the workers' networks (and validations) must agree
        parallel.report(rank, run.workers, dataset.get_dataset_size() * run.batchsize, net,
                        validator.last if validator else None)
    stop = guard.outcome(saver.latest if writer else callbacks.WORKER_0)
    if stop:
        stop.exit()  # the documented exit statuses of an interrupted, diverged or failed run
    if writer:
        print(f"checkpoint: {saver.latest}")
    return saver.latest


def resolve(args):
    """The run's settings: the flags plus what derives from them, resolved once (device, workers,
    global batch, validation, learning rate), as a new namespace; and this worker's rank."""
    device = cli.setup_device(args.device, pynative=args.pynative)
    rank, workers = parallel.init(args.distributed)  # msrun's scheduler process ends in there
    check_amp(args, device)
    has_test = os.path.exists(os.path.join(args.data_dir, preprocess.TEST_FILE))
    run = argparse.Namespace(**vars(args))
    run.device, run.workers, run.global_batch = device, workers, args.batchsize * workers
    run.eval_every = (1 if has_test else 0) if args.eval_every is None else args.eval_every
    run.learningRate = args.learningRate * workers if args.scale_lr else args.learningRate
    adversarial.resolve(run)
    return run, rank


def resumed_arch(run, found):
    """The network of the run: that of the checkpoint it resumes (`found`: checkpoint.find_resume's), which --arch
    may only repeat; else --arch, or the default."""
    if not found:
        return run.arch or resnetv2.DEFAULT_ARCH
    arch = checkpoint.arch(*found)
    if run.arch and run.arch != arch:
        raise cli.InputError(f"--resume {found[0]} trained {arch}, but this run asks for --arch {run.arch}; resume "
                             f"with --arch {arch} (or without --arch), or train {run.arch} into another -dir")
    return arch


def resumed_weight_bits(found):
    """The QAT weight bits of the run: those of the checkpoint it resumes (`found`: checkpoint.find_resume's), as it
    was trained, else QuantConfig's."""
    config = checkpoint.quant_config(*found) if found else None
    return (config or QuantConfig()).weight_bits


def resume(run, found, train_net, dataset, steps_per_epoch):
    """With --resume, `found` (checkpoint.find_resume's): load the checkpoint's training state and move the data
    pipeline to its step. Return (the checkpoint's path or None, the step to continue after)."""
    step = 0
    if found:
        path, params = found
        step = checkpoint.load_training_state(train_net, path, params, model_kind(run), run.quant_delay,
                                              steps_per_epoch, run.epoch)
        epoch, step_in_epoch = checkpoint.position(step, steps_per_epoch)
        print(f"resuming from {path}: after step {step} of {run.epoch * steps_per_epoch} (epoch {epoch}, step "
              f"{step_in_epoch} of {steps_per_epoch})", flush=True)
        bits = resumed_weight_bits(found)
        if run.qat and bits != QuantConfig.weight_bits:
            print(f"note: {path} was trained with {bits}-bit weights, and the run goes on with them; its int8 ONNX "
                  f"model will be exact on every CPU but slower than one of {QuantConfig.weight_bits}-bit weights "
                  "(docs/deployment.md#exact-on-every-cpu)", flush=True)
    parallel.check_same_step(step, run.workers)
    if step:
        # Replay the data pipeline up to the resumed step, so that data order and augmentation
        # continue as in an uninterrupted run (fast recovery would re-seed, not replay).
        ds.config.set_fast_recovery(False)
        dataset.set_init_step(step)
    return (found[0] if found else None), step


def start_save_dir(args, run, resumed, net):
    """Print the settings and the network's size, write args.json, clear crashed saves; return the prefix of this
    run's checkpoints."""
    print("arguments: " + json.dumps(vars(run), sort_keys=True))
    print(size_card(net))
    if preprocess.is_synthetic(run.data_dir):
        print(f"note: {run.data_dir} holds synthetic data, not CIFAR-10")
    if run.scale_lr:  # Goyal et al. 2017's linear scaling rule
        print(f"--scale_lr: learning rate {args.learningRate:g} x {run.workers} worker(s) = {run.learningRate:g}")
    elif run.workers > 1:
        print(f"note: learning rate {run.learningRate:g} is not scaled for the {run.workers}x larger global batch "
              f"(--scale_lr multiplies it by {run.workers})")
    if run.adv_train != "none":
        print(adversarial.describe(run))
    if run.workers > 1:
        print(f"data parallel: {run.workers} workers, batch {run.batchsize} per worker, global batch "
              f"{run.global_batch}; each worker trains on its own 1/{run.workers} of every epoch", flush=True)
    path = os.path.join(run.savedir, "args.json")
    try:
        checkpoint.write_text(path, json.dumps(vars(run), indent=2, sort_keys=True))
    except OSError as e:
        callbacks.Stop(callbacks.EXIT_SAVE_FAILED, f"could not write {path} ({e.strerror}); nothing was trained; "
                       "free space or fix the save folder, then run again", error=True).exit()
    checkpoint.remove_stale_partials(run.savedir)
    return checkpoint.series_prefix(run.savedir, checkpoint.series_base(model_kind(run), run.arch), resumed)


def size_card(net):
    """One line: the network's name, parameters, multiply-accumulates per image and the int8 file to expect."""
    profile = resnetv2.profile(net)
    return (f"network: {profile['arch']}, {profile['params']:,} parameters, {profile['macs'] / 1e6:,.1f} M "
            f"multiply-accumulates per 32x32 image; its int8 file (export.py --format int8) will be about "
            f"{cli.size_text(int8.expected_size(profile))}")


def model_kind(run):
    return checkpoint.kind(QuantConfig(bn_fold=run.bn_fold) if run.qat else None)


def check_amp(args, device):
    """--amp O1/O2 only where it can help and where it works with the network."""
    if args.amp == "O0":
        return
    if device == "CPU":
        raise cli.InputError(f"--amp {args.amp} needs a GPU: on CPU MindSpore's float16 kernels make a training "
                             "step about 1.8x slower than float32; drop --amp")
    if args.amp == "O1" and args.qat:
        raise cli.InputError("--amp O1 rewrites the network's Python code and cannot rewrite the QAT cells; "
                             "use --amp O2 (or --no-qat)")
    if args.bn_fold:
        raise cli.InputError("--bn_fold trains in float32 only; drop --amp or --bn_fold")


def load_data(run, rank=0):
    """The training pipeline; with several workers, this worker's shard: 1/workers of the images
    of each epoch (of --num_samples, when given, which counts all workers' images)."""
    workers = run.workers
    if run.num_samples is not None and run.num_samples < workers:
        raise cli.InputError(f"--num_samples {run.num_samples} cannot be shared among {workers} workers; "
                             f"give at least {workers * run.batchsize} (workers x -bsize)")
    per_worker = None if run.num_samples is None else run.num_samples // workers
    dataset = preprocess.create_dataset(run.data_dir, training=True, batch_size=run.batchsize,
                                        repeat_num=run.repeatNum, num_samples=per_worker,
                                        num_shards=workers if workers > 1 else None,
                                        shard_id=rank if workers > 1 else None)
    if dataset.get_dataset_size() == 0:
        images = run.num_samples or "the"
        if workers > 1:
            raise cli.InputError(f"{workers} workers x batch size {run.batchsize} is more than {images} training "
                                 "images per epoch: each worker gets less than one batch; use fewer workers, a "
                                 "lower -bsize or more --num_samples")
        raise cli.InputError(f"batch size {run.batchsize} is larger than {images} training images per epoch; "
                             "lower -bsize or raise --num_samples")
    return dataset


def load_validation_data(run):
    """The test split for validation during training, or None when --eval_every is 0."""
    if not run.eval_every:
        return None
    try:
        return preprocess.create_dataset(run.data_dir, training=False, batch_size=VALIDATION_BATCH,
                                         num_samples=run.val_samples)
    except preprocess.DatasetError as e:
        raise cli.InputError(f"{e} (for --eval_every; --eval_every 0 trains without validation)") from None


def build_network(run, steps_per_epoch, weight_bits=QuantConfig.weight_bits):
    net = resnetv2.resnet(run.arch or resnetv2.DEFAULT_ARCH, preprocess.NUM_CLASSES)
    if run.qat:
        freeze_step = -1 if run.freeze_bn is None else run.freeze_bn * steps_per_epoch
        net = quantize(net, QuantConfig(weight_bits=weight_bits, quant_delay=run.quant_delay, bn_fold=run.bn_fold,
                                        freeze_bn=freeze_step))
    return net


def make_optimizer(net, run, steps_per_epoch):
    """Weight decay on conv and dense weights only, not on BatchNorm's gamma/beta or biases."""
    params = net.trainable_params()
    decayed = [p for p in params if p.name.endswith(".weight")]
    others = [p for p in params if not p.name.endswith(".weight")]
    groups = [{"params": decayed, "weight_decay": run.weightDecay}, {"params": others, "weight_decay": 0.0}]
    return OPTIMIZERS[run.optimizer](groups, schedules.learning_rates(run, steps_per_epoch), run)


def make_loss(run):
    if run.label_smoothing:
        return nn.CrossEntropyLoss(reduction="mean", label_smoothing=run.label_smoothing)
    return nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")  # the seed's loss


def build_train_network(net, optimizer, run, rank=0):
    """One training step (loss, gradients, optimizer update) as a Cell: with --adv_train, on adversarial images
    (adversarial.py, with worker `rank`'s random starts); with --amp, in mixed precision (amp_step)."""
    if run.amp != "O0":
        return amp_step(net, optimizer, run)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, make_loss(run)), optimizer)
    if run.adv_train != "none":
        step = adversarial.AdversarialStep(step, net, run, rank)
    return step


def amp_step(net, optimizer, run):
    """The training step in mixed precision: O2 keeps BatchNorm and the quantizers in float32 and scales the loss,
    dynamically on GPU (MindSpore's default); CPU, where check_amp refuses --amp as slower but the tests build
    it, takes a fixed scale."""
    options = {}
    if ms.get_context("device_target") == "CPU":
        options["loss_scale_manager"] = ms.FixedLossScaleManager(1024.0, drop_overflow_update=False)
    train_net = ms.amp.build_train_network(net, optimizer, make_loss(run), level=run.amp, **options)
    # O2 marks every cell but BatchNorm float16; the quantizers compute in float32 (their rounding
    # constant, 1.5 * 2^23, is beyond float16's range).
    for _, cell in net.cells_and_names():
        if isinstance(cell, (quant.ActQuant, quant.WeightQuant)):
            cell.to_float(ms.float32)
    return train_net


if __name__ == "__main__":
    main()
