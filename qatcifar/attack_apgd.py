"""APGD (Croce and Hein, ICML 2020), L-infinity, on a MindSpore network (float32 or QAT): PGD without a step size to
tune, with the cross-entropy loss (APGD-CE) or the targeted difference-of-logits-ratio loss (APGD-DLR, AutoAttack's
APGD-T: each of the 9 classes scored highest after the true one is a target in turn).

    >>> attack = APGD(net, eps=8 / 255, steps=100, loss="ce")
    >>> adversarial = attack(images, labels)          # normalized float32 images in and out (numpy)

As the paper's Algorithm 1 and AutoAttack's implementation: a random start on the eps-ball's surface, the step size
2 eps, a momentum of 0.75 after the first step; at checkpoints (22 % of the steps, then ever closer, at least 6 %),
an image's step size halves and it restarts from its best point when fewer than 75 % of the steps since the last
checkpoint raised its loss, or when neither its step size nor its best loss changed since then. An image counts as
broken if any iterate misclassifies it. Each step is one gradient call of a compiled graph (the loss's gradient
with respect to the pixels, summed over the batch) and one forward pass (the per-image losses and predictions); the
batch is padded to a few shapes so that the graph compiles once per shape.
"""
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from qatcifar import attacks
from qatcifar.attack_square import few_shapes

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75
RHO = 0.75  # the share of steps since the last checkpoint that must raise the loss
FIRST_CHECK, CHECK_DECREASE, CHECK_MIN = 0.22, 0.03, 0.06  # checkpoints, as fractions of the steps
TARGETS = 9  # APGD-T's target classes: all but the true one in CIFAR-10
DLR_FLOOR = 1e-12


class SummedLoss(nn.Cell):
    """The batch's summed loss on pixel images (normalization inside): cross-entropy, or targeted DLR."""

    def __init__(self, net, loss):
        super().__init__(auto_prefix=False)
        self.net, self.dlr = net, loss == "dlr"
        self.mean, self.std = ms.Tensor(attacks.MEAN), ms.Tensor(attacks.STD)
        self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="sum")

    def construct(self, pixels, labels, targets):
        logits = self.net((pixels - self.mean) / self.std)
        if not self.dlr:
            return self.ce(logits, labels)
        top = ops.topk(logits, 4)[0]  # (descending)
        true = ops.gather_elements(logits, 1, labels.reshape(-1, 1)).reshape(-1)
        target = ops.gather_elements(logits, 1, targets.reshape(-1, 1)).reshape(-1)
        return (-(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_FLOOR)).sum()


class Gradient(nn.Cell):
    def __init__(self, loss):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.grad = ops.GradOperation()  # with respect to the pixels only

    def construct(self, pixels, labels, targets):
        return self.grad(self.loss)(pixels, labels, targets)


def losses(logits, labels, targets, loss):
    """Per-image losses as SummedLoss sums them (numpy, float64)."""
    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))
    if loss == "ce":
        shifted = logits - logits.max(axis=1, keepdims=True)
        return np.log(np.exp(shifted).sum(axis=1)) - shifted[rows, labels]
    top = -np.sort(-logits, axis=1)
    return -(logits[rows, labels] - logits[rows, targets]) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_FLOOR)


def checkpoints(steps):
    """The steps at which step sizes are checked: 22 % of the steps, then a gap 3 % shorter each time, at least 6 %
    (AutoAttack's: its first check after max(0.22 steps, 1) steps)."""
    first, decrease, least = (max(int(share * steps), 1) for share in (FIRST_CHECK, CHECK_DECREASE, CHECK_MIN))
    points, gap, at = [], first, first
    while at < steps:
        points.append(at)
        gap = max(gap - decrease, least)
        at += gap
    return points


class APGD:
    """The attack with its settings, applied batch by batch (eval.py, autoattack.py)."""

    def __init__(self, net, eps, steps=100, loss="ce", restarts=1, seed=0, targets=TARGETS):
        self.net, self.eps, self.steps, self.loss, self.restarts, self.seed = net, eps, steps, loss, restarts, seed
        self.targets = targets if loss == "dlr" else 1
        self.method = "apgd-ce" if loss == "ce" else "apgd-dlr"
        self.rng = np.random.default_rng(seed)
        self.gradient = few_shapes_many(Gradient(SummedLoss(net, loss)))
        self.logits = few_shapes(lambda images: net(ms.Tensor(images)).asnumpy())
        self.on_steps = lambda steps: None

    def describe(self):
        name = "APGD-CE" if self.loss == "ce" else f"APGD-DLR (targeted, {self.targets} targets)"
        return f"{name}-{self.steps}, eps {self.eps * 255:.3g}/255"

    def settings(self):
        return {"method": self.method, "eps": self.eps, "steps": self.steps, "restarts": self.restarts,
                "seed": self.seed, **({"targets": self.targets} if self.loss == "dlr" else {})}

    def units(self):
        """Progress-bar steps per batch."""
        return self.steps * self.restarts * self.targets

    def __call__(self, images, labels):
        clean = attacks.to_pixels(images).astype(np.float32)
        best = clean.copy()
        broken = self.logits(images).argmax(axis=1) != labels
        order = np.argsort(-self.logits(images), axis=1)
        for target in range(self.targets):
            for _ in range(self.restarts):
                todo = np.flatnonzero(~broken)
                if not len(todo):
                    self.on_steps(self.steps)
                    continue
                targets = order[todo, target + 1] if self.loss == "dlr" else labels[todo]
                found, hit = self.run(clean[todo], labels[todo], targets.astype(np.int32))
                best[todo[hit]], broken[todo[hit]] = found[hit], True
        return attacks.to_normalized(best)

    def run(self, clean, labels, targets):
        """One APGD run on pixel images: (the adversarial images found, which ones are misclassified)."""
        low, high = np.maximum(clean - self.eps, 0), np.minimum(clean + self.eps, 1)
        start = 2 * self.rng.random(clean.shape, dtype=np.float32) - 1
        start = clean + self.eps * start / np.abs(start).reshape(len(clean), -1).max(axis=1)[:, None, None, None]
        x = np.clip(start, 0, 1).astype(np.float32)
        loss, grad, wrong = self.evaluate(x, labels, targets)
        found, hit = x.copy(), wrong.copy()
        best_x, best_loss, best_grad = x.copy(), loss.copy(), grad.copy()
        step = np.full(len(x), 2 * self.eps, np.float32)[:, None, None, None]
        previous, history = x.copy(), [loss]
        checks, last_check, last_best, reduced = checkpoints(self.steps), 0, best_loss.copy(), np.zeros(len(x), bool)
        for k in range(self.steps):
            momentum = MOMENTUM if k else 1.0
            z = np.clip(x + step * np.sign(grad), low, high)
            moved = np.clip(x + momentum * (z - x) + (1 - momentum) * (x - previous), low, high).astype(np.float32)
            previous, x = x, moved
            loss, grad, wrong = self.evaluate(x, labels, targets)
            found[wrong], hit = x[wrong], hit | wrong
            better = loss > best_loss
            best_x[better], best_loss[better], best_grad[better] = x[better], loss[better], grad[better]
            history.append(loss)
            self.on_steps(1)
            if k + 1 in checks:
                window = np.array(history[last_check:k + 2])
                rises = (window[1:] > window[:-1]).sum(axis=0)
                halve = (rises <= (k + 1 - last_check) * RHO) | (~reduced & (last_best >= best_loss))
                step[halve] /= 2
                x[halve], grad[halve] = best_x[halve], best_grad[halve]
                reduced, last_best, last_check = halve, best_loss.copy(), k + 1
        return found, hit

    def evaluate(self, pixels, labels, targets):
        """(per-image losses, the gradient of their sum, which images are misclassified) at pixel images."""
        logits = self.logits(attacks.to_normalized(pixels))
        grad = self.gradient(pixels, labels, targets)
        return losses(logits, labels, targets, self.loss), grad, logits.argmax(axis=1) != labels


def few_shapes_many(cell):
    """cell(pixels, labels, targets) -> gradient (numpy), on batches padded to a power of two (see few_shapes)."""
    largest = [0]

    def call(pixels, labels, targets):
        n = len(pixels)
        largest[0] = max(largest[0], n)
        size = min(1 << (n - 1).bit_length(), largest[0])
        pad = size - n
        if pad:
            pixels, labels, targets = (np.concatenate([a, np.repeat(a[:1], pad, axis=0)])
                                       for a in (pixels, labels, targets))
        out = cell(ms.Tensor(pixels), ms.Tensor(labels.astype(np.int32)), ms.Tensor(targets.astype(np.int32)))
        return out.asnumpy()[:n]
    return call
