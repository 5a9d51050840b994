"""Train ResNet-18 on CIFAR-10 with quantization-aware training (QAT), in MindSpore, on CPU or GPU.

    python train.py                                              # the seed's run: QAT, Adam, 40 epochs
    python train.py -bsize 128 -e 40 -opt momentum -lr 0.05      # the seed's flags
    python train.py -data data/demo -e 2 --num_samples 1024      # a quick trial on synthetic data

Writes `<prefix>-<epoch>_<step>.ckpt` after every epoch into the save directory (-dir,
default checkpoints/), `args.json` with the resolved arguments, appends one line per epoch
to `metrics.jsonl`, and prints the final checkpoint's path; `python eval.py -loc <that path>`
evaluates it.
"""
import cli  # noqa: F401  (first: quiets MindSpore's log before it loads)

import argparse
import json
import math
import os
import tempfile
import time

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np
from mindspore.train import Callback, CheckpointConfig, Model, ModelCheckpoint

import eval as evaluate
import preprocess
from quant import QuantConfig, quantize
from resnetv2 import resnet18

METRICS_FILE = "metrics.jsonl"
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
                        help="batch size (per device)")
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
                        help="keep the newest N per-epoch checkpoints (best.ckpt is kept besides)")
    parser.add_argument("--log_every", type=cli.positive_int, default=50, metavar="N",
                        help="print a progress line every N steps (and at the end of each epoch)")
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
    check_save_dir(args.savedir)
    args.device = cli.setup_device(args.device)
    ms.set_seed(args.seed)
    ds.config.set_seed(args.seed)
    dataset = load_data(args)
    steps_per_epoch = dataset.get_dataset_size()
    validation = load_validation_data(args)

    print("arguments: " + json.dumps(vars(args), sort_keys=True))
    if preprocess.is_synthetic(args.data_dir):
        print(f"note: {args.data_dir} holds synthetic data, not CIFAR-10")
    with open(os.path.join(args.savedir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)

    net = resnet18(preprocess.NUM_CLASSES)
    if args.qat:
        freeze_step = -1 if args.freeze_bn is None else args.freeze_bn * steps_per_epoch
        net = quantize(net, QuantConfig(quant_delay=args.quant_delay, bn_fold=args.bn_fold, freeze_bn=freeze_step))
    model = Model(net, loss_fn=make_loss(args), optimizer=make_optimizer(net, args, steps_per_epoch))
    checkpoints = ModelCheckpoint(prefix="resnet18_qat" if args.qat else "resnet18", directory=args.savedir,
                                  config=CheckpointConfig(save_checkpoint_steps=steps_per_epoch,
                                                          keep_checkpoint_max=args.keep,
                                                          append_info=["epoch_num", "step_num"]))
    validate = Validator(net, validation, args.eval_every, args.savedir) if validation else None
    progress = Progress(args.batchsize, steps_per_epoch, args.log_every, os.path.join(args.savedir, METRICS_FILE),
                        validate)
    model.train(args.epoch, dataset, callbacks=[progress, checkpoints], dataset_sink_mode=False)

    path = checkpoints.latest_ckpt_file_name
    print(f"checkpoint: {path}")
    return path


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


def load_data(args):
    try:
        dataset = preprocess.create_dataset(args.data_dir, training=True, batch_size=args.batchsize,
                                            repeat_num=args.repeatNum, num_samples=args.num_samples)
    except preprocess.DatasetError as e:
        cli.fail(str(e))
    if dataset.get_dataset_size() == 0:
        images = args.num_samples or "the"
        cli.fail(f"batch size {args.batchsize} is larger than {images} training images per epoch; "
                 "lower -bsize or raise --num_samples")
    return dataset


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

    def __init__(self, net, dataset, every, savedir):
        self.net, self.dataset, self.every = net, dataset, every
        self.path = os.path.join(savedir, BEST_FILE)
        self.best = previous_best(self.path)  # an earlier run's better model in this folder is kept

    def __call__(self, epoch, last):
        if epoch % self.every and not last:
            return None
        self.net.set_train(False)
        predictions, labels = evaluate.predict(self.net, self.dataset)
        self.net.set_train(True)
        accuracy = float((predictions == labels).mean())
        better = self.best is None or accuracy > self.best
        print(f"validation accuracy {100 * accuracy:.2f}% on {len(labels)} test images"
              + (f" (best so far: {self.path})" if better else f" (best: {100 * self.best:.2f}%)"), flush=True)
        if better:
            self.best = accuracy
            save_atomically(self.net, self.path, {"epoch_num": epoch, "val_accuracy": accuracy})
        return accuracy


def previous_best(path):
    if not os.path.exists(path):
        return None
    try:
        return float(ms.load_checkpoint(path, choice_func=lambda name: name == "val_accuracy")["val_accuracy"].asnumpy())
    except (ValueError, RuntimeError, KeyError, OSError):
        print(f"warning: {path} is unreadable or has no val_accuracy; this run's best model will replace it")
        return None


def save_atomically(net, path, append_dict):
    """Write a checkpoint under a temporary name in the same folder, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}.ckpt"
    try:
        ms.save_checkpoint(net, tmp, append_dict=append_dict)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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

    A line: epoch and step (of the epoch and of the run), loss, learning rate, images/s, time
    elapsed and the estimated time left. Images/s leave out the first step (graph compilation).
    """

    def __init__(self, batch_size, steps_per_epoch, every, metrics_path, validate=None):
        super().__init__()
        self.validate = validate
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.every = every
        self.metrics_path = metrics_path

    def on_train_begin(self, run_context):
        self.start = time.time()
        self.timed_start, self.timed_steps = None, 0  # measured from the end of the first step

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = time.time()
        self.epoch_timed_steps, self.epoch_timed_time = 0, 0.0
        self.losses = []

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        self.losses.append(float(cb.net_outputs.asnumpy()))
        now = time.time()
        if self.timed_start is None:
            print(f"first step done in {now - self.start:.1f} s (includes graph compilation)", flush=True)
            self.timed_start = self.last = now
            return
        self.timed_steps += 1
        self.epoch_timed_steps += 1
        self.epoch_timed_time += now - self.last
        self.last = now
        step = (cb.cur_step_num - 1) % self.steps_per_epoch + 1
        if step % self.every == 0 or step == self.steps_per_epoch:
            total = cb.epoch_num * self.steps_per_epoch
            per_step = (now - self.timed_start) / self.timed_steps
            print(f"epoch {cb.cur_epoch_num}/{cb.epoch_num} step {step}/{self.steps_per_epoch} "
                  f"({cb.cur_step_num}/{total}) loss {self.losses[-1]:.4f} lr {learning_rate(cb):.3g} "
                  f"{self.batch_size / per_step:.1f} images/s elapsed {clock(now - self.start)} "
                  f"eta {clock(per_step * (total - cb.cur_step_num))}", flush=True)

    def on_train_epoch_end(self, run_context):
        cb = run_context.original_args()
        now = time.time()
        speed = self.epoch_timed_steps * self.batch_size / self.epoch_timed_time if self.epoch_timed_steps else None
        record = {"epoch": cb.cur_epoch_num, "step": cb.cur_step_num, "loss": sum(self.losses) / len(self.losses),
                  "lr": learning_rate(cb), "images_per_s": speed, "epoch_s": now - self.epoch_start,
                  "elapsed_s": now - self.start, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(f"epoch {cb.cur_epoch_num}/{cb.epoch_num} done in {record['epoch_s']:.1f} s, "
              f"mean loss {record['loss']:.4f}", flush=True)
        if self.validate:
            record["val_accuracy"] = self.validate(cb.cur_epoch_num, cb.cur_epoch_num == cb.epoch_num)
        with open(self.metrics_path, "a") as f:  # append: an earlier run's records stay
            f.write(json.dumps(record) + "\n")


def learning_rate(cb):
    """The optimizer's learning rate at the current step (a constant, or one value per step)."""
    rate = cb.optimizer.learning_rate
    rate = getattr(rate, "learning_rate", rate)  # a per-step schedule is a Cell holding the Parameter
    rates = np.asarray(rate.asnumpy()).reshape(-1)
    return float(rates[min(cb.cur_step_num - 1, rates.size - 1)])


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"

if __name__ == "__main__":
    main()
