"""qatcifar.adversarial, adversarial training in train.py: its random starts, its training step, its flags, and that it
makes the model more robust, resumably."""
import json
import math
import os
import shutil

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import eval as evaluate
import train
from conftest import ARCH, SMALL, expect_error, snapshot, train_in_subprocess
from qatcifar import adversarial, attacks, networks, quant, training


def test_random_starts_are_uniform_and_a_function_of_key_and_step():
    starts = adversarial.UniformStarts((64, 3, 32, 32), key=7)
    step = lambda n: starts(ms.Tensor([n], ms.int32)).asnumpy()  # noqa: E731
    first = step(0)
    assert first.dtype == np.float32 and first.min() >= -1 and first.max() < 1
    assert abs(first.mean()) < 0.01 and abs(first.std() - 1 / math.sqrt(3)) < 0.01  # uniform on [-1, 1)
    np.testing.assert_array_equal(first, step(0))
    assert np.corrcoef(first.ravel(), step(1).ravel())[0, 1] < 0.02  # the next step: new numbers
    other = adversarial.UniformStarts((64, 3, 32, 32), key=8)(ms.Tensor([0], ms.int32)).asnumpy()
    assert np.corrcoef(first.ravel(), other.ravel())[0, 1] < 0.02  # another seed or worker: new numbers


def test_signed_steps_stay_in_the_ball_and_the_pixel_range():
    from qatcifar import networks
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (8, 3, 32, 32)).astype(np.float32)
    clean[:, :, :4] = 0  # pixels at the range's ends
    clean[:, :, -4:] = 1
    eps = 8 / 255
    start = np.clip(clean + rng.uniform(-eps, eps, clean.shape), 0, 1).astype(np.float32)
    steps = attacks.SignedSteps(networks.resnet(ARCH).set_train(False), eps, 3, 0.02)
    pixels = steps(ms.Tensor(clean), ms.Tensor(start), ms.Tensor(rng.integers(0, 10, 8).astype(np.int32))).asnumpy()
    assert np.abs(pixels - clean).max() <= eps + 1e-6 and pixels.min() >= 0 and pixels.max() <= 1
    assert (np.abs(pixels - start) > 0.01).mean() > 0.5  # the steps moved most pixels


def test_an_attack_in_chunks_is_the_attack_in_one_run(monkeypatch):
    """Attack runs its steps CHUNK at a time, for the progress bar: 5 steps as 2 + 2 + 1 are the 5 steps of one
    SignedSteps, exactly, and the bar hears of each chunk."""
    monkeypatch.setattr(attacks.Attack, "CHUNK", 2)
    net = networks.resnet(ARCH).set_train(False)
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(4, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)
    attack, heard = attacks.Attack(net, "pgd", 8 / 255, steps=5, seed=1), []
    attack.on_steps = heard.append
    chunked = attack(images, labels)
    assert heard == [2, 2, 1] and [chunk.steps for chunk in attack.chunks] == [2, 2, 1]
    start = np.random.default_rng(1).uniform(-8 / 255, 8 / 255, images.shape).astype(np.float32)  # the first start
    clean = attacks.to_pixels(images)
    whole = attacks.SignedSteps(net, 8 / 255, 5, attack.step_size)(
        ms.Tensor(clean), ms.Tensor(np.clip(clean + start, 0, 1).astype(np.float32)),
        ms.Tensor(labels.astype(np.int32))).asnumpy()
    np.testing.assert_array_equal(chunked, attacks.to_normalized(whole))


def test_a_thousand_steps_compile_as_a_loop():
    """In GRAPH_MODE the steps are a loop in the graph: 1,000 steps compile as fast as 10 (unrolled, 500 exceeded
    MindSpore's call depth). A linear model keeps the steps cheap."""
    ms.set_context(mode=ms.GRAPH_MODE)
    net = nn.SequentialCell([nn.Flatten(), nn.Dense(3 * 32 * 32, 10)]).set_train(False)
    clean = np.full((2, 3, 32, 32), 0.5, np.float32)
    pixels = attacks.SignedSteps(net, 8 / 255, 1000, 1 / 255)(ms.Tensor(clean), ms.Tensor(clean),
                                                               ms.Tensor(np.array([1, 2], np.int32))).asnumpy()
    assert np.abs(pixels - clean).max() == pytest.approx(8 / 255) and np.abs(pixels - clean).max() <= 8 / 255 + 1e-6


def make_step(flags):
    args = train.get_args_parser().parse_args([*SMALL, "-bsize", "8", *flags])
    adversarial.resolve(args)
    net = training.build_network(args, steps_per_epoch=1)
    return net, training.build_train_network(net, training.make_optimizer(net, args, steps_per_epoch=1), args)


@pytest.mark.parametrize("model", [["--bn_fold"], ["--no-qat"]])
def test_the_attack_changes_no_state_and_checkpoints_keep_their_names(model):
    """An adversarial step moves the QAT counters once, as a clean step does (the attack runs on an eval twin that
    stays in eval mode), and its checkpoint holds exactly a clean step's parameters."""
    net, step = make_step(["--adv_train", "pgd", "--adv_steps", "2", *model])
    _, clean_step = make_step(model)
    assert sorted(p.name for p in step.get_parameters()) == sorted(p.name for p in clean_step.get_parameters())
    step.set_train(True)  # as Model.train does: the twin stays in eval mode
    twins = [cell for _, cell in step.cells_and_names() if isinstance(cell, adversarial.EvalTwin)]
    assert len(twins) == 1 and not any(cell.training for _, cell in twins[0].net.cells_and_names())
    rng = np.random.default_rng(0)
    loss = step(ms.Tensor(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)),
                ms.Tensor(rng.integers(0, 10, 8).astype(np.int32)))
    assert np.isfinite(loss.asnumpy())
    if model == ["--no-qat"]:  # no counters to count; the twin is a float network too
        assert type(twins[0].net.conv1) is type(net.conv1) and not isinstance(net.conv1, quant.QuantConvBN)
        return
    counters = {p.name: int(p.asnumpy()) for p in net.get_parameters() if p.name.endswith("steps")}
    assert counters and set(counters.values()) == {1}, counters
    assert all(isinstance(cell, quant.QuantConvBN) for cell in (net.conv1, twins[0].net.conv1))


@pytest.mark.parametrize("flags, fragments", [
    (["--adv_eps", "4/255"], ["--adv_eps belongs to adversarial training", "--adv_train fgsm"]),
    (["--adv_ratio", "0.5", "--val_attack", "pgd"], ["--adv_ratio belongs to adversarial training"]),
    (["--adv_train", "fgsm", "--adv_steps", "3"], ["--adv_steps applies to --adv_train pgd"]),
    (["--adv_train", "pgd", "--adv_eps=-1/255"], ["--adv_eps", "from 0 to 1"]),
    (["--adv_train", "pgd", "--adv_eps", "1.5"], ["--adv_eps", "from 0 to 1"]),
    (["--adv_train", "pgd", "--adv_steps", "0"], ["--adv_steps", "from 1 to 100"]),
    (["--adv_train", "pgd", "--adv_ratio", "0"], ["--adv_ratio", "positive"]),
    (["--adv_train", "pgd", "--adv_ratio", "1.5"], ["--adv_ratio", "(0, 1]"]),
    (["--adv_train", "pgd-7"], ["invalid choice: 'pgd-7'"]),
    (["--val_attack", "pgd", "--eval_every", "0"], ["--val_attack", "does not validate", "--eval_every N"]),
])
def test_bad_adversarial_flags_fail_before_anything_is_written(flags, fragments, synthetic_dir, tmp_path, capsys):
    savedir = tmp_path / "run"
    savedir.mkdir()
    (savedir / "resnet8_qat-args.json").write_text("{}")
    before = snapshot(savedir)
    expect_error(train.main, ["-data", synthetic_dir, "-dir", str(savedir), "-e", "1", "--num_samples", "64",
                              *flags], capsys, *fragments)
    assert snapshot(savedir) == before


def test_amp_is_refused_with_adversarial_training():
    args = train.get_args_parser().parse_args(["--adv_train", "fgsm", "--amp", "O2"])
    with pytest.raises(train.cli.InputError, match="drop --amp O2"):
        adversarial.resolve(args)


def test_defaults_follow_the_papers():
    fgsm = train.get_args_parser().parse_args(["--adv_train", "fgsm"])
    adversarial.resolve(fgsm)
    assert (fgsm.adv_eps, fgsm.adv_steps, fgsm.adv_step_size, fgsm.adv_ratio) == (8 / 255, 1, 1.25 * 8 / 255, 1.0)
    pgd = train.get_args_parser().parse_args(["--adv_train", "pgd", "--adv_eps", "4/255"])
    adversarial.resolve(pgd)
    assert (pgd.adv_steps, pgd.adv_step_size) == (7, 2.5 * (4 / 255) / 7)


@pytest.mark.slow
def test_an_adversarial_run_resumed_mid_epoch_ends_bit_identical(synthetic_dir, tmp_path):
    """PGD training with random starts, half of each batch attacked, a per-step schedule and delayed observers: a
    run resumed from its step-2 checkpoint ends exactly as the run that was not stopped."""
    flags = [*SMALL, "-data", synthetic_dir, "-bsize", "16", "--num_samples", "64", "-e", "2", "--save_steps", "2",
             "--keep", "20", "--lr_schedule", "cosine", "--quant_delay", "1", "--seed", "3", "--eval_every", "0",
             "--adv_train", "pgd", "--adv_steps", "2", "--adv_ratio", "0.5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    final = train_in_subprocess(*flags, "-dir", str(whole))
    resumed.mkdir()
    shutil.copy(whole / "resnet8_qat-1_2.ckpt", resumed)
    path, stdout = train_in_subprocess(*flags, "-dir", str(resumed), "--resume", "auto", output=True)
    assert "resuming from" in stdout and "after step 2 of 8" in stdout
    assert os.path.basename(path) == os.path.basename(final) == "resnet8_qat-2_4.ckpt"
    got, expected = ms.load_checkpoint(path), ms.load_checkpoint(final)
    assert sorted(got) == sorted(expected)
    assert got.pop("arch") == expected.pop("arch") == ARCH
    for name in expected:
        np.testing.assert_array_equal(got[name].asnumpy(), expected[name].asnumpy(), err_msg=name)
    epochs = [[json.loads(line) for line in (folder / "resnet8_qat-metrics.jsonl").read_text().splitlines()]
              for folder in (whole, resumed)]
    assert epochs[0][-1]["loss"] == epochs[1][-1]["loss"]  # epoch 2's mean loss, over the steps both ran


ADV_EPS = "24/255"


@pytest.fixture(scope="module")
def continued(trained, synthetic_dir, tmp_path_factory):
    """The `trained` model (4 standard epochs) trained 4 more epochs, standard and PGD-2 adversarial, both validated
    against PGD-10 on 200 test images: {"standard": (its save folder, its last metrics record), "adversarial": ...}.
    At eps ADV_EPS: the synthetic set is learned so well by then that PGD-10 at 8/255 leaves resnet8 over 90 %
    of it, and little for adversarial training to improve on (docs/robustness.md)."""
    runs = {}
    for name, flags in (("standard", []), ("adversarial", ["--adv_train", "pgd", "--adv_steps", "2"])):
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(trained[0], folder)
        train_in_subprocess("-data", synthetic_dir, "-dir", str(folder), "-e", "8", "-bsize", "32", "--num_samples",
                            "384", "--val_samples", "200", "--eval_every", "4", "--val_attack", "pgd", "--resume",
                            "auto", "--adv_eps", ADV_EPS, *flags)
        runs[name] = folder, json.loads((folder / "resnet8_qat-metrics.jsonl").read_text().splitlines()[-1])
    return runs


@pytest.mark.slow
def test_adversarial_training_is_more_robust_than_standard_training_of_the_same_length(continued):
    standard, adversarial_ = (continued[name][1]["val_robust_accuracy"] for name in ("standard", "adversarial"))
    # Both on the same 200 images; the gap must exceed twice its standard error (binomial), whatever it is.
    error = math.sqrt((standard * (1 - standard) + adversarial_ * (1 - adversarial_)) / 200)
    assert adversarial_ - standard > 2 * error, (standard, adversarial_)
    for name in continued:
        record = continued[name][1]
        assert record["epoch"] == 8 and record["val_robust_accuracy"] <= record["val_accuracy"]


@pytest.mark.slow
def test_robust_validation_is_eval_py_s_attack_and_keeps_the_most_robust_model(continued, synthetic_dir, capsys):
    folder, record = continued["adversarial"]
    final = folder / "resnet8_qat-8_12.ckpt"
    evaluate.main(["-loc", str(final), "-data", synthetic_dir, "--num_samples", "200", "--attack", "pgd", "--eps",
                   ADV_EPS, "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["clean_accuracy"], result["robust_accuracy"]) == (record["val_accuracy"],
                                                                     record["val_robust_accuracy"])
    best = ms.load_checkpoint(str(folder / "resnet8_qat-best.ckpt"))
    assert float(best["val_robust_accuracy"].asnumpy()) == pytest.approx(record["val_robust_accuracy"])
