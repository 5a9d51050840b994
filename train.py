"""Train ResNet-18 on CIFAR-10 with quantization-aware training (QAT), in MindSpore, on CPU or GPU.

    python train.py                                              # the seed's run: QAT, Adam, 40 epochs
    python train.py -bsize 128 -e 40 -opt momentum -lr 0.05      # the seed's flags
    python train.py -data data/demo -e 2 --num_samples 1024      # a quick trial on synthetic data

Writes `<prefix>-<epoch>_<step>.ckpt` after every epoch into the save directory (-dir,
default checkpoints/), `args.json` with the resolved arguments, and prints the final
checkpoint's path; `python eval.py -loc <that path>` evaluates it.
"""
import cli  # noqa: F401  (first: quiets MindSpore's log before it loads)

import argparse
import json
import os
import tempfile
import time

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
from mindspore.train import Callback, CheckpointConfig, Model, ModelCheckpoint

import preprocess
from quant import QuantConfig, quantize
from resnetv2 import resnet18

LOG_EVERY = 50  # steps between progress lines, besides the one at each epoch's end


def adam(groups, args):
    return nn.Adam(groups, learning_rate=args.learningRate)


def momentum(groups, args):
    return nn.Momentum(groups, learning_rate=args.learningRate, momentum=args.momentum)


def sgd(groups, args):
    return nn.SGD(groups, learning_rate=args.learningRate, momentum=args.momentum, nesterov=args.momentum > 0)


OPTIMIZERS = {"adam": adam, "momentum": momentum, "sgd": sgd}


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

    print("arguments: " + json.dumps(vars(args), sort_keys=True))
    if preprocess.is_synthetic(args.data_dir):
        print(f"note: {args.data_dir} holds synthetic data, not CIFAR-10")
    with open(os.path.join(args.savedir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)

    net = resnet18(preprocess.NUM_CLASSES)
    if args.qat:
        freeze_step = -1 if args.freeze_bn is None else args.freeze_bn * steps_per_epoch
        net = quantize(net, QuantConfig(quant_delay=args.quant_delay, bn_fold=args.bn_fold, freeze_bn=freeze_step))
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    model = Model(net, loss_fn=loss, optimizer=make_optimizer(net, args))
    checkpoints = ModelCheckpoint(prefix="resnet18_qat" if args.qat else "resnet18", directory=args.savedir,
                                  config=CheckpointConfig(save_checkpoint_steps=steps_per_epoch,
                                                          append_info=["epoch_num", "step_num"]))
    progress = Progress(args.batchsize, steps_per_epoch)
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


def make_optimizer(net, args):
    """Weight decay on conv and dense weights only, not on BatchNorm's gamma/beta or biases."""
    params = net.trainable_params()
    decayed = [p for p in params if p.name.endswith(".weight")]
    others = [p for p in params if not p.name.endswith(".weight")]
    groups = [{"params": decayed, "weight_decay": args.weightDecay}, {"params": others, "weight_decay": 0.0}]
    return OPTIMIZERS[args.optimizer](groups, args)


class Progress(Callback):
    """Prints epoch, step, loss and images/s every LOG_EVERY steps and at the end of each epoch."""

    def __init__(self, batch_size, steps_per_epoch, every=LOG_EVERY):
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.every = every

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = self.window_start = time.time()
        self.window_steps = 0
        self.losses = []

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        step = (cb.cur_step_num - 1) % self.steps_per_epoch + 1
        self.losses.append(float(cb.net_outputs.asnumpy()))
        now = time.time()
        if cb.cur_step_num == 1:  # keep graph compilation out of the images/s figures
            print(f"first step done in {now - self.window_start:.1f} s (includes graph compilation)", flush=True)
            self.window_start = now
            return
        self.window_steps += 1
        if step % self.every == 0 or step == self.steps_per_epoch:
            speed = self.window_steps * self.batch_size / (now - self.window_start)
            print(f"epoch {cb.cur_epoch_num}/{cb.epoch_num} step {step}/{self.steps_per_epoch} "
                  f"loss {self.losses[-1]:.4f} {speed:.1f} images/s", flush=True)
            self.window_start, self.window_steps = now, 0

    def on_train_epoch_end(self, run_context):
        cb = run_context.original_args()
        mean_loss = sum(self.losses) / len(self.losses)
        print(f"epoch {cb.cur_epoch_num}/{cb.epoch_num} done in {time.time() - self.epoch_start:.1f} s, "
              f"mean loss {mean_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
