"""export.py --format c (qatcifar/c_export.py, qatcifar/c/): the C folder computes the int8 reference's int32 logits
bit for bit, built for this machine (also with sanitizers) and for an emulated Cortex-M4; eval.py and predict.py run
it (qatcifar/model_c.py); hostile folders and outputs are one error line."""
import copy
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import eval as evaluate
import export
import predict
from conftest import ROOT, expect_error, first_test_images, observed_qat_net
from qatcifar import c_export, int8, int8_export, mcu, model_c
from qatcifar.quant import QuantConfig

IMAGES = 200  # per model on the host: a few hundred with the extremes below
MCU_IMAGES = 12  # on the emulated Cortex-M4 (a quarter of a second each in QEMU)
STRICT = ("-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror")
SANITIZE = ("-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
HARNESS = os.path.join(ROOT, "tests", "c", "host_main.c")


def int8_model(arch="resnet8", version=None, **config):
    """The int8 model of observed_qat_net (its structure whole, its numbers meaningless), QuantConfig(**config);
    `version`: the header's, for the arithmetic of older files."""
    settings = QuantConfig(**config)
    header, arrays = int8_export.int8_model(observed_qat_net(arch, settings), settings)
    header["version"] = version or header["version"]
    return {"header": header, "arrays": arrays}


def extreme_weights(model, seed=0):
    """The model with random weights at the ends of their range, ±(2^(B-1) - 1), and random biases as large as int32
    leaves room for (int8.check)."""
    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    bits = model["header"]["weight_bits"]
    for node in model["header"]["graph"]:
        if "weight" in node:
            weight = model["arrays"][node["weight"]]
            end = 2 ** (node.get("weight_bits", bits) - 1) - 1
            model["arrays"][node["weight"]] = (rng.choice([-end, end], weight.shape)).astype(np.int8)
            model["arrays"][node["bias"]] = rng.integers(-2 ** 20, 2 ** 20, weight.shape[0]).astype(np.int32)
    int8.check(model)
    return model


def images_with_extremes(synthetic_dir, count):
    """The first test images, then an image of level 0 everywhere and one of the top level (saturated)."""
    low = np.full((1, 3, 32, 32), -1e3, np.float32)
    return np.concatenate([first_test_images(synthetic_dir, count - 2), low, -low])


def write(model, folder):
    os.makedirs(folder)
    c_export.write_folder(str(folder), model["header"], model["arrays"],
                          int8_export.metadata("int8 C", "test", None, {"arch": model["header"]["arch"]}))
    return str(folder)


def levels(model, images):
    """The quantized images, channels last, as model_run takes them."""
    header = model["header"]
    tensor = header["tensors"][header["graph"][0]["output"]]
    return int8.quantize_input(images, tensor, int8.tflite_arithmetic(header)).transpose(0, 2, 3, 1)


CASES = {
    "resnet8": {},
    "version 1": {"version": 1},
    "version 2, 4-bit activations": {"version": 2, "act_bits": 4},
    "4-bit activations (bias bits)": {"act_bits": 4},
    "4-bit weights, packed": {"weight_bits": 4},
    "resnet20": {"arch": "resnet20"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, "extreme weights"])
def test_the_c_logits_equal_the_references_bit_for_bit(case, synthetic_dir, tmp_path):
    model = extreme_weights(int8_model()) if case == "extreme weights" else int8_model(**CASES[case])
    images = images_with_extremes(synthetic_dir, IMAGES)
    run = model_c.runner(write(model, tmp_path / "c"))
    logits = run(images)
    reference = int8.run_all(model, images)
    assert np.array_equal(run.acc, reference["logits.acc"])
    assert np.array_equal(logits, reference["logits"])  # (model_logits_float: the same float32 numbers)
    first = reference[model["header"]["graph"][0]["output"]]
    assert first[-2].max() == 0 and first[-1].min() == 2 ** model["header"]["tensors"]["t0"].get("bits", 8) - 1


def build_harness(folder, output, flags):
    subprocess.run(["gcc", *STRICT, *flags, f"-I{folder}", "-o", output, HARNESS,
                    os.path.join(folder, "model.c"), os.path.join(folder, "qat_kernels.c")], check=True)
    return output


def raw_test_images(data_dir, count):
    """The first test images as 8-bit RGB, channels last, read from test_batch.bin itself."""
    records = np.fromfile(os.path.join(data_dir, "test_batch.bin"), np.uint8, count * 3073).reshape(count, 3073)
    return np.ascontiguousarray(records[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, {"weight_bits": 4, "act_bits": 4}], ids=["7-bit", "4-bit"])
def test_sanitizers_find_nothing_and_the_rgb_helper_quantizes_as_the_pipeline(config, synthetic_dir, tmp_path):
    """-Werror -pedantic, AddressSanitizer and UndefinedBehaviorSanitizer; model_input's copy-free path; and
    model_quantize_rgb of test_batch.bin's bytes gives the levels of eval.py's normalized images."""
    model = int8_model(**config)
    folder = write(model, tmp_path / "c")
    harness = build_harness(folder, str(tmp_path / "host"), SANITIZE)
    images = images_with_extremes(synthetic_dir, 20)
    (tmp_path / "images.bin").write_bytes(np.ascontiguousarray(levels(model, images)).tobytes())
    (tmp_path / "rgb.bin").write_bytes(raw_test_images(synthetic_dir, 100).tobytes())
    result = subprocess.run([harness, *(str(tmp_path / name) for name in ("images.bin", "logits.bin", "rgb.bin",
                                                                          "levels.bin"))],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "runtime error" not in result.stderr, result.stderr
    logits = np.fromfile(tmp_path / "logits.bin", np.int32).reshape(len(images), -1)
    assert np.array_equal(logits, int8.run_all(model, images)["logits.acc"])
    quantized = np.fromfile(tmp_path / "levels.bin", np.uint8).reshape(100, 32, 32, 3)
    assert np.array_equal(quantized, levels(model, first_test_images(synthetic_dir, 100)))


def test_the_arena_plan_overlaps_no_tensor_while_it_is_needed():
    model = int8_model()
    steps, shapes, offsets, arena = c_export.plan(model["header"], model["arrays"])
    assert arena == 32 * 1024  # ResNet-8: a block's input and one intermediate of 32x32x16
    span = {name: (offsets[name], offsets[name] + int(np.prod(shapes[name]))) for name in offsets}
    made = {step["output"]: i for i, step in enumerate(steps)}
    last = {name: i for i, step in enumerate(steps) for name in step["inputs"]}
    for i, step in enumerate(steps):
        if step["node"]["op"] == "dense":
            continue
        out = span[step["output"]]
        for name in span:
            alive = made.get(name, -1) < i <= last.get(name, -1)  # (made before this step, read by it or later)
            if alive and out[0] < span[name][1] and span[name][0] < out[1]:
                in_place = name in step["inputs"] and last[name] == i and span[name] == out and (
                    name == step.get("other") or step["node"]["op"] == "add")
                assert in_place, (i, step["output"], name)


# --- on the emulated Cortex-M4 ---------------------------------------------------------------------------------

def require_mcu_tools():
    """Skip, naming the packages, only where they are not installed (.ci/run installs them with apt-get)."""
    absent = mcu.missing()
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed and could not be installed here (apt-get install "
                    f"{' '.join(sorted(set(absent.values())))})")


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, {"weight_bits": 4}], ids=["7-bit", "4-bit"])
def test_the_cortex_m4_build_gives_the_same_logits_without_a_warning(config, synthetic_dir, tmp_path):
    require_mcu_tools()
    model = int8_model(**config)
    folder = write(model, tmp_path / "c")
    images = images_with_extremes(synthetic_dir, MCU_IMAGES)
    reference = int8.run_all(model, images)["logits.acc"]
    for plain in (False, True):  # the M4's SMLAD kernel, and plain C
        work = tmp_path / ("plain" if plain else "smlad")
        work.mkdir()
        result = mcu.run(mcu.build(folder, str(work), plain=plain), levels(model, images), str(work))
        assert np.array_equal(result["logits"], reference)
        assert 1e6 < result["instructions"] < 100e6 and 0 < result["stack_bytes"] <= 2048
    with open(os.path.join(folder, c_export.MANIFEST)) as f:
        record = json.load(f)
    # static RAM: the arena (32 KB for ResNet-8) and, for 4-bit weights, their scratch; nothing else
    assert mcu.sizes(folder, str(tmp_path))["ram_bytes"] == record["arena_bytes"] + record["scratch_bytes"]


# --- the commands --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c_folder(trained_exports, synthetic_dir, tmp_path_factory):
    return export.main(["-loc", trained_exports["checkpoint"], "--format", "c", "-o",
                        str(tmp_path_factory.mktemp("c") / "resnet8_c"), "-data", synthetic_dir])


@pytest.mark.slow
def test_eval_and_predict_on_the_folder_give_the_int8_files_answers(c_folder, trained_exports, synthetic_dir,
                                                                    capsys):
    argv = ["-data", synthetic_dir, "--num_samples", "300"]
    folder = evaluate.main(["-loc", c_folder, *argv])
    assert "of C (integer arithmetic, host build)" in capsys.readouterr().out
    assert folder == evaluate.main(["-loc", trained_exports["int8"], *argv])
    libraries = os.listdir(os.path.join(c_folder, model_c.BUILD))
    evaluate.main(["-loc", c_folder, *argv])  # (built once: the cached library again)
    assert os.listdir(os.path.join(c_folder, model_c.BUILD)) == libraries and len(libraries) == 1
    samples = sorted(os.path.join(synthetic_dir, "samples", name)
                     for name in os.listdir(os.path.join(synthetic_dir, "samples")))[:4]
    got = predict.main(["-loc", c_folder, *samples])
    want = predict.main(["-loc", trained_exports["int8"], *samples])
    assert [r["top"] for r in got] == [r["top"] for r in want]
    capsys.readouterr()


@pytest.mark.slow
def test_a_folder_it_cannot_build_in_is_built_in_a_temporary_one(c_folder, tmp_path):
    """Where .build cannot be made (a read-only folder; here a file of that name, which stops root too), the library
    is built for this process only, and the folder is left as it was."""
    folder = tmp_path / "c"
    shutil.copytree(c_folder, folder, ignore=shutil.ignore_patterns(model_c.BUILD))
    (folder / model_c.BUILD).write_text("not a folder")
    run = model_c.runner(str(folder))
    assert run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    assert (folder / model_c.BUILD).read_text() == "not a folder"


# --- hostile folders and outputs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    return write(int8_model(), tmp_path_factory.mktemp("clean") / "c")


def damage(folder, case):
    if case == "no manifest":
        os.remove(os.path.join(folder, c_export.MANIFEST))
    elif case == "manifest not JSON":
        with open(os.path.join(folder, c_export.MANIFEST), "w") as f:
            f.write("{not json")
    elif case == "foreign manifest":
        with open(os.path.join(folder, c_export.MANIFEST), "w") as f:
            json.dump({"format": "something-else", "version": 1}, f)
    elif case == "model.c edited":
        with open(os.path.join(folder, "model.c"), "a") as f:
            f.write("\nint injected(void) { return 1; }\n")
    elif case == "kernels missing":
        os.remove(os.path.join(folder, "qat_kernels.c"))


@pytest.mark.parametrize("case, fragment", [
    ("no manifest", "without model.json"), ("manifest not JSON", "not readable JSON"),
    ("foreign manifest", "not the manifest"), ("model.c edited", "was changed after export.py wrote it"),
    ("kernels missing", "has no qat_kernels.c")])
def test_a_damaged_or_foreign_folder_is_one_error_line_before_anything_is_built(case, fragment, clean_folder,
                                                                                synthetic_dir, tmp_path, capsys):
    folder = str(tmp_path / "c")
    shutil.copytree(clean_folder, folder)
    damage(folder, case)
    expect_error(evaluate.main, ["-loc", folder, "-data", synthetic_dir], capsys, folder, fragment)
    assert not os.path.exists(os.path.join(folder, model_c.BUILD))


def test_without_a_c_compiler_the_folder_is_one_error_line(clean_folder, synthetic_dir, monkeypatch, capsys):
    monkeypatch.setenv("CC", "no-such-cc")
    expect_error(evaluate.main, ["-loc", clean_folder, "-data", synthetic_dir], capsys, "no C compiler",
                 "no-such-cc")


@pytest.mark.parametrize("case", ["exists", "foreign folder", "a file", "the data folder"])
def test_export_refuses_an_output_folder_it_must_not_write(case, untrained, synthetic_dir, clean_folder, tmp_path,
                                                           capsys):
    target, extra, fragment = {
        "exists": (clean_folder, [], "add --overwrite"),
        "foreign folder": (str(tmp_path), ["--overwrite"], "did not write"),
        "a file": (untrained["QAT"], ["--overwrite"], "is a file"),
        "the data folder": (synthetic_dir, ["--overwrite"], "the data folder"),
    }[case]
    before = sorted(os.listdir(target)) if os.path.isdir(target) else None
    expect_error(export.main, ["-loc", untrained["QAT"], "--format", "c", "-o", target, "-data", synthetic_dir,
                               *extra], capsys, fragment)
    assert (sorted(os.listdir(target)) if os.path.isdir(target) else None) == before


def test_the_folder_is_a_model_for_eval_not_a_file_with_a_suffix(clean_folder):
    from qatcifar import inference

    assert inference.format_module(clean_folder) is model_c and not inference.uses_mindspore(clean_folder)
    with open(os.path.join(clean_folder, "model.h")) as f:
        header = f.read()
    assert "#define MODEL_INPUT_BYTES 3072" in header and "#define MODEL_ARENA_BYTES 32768" in header


def test_an_attack_on_the_folder_is_refused_it_has_no_gradients(clean_folder, synthetic_dir, capsys):
    expect_error(evaluate.main, ["-loc", clean_folder, "-data", synthetic_dir, "--attack", "pgd"], capsys,
                 "has no gradients to attack")
