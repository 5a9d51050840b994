"""Adversarial attacks, L-infinity, in pixel space: FGSM and PGD on a MindSpore network (float32 or QAT), and the
registry of eval.py's attacks (METHODS; `build`): Square, gradient-free, on any model file (attack_square.py).

    >>> attack = attacks.Attack(net, "pgd", eps=8 / 255, steps=10)
    >>> adversarial = attack(images, labels)        # normalized float32 images in and out (numpy)

The pipeline's images are normalized; an attack maps them back to pixels in [0, 1], perturbs the
pixels, and differentiates the loss through the normalization, so that every adversarial image
is within `eps` of the original pixel by pixel and inside [0, 1]. A QAT network's gradient is
its straight-through estimate (quant.py), what an attacker of the fake-quant model gets.

- FGSM (Goodfellow et al. 2015): one step of size eps along the gradient's sign.
- PGD (Madry et al. 2018): a random start in the eps-ball, then `steps` signed-gradient steps
  of `step_size`, each projected back into the ball and [0, 1]; with `restarts`, an image
  counts as broken if any restart breaks it.
"""
import argparse
import os
import shutil

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from qatcifar import cifar, cli, files, inference

METHODS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "autoattack")
GRADIENT = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "autoattack")  # they differentiate the network: checkpoints only
APGD_STEPS = 100  # APGD's steps, as AutoAttack runs it
DEFAULTS = {"eps": 8 / 255, "steps": 10, "restarts": 1, "attack_seed": 0}
SQUARE_QUERIES = 5000  # attack_square.DEFAULT_QUERIES (attack_square imports this module)
NOTE_FILE = "ADVERSARIAL.txt"
MEAN = np.array(cifar.CIFAR10_MEAN, np.float32).reshape(1, 3, 1, 1)
STD = np.array(cifar.CIFAR10_STD, np.float32).reshape(1, 3, 1, 1)


def pixel_fraction(text):
    """An argparse type: a value in pixel units from 0 to 1, written `8/255` or `0.0314`. Huge, infinite and NaN
    values are refused as out of range (read as floats, never as exact integers: `1e999999999` would take hours)."""
    numerator, slash, denominator = text.strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or a fraction like 8/255: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1 in pixel units (8/255 is 0.0314), got {text}")
    return value


def resolve(args, path):
    """Before any work: check eval.py's attack flags against each other and the model file, fill in the defaults,
    and check that --save_adversarial names a new or empty folder. Raises cli.InputError."""
    flags = {"--eps": args.eps, "--steps": args.steps, "--step_size": args.step_size, "--restarts": args.restarts,
             "--attack_seed": args.attack_seed, "--save_adversarial": args.save_adversarial,
             "--queries": args.queries}
    given = [flag for flag, value in flags.items() if value is not None]
    if not args.attack:
        if given:
            raise cli.InputError(f"{given[0]} belongs to an attack; add --attack pgd (or fgsm, square)")
        return
    pgd_only = [flag for flag in given if flag in ("--steps", "--step_size", "--restarts")]
    if args.attack in ("fgsm", "square") and pgd_only:
        what = "FGSM is one step of size --eps" if args.attack == "fgsm" else "Square takes --queries, not steps"
        raise cli.InputError(f"{what}; {pgd_only[0]} applies to --attack pgd")
    if args.attack.startswith("apgd") and args.step_size is not None:
        raise cli.InputError("APGD sets its own step sizes; --step_size applies to --attack pgd")
    if args.attack == "autoattack" and pgd_only:
        raise cli.InputError(f"AutoAttack's standard version fixes its steps and restarts; {pgd_only[0]} applies to "
                             "--attack pgd (or apgd-ce, apgd-dlr)")
    if args.attack == "fgsm" and args.attack_seed is not None:
        raise cli.InputError("FGSM is one step of size --eps, with no random start; --attack_seed applies to --attack "
                             "pgd and square")
    if args.queries is not None and args.attack not in ("square", "autoattack"):
        raise cli.InputError(f"--queries is the Square attack's budget; {args.attack.upper()} takes steps: drop it, "
                             "or give --attack square")
    if args.attack in GRADIENT and not inference.is_checkpoint(path):
        raise cli.InputError(f"{path} has no gradients to attack (only checkpoints do): attack it with --attack "
                             "square (gradient-free), or attack the QAT checkpoint it was exported from with "
                             "--save_adversarial DIR, then evaluate this file on those images with eval.py -data DIR")
    if args.steps is None and args.attack.startswith("apgd"):
        args.steps = APGD_STEPS
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.queries is None:
        args.queries = SQUARE_QUERIES
    if args.step_size is None:
        args.step_size = 2.5 * args.eps / args.steps  # Madry et al.'s 2/255 for 8/255 in 10 steps (7 steps there)
    if args.save_adversarial:
        cifar.check_new_folder(args.save_adversarial)


def build(args, model):
    """The attack eval.py runs (resolve'd args) on a loaded inference.Model."""
    if args.attack == "square":
        from qatcifar.attack_square import Square

        return Square(model.logits, args.eps, args.queries, args.attack_seed)
    if args.attack.startswith("apgd"):
        from qatcifar.attack_apgd import APGD

        return APGD(model.network, args.eps, args.steps, args.attack[len("apgd-"):], args.restarts, args.attack_seed)
    if args.attack == "autoattack":
        from qatcifar.attack_auto import AutoAttack

        return AutoAttack(model.network, args.eps, args.attack_seed, args.queries)
    return Attack(model.network, args.attack, args.eps, args.steps, args.step_size, args.restarts, args.attack_seed)


def to_pixels(images):
    return images * STD + MEAN


def to_normalized(pixels):
    return ((pixels - MEAN) / STD).astype(np.float32)


class PixelLoss(nn.Cell):
    """The network's summed cross-entropy on pixel images: normalization inside, so gradients pass through it."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)  # the network's parameters keep their names (a training step saves them)
        self.net = net
        self.mean, self.std = ms.Tensor(MEAN), ms.Tensor(STD)
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="sum")

    def construct(self, pixels, labels):
        return self.loss(self.net((pixels - self.mean) / self.std), labels)


class SignedSteps(nn.Cell):
    """The attack's steps as one compiled graph: from `start`, `steps` steps of `step_size` along the sign of the
    loss's gradient, each projected into the eps-ball around `clean` and [0, 1] (pixels in, pixels out).

    eval.py's attacks and train.py's adversarial training (adversarial.py) both run it; a Python
    loop of gradient calls would cost a round trip per step and could not be part of a training step.
    The steps are a loop in the graph, on a tensor counter: unrolled (a Python `for`), the graph grew
    with the step count, its compilation took minutes at 100 steps, and at 500 it exceeded MindSpore's
    call depth.
    """

    def __init__(self, net, eps, steps, step_size):
        super().__init__(auto_prefix=False)
        self.loss = PixelLoss(net)
        self.gradient = ops.GradOperation()  # with respect to the pixels only
        self.eps, self.steps, self.step_size = eps, steps, step_size

    def construct(self, clean, start, labels):
        low, high = ops.relu(clean - self.eps), ops.minimum(clean + self.eps, 1.0)
        pixels, step = start, ms.Tensor(0, ms.int32)
        while step < self.steps:  # (a loop in the graph: the counter is a tensor)
            pixels = pixels + self.step_size * ops.sign(self.gradient(self.loss)(pixels, labels))
            pixels = ops.minimum(ops.maximum(pixels, low), high)
            step = step + 1
        return ops.stop_gradient(pixels)


class Attack:
    """An attack with its settings, applied batch by batch to a network in eval mode. Its steps run CHUNK at a time
    (and the remainder), so that a progress bar can follow a long attack: `on_steps(n)` after each run of n steps."""

    CHUNK = 50

    def __init__(self, net, method, eps, steps=10, step_size=None, restarts=1, seed=0):
        self.net, self.method, self.eps = net, method, eps
        self.steps = 1 if method == "fgsm" else steps
        self.step_size = eps if method == "fgsm" else (step_size if step_size is not None else 2.5 * eps / steps)
        self.restarts = 1 if method == "fgsm" else restarts
        self.seed, self.rng = seed, np.random.default_rng(seed)
        full, rest = divmod(self.steps, self.CHUNK)
        chunks = [self.CHUNK] * full + [rest] * bool(rest)
        cells = {n: SignedSteps(net, eps, n, self.step_size) for n in set(chunks)}  # (at most two graphs to compile)
        self.chunks = [cells[n] for n in chunks]
        self.on_steps = lambda steps: None

    def describe(self):
        """Like `PGD-10, eps 8/255`."""
        steps = f"-{self.steps}" if self.method == "pgd" else ""
        return f"{self.method.upper()}{steps}, eps {self.eps * 255:.3g}/255"

    def settings(self):
        return {"method": self.method, "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "restarts": self.restarts, "seed": self.seed}

    def __call__(self, images, labels):
        """Adversarial versions of normalized images (N, 3, 32, 32) with their labels; normalized, numpy."""
        clean = to_pixels(images)
        labels = ms.Tensor(labels.astype(np.int32))
        best = clean
        for restart in range(self.restarts):
            start = clean
            if self.method == "pgd":
                start = np.clip(clean + self.rng.uniform(-self.eps, self.eps, clean.shape).astype(np.float32), 0, 1)
            pixels = start.astype(np.float32)
            for chunk in self.chunks:
                pixels = chunk(ms.Tensor(clean), ms.Tensor(pixels), labels).asnumpy()
                self.on_steps(chunk.steps)
            if restart == 0:
                best = pixels
            else:  # keep, per image, a restart that broke it
                broken = self.predict(pixels) != labels.asnumpy()
                best = np.where(broken[:, None, None, None], pixels, best)
        return to_normalized(best)

    def predict(self, pixels):
        return self.logits(to_normalized(pixels)).argmax(axis=1)

    def logits(self, images):
        """The network's scores of normalized images (numpy in and out)."""
        return self.net(ms.Tensor(images)).asnumpy()


def evaluate(attack, dataset, keep=False):
    """Clean and robust predictions of the whole dataset, in order: (clean, robust, labels, records), records the
    adversarial images as CIFAR pixels (N, 3, 32, 32 uint8) with `keep`, else None."""
    clean, robust, labels, records = [], [], [], []
    attack.rng = np.random.default_rng(attack.seed)  # the same random starts for the same images, every time
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    units = attack.units() if hasattr(attack, "units") else attack.restarts * attack.steps
    bar = cli.bar(dataset.get_dataset_size() * units, f"attacking ({attack.describe()})",
                  unit="step")  # (in attack steps of a batch: a long attack moves within a batch)
    attack.on_steps = bar.update
    try:
        for images, batch_labels in batches:
            clean.append(attack.logits(images).argmax(axis=1))
            adversarial = attack(images, batch_labels)
            robust.append(attack.logits(adversarial).argmax(axis=1))
            labels.append(batch_labels)
            if keep:
                records.append(to_uint8(adversarial, images, attack.eps))
    finally:
        bar.close()
    return (np.concatenate(clean), np.concatenate(robust), np.concatenate(labels),
            np.concatenate(records) if keep else None)


def save_folder(folder, data_dir, records, description):
    """A CIFAR-format test folder: test_batch.bin with `records` as its first images and the rest of data_dir's
    test_batch.bin unchanged, its batches.meta.txt (and SYNTHETIC.txt), and a note saying how it was made."""
    source = np.fromfile(os.path.join(data_dir, cifar.TEST_FILE), np.uint8).reshape(-1, cifar.RECORD_BYTES)
    source[:len(records), 1:] = records.reshape(len(records), -1)

    def write(tmp):
        files.write_array(os.path.join(tmp, cifar.TEST_FILE), source)
        for name in (cifar.META_FILE, cifar.SYNTHETIC_MARKER):  # (regular files only: a FIFO would block)
            if os.path.isfile(os.path.join(data_dir, name)):
                shutil.copyfile(os.path.join(data_dir, name), os.path.join(tmp, name))
        files.write_text(os.path.join(tmp, NOTE_FILE), description)
    cifar.write_folder(folder, write)


def to_uint8(adversarial, images, eps):
    """CIFAR records' pixels (N, 3, 32, 32 uint8) of adversarial images, rounded but still within eps (in whole
    pixel levels) of the original images."""
    original = np.round(to_pixels(images) * 255)
    levels = np.floor(eps * 255 + 1e-6)
    rounded = np.clip(np.round(to_pixels(adversarial) * 255), original - levels, original + levels)
    return np.clip(rounded, 0, 255).astype(np.uint8)
