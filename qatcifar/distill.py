"""Knowledge distillation (Hinton et al. 2015): `train.py --teacher CKPT` trains the network on a trained teacher's
soft targets as well as on the labels.

    loss = (1 - kd_weight) x cross-entropy(student, labels)
           + kd_weight x T^2 x KL(softmax(teacher / T) || softmax(student / T))        (T: --kd_temperature)

The teacher is any checkpoint the toolkit reads (any --arch, float32 or QAT), loaded as eval.py loads it and kept in
eval mode for the whole run (Model.train's set_train does not reach it), its weights frozen: no gradient, no
optimizer state, and not in the run's checkpoints (its parameters are named `teacher.<name>`, which
checkpoint.save leaves out). T^2 keeps the soft targets' gradients on the scale of the labels' as T changes
(Hinton et al.). Its path is in args.json; a resumed run gives --teacher again.
"""
import os

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from qatcifar import checkpoint, cifar, cli, quant

PREFIX = checkpoint.TEACHER_PREFIX  # of the teacher's parameters: checkpoint.save leaves them out
DEFAULTS = {"kd_weight": 0.9, "kd_temperature": 4.0}
# Hinton et al. use 1 to 20. Beyond these, float32 fails: logits / T overflow below, T^2 x KL loses every digit above.
TEMPERATURES = (0.1, 100.0)
PROBE_IMAGES = 2  # images of noise the teacher must give sane class scores for before training starts
MAX_SCORE = 1e4  # a trained network's class scores are tens; softmax(1e36 / T) underflows to log(0) in float32


def add_arguments(parser):
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", metavar="CKPT", default=None,
                       help="a trained checkpoint (any --arch, float32 or QAT) whose soft targets the network also "
                            "learns (Hinton et al. 2015)")
    group.add_argument("--kd_weight", type=cli.share, default=None,
                       help=f"with --teacher: the soft targets' share of the loss, in (0, 1] "
                            f"(default {DEFAULTS['kd_weight']})")
    group.add_argument("--kd_temperature", type=cli.float_range(*TEMPERATURES), default=None,
                       help=f"with --teacher: the softmax temperature of the soft targets, {TEMPERATURES[0]:g} to "
                            f"{TEMPERATURES[1]:g} (default {DEFAULTS['kd_temperature']:g})")


def resolve(run):
    """Check the distillation flags against each other and the run, and fill in the defaults. Raises InputError."""
    given = [f"--{name}" for name in DEFAULTS if getattr(run, name) is not None]
    if run.teacher is None:
        if given:
            raise cli.InputError(f"{given[0]} belongs to distillation; add --teacher CKPT")
        return
    if run.amp != "O0":
        raise cli.InputError("--teacher trains in float32 here; drop --amp")
    if not run.teacher.endswith(".ckpt"):
        raise cli.InputError(f"--teacher {run.teacher} is not a .ckpt file; give a checkpoint written by train.py")
    if not os.path.isfile(run.teacher):
        problem = "is not a file" if os.path.exists(run.teacher) else "does not exist"
        raise cli.InputError(f"--teacher {run.teacher} {problem}; give a checkpoint written by train.py")
    for name, value in DEFAULTS.items():
        if getattr(run, name) is None:
            setattr(run, name, value)


def load_teacher(path):
    """The teacher network of a checkpoint, in eval mode for good, its parameters renamed and frozen."""
    net, config = checkpoint.load_network(path, cifar.NUM_CLASSES, "--teacher")
    if config is not None:
        quant.freeze(net)  # (its weights quantized once, not at every step)
    images = np.random.default_rng(0).normal(size=(PROBE_IMAGES, 3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE))
    scores = net(ms.Tensor(images, ms.float32)).asnumpy()
    if not (np.isfinite(scores).all() and np.abs(scores).max() <= MAX_SCORE):
        raise cli.InputError(f"--teacher {path} gives class scores of {np.abs(scores).max():.3g} for an image of "
                             f"noise, not finite numbers within +-{MAX_SCORE:g} as a trained network's: its soft "
                             "targets would make the loss NaN; the file is damaged: give another checkpoint")
    for param in net.get_parameters():
        param.name, param.requires_grad = PREFIX + param.name, False
    return Frozen(net)


def describe(run):
    """The line train.py prints of a distilling run."""
    return (f"distillation: from {run.teacher}, soft targets at temperature {run.kd_temperature:g} weigh "
            f"{run.kd_weight:g} of the loss, the labels {1 - run.kd_weight:g}")


class Frozen(nn.Cell):
    """A network that stays in eval mode (set_train on an enclosing cell does not reach it) and passes no gradient."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net.set_train(False)

    def add_flags_recursive(self, **flags):
        flags.pop("training", None)
        return super().add_flags_recursive(**flags)

    def construct(self, x):
        return ops.stop_gradient(self.net(x))


class DistillLoss(nn.Cell):
    """The distillation loss of `net` on (images, labels): `hard_loss` on the labels, KL to `teacher`'s soft targets
    (a WithLossCell for TrainOneStepCell)."""

    def __init__(self, net, teacher, hard_loss, weight, temperature):
        super().__init__(auto_prefix=False)
        self.net, self.teacher, self.hard_loss = net, teacher, hard_loss
        self.weight, self.temperature = weight, temperature

    def construct(self, images, labels):
        logits = self.net(images)
        student = ops.log_softmax(logits / self.temperature, axis=-1)
        targets = ops.log_softmax(self.teacher(images) / self.temperature, axis=-1)
        kl = (ops.exp(targets) * (targets - student)).sum(axis=-1).mean()
        soft = kl * (self.temperature * self.temperature)
        return (1 - self.weight) * self.hard_loss(logits, labels) + self.weight * soft
