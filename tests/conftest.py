"""Shared fixtures and helpers: CIFAR-format files written by the tests themselves (no download, no GPU),
one launcher for the project's scripts in a subprocess, and one check of the `error:` line.

Tests marked `slow` train more than a few steps, start msrun or run the int8 reference on hundreds
of images: `python -m pytest -m "not slow"` leaves them out.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

# Before MindSpore runs a convolution (see cli.py): the fast oneDNN kernels, and a quiet log.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import eval as evaluate  # noqa: E402
import preprocess  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_script(*argv, env=None):
    """`python argv...` in the project's folder, as a user starts it; a Popen with text stdout and stderr pipes.

    Training runs in child processes because MindSpore keeps the memory pool of every network
    trained in a process (ms_memory_recycle returns little of it): a dozen in-process runs exhaust 24 GB.
    """
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_script(*argv, env=None, timeout=600):
    """start_script to its end: a CompletedProcess with the exit status, stdout and stderr."""
    process = start_script(*argv, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train_in_subprocess(*argv, output=False):
    """Run train.py to a successful end and return the checkpoint it printed (and its stdout with output=True)."""
    result = run_script("train.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")]
    path = lines[-1][len("checkpoint: "):]
    return (path, result.stdout) if output else path


def expect_error(main, argv, capsys, *fragments, code=2):
    """main(argv) must exit with `code` after exactly one `error:` line on stderr that holds every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """Names, sizes and modification times of everything in a folder, to prove nothing changed."""
    return {name: (os.stat(os.path.join(folder, name)).st_size, os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A learnable synthetic CIFAR-format folder: data_batch_1.bin and test_batch.bin, 10,000 images each."""
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    preprocess.write_synthetic(path, seed=0)
    return path


@pytest.fixture(scope="session")
def untrained(tmp_path_factory):
    """Checkpoints of an untrained ResNet-18, {"float32": path, "QAT": path}: loadable, quickly made; the QAT
    one's observers have seen no step, so its activations are not quantized yet."""
    import mindspore as ms

    from quant import quantize
    from resnetv2 import resnet18

    folder = tmp_path_factory.mktemp("untrained")
    paths = {"float32": str(folder / "float32.ckpt"), "QAT": str(folder / "qat.ckpt")}
    ms.save_checkpoint(resnet18(), paths["float32"])
    ms.save_checkpoint(quantize(resnet18()), paths["QAT"])
    return paths


@pytest.fixture(scope="session")
def int8_file(tmp_path_factory):
    """A valid int8 file of an untrained QAT ResNet-18 whose observers are set as after one step (activations in
    [-4, 4]): the full-size structure in a second, its predictions meaningless."""
    import mindspore as ms

    import export
    import int8
    from quant import QuantConfig, quantize
    from resnetv2 import resnet18

    net = quantize(resnet18(), QuantConfig())
    for name, param in net.parameters_and_names():
        value = {"steps": 1, "min_val": -4.0, "max_val": 4.0}.get(name.rsplit(".", 1)[-1])
        if value is not None and "quant" in name:
            param.set_data(ms.Tensor(value, param.dtype))
    net.set_train(False)
    header, arrays = export.int8_model(net, QuantConfig())
    path = str(tmp_path_factory.mktemp("int8") / "untrained.int8.npz")
    int8.save(path, header, arrays)
    return path


@pytest.fixture(scope="session")
def trained(synthetic_dir, tmp_path_factory):
    """A QAT model trained 4 short epochs on the learnable synthetic set, validated after epochs 2 and 4:
    (checkpoint, save dir)."""
    savedir = str(tmp_path_factory.mktemp("qat"))
    path = train_in_subprocess("-data", synthetic_dir, "-dir", savedir, "-e", "4", "-bsize", "32",
                               "--num_samples", "384", "--val_samples", "200", "--eval_every", "2")
    return path, savedir


@pytest.fixture(scope="session")
def trained_evaluation(trained, synthetic_dir, tmp_path_factory):
    """eval.py --json --save_predictions on the trained checkpoint and the first 500 test images:
    (the accuracy main returned, the JSON line, the predictions)."""
    predictions = str(tmp_path_factory.mktemp("predictions") / "checkpoint.npy")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        accuracy = evaluate.main(["-loc", trained[0], "-data", synthetic_dir, "--num_samples", "500", "--json",
                                  "--save_predictions", predictions])
    return accuracy, json.loads(stdout.getvalue().strip().splitlines()[-1]), np.load(predictions)


AGREEMENT_IMAGES = 1000  # the measure of agreement between model formats


@pytest.fixture(scope="session")
def trained_exports(trained, synthetic_dir, tmp_path_factory):
    """The trained QAT checkpoint's int8 file and ONNX model (class names from the synthetic folder), and the
    predictions of all three on the first AGREEMENT_IMAGES test images: {"int8": path, "onnx": path,
    "predictions": {"checkpoint": array, "int8": array, "onnx": array}}. The int8 reference takes 1 1/2 minutes."""
    import export
    import inference

    folder = tmp_path_factory.mktemp("exports")
    paths = {"checkpoint": trained[0]}
    for form, name in (("int8", "qat.int8.npz"), ("onnx", "qat.onnx")):
        paths[form] = export.main(["-loc", trained[0], "--format", form, "-o", str(folder / name),
                                   "-data", synthetic_dir])
    dataset = preprocess.create_dataset(synthetic_dir, training=False, batch_size=100, num_samples=AGREEMENT_IMAGES)
    paths["predictions"] = {form: inference.predict(inference.load_model(paths[form]), dataset)[0]
                            for form in ("checkpoint", "int8", "onnx")}
    return paths


# A short QAT run: 3 epochs of 4 steps, a checkpoint every 2 steps, a schedule that changes
# every step and observers that start quantizing at step 1, so that a resumed run only matches
# an uninterrupted one if everything is restored.
SHORT_RUN = ["-bsize", "16", "--num_samples", "64", "-e", "3", "--save_steps", "2", "--keep", "20",
             "--lr_schedule", "cosine", "--quant_delay", "1", "--seed", "3", "--eval_every", "0"]


@pytest.fixture(scope="session")
def uninterrupted(synthetic_dir, tmp_path_factory):
    """The save folder of SHORT_RUN run from start to end: resnet18_qat-<epoch>_<step>.ckpt for steps 2, 4, ... 12."""
    folder = str(tmp_path_factory.mktemp("uninterrupted"))
    train_in_subprocess("-data", synthetic_dir, "-dir", folder, *SHORT_RUN)
    return folder


@pytest.fixture(autouse=True)
def release_memory():
    """Free what MindSpore caches for each compiled network: the suite builds dozens in one process."""
    yield
    import gc

    import mindspore as ms

    gc.collect()
    ms.ms_memory_recycle()
