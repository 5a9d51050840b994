"""AutoAttack's standard version (Croce and Hein, ICML 2020), L-infinity, on a MindSpore network: APGD-CE, then
APGD-T (targeted DLR, 9 targets), then Square (5,000 queries), each on the images the ones before left unbroken.

    >>> attack = AutoAttack(net, eps=8 / 255)
    >>> adversarial = attack(images, labels)          # normalized float32 images in and out (numpy)
    >>> attack.stages                                 # {"apgd-ce": unbroken after it, ...}, over every batch so far

Its FAB-T (a minimal-perturbation attack) is left out: in the paper's evaluations it lowers the robust accuracy of
no model below what the other three reach, and it is AutoAttack's slowest part.
"""
import numpy as np

from qatcifar.attack_apgd import APGD
from qatcifar.attack_square import DEFAULT_QUERIES, Square

STAGES = ("clean", "apgd-ce", "apgd-dlr", "square")


class AutoAttack:
    method = "autoattack"
    restarts = 1

    def __init__(self, net, eps, seed=0, queries=None, steps=100):
        self.net, self.eps, self.seed = net, eps, seed
        self.parts = {loss_name: APGD(net, eps, steps, loss, seed=seed)
                      for loss_name, loss in (("apgd-ce", "ce"), ("apgd-dlr", "dlr"))}
        self.parts["square"] = Square(self.parts["apgd-ce"].logits, eps, queries or DEFAULT_QUERIES, seed)
        self.stages = dict.fromkeys(STAGES, 0)  # images unbroken after each stage, over the batches so far
        self.images = 0
        self.rng = np.random.default_rng(seed)  # (attacks.evaluate resets it: the parts draw from their own)
        self.on_steps = lambda steps: None

    @property
    def steps(self):
        return sum(self.units_of(part) for part in self.parts.values())

    @staticmethod
    def units_of(part):
        return part.units() if hasattr(part, "units") else part.steps

    def units(self):
        return self.steps

    def describe(self):
        return f"AutoAttack (APGD-CE, APGD-T, Square-{self.parts['square'].steps}), eps {self.eps * 255:.3g}/255"

    def settings(self):
        return {"method": self.method, "eps": self.eps, "seed": self.seed,
                "parts": {name: part.settings() for name, part in self.parts.items()}}

    def logits(self, images):
        return self.parts["apgd-ce"].logits(images)

    def __call__(self, images, labels):
        for part in self.parts.values():
            part.on_steps = self.on_steps
        adversarial = images.copy()
        unbroken = self.logits(images).argmax(axis=1) == labels
        self.stages["clean"] += int(unbroken.sum())
        for name, part in self.parts.items():
            todo = np.flatnonzero(unbroken)
            if len(todo):
                found = part(images[todo], labels[todo])
                hit = self.logits(found).argmax(axis=1) != labels[todo]
                adversarial[todo[hit]] = found[hit]
                unbroken[todo[hit]] = False
            else:
                self.on_steps(self.units_of(part))
            self.stages[name] += int(unbroken.sum())
        self.images += len(images)
        return adversarial
