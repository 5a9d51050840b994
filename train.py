"""Train a ResNet on CIFAR-10 with quantization-aware training (QAT), in MindSpore, on CPU or GPU.

    python train.py                                              # the seed's run: ResNet-18, QAT, Adam, 40 epochs
    python train.py -bsize 128 -e 40 -opt momentum -lr 0.05      # the seed's flags
    python train.py --arch resnet8 -e 40                         # MLPerf Tiny's 78 k-parameter ResNet-8
    python train.py -data data/demo -e 2 --num_samples 1024      # a quick trial on synthetic data
    msrun --worker_num=4 --local_worker_num=4 --join=True train.py --scale_lr   # data parallel on 4 GPUs

Writes `<prefix>-<epoch>_<step>.ckpt` after every epoch into the save directory (-dir,
default checkpoints/), `<prefix>-args.json` with the resolved arguments, appends one line per epoch
to `<prefix>-metrics.jsonl`, keeps `<prefix>-best.ckpt` and `<prefix>-curves.png` (every run its own
prefix: resnet18_qat, then resnet18_qat_1, ...; a resumed run keeps its own), and prints the final
checkpoint's path; `python eval.py -loc <that path>` evaluates it. What a run is built from (the
flags, data, network, optimizer, training step) is in qatcifar/training.py, the callbacks
(stopping, saving, validating, progress) in qatcifar/callbacks.py, the checkpoint files in
qatcifar/checkpoint.py; docs/training.md explains the run.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import argparse  # noqa: E402
import json
import os

import mindspore as ms
import mindspore.dataset as ds
from mindspore.train import Model

from qatcifar import (
    adversarial,
    callbacks,
    checkpoint,
    cifar,
    distill,
    files,
    int8,
    networks,
    parallel,
    plots,
    quant,
    schedules,
    training,
)
from qatcifar.plots import trim_metrics
from qatcifar.quant import QuantConfig
from qatcifar.training import SEED_DEFAULTS  # noqa: E402


def get_args_parser():
    parser = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    # The seed's flags, both spellings, as in its usage text.
    parser.add_argument("-bsize", "--batchsize", type=cli.positive_int, default=SEED_DEFAULTS["batchsize"],
                        help="batch size per device: under msrun, per worker (the global batch: workers x this)")
    parser.add_argument("-repeatNum", "--repeatNum", type=cli.positive_int, default=SEED_DEFAULTS["repeatNum"],
                        help="repeat num: passes over the data in one epoch")
    parser.add_argument("-dir", "--savedir", default=SEED_DEFAULTS["savedir"], help="save directory")
    parser.add_argument("-e", "--epoch", type=cli.positive_int, default=SEED_DEFAULTS["epoch"], help="no of epochs")
    parser.add_argument("-opt", "--optimizer", type=str.lower, choices=sorted(training.OPTIMIZERS),
                        default=SEED_DEFAULTS["optimizer"], metavar="OPTIMIZER",
                        help="optimizer: adam, momentum, or sgd (Nesterov SGD)")
    parser.add_argument("-lr", "--learningRate", type=cli.positive_float, default=SEED_DEFAULTS["learningRate"],
                        help="learning rate")
    parser.add_argument("-m", "--momentum", type=cli.unit_interval, default=SEED_DEFAULTS["momentum"],
                        help="momentum of -opt momentum and sgd, in [0, 1)")
    parser.add_argument("-wDecay", "--weightDecay", type=cli.non_negative_float, default=SEED_DEFAULTS["weightDecay"],
                        help="weight decay (L2) of conv and dense weights")
    training.add_arguments(parser)  # ours
    return parser


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.bn_fold or args.freeze_bn is not None) and not args.qat:
        parser.error("--bn_fold and --freeze_bn need QAT; drop --no-qat")
    if args.freeze_bn is not None and not args.bn_fold:
        parser.error("--freeze_bn needs --bn_fold")
    if (args.weight_bits or args.first_last_bits or args.layer_bits or args.act_bits or args.quantizer) \
            and not args.qat:
        parser.error("--weight_bits, --first_last_bits, --layer_bits, --act_bits and --quantizer are QAT's; drop "
                     "--no-qat")
    if args.quantizer == "lsq" and args.bn_fold:
        parser.error("--quantizer lsq learns the steps of unfolded weights; drop --bn_fold (or use --quantizer "
                     "minmax)")
    try:  # (Ctrl-C and SIGTERM go to the Guard, which stops training after the current step)
        return interrupts.run(train, args, deferred=True)
    except callbacks.Stop as stop:  # the documented exit statuses of an interrupted, diverged or failed run
        raise SystemExit(stop.report()) from None
    finally:
        files.release_locks()
        files.remove_created_folders()  # (those still empty: a run refused or stopped before it wrote anything)



def train(args):
    """Train as the flags say; return the last checkpoint's path (None on workers that do not save)."""
    run, rank = resolve(args)
    writer = rank == 0  # only the first worker writes into the save directory and prints progress
    ms.set_seed(run.seed)  # the same seed on every worker: the same initial weights
    ds.config.set_seed(run.seed)  # and the same shuffle, of which each worker takes its own shard
    dataset = training.load_data(run, rank)  # the data folder is checked before anything is written
    steps_per_epoch = dataset.get_dataset_size()
    schedules.check_step_count(run, steps_per_epoch)
    validation = training.load_validation_data(run)
    if writer:
        files.check_save_dir(run.savedir)
        if run.summary_dir:
            files.check_save_dir(run.summary_dir, "--summary_dir")
        files.lock_save_dir(run.savedir)  # one run per save folder, held until this process ends

    found = checkpoint.find_resume(run.resume, run.savedir) if run.resume else None
    run.arch = resumed_arch(run, found)
    net = training.build_network(run, steps_per_epoch, resumed_quantization(run, found))
    record_quantization(run, net)
    optimizer = training.make_optimizer(net, run, steps_per_epoch)
    train_net = training.build_train_network(net, optimizer, run, rank)
    if run.workers > 1:
        train_net = parallel.DataParallelStep(train_net, net, run.workers)
    resumed, start_step = resume(run, found, train_net, dataset, steps_per_epoch)

    prefix = start_save_dir(args, run, resumed, net, start_step // steps_per_epoch) if writer else None
    record = files.RunFiles(run.savedir, prefix)
    guard = callbacks.Guard(start_step, steps_per_epoch)
    saver = callbacks.Checkpointer(train_net, run.savedir, prefix, steps_per_epoch, run.save_steps, run.keep,
                                   start_step, guard, latest=resumed, writer=writer)
    validator = progress = None
    if validation:
        validator = callbacks.Validator(net, validation, run.eval_every, run.epoch, record.best, guard, writer,
                                        attack=adversarial.validation_attack(net, run))
    if writer:
        progress = callbacks.Progress(run.global_batch, steps_per_epoch, run.epoch, start_step, run.log_every,
                                      record, plots.run_label(vars(run)), optimizer, guard, validator,
                                      run.summary_dir)
    Model(train_net).train(run.epoch, dataset, callbacks=[cb for cb in (guard, saver, validator, progress) if cb],
                           dataset_sink_mode=False, initial_epoch=start_step // steps_per_epoch)
    if run.workers > 1:  # in each worker's own log: the workers' networks (and validations) must agree
        parallel.report(rank, run.workers, dataset.get_dataset_size() * run.batchsize, net,
                        validator.last if validator else None)
    stop = guard.outcome(saver.latest if writer else callbacks.WORKER_0, resumed)
    if stop:
        raise stop
    if writer:
        print(f"checkpoint: {saver.latest}")
    return saver.latest


def resolve(args):
    """The run's settings: the flags plus what derives from them, resolved once (device, workers,
    global batch, validation, learning rate), as a new namespace; and this worker's rank."""
    device = cli.setup_device(args.device, pynative=args.pynative)
    rank, workers = parallel.init(args.distributed)  # msrun's scheduler process ends in there
    training.check_amp(args, device)
    has_test = os.path.exists(os.path.join(args.data_dir, cifar.TEST_FILE))
    run = argparse.Namespace(**vars(args))
    run.device, run.workers, run.global_batch = device, workers, args.batchsize * workers
    run.eval_every = (1 if has_test else 0) if args.eval_every is None else args.eval_every
    run.learningRate = args.learningRate * workers if args.scale_lr else args.learningRate
    training.resolve_losses(run)
    return run, rank


def resumed_arch(run, found):
    """The network of the run: that of the checkpoint it resumes (`found`: checkpoint.find_resume's), which --arch
    may only repeat; else --arch, or the default."""
    if not found:
        return run.arch or networks.DEFAULT_ARCH
    arch = checkpoint.arch(*found)
    if run.arch and run.arch != arch:
        raise cli.InputError(f"--resume {found[0]} trained {arch}, but this run asks for --arch {run.arch}; resume "
                             f"with --arch {arch} (or without --arch), or train {run.arch} into another -dir")
    return arch


def resumed_quantization(run, found):
    """The QAT choices of the run, {weight_bits, layer_bits, act_bits, quantizer}: those of the checkpoint it resumes
    (`found`: checkpoint.find_resume's), as it was trained, which --weight_bits, --first_last_bits, --layer_bits,
    --act_bits and --quantizer may only repeat; else None (the flags')."""
    config = checkpoint.quant_config(*found) if found else None
    if config is None:
        return None
    def redo(flags):
        return f"resume without {flags}, or train the new choice into another -dir"
    if run.act_bits and run.act_bits != config.act_bits:
        raise cli.InputError(f"--resume {found[0]} trained {config.act_bits}-bit activations, not --act_bits "
                             f"{run.act_bits}; {redo('--act_bits')}")
    if run.quantizer and run.quantizer != config.quantizer:
        raise cli.InputError(f"--resume {found[0]} trained with --quantizer {config.quantizer}, not "
                             f"{run.quantizer}; {redo('--quantizer')}")
    bits = config.weight_bits, config.layer_bits
    if (run.weight_bits or run.first_last_bits or run.layer_bits) and training.weight_bits_of(run) != bits:
        layers = ", ".join(f"{layer} {b}" for layer, b in config.layer_bits)
        raise cli.InputError(f"--resume {found[0]} trained {config.weight_bits}-bit weights"
                             f"{f' ({layers})' if layers else ''}, not what --weight_bits, --first_last_bits and "
                             f"--layer_bits ask; {redo('them')}")
    return {"weight_bits": config.weight_bits, "layer_bits": config.layer_bits, "act_bits": config.act_bits,
            "quantizer": config.quantizer}


def record_quantization(run, net):
    """Record in `run` (and so in args.json) the quantization the network was built with, the resumed checkpoint's or
    the flags' with their defaults: --weight_bits (the most layers'), --first_last_bits, --act_bits, --quantizer, and
    every layer's weight bits (bits_per_layer). A float32 run records none."""
    vars(run).pop("layer_bits_read", None)  # (--layer_bits' contents, read once: bits_per_layer records them)
    if not run.qat:
        return
    params = dict(net.parameters_and_names())
    config = quant.config_from_checkpoint(params)
    bits = quant.bits_per_layer(params)
    run.weight_bits, run.act_bits, run.quantizer = config.weight_bits, config.act_bits, config.quantizer
    run.first_last_bits, run.bits_per_layer = bits[networks.EDGE_LAYERS[0]], bits


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
        report_dropped_teacher(run, path)
        bits = (checkpoint.quant_config(*found) or QuantConfig()).weight_bits
        if run.qat and bits == 8:
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


def report_dropped_teacher(run, path):
    """A note where the resumed run distilled (its args.json names a teacher, which no checkpoint holds) and this one
    is not given --teacher: it goes on without distillation."""
    record = files.RunFiles.of_model(path)
    teacher = record.settings().get("teacher") if record else None
    if teacher and not run.teacher:
        print(f"note: {path}'s run distilled from --teacher {teacher} ({record.args}); this run goes on without "
              f"distillation (give --teacher {teacher} to keep it)", flush=True)


def start_save_dir(args, run, resumed, net, epochs_done):
    """Print the settings and the network's size, write the run's args.json, clear crashed saves, trim the metrics of
    a resumed run to the epochs done (`resumed`: the checkpoint's path); return the prefix of this run's files
    (files.RunFiles): a new run's own, a resumed run's that of the series it continues."""
    print("arguments: " + json.dumps(vars(run), sort_keys=True))
    print(size_card(net))
    if cifar.is_synthetic(run.data_dir):
        print(f"note: {run.data_dir} holds synthetic data, not CIFAR-10")
    if run.scale_lr:  # Goyal et al. 2017's linear scaling rule
        print(f"--scale_lr: learning rate {args.learningRate:g} x {run.workers} worker(s) = {run.learningRate:g}")
    elif run.workers > 1:
        print(f"note: learning rate {run.learningRate:g} is not scaled for the {run.workers}x larger global batch "
              f"(--scale_lr multiplies it by {run.workers})")
    if run.adv_train != "none":
        print(adversarial.describe(run))
    if run.teacher:
        print(distill.describe(run))
    if run.workers > 1:
        print(f"data parallel: {run.workers} workers, batch {run.batchsize} per worker, global batch "
              f"{run.global_batch}; each worker trains on its own 1/{run.workers} of every epoch", flush=True)
    prefix = checkpoint.series_prefix(run.savedir, checkpoint.series_base(model_kind(run), run.arch), resumed)
    record = files.RunFiles(run.savedir, prefix)
    print(f"this run's files in {run.savedir}/: {prefix}-<epoch>_<step>.ckpt, {os.path.basename(record.best)}, "
          f"{os.path.basename(record.metrics)}, {os.path.basename(record.curves)}, {os.path.basename(record.args)}")
    try:
        files.write_text(record.args, json.dumps(vars(run), indent=2, sort_keys=True))
    except OSError as e:
        raise callbacks.Stop(callbacks.EXIT_SAVE_FAILED, f"could not write {record.args} ({e.strerror}); nothing was "
                             "trained; free space or fix the save folder, then run again", error=True) from None
    files.remove_stale_partials(run.savedir)
    if resumed:
        repair_metrics(record.metrics, epochs_done, os.path.getmtime(resumed))
    return prefix


def repair_metrics(path, epochs_done, saved):
    """plots.trim_metrics, each removal said in one line; a failure to write is a failed save (exit status 1)."""
    try:
        damaged, later = trim_metrics(path, epochs_done, saved)
    except OSError as e:
        raise callbacks.Stop(callbacks.EXIT_SAVE_FAILED, f"could not repair {path} ({files.why(e)}); nothing was "
                             "trained; free space or fix the save folder, then run again", error=True) from None
    if damaged:
        print(f"warning: {path}: removed {damaged} line(s) cut short (not whole JSON records)")
    if later:
        print(f"note: {path}: removed {later} record(s) of epochs after {epochs_done}, the checkpoint's: this run "
              "trains them again")


def size_card(net):
    """One line: the network's name, parameters, multiply-accumulates per image and the int8 file to expect."""
    profile = networks.profile(net)
    return (f"network: {profile['arch']}, {profile['params']:,} parameters, {profile['macs'] / 1e6:,.1f} M "
            f"multiply-accumulates per 32x32 image; its int8 file (export.py --format int8) will be about "
            f"{cli.size_text(int8.expected_size(profile))}")


def model_kind(run):
    return checkpoint.kind(QuantConfig(bn_fold=run.bn_fold) if run.qat else None)



if __name__ == "__main__":
    main()
