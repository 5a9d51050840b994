"""qatcifar.attack_square: the Square attack stays in the eps-ball and [0, 1], only ever lowers an image's margin,
leaves misclassified images alone, breaks what a gradient-free attack can break, and runs on any model file."""
import json

import numpy as np
import pytest

import eval as evaluate
from conftest import expect_error
from qatcifar import attacks
from qatcifar.attack_square import SCHEDULE, Square, margins, window_share

EPS = 8 / 255


def linear_model(seed=0):
    """Scores of a fixed random linear model of normalized images: a model whose margins a few pixels change."""
    weights = np.random.default_rng(seed).standard_normal((3 * 32 * 32, 10)).astype(np.float32) / 50
    return lambda images: images.reshape(len(images), -1) @ weights


def images_and_labels(logits, count=12, seed=1):
    images = np.random.default_rng(seed).uniform(-1.5, 1.5, (count, 3, 32, 32)).astype(np.float32)
    return images, logits(images).argmax(axis=1)  # (each image classified correctly: its own top class)


def test_the_window_shrinks_on_the_papers_schedule():
    assert window_share(0.8, 0, 5000) == 0.8
    assert window_share(0.8, 5000 * SCHEDULE[0] // 10000 + 1, 5000) == 0.4
    assert window_share(0.8, 4999, 5000) == 0.8 / 2 ** len(SCHEDULE)


def test_square_stays_in_the_ball_lowers_margins_and_breaks_a_linear_model():
    logits = linear_model()
    images, labels = images_and_labels(logits)
    labels[0] = (labels[0] + 1) % 10  # misclassified from the start: left as it is
    calls = []
    attack = Square(lambda x: calls.append(len(x)) or logits(x), EPS, queries=200, seed=3)
    adversarial = attack(images, labels)
    pixels, clean = attacks.to_pixels(adversarial), attacks.to_pixels(images)
    assert np.abs(pixels - clean).max() <= EPS + 1e-6 and pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert np.allclose(adversarial[0], images[0], atol=1e-6)
    before, after = margins(logits(images), labels), margins(logits(adversarial), labels)
    assert (after[1:] <= before[1:] + 1e-5).all() and (after[1:] < 0).mean() >= 0.5
    assert max(calls) <= len(images)  # (the queries go to the images not yet broken, padded to few shapes)
    again = Square(logits, EPS, queries=200, seed=3)(images, labels)
    assert np.array_equal(again, adversarial)  # the seed fixes every window and sign


def test_square_with_eps_zero_changes_nothing():
    logits = linear_model()
    images, labels = images_and_labels(logits, count=4)
    assert np.allclose(Square(logits, 0.0, queries=20)(images, labels), images, atol=1e-5)


def test_square_flags_are_checked_before_any_work(int8_file, synthetic_dir, capsys):
    base = ["-loc", int8_file, "-data", synthetic_dir]
    for flags, fragments in (
            (["--attack", "square", "--steps", "5"], ["Square takes --queries, not steps", "--steps"]),
            (["--attack", "pgd", "--queries", "10"], ["--queries is the Square attack's budget"]),
            (["--queries", "10"], ["--queries belongs to an attack"]),
            (["--attack", "square", "--queries", "0"], ["--queries", "from 1 to 100000"]),
            (["--attack", "pgd"], ["has no gradients to attack", "--attack square (gradient-free)"])):
        expect_error(evaluate.main, base + flags, capsys, *fragments)


def test_square_attacks_an_int8_file_as_eval_reports_it(int8_file, synthetic_dir, capsys):
    evaluate.main(["-loc", int8_file, "-data", synthetic_dir, "--num_samples", "8", "-bsize", "8", "--attack",
                   "square", "--queries", "5", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["attack"] == {"method": "square", "eps": EPS, "queries": 5, "p_init": 0.8, "seed": 0}
    assert result["robust_accuracy"] <= result["clean_accuracy"]


@pytest.mark.slow
def test_the_deployed_onnx_model_is_as_robust_under_square_as_its_checkpoint(trained_exports, synthetic_dir,
                                                                               capsys):
    """Square on the int8 ONNX model and on the QAT checkpoint it was exported from, the same images and seed."""
    argv = ["-data", synthetic_dir, "--num_samples", "100", "--attack", "square", "--queries", "100", "--json"]
    found = {}
    for form in ("checkpoint", "onnx"):
        evaluate.main(["-loc", trained_exports[form], *argv])
        found[form] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(found["onnx"]["robust_accuracy"] - found["checkpoint"]["robust_accuracy"]) <= 0.05
    assert all(r["robust_accuracy"] < r["clean_accuracy"] for r in found.values())
