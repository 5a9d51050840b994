"""Adversarial training in train.py's compiled training step: FGSM with a random start, or PGD-k.

    python train.py --adv_train fgsm                  # FGSM-RS: eps 8/255, a step of 1.25 eps (Wong et al. 2020)
    python train.py --adv_train pgd --adv_steps 7     # PGD-7: steps of 2.5 eps / 7 (Madry et al. 2018)
    python train.py --adv_train fgsm --val_attack pgd --val_samples 500   # and robust accuracy each epoch

Each step replaces the first --adv_ratio of its batch (whose order is random) by adversarial
versions, made by attacks.SignedSteps from a uniform random start in the eps-ball, and trains on
the mixed batch: one compiled graph per step, the attack included.

The attack sees the network as it is evaluated and deployed: an eval-mode twin that shares the
trained network's parameters (BatchNorm's moving statistics, the QAT observers' ranges). Its
forward passes change no state, so BatchNorm statistics, observer ranges and the QAT step
counters move once per step, from the training pass, as in a clean run (--quant_delay and
--freeze_bn still count training steps). TRADES (Zhang et al. 2019) also crafts its training
attacks in eval mode.

The random starts come from a counter-based hash of (--seed, the worker's rank, the optimizer's
step count), not from a random op with hidden state: the step count is in every checkpoint, so a
resumed run draws exactly the starts of an uninterrupted one, and each msrun worker its own.
"""
import copy

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from qatcifar import attacks, cli

METHODS = ("none", "fgsm", "pgd")
DEFAULT_EPS = 8 / 255
DEFAULT_PGD_STEPS = 7  # Madry et al.'s CIFAR-10 training attack
FGSM_STEP = 1.25  # x eps: Wong et al.'s step for FGSM from a random start
VALIDATION_PGD_STEPS = 10  # eval.py --attack pgd's default, so that the figures compare
MASK32 = 0xFFFFFFFF


def add_arguments(parser):
    group = parser.add_argument_group("adversarial training (see adversarial.py)")
    group.add_argument("--adv_train", choices=METHODS, default="none",
                       help="train on adversarial images: fgsm (with a random start, Wong et al. 2020) or pgd "
                            "(Madry et al. 2018)")
    group.add_argument("--adv_eps", type=attacks.pixel_fraction, default=None,
                       help="L-infinity bound of the training and validation attacks in pixels, like 8/255 "
                            "(default 8/255)")
    group.add_argument("--adv_steps", type=cli.int_range(1, 100), default=None,
                       help=f"pgd: attack steps per training step (default {DEFAULT_PGD_STEPS})")
    group.add_argument("--adv_step_size", type=attacks.pixel_fraction, default=None,
                       help=f"size of an attack step (default: fgsm {FGSM_STEP} x eps, pgd 2.5 x eps / steps)")
    group.add_argument("--adv_ratio", type=cli.share, default=None,
                       help="share of each batch replaced by its adversarial version, in (0, 1] (default 1)")
    group.add_argument("--val_attack", choices=attacks.METHODS, default=None,
                       help="also report robust accuracy at each validation, against eval.py's attack of that "
                            "name at --adv_eps (pgd: 10 steps); <prefix>-best.ckpt is then the most robust model")



def resolve(run):
    """Check the adversarial flags of train.py's settings `run` and fill in their defaults, in `run`."""
    given = [flag for flag in ("adv_eps", "adv_steps", "adv_step_size", "adv_ratio") if getattr(run, flag) is not None]
    if run.adv_train == "none":
        needed = [flag for flag in given if flag != "adv_eps" or not run.val_attack]
        if needed:
            raise cli.InputError(f"--{needed[0]} belongs to adversarial training; add --adv_train fgsm (or pgd)")
    elif run.adv_train == "fgsm" and run.adv_steps is not None:
        raise cli.InputError("--adv_train fgsm is one step of --adv_step_size; --adv_steps applies to --adv_train pgd")
    if run.adv_train != "none" and run.amp != "O0":
        raise cli.InputError(f"--adv_train trains in float32 only: the attack's gradients are not loss-scaled; drop "
                             f"--amp {run.amp}")
    if run.val_attack and not run.eval_every:
        raise cli.InputError("--val_attack attacks the validation images, and this run does not validate; give "
                             "--eval_every N and a data folder with test_batch.bin")
    run.adv_eps = DEFAULT_EPS if run.adv_eps is None else run.adv_eps
    if run.adv_train == "none":
        return
    run.adv_steps = 1 if run.adv_train == "fgsm" else run.adv_steps or DEFAULT_PGD_STEPS
    if run.adv_step_size is None:
        run.adv_step_size = FGSM_STEP * run.adv_eps if run.adv_train == "fgsm" else 2.5 * run.adv_eps / run.adv_steps
    run.adv_ratio = 1.0 if run.adv_ratio is None else run.adv_ratio


def describe(run):
    """One line about the run's adversarial training, for its log."""
    attacked = attacked_count(run.adv_ratio, run.batchsize)
    method = "FGSM from a random start" if run.adv_train == "fgsm" else f"PGD-{run.adv_steps}"
    return (f"adversarial training: {method}, eps {run.adv_eps:.4g} ({run.adv_eps * 255:.3g}/255), step "
            f"{run.adv_step_size:.4g}, on {attacked} of the {run.batchsize} images of each batch")


def attacked_count(share, batch_size):
    return max(1, round(share * batch_size))


def validation_attack(net, run):
    """The attack of --val_attack on `net` (which the validation runs in eval mode), or None."""
    if not run.val_attack:
        return None
    return attacks.Attack(net, run.val_attack, run.adv_eps, steps=VALIDATION_PGD_STEPS)


class EvalTwin(nn.Cell):
    """A copy of `net` that shares its Parameters and stays in eval mode: set_train on an enclosing cell
    (Model.train calls it on the whole training step) does not reach it."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)  # the shared Parameters keep their names
        self.net = copy.deepcopy(net, {id(param): param for param in net.get_parameters()})
        self.net.set_train(False)

    def add_flags_recursive(self, **flags):
        flags.pop("training", None)
        return super().add_flags_recursive(**flags)

    def construct(self, x):
        return self.net(x)


def hash32(x):
    """A bijective mixer of integers in [0, 2^32) held in int64 (the finalizer of a counter-based generator):
    consecutive inputs give unrelated outputs. Products stay below 2^63 (multipliers below 2^31)."""
    x = ops.bitwise_xor(x, ops.floor_div(x, 2 ** 16))
    x = ops.bitwise_and(x * 0x7FEB352D, MASK32)
    x = ops.bitwise_xor(x, ops.floor_div(x, 2 ** 15))
    x = ops.bitwise_and(x * 0x5BD1E995, MASK32)
    return ops.bitwise_xor(x, ops.floor_div(x, 2 ** 16))


class UniformStarts(nn.Cell):
    """Numbers uniform in [-1, 1) of a fixed shape that are a function of (key, step) only: a stateless generator."""

    def __init__(self, shape, key):
        super().__init__()
        self.index = ms.Tensor(np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape))
        self.key = ms.Tensor(key & MASK32, ms.int64)

    def construct(self, step):
        stream = hash32(ops.bitwise_xor(self.key, ops.bitwise_and(step.astype(ms.int64), MASK32)))
        bits = hash32(ops.bitwise_and(self.index + stream, MASK32))
        return ops.floor_div(bits, 2 ** 8).astype(ms.float32) * (2.0 / 2 ** 24) - 1.0  # 24 bits: float32's precision


class AdversarialStep(nn.Cell):
    """A training step (`step`, train.py's TrainOneStepCell of `net`) on batches whose first images are replaced
    by adversarial versions: `run`'s --adv_* settings, on worker `rank`. Checkpoints of it hold exactly
    the parameters of `step`."""

    def __init__(self, step, net, run, rank):
        super().__init__(auto_prefix=False)
        self.step = step
        self.attack = attacks.SignedSteps(EvalTwin(net), run.adv_eps, run.adv_steps, run.adv_step_size)
        self.count = attacked_count(run.adv_ratio, run.batchsize)
        # FGSM-RS and PGD both start uniformly in the ball; a different stream per seed and per worker.
        self.starts = UniformStarts((self.count, 3, 32, 32), run.seed * 0x9E3779B1 + rank)
        self.eps = run.adv_eps
        self.mean, self.std = ms.Tensor(attacks.MEAN), ms.Tensor(attacks.STD)

    def construct(self, images, labels):
        count = self.count
        clean = images[:count] * self.std + self.mean
        start = ops.clamp(clean + self.eps * self.starts(self.step.optimizer.global_step), 0.0, 1.0)
        adversarial = (self.attack(clean, start, labels[:count]) - self.mean) / self.std
        if count < images.shape[0]:
            adversarial = ops.concat((adversarial, images[count:]))
        return self.step(adversarial, labels)
