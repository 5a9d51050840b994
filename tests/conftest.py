"""Shared fixtures and helpers: CIFAR-format files written by the tests themselves (no download, no GPU),
one launcher for the project's scripts in a subprocess, and one check of the `error:` line.

Tests marked `slow` train more than a few steps, start msrun or run the int8 reference on hundreds
of images: `python -m pytest -m "not slow"` leaves them out. A test that needs a network but not
ResNet-18 in particular uses ARCH, MLPerf Tiny's ResNet-8: the same code path, 1/44 of the work.
"""
import contextlib
import gc
import io
import json
import os
import signal
import subprocess
import sys

# Before MindSpore runs a convolution (see cli.py): the fast oneDNN kernels, and a quiet log.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import eval as evaluate  # noqa: E402
from qatcifar import (
    cifar,  # noqa: E402
    files,
    int8_export,
)

# What MindSpore and the project import is there for the whole session: the garbage collector no longer scans it, so
# that release_memory's collection after every test costs a millisecond, not a tenth of a second.
gc.freeze()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "resnet8"  # the suite's network, wherever ResNet-18's size is not the point
SMALL = ["--arch", ARCH]  # train.py's flag for it


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
    cifar.write_synthetic(path, seed=0)
    return path


@pytest.fixture(scope="session")
def untrained(tmp_path_factory):
    """Checkpoints of an untrained ARCH, {"float32": path, "QAT": path}, written as train.py writes them: loadable,
    quickly made; the QAT one's observers have seen no step, so its activations are not quantized yet."""
    from qatcifar import checkpoint, networks
    from qatcifar.quant import quantize

    folder = tmp_path_factory.mktemp("untrained")
    paths = {"float32": str(folder / "float32.ckpt"), "QAT": str(folder / "qat.ckpt")}
    checkpoint.save(networks.resnet(ARCH), paths["float32"], {})
    checkpoint.save(quantize(networks.resnet(ARCH)), paths["QAT"], {})
    return paths


def observed_qat_net(arch=ARCH, config=None):
    """An untrained QAT network in eval mode whose observers are set as after one step (activations in [-4, 4],
    after a ReLU in [0, 4]): the whole structure in a second, its predictions meaningless. `config`: its
    QuantConfig (default QAT's); its weights are the same for every config (seed 0)."""
    import mindspore as ms

    from qatcifar import networks
    from qatcifar.quant import ActQuant, QuantConfig, quantize

    ms.set_seed(0)
    net = quantize(networks.resnet(arch), config or QuantConfig())
    for _, cell in net.cells_and_names():
        if isinstance(cell, ActQuant):
            cell.steps.set_data(ms.Tensor(1, ms.int32))
            cell.min_val.set_data(ms.Tensor(0.0 if cell.relu else -4.0, ms.float32))
            cell.max_val.set_data(ms.Tensor(4.0, ms.float32))
    net.set_train(False)
    return net


@pytest.fixture(scope="session")
def int8_file(tmp_path_factory):
    """A valid int8 file of observed_qat_net, with QAT's default settings."""
    from qatcifar import int8
    from qatcifar.quant import QuantConfig

    path = str(tmp_path_factory.mktemp("int8") / "untrained.int8.npz")
    int8.save(path, *int8_export.int8_model(observed_qat_net(), QuantConfig()))
    return path


@pytest.fixture(scope="session")
def trained(synthetic_dir, tmp_path_factory):
    """A QAT ARCH trained 4 short epochs on the learnable synthetic set, validated after epochs 2 and 4:
    (checkpoint, save dir)."""
    savedir = str(tmp_path_factory.mktemp("qat"))
    path = train_in_subprocess(*SMALL, "-data", synthetic_dir, "-dir", savedir, "-e", "4", "-bsize", "32",
                               "--num_samples", "384", "--val_samples", "200", "--eval_every", "2")
    return path, savedir


@pytest.fixture(scope="session")
def trained_float(synthetic_dir, tmp_path_factory):
    """A float32 ARCH (--no-qat) trained 2 short epochs on the learnable synthetic set: its checkpoint."""
    savedir = str(tmp_path_factory.mktemp("float"))
    return train_in_subprocess(*SMALL, "--no-qat", "-data", synthetic_dir, "-dir", savedir, "-e", "2", "-bsize", "32",
                               "--num_samples", "256", "--eval_every", "0")


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
# How far ONNX Runtime's logits may be from the int8 reference's, as a fraction of the largest |logit|: the two round
# their requantizations differently (float32 against fixed point), which moves logits by under 0.1 %; a pair of
# products saturating in 16 bits (ort_kernels.py) moves them by 30 % and more.
LOGIT_TOLERANCE = 0.01


def assert_agrees_with_reference(logits, reference):
    """ONNX Runtime's logits are the int8 reference's: every logit within LOGIT_TOLERANCE of the largest, and so the
    same class for every image but where the reference's top two are closer than that."""
    assert logits.shape == reference.shape
    scale = np.abs(reference).max()
    errors = np.abs(logits - reference).max(axis=1) / scale
    worst = int(errors.argmax())
    assert errors[worst] <= LOGIT_TOLERANCE, f"image {worst}: logits {logits[worst]} against {reference[worst]}"
    second, first = np.sort(reference, axis=1)[:, -2:].T
    decided = first - second > 2 * LOGIT_TOLERANCE * scale
    np.testing.assert_array_equal(logits.argmax(axis=1)[decided], reference.argmax(axis=1)[decided])


def high_contrast(images):
    """Normalized images with every pixel pushed to black or white: inputs at the ends of their range, which drive
    many activations up to their observers' maxima, where 16-bit pair sums saturate."""
    mean = np.float32(cifar.CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.float32(cifar.CIFAR10_STD).reshape(1, 3, 1, 1)
    pixels = np.where(images * std + mean > 0.5, np.float32(1), np.float32(0))
    return ((pixels - mean) / std).astype(np.float32)


def first_test_images(data_dir, count):
    """The first `count` normalized test images, as eval.py feeds them."""
    dataset = cifar.create_dataset(data_dir, training=False, batch_size=count, num_samples=count)
    return next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]


@pytest.fixture(scope="session")
def trained_exports(trained, synthetic_dir, tmp_path_factory):
    """The trained QAT checkpoint's int8 file and ONNX model (class names from the synthetic folder), the logits of
    both and the predictions of all three on the first AGREEMENT_IMAGES test images: {"int8": path, "onnx": path,
    "logits": {"int8": array, "onnx": array}, "predictions": {"checkpoint": array, "int8": array, "onnx": array}}.
    """
    import export
    from qatcifar import inference

    folder = tmp_path_factory.mktemp("exports")
    paths = {"checkpoint": trained[0]}
    for form, name in (("int8", "qat.int8.npz"), ("onnx", "qat.onnx")):
        paths[form] = export.main(["-loc", trained[0], "--format", form, "-o", str(folder / name),
                                   "-data", synthetic_dir])
    images = first_test_images(synthetic_dir, AGREEMENT_IMAGES)
    paths["logits"] = {form: inference.load_model(paths[form]).logits(images) for form in ("int8", "onnx")}
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=100, num_samples=AGREEMENT_IMAGES)
    paths["predictions"] = {form: logits.argmax(axis=1) for form, logits in paths["logits"].items()}
    paths["predictions"]["checkpoint"] = inference.predict(inference.load_model(trained[0]), dataset)[0]
    return paths


# A short QAT run: 3 epochs of 4 steps, a checkpoint every 2 steps, a schedule that changes
# every step and observers that start quantizing at step 1, so that a resumed run only matches
# an uninterrupted one if everything is restored.
SHORT_RUN = [*SMALL, "-bsize", "16", "--num_samples", "64", "-e", "3", "--save_steps", "2", "--keep", "20",
             "--lr_schedule", "cosine", "--quant_delay", "1", "--seed", "3", "--eval_every", "0"]


@pytest.fixture(scope="session")
def uninterrupted(synthetic_dir, tmp_path_factory):
    """The save folder of SHORT_RUN run from start to end: resnet8_qat-<epoch>_<step>.ckpt for steps 2, 4, ... 12."""
    folder = str(tmp_path_factory.mktemp("uninterrupted"))
    train_in_subprocess("-data", synthetic_dir, "-dir", folder, *SHORT_RUN)
    return folder


IN_PROCESS_MINDSPORE = ("mindspore", "train", "eval", "export", "bench", "qatcifar.")  # (qatcifar.files, .cli do not)
NO_MINDSPORE = {"qatcifar.files", "qatcifar.cli", "qatcifar.interrupts", "qatcifar.plots", "qatcifar.int8",
                "qatcifar.ort_kernels", "qatcifar.onnx_graph"}


def uses_mindspore(module):
    """Whether a test module runs MindSpore in pytest's process: it imports MindSpore, a command that runs it, or a
    library module that does. (Modules that only start processes do not.)"""
    names = {getattr(value, "__name__", "") for value in vars(module).values()}
    return any(name.startswith(IN_PROCESS_MINDSPORE) and name not in NO_MINDSPORE for name in names)


@pytest.fixture(autouse=True)
def release_memory(request):
    """Around each test of a module that runs MindSpore in this process: MindSpore's default PYNATIVE_MODE before and
    after it (a command's main, also in a session fixture, leaves GRAPH_MODE set, and the next unit test would compile
    its cells: 15 s instead of 3), and afterwards free what MindSpore caches for each compiled network (the suite
    builds dozens in one process)."""
    if not uses_mindspore(request.module):
        yield
        return
    import mindspore as ms

    def pynative():
        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            ms.set_context(mode=ms.PYNATIVE_MODE)

    pynative()
    yield
    pynative()
    gc.collect()
    ms.ms_memory_recycle()


UNBUFFERED = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they are printed


def wait_for_line(process, text):
    """Read a started script's stdout up to a line that holds `text`."""
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"{process.args} ended without a line {text!r}: {process.stderr.read()[-2000:]}")


def interrupt(process, signum=signal.SIGINT):
    """Ctrl-C (or `signum`), and what the process then says: (exit status, stderr, the signal)."""
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stderr, signum


def assert_interrupted(status, stderr, signum, said):
    """One line, and the status of the signal: 130 (Ctrl-C) or 143 (SIGTERM)."""
    assert status == 128 + signum, stderr
    by = "" if signum == signal.SIGINT else " by SIGTERM"
    assert stderr.splitlines() == [f"interrupted{by}: {said}"], stderr


SYNTHETIC_NAMES = [f"synthetic_{i}" for i in range(10)]  # the class names of cifar.write_synthetic's folders


def node(header, name):
    """The node named `name` in an int8 file's header."""
    return next(n for n in header["graph"] if n.get("name") == name)


def assert_png(path, width, height):
    """A PNG of that size, with something drawn on it."""
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[:2] == (height, width) and image.std() > 0.05  # drawn, not blank


def write_metrics(folder, lines, prefix="resnet8_qat"):
    """A run's metrics file (files.RunFiles) of these lines in `folder` (made if need be); returns its path."""
    folder.mkdir(exist_ok=True)
    path = files.RunFiles(str(folder), prefix).metrics
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def savedir(tmp_path):
    """A save directory that already holds a run's files, which no failed run may touch."""
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "resnet18_qat-1_1.ckpt").write_bytes(b"earlier run")
    (folder / "resnet18_qat-args.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="session")
def float_onnx(tmp_path_factory):
    """A float32 ARCH with random BatchNorm statistics (so that folding them is tested) as a checkpoint and
    as ONNX: (checkpoint, onnx)."""
    import mindspore as ms

    import export
    from qatcifar import checkpoint, networks

    folder = tmp_path_factory.mktemp("float_onnx")
    net, rng = networks.resnet(ARCH), np.random.default_rng(0)
    ranges = {"gamma": (0.5, 1.5), "beta": (-0.2, 0.2), "moving_mean": (-0.2, 0.2), "moving_variance": (0.5, 2.0)}
    for name, param in net.parameters_and_names():
        low_high = ranges.get(name.rsplit(".", 1)[-1]) if ".bn." in name else None
        if low_high:
            param.set_data(ms.Tensor(rng.uniform(*low_high, param.shape).astype(np.float32)))
    path = str(folder / "float.ckpt")
    checkpoint.save(net, path, {})
    return path, export.main(["-loc", path, "--format", "onnx", "-o", str(folder / "float.onnx")])


def metric_records(epochs, robust=False, first=1):
    out = []
    for epoch in range(first, first + epochs):
        record = {"epoch": epoch, "step": 10 * epoch, "loss": 2.0 / epoch, "loss_min": 1.0 / epoch,
                  "loss_max": 3.0 / epoch, "lr": 0.001 * epoch, "images_per_s": 30.0}
        if epoch % 2 == 0:
            record.update(val_accuracy=0.5 + 0.04 * epoch, val_s=1.0)
            if robust:
                record["val_robust_accuracy"] = 0.2 + 0.03 * epoch
        out.append(record)
    return out


class FakeRunContext:
    """What a callback sees of Model.train: the step and epoch counts, the step's loss, and the stop request."""

    def __init__(self, step, epoch=1, loss=1.0):
        import mindspore as ms

        self.args = type("CallbackParams", (), {"cur_step_num": step, "cur_epoch_num": epoch,
                                                "net_outputs": ms.Tensor(loss, ms.float32)})()
        self.stop_requested = False

    def original_args(self):
        return self.args

    def request_stop(self):
        self.stop_requested = True
