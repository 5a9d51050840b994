"""qatcifar.attack_apgd and attack_auto: APGD's schedule and losses as the paper defines them, its images inside the
eps-ball, and AutoAttack's stages each on what the one before left, never above PGD's robust accuracy."""
import mindspore as ms
import numpy as np
import pytest

import eval as evaluate
from conftest import expect_error, first_test_images, observed_qat_net
from qatcifar import attacks
from qatcifar.attack_apgd import APGD, Gradient, SummedLoss, checkpoints, losses
from qatcifar.attack_auto import STAGES, AutoAttack

EPS = 8 / 255


def test_step_sizes_are_checked_on_autoattacks_schedule():
    """AutoAttack's checks at 100 steps: after 22, then gaps 3 shorter each time, at least 6."""
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(5) == [1, 2, 3, 4]


@pytest.mark.slow  # (a QAT network's gradient in PYNATIVE_MODE: seconds)
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_the_numpy_losses_are_the_ones_the_graph_differentiates(loss):
    net = observed_qat_net()
    pixels = np.random.default_rng(0).uniform(0, 1, (4, 3, 32, 32)).astype(np.float32)
    logits = net(ms.Tensor(attacks.to_normalized(pixels))).asnumpy()
    labels = logits.argmax(axis=1).astype(np.int32)
    targets = np.argsort(-logits, axis=1)[:, 1].astype(np.int32)
    summed = SummedLoss(net, loss)(ms.Tensor(pixels), ms.Tensor(labels), ms.Tensor(targets)).asnumpy()
    assert np.isclose(losses(logits, labels, targets, loss).sum(), summed, rtol=1e-4)
    grad = Gradient(SummedLoss(net, loss))(ms.Tensor(pixels), ms.Tensor(labels), ms.Tensor(targets)).asnumpy()
    assert grad.shape == pixels.shape and np.isfinite(grad).all()


@pytest.mark.slow
def test_apgd_and_autoattack_stay_in_the_ball_and_report_each_stage(synthetic_dir):
    net = observed_qat_net()
    images = first_test_images(synthetic_dir, 4)
    labels = net(ms.Tensor(images)).asnumpy().argmax(axis=1)  # (all clean-correct: the network's own answers)
    for attack in (APGD(net, EPS, steps=1, loss="dlr", targets=2), AutoAttack(net, EPS, queries=2, steps=1)):
        adversarial = attack(images, labels)
        delta = attacks.to_pixels(adversarial) - attacks.to_pixels(images)
        assert np.abs(delta).max() <= EPS + 1e-5
    stages = attack.stages
    assert list(stages) == list(STAGES) and stages["clean"] == 4 and attack.images == 4
    counts = list(stages.values())
    assert counts == sorted(counts, reverse=True)  # (each attack on what the one before left)
    robust = (attack.logits(adversarial).argmax(axis=1) == labels).sum()
    assert robust == stages["square"]


def test_apgd_and_autoattack_flags_are_checked(untrained, synthetic_dir, capsys):
    base = ["-loc", untrained["float32"], "-data", synthetic_dir]
    for flags, fragments in ((["--attack", "apgd-ce", "--step_size", "1/255"], ["APGD sets its own step sizes"]),
                             (["--attack", "autoattack", "--steps", "5"], ["AutoAttack's standard version fixes"])):
        expect_error(evaluate.main, base + flags, capsys, *fragments)


@pytest.mark.slow
def test_autoattack_is_no_weaker_than_apgd_ce_and_apgd_ce_no_weaker_than_pgd(trained, synthetic_dir):
    """On the trained QAT ResNet-8 at 1/255 (some images robust), 5 steps each (AutoAttack's parts too, Square 20
    queries): AutoAttack <= APGD-CE <= PGD <= clean, counted on the same 16 images."""
    from qatcifar import inference

    net = inference.load_model(trained[0]).network
    images = first_test_images(synthetic_dir, 16)
    labels = np.asarray(first_labels(synthetic_dir, 16))
    eps = 1 / 255
    robust = {}
    for name, attack in (("pgd", attacks.Attack(net, "pgd", eps, steps=5)), ("apgd-ce", APGD(net, eps, steps=5)),
                         ("autoattack", AutoAttack(net, eps, queries=20, steps=5))):
        robust[name] = int((attack.logits(attack(images, labels)).argmax(axis=1) == labels).sum())
    clean = int((net(ms.Tensor(images)).asnumpy().argmax(axis=1) == labels).sum())
    assert robust["autoattack"] <= robust["apgd-ce"] <= robust["pgd"] <= clean
    assert attack.stages["apgd-ce"] >= attack.stages["apgd-dlr"] >= attack.stages["square"] == robust["autoattack"]


def first_labels(data_dir, count):
    from qatcifar import cifar

    dataset = cifar.create_dataset(data_dir, training=False, batch_size=count, num_samples=count)
    return next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[1]
