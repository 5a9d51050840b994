"""The learning rate over a run (train.py's --lr_schedule and --warmup_epochs), and the run's step budget.

    >>> rates = schedules.learning_rates(run, steps_per_epoch)   # a float, or one rate per training step

A per-step schedule is handed to the optimizer as one float32 Tensor of a rate per step, so a
run with one has at most MAX_SCHEDULE_STEPS steps; any run has at most 2^31 - 1, the range of
the optimizer's and the observers' int32 step counters (`check_step_count`).
"""
import math

from qatcifar import cli

SCHEDULES = ("constant", "cosine", "onecycle")
MAX_SCHEDULE_STEPS = 10 ** 8  # 400 MB of float32 rates


def check_step_count(run, steps_per_epoch):
    """The run's steps must fit the int32 step counters, and a per-step learning-rate schedule in memory."""
    per_step_rates = run.lr_schedule != "constant" or run.warmup_epochs
    for flag, epochs, limit in (("-e", run.epoch, MAX_SCHEDULE_STEPS if per_step_rates else cli.INT32_MAX),
                                ("--freeze_bn", run.freeze_bn or 0, cli.INT32_MAX)):
        if epochs * steps_per_epoch > limit:
            raise cli.InputError(f"{flag} {epochs} x {steps_per_epoch} steps per epoch is more than the {limit} steps "
                                 f"a run can count; give at most {limit // steps_per_epoch} epochs, or fewer steps "
                                 "per epoch")


def learning_rates(run, steps_per_epoch):
    """The learning rate: a float when constant, else one value per training step.

    constant and cosine (to 0) start with a linear warmup of --warmup_epochs; onecycle rises
    linearly from lr/25 to lr over --warmup_epochs (default 30 % of the run), then anneals to
    lr/10^4 along a cosine (Smith & Topin 2019).
    """
    lr, total = run.learningRate, run.epoch * steps_per_epoch
    if run.lr_schedule == "constant" and not run.warmup_epochs:
        return lr
    warmup = round(min(run.warmup_epochs, run.epoch) * steps_per_epoch)  # (a longer warmup: the whole run)
    if run.lr_schedule == "onecycle" and not run.warmup_epochs:
        warmup = round(0.3 * total)
    rates = []
    for step in range(total):
        if step < warmup:
            start = lr / 25 if run.lr_schedule == "onecycle" else 0.0
            rates.append(start + (lr - start) * (step + 1) / warmup)
            continue
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        rates.append({"constant": lr, "cosine": lr * cosine, "onecycle": lr / 1e4 + (lr - lr / 1e4) * cosine}
                     [run.lr_schedule])
    return rates
