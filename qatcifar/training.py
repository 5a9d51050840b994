"""What a training run is made of, built from train.py's flags: the flags beyond the seed's, the data, the network,
the optimizer, the loss and the training step (train.py runs them; bench.py times the step alone).

    >>> from qatcifar import training
    >>> run = training.settings(["--arch", "resnet8"])
    >>> net = training.build_network(run, steps_per_epoch=1)
    >>> step = training.build_train_network(net, training.make_optimizer(net, run, 1), run)
"""
import argparse

import mindspore as ms
import mindspore.nn as nn

from qatcifar import adversarial, cifar, cli, distill, files, networks, quant, schedules
from qatcifar.quant import QuantConfig, quantize

VALIDATION_BATCH = 100
OPTIMIZERS = {  # name: (parameter groups, learning rate, run) -> optimizer
    "adam": lambda groups, lr, run: nn.Adam(groups, learning_rate=lr),
    "momentum": lambda groups, lr, run: nn.Momentum(groups, learning_rate=lr, momentum=run.momentum),
    "sgd": lambda groups, lr, run: nn.SGD(groups, learning_rate=lr, momentum=run.momentum,
                                          nesterov=run.momentum > 0),
}


# The defaults of the seed's flags, which train.py's parser defines (its first eight).
SEED_DEFAULTS = {"batchsize": 32, "repeatNum": 1, "savedir": "checkpoints", "epoch": 40, "optimizer": "adam",
                 "learningRate": 0.001, "momentum": 0.9, "weightDecay": 1e-4}


def settings(flags=()):
    """train.py's settings as its parser gives them: the seed's defaults, and `flags` of the others (bench.py, which
    times the training step alone)."""
    parser = cli.ArgumentParser(prog="train.py")
    parser.set_defaults(**SEED_DEFAULTS)
    add_arguments(parser)
    return parser.parse_args(list(flags))


def add_arguments(parser):
    """train.py's flags beyond the seed's."""
    parser.add_argument("--arch", choices=tuple(networks.ARCHS), default=None,
                        help=f"the network: resnet8 (MLPerf Tiny's, 78 k parameters), resnet20 (0.27 M) or resnet18 "
                             f"(11.2 M, the seed's); default: the checkpoint's with --resume, else "
                             f"{networks.DEFAULT_ARCH}")
    parser.add_argument("-data", "--data_dir", default=cifar.DEFAULT_DATA_DIR,
                        help="CIFAR-10 binary folder (see preprocess.py --download / --synthetic)")
    cli.add_device_argument(parser)
    parser.add_argument("--qat", action=argparse.BooleanOptionalAction, default=True,
                        help="quantization-aware training (int8 weights and activations); --no-qat trains float32")
    parser.add_argument("--weight_bits", type=cli.int_range(2, 8), default=None, metavar="B",
                        help=f"QAT: the weights' bits, 2 to 8, but the first convolution's and the classifier's "
                             f"(--first_last_bits); default {QuantConfig.weight_bits}, which ONNX Runtime computes "
                             "exactly and fast on every CPU (8 bits: exactly, more slowly; 4 and fewer: two to a byte "
                             "in the int8 file)")
    parser.add_argument("--first_last_bits", type=cli.int_range(2, 8), default=None, metavar="B",
                        help=f"QAT: the bits of the first convolution's and the classifier's weights (default "
                             f"{QuantConfig.weight_bits}: they keep them, as the low-bit literature does)")
    parser.add_argument("--act_bits", type=cli.int_range(2, 8), default=None, metavar="B",
                        help=f"QAT: the activations' bits, 2 to 8, but the network input's and the classifier "
                             f"input's, which keep {quant.ACT_BITS} (default {quant.ACT_BITS}; below 8 the int8 file "
                             "holds them, ONNX cannot: its QuantizeLinear saturates at 255)")
    parser.add_argument("--quantizer", choices=quant.QUANTIZERS, default=None,
                        help="QAT: how quantization ranges are found: minmax, from min/max observers; lsq, learned "
                             "step sizes (LSQ), for 4 bits and fewer (default: the checkpoint's with --resume, else "
                             f"{QuantConfig.quantizer})")
    parser.add_argument("--layer_bits", metavar="FILE", default=None,
                        help="QAT: a JSON object of layer names and weight bits, e.g. {\"layer3.0.conv2\": 4}, over "
                             "--weight_bits and --first_last_bits (eval.py --sensitivity suggests one)")
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
                        help="validate on the test split every N epochs and keep the best as <prefix>-best.ckpt; 0: "
                             "never (default: 1 when the data folder has test_batch.bin, else 0)")
    parser.add_argument("--val_samples", type=cli.positive_int, default=None, metavar="N",
                        help="validate on the first N test images (default: all)")
    parser.add_argument("--keep", type=cli.positive_int, default=5, metavar="N",
                        help="keep the newest N periodic checkpoints (<prefix>-best.ckpt is kept besides)")
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
    distill.add_arguments(parser)


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
    if args.quantizer == "lsq":
        raise cli.InputError("--quantizer lsq trains in float32 only; drop --amp or use --quantizer minmax")


def load_data(run, rank=0):
    """The training pipeline; with several workers, this worker's shard: 1/workers of the images
    of each epoch (of --num_samples, when given, which counts all workers' images)."""
    workers = run.workers
    if run.num_samples is not None and run.num_samples < workers:
        raise cli.InputError(f"--num_samples {run.num_samples} cannot be shared among {workers} workers; "
                             f"give at least {workers * run.batchsize} (workers x -bsize)")
    per_worker = None if run.num_samples is None else run.num_samples // workers
    dataset = cifar.create_dataset(run.data_dir, training=True, batch_size=run.batchsize,
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
        return cifar.create_dataset(run.data_dir, training=False, batch_size=VALIDATION_BATCH,
                                         num_samples=run.val_samples)
    except cifar.DatasetError as e:
        raise cli.InputError(f"{e} (for --eval_every; --eval_every 0 trains without validation)") from None


def build_network(run, steps_per_epoch, resumed=None):
    """The run's network; QAT as `resumed` says ({weight_bits, layer_bits, act_bits, quantizer}: the QuantConfig
    fields of the checkpoint it resumes), else as the flags say (`quant_choices`)."""
    net = networks.resnet(run.arch or networks.DEFAULT_ARCH, cifar.NUM_CLASSES)
    if run.qat:
        freeze_step = -1 if run.freeze_bn is None else run.freeze_bn * steps_per_epoch
        chosen = resumed or quant_choices(run, networks.weighted_layers(net))
        net = quantize(net, QuantConfig(**chosen, quant_delay=run.quant_delay, bn_fold=run.bn_fold,
                                        freeze_bn=freeze_step))
    return net


def quant_choices(run, layers=None):
    """The QuantConfig fields that the flags choose: {weight_bits, layer_bits (weight_bits_of), act_bits, quantizer}."""
    weight_bits, layer_bits = weight_bits_of(run, layers)
    return {"weight_bits": weight_bits, "layer_bits": layer_bits,
            "act_bits": getattr(run, "act_bits", None) or quant.ACT_BITS,
            "quantizer": getattr(run, "quantizer", None) or QuantConfig.quantizer}


def weight_bits_of(run, layers=None):
    """(weight_bits, layer_bits) of the flags: --weight_bits for every layer but the first and the last, which have
    --first_last_bits (QuantConfig's default bits where a flag is not given), then --layer_bits' layers; `layers`:
    the network's (networks.weighted_layers), against which --layer_bits' names are checked."""
    bits = getattr(run, "weight_bits", None) or QuantConfig.weight_bits
    edges = getattr(run, "first_last_bits", None) or QuantConfig.weight_bits
    chosen = {layer: edges for layer in networks.EDGE_LAYERS}
    if getattr(run, "layer_bits", None):
        given = getattr(run, "layer_bits_read", None) or read_layer_bits(run.layer_bits)  # (read once: resolve_losses)
        chosen.update(check_layer_names(run.layer_bits, given, layers))
    return bits, tuple(sorted((layer, b) for layer, b in chosen.items() if b != bits))


def read_layer_bits(path):
    """--layer_bits FILE: {layer name: weight bits 2 to 8}; InputError naming what is wrong. A small regular file
    only (files.read_small: no FIFO, no device, no file of megabytes, no nesting that exhausts the parser)."""
    try:
        chosen = files.load_json(path)
    except (OSError, ValueError) as e:
        raise cli.InputError(f"--layer_bits {path}: {files.why(e)}; give a JSON file like "
                             '{"layer3.0.conv2": 4}') from None
    if not isinstance(chosen, dict) or not all(type(b) is int and 2 <= b <= 8 for b in chosen.values()):
        raise cli.InputError(f"--layer_bits {path} is not a JSON object of layer names and bits from 2 to 8, like "
                             '{"layer3.0.conv2": 4}')
    return chosen


def check_layer_names(path, chosen, layers=None):
    """`chosen` (read_layer_bits' of --layer_bits `path`), InputError for a name not among `layers` (when given)."""
    unknown = sorted(set(chosen) - set(layers)) if layers is not None else []
    if unknown:
        raise cli.InputError(f"--layer_bits {path} names {unknown[0]}, which is not a layer of this network; its "
                             f"layers: {', '.join(layers)}")
    return chosen


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


def resolve_losses(run):
    """Check the flags of adversarial training and distillation and fill in their defaults, and read --layer_bits
    (InputError)."""
    adversarial.resolve(run)
    distill.resolve(run)
    if getattr(run, "layer_bits", None):
        run.layer_bits_read = read_layer_bits(run.layer_bits)


def build_train_network(net, optimizer, run, rank=0):
    """One training step (loss, gradients, optimizer update) as a Cell: with --teacher, on a distillation loss
    (distill.py); with --adv_train, on adversarial images (adversarial.py, with worker `rank`'s random starts); with
    --amp, in mixed precision (amp_step)."""
    if run.amp != "O0":
        return amp_step(net, optimizer, run)
    if getattr(run, "teacher", None):  # (knowledge distillation: distill.py)
        loss = distill.DistillLoss(net, distill.load_teacher(run.teacher), make_loss(run), run.kd_weight,
                                   run.kd_temperature)
    else:
        loss = nn.WithLossCell(net, make_loss(run))
    step = nn.TrainOneStepCell(loss, optimizer)
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
