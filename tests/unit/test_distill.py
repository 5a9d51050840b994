"""qatcifar.distill: Hinton's loss, a teacher that stays in eval mode and out of gradients, optimizer and
checkpoints, and train.py's distillation flags."""
import os

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import train
from conftest import ARCH, SMALL, expect_error, snapshot, train_in_subprocess
from qatcifar import checkpoint, distill, files, networks, training


class Fixed(nn.Cell):
    """A 'network' that returns given logits whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = ms.Parameter(ms.Tensor(logits), name="logits")

    def construct(self, x):
        return self.logits + 0 * x.sum()


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_loss_is_hinton_s():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(4, 10)).astype(np.float32), rng.normal(size=(4, 10)).astype(np.float32)
    labels = np.array([1, 2, 3, 4], np.int32)
    weight, temperature = 0.7, 3.0
    loss = distill.DistillLoss(Fixed(student), distill.Frozen(Fixed(teacher)),
                               nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), weight, temperature)
    got = float(loss(ms.Tensor(np.zeros((4, 3, 2, 2), np.float32)), ms.Tensor(labels)).asnumpy())
    hard = -np.log(softmax(student)[np.arange(4), labels]).mean()
    p, q = softmax(teacher / temperature), softmax(student / temperature)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1).mean()
    assert got == pytest.approx((1 - weight) * hard + weight * temperature ** 2 * kl, rel=1e-5)


def test_the_teacher_stays_in_eval_mode_and_out_of_the_run_s_state(untrained, tmp_path):
    """Its parameters renamed and frozen: no gradient, not in the optimizer, not in the run's checkpoint."""
    args = train.get_args_parser().parse_args([*SMALL, "--teacher", untrained["QAT"], "-bsize", "8"])
    training.resolve_losses(args)
    net = training.build_network(args, steps_per_epoch=1)
    optimizer = training.make_optimizer(net, args, steps_per_epoch=1)
    step = training.build_train_network(net, optimizer, args)
    step.set_train(True)
    teachers = [cell for _, cell in step.cells_and_names() if isinstance(cell, distill.Frozen)]
    assert len(teachers) == 1 and not any(cell.training for _, cell in teachers[0].net.cells_and_names())
    teacher_params = [p for p in step.get_parameters() if p.name.startswith(distill.PREFIX)]
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert not any(p.name.startswith(distill.PREFIX) for p in optimizer.parameters)
    rng = np.random.default_rng(0)
    before = {p.name: p.asnumpy().copy() for p in teacher_params}
    loss = step(ms.Tensor(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)),
                ms.Tensor(rng.integers(0, 10, 8).astype(np.int32)))
    assert np.isfinite(loss.asnumpy())
    assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in teacher_params)  # (its observers too)
    path = str(tmp_path / "run.ckpt")
    checkpoint.save(step, path, {})
    saved = checkpoint.read(path)
    assert saved[checkpoint.ARCH_RECORD] == ARCH and not any(name.startswith(distill.PREFIX) for name in saved)
    assert sorted(saved) == sorted([p.name for p in step.get_parameters() if not p.name.startswith(distill.PREFIX)]
                                   + [checkpoint.ARCH_RECORD])


@pytest.mark.parametrize("flags, fragment", [
    (["--kd_weight", "0.5"], "--kd_weight belongs to distillation; add --teacher CKPT"),
    (["--teacher", "{data}/teacher.ckpt"], "--teacher {data}/teacher.ckpt does not exist"),
    (["--teacher", "{data}"], "is not a .ckpt file"),
    (["--teacher", "{float}", "--kd_weight", "0"], "--kd_weight: must be a positive finite number, got 0"),
    (["--teacher", "{float}", "--kd_weight", "1.5"], "--kd_weight: must be in (0, 1], got 1.5"),
    (["--teacher", "{float}", "--kd_temperature", "-1"], "--kd_temperature: must be a number from 0.1 to 100"),
    (["--teacher", "{data}/batches.meta.txt.ckpt"], "does not exist"),
    (["--teacher", "{float}", "--kd_temperature", "1e30"], "--kd_temperature: must be a number from 0.1 to 100"),
    (["--teacher", "{float}", "--kd_temperature", "1e-45"], "--kd_temperature: must be a number from 0.1 to 100"),
    (["--teacher", "{garbage}"], "--teacher {garbage} is not a readable MindSpore checkpoint"),
    (["--teacher", "{huge}"], "--teacher {huge} gives class scores of"),
    (["--teacher", "{negative}"],
     "--teacher {negative}: parameter conv1.bn.moving_variance is a BatchNorm variance below 0"),
])
def test_bad_distillation_flags_fail_before_anything_is_written(flags, fragment, untrained, synthetic_dir, tmp_path,
                                                                 capsys):
    savedir = tmp_path / "run"
    savedir.mkdir()
    (savedir / "resnet8_qat-args.json").write_text("{}")
    before = snapshot(savedir)
    fill = {"data": synthetic_dir, "float": untrained["float32"], **damaged_teachers(untrained["float32"], tmp_path)}
    expect_error(train.main, ["-data", synthetic_dir, "-dir", str(savedir), "-e", "1", "--num_samples", "64",
                              *[flag.format(**fill) for flag in flags]], capsys, fragment.format(**fill))
    assert snapshot(savedir) == before


def damaged_teachers(path, folder):
    """Teachers that load but cannot teach: {"garbage": not a checkpoint, "huge": finite weights of 1e38, whose
    class scores are beyond any trained network's (the loss would be NaN at once), "negative": a BatchNorm variance
    below 0}."""
    params = checkpoint.read(path)
    found = {"garbage": str(folder / "garbage.ckpt"), "huge": str(folder / "huge.ckpt"),
             "negative": str(folder / "negative.ckpt")}
    with open(found["garbage"], "wb") as f:
        f.write(b"not a checkpoint" * 64)
    for name, parameter, value in (("huge", "conv1.conv.weight", 1e38), ("negative", "conv1.bn.moving_variance", -1.0)):
        edited = dict(params)
        edited[parameter] = ms.Parameter(ms.Tensor(np.full(params[parameter].shape, value, np.float32)),
                                         name=parameter)
        checkpoint.save_parameters(edited, found[name])
    return found


@pytest.mark.slow
def test_a_network_learns_from_a_qat_teacher_and_resumes(trained, synthetic_dir, tmp_path):
    """A QAT resnet8 of 4-bit weights distilled from a QAT teacher (observers and weight bits of its own, in no
    checkpoint of the run): it trains, says so, records the teacher in its args.json but not in its checkpoints, and
    resumes with it; resumed without --teacher it says that distillation is dropped. Each resumed run's args.json
    records the quantization it uses (the checkpoint's), not the flags' nulls."""
    teacher = trained[0]
    folder = str(tmp_path / "kd")
    run = [*SMALL, "-data", synthetic_dir, "-dir", folder, "-bsize", "32", "--num_samples", "256", "--eval_every", "0"]
    path, out = train_in_subprocess(*run, "-e", "1", "--weight_bits", "4", "--act_bits", "6", "--teacher", teacher,
                                    "--kd_temperature", "2", output=True)
    assert f"distillation: from {teacher}, soft targets at temperature 2 weigh 0.9 of the loss" in out
    record = files.RunFiles(folder, "resnet8_qat")
    assert record.settings()["teacher"] == teacher
    assert not any(name.startswith(distill.PREFIX) for name in checkpoint.read(path))
    path, out = train_in_subprocess(*run, "-e", "2", "--resume", "auto", "--teacher", teacher, output=True)
    assert "resuming from" in out and path.endswith("resnet8_qat-2_8.ckpt") and "without distillation" not in out
    settings = record.settings()
    assert (settings["weight_bits"], settings["act_bits"], settings["quantizer"]) == (4, 6, "minmax")
    assert settings["bits_per_layer"]["layer1.0.conv1"] == 4 and settings["bits_per_layer"]["fc"] == 7
    path, out = train_in_subprocess(*run, "-e", "3", "--resume", "auto", output=True)
    assert (f"{os.path.join(folder, 'resnet8_qat-2_8.ckpt')}'s run distilled from --teacher {teacher}" in out
            and "goes on without distillation" in out)
    assert networks.profile(checkpoint.load_network(path, 10)[0])["arch"] == ARCH
