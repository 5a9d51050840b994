"""qatcifar.attacks, the attacks of eval.py: FGSM and PGD in pixel space, and adversarial test folders."""
import argparse
import json
import os

import numpy as np
import pytest

import eval as evaluate
from conftest import expect_error
from qatcifar import attacks, cifar

SAMPLES = "100"


def attacked(path, data, capsys, *flags):
    """eval.py --json with an attack: its JSON line."""
    evaluate.main(["-loc", path, "-data", data, "--num_samples", SAMPLES, "--json", *flags])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def records(folder):
    return np.fromfile(os.path.join(folder, cifar.TEST_FILE), np.uint8).reshape(-1, cifar.RECORD_BYTES)


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("3/255", 3 / 255), ("0", 0.0), ("1", 1.0),
                                         (" 8/255 ", 8 / 255)])
def test_pixel_fraction_reads_fractions_and_decimals(text, value):
    assert attacks.pixel_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1e400", "1e999999999", "-1e400/1", "inf", "nan", "1/0", "2/255/3", "8/", "x"])
def test_pixel_fraction_refuses_huge_infinite_and_malformed_values_at_once(text):
    with pytest.raises(argparse.ArgumentTypeError):
        attacks.pixel_fraction(text)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_eps_zero_leaves_the_images_and_the_accuracy(method, untrained, synthetic_dir, capsys):
    flags = ["--attack", method, "--eps", "0"] + (["--steps", "2"] if method == "pgd" else [])
    result = attacked(untrained["float32"], synthetic_dir, capsys, *flags)
    assert result["robust_accuracy"] == result["clean_accuracy"] == result["accuracy"]
    assert result["attack"]["eps"] == 0 and result["attack"]["method"] == method


def test_attack_flags_are_checked_before_any_work(untrained, int8_file, synthetic_dir, tmp_path, capsys):
    ckpt = untrained["float32"]
    base = ["-loc", ckpt, "-data", synthetic_dir]
    full = tmp_path / "full"
    full.mkdir()
    (full / "earlier.txt").write_text("kept")
    for flags, fragments in (
            (["--attack", "pgd", "--eps", "-0.1"], ["--eps", "from 0 to 1"]),
            (["--attack", "pgd", "--eps", "2"], ["--eps", "from 0 to 1"]),
            (["--attack", "pgd", "--eps", "8/0"], ["--eps", "like 8/255"]),
            (["--attack", "pgd", "--steps", "0"], ["--steps", "from 1 to 1000"]),
            (["--attack", "cw"], ["invalid choice: 'cw'"]),
            (["--eps", "8/255"], ["--eps belongs to an attack; add --attack pgd"]),
            (["--save_adversarial", str(tmp_path / "adv")], ["--save_adversarial belongs to an attack"]),
            (["--attack", "fgsm", "--steps", "5"], ["FGSM is one step", "--steps applies to --attack pgd"]),
            (["--attack", "pgd", "--save_adversarial", synthetic_dir], ["is the data folder (-data)"]),
            (["--attack", "pgd", "--save_adversarial", str(full)], ["is not empty", "choose an empty or new"]),
            (["--attack", "pgd", "--save_adversarial", os.path.join(untrained["float32"], "adv")],
             ["cannot write", "is not a folder"])):
        expect_error(evaluate.main, base + flags, capsys, *fragments)
    expect_error(evaluate.main, ["-loc", int8_file, "-data", synthetic_dir, "--attack", "pgd"], capsys,
                 "has no gradients to attack", "--save_adversarial DIR", "eval.py -data DIR")
    assert not os.path.exists(tmp_path / "adv")


@pytest.mark.slow
def test_pgd_is_at_least_as_strong_as_fgsm_and_robust_at_most_clean(trained, synthetic_dir, capsys):
    fgsm = attacked(trained[0], synthetic_dir, capsys, "--attack", "fgsm", "--eps", "8/255")
    pgd = attacked(trained[0], synthetic_dir, capsys, "--attack", "pgd", "--eps", "8/255", "--steps", "5")
    assert fgsm["clean_accuracy"] == pgd["clean_accuracy"] > 0.5
    assert pgd["robust_accuracy"] <= fgsm["robust_accuracy"] <= fgsm["clean_accuracy"]
    assert pgd["attack"] == {"method": "pgd", "eps": 8 / 255, "steps": 5, "step_size": 2.5 * (8 / 255) / 5,
                             "restarts": 1, "seed": 0}
    assert set(pgd["per_class_robust"]) == set(pgd["per_class"])


@pytest.mark.slow
def test_saved_adversarial_images_stay_in_the_ball_and_load_with_plain_eval(trained_exports, synthetic_dir,
                                                                            tmp_path, capsys):
    folder = str(tmp_path / "adv")
    result = attacked(trained_exports["checkpoint"], synthetic_dir, capsys, "--attack", "pgd", "--eps", "4/255",
                      "--steps", "3", "--save_adversarial", folder)
    saved, original = records(folder).astype(int), records(synthetic_dir).astype(int)
    count = int(SAMPLES)
    assert saved.shape == original.shape and (saved[:, 0] == original[:, 0]).all()  # 10,000 records, same labels
    assert np.abs(saved[:count, 1:] - original[:count, 1:]).max() <= 4  # eps 4/255: four pixel levels
    assert (saved[:count, 1:] != original[:count, 1:]).any() and (saved[count:] == original[count:]).all()
    assert sorted(os.listdir(folder)) == sorted([attacks.NOTE_FILE, cifar.META_FILE, cifar.SYNTHETIC_MARKER,
                                                 cifar.TEST_FILE])
    # Any model file on the attacked images, with plain eval.py: the transfer to the deployed int8 model.
    for form in ("checkpoint", "int8", "onnx"):
        accuracy = evaluate.main(["-loc", trained_exports[form], "-data", folder, "--num_samples", SAMPLES])
        assert accuracy <= result["clean_accuracy"]
    capsys.readouterr()
