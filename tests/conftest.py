"""Shared fixtures: CIFAR-format files written by the tests themselves (no download, no GPU)."""
import os
import subprocess
import sys

# Before MindSpore runs a convolution (see cli.py): the fast oneDNN kernels, and a quiet log.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import pytest  # noqa: E402

import preprocess  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A learnable synthetic CIFAR-format folder: data_batch_1.bin and test_batch.bin, 10,000 images each."""
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    preprocess.write_synthetic(path, seed=0)
    return path


def train_in_subprocess(*argv, output=False):
    """Run train.py in its own process and return the checkpoint it printed (and its stdout with output=True).

    Training runs in a child process because MindSpore keeps the memory pool of every network
    trained in a process (ms_memory_recycle returns little of it): a dozen in-process runs
    exhaust 24 GB.
    """
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")]
    path = lines[-1][len("checkpoint: "):]
    return (path, result.stdout) if output else path


@pytest.fixture(scope="session")
def trained(synthetic_dir, tmp_path_factory):
    """A QAT model trained 4 short epochs on the learnable synthetic set, validated after epochs 2 and 4:
    (checkpoint, save dir)."""
    savedir = str(tmp_path_factory.mktemp("qat"))
    path = train_in_subprocess("-data", synthetic_dir, "-dir", savedir, "-e", "4", "-bsize", "32",
                               "--num_samples", "384", "--val_samples", "200", "--eval_every", "2")
    return path, savedir


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


def snapshot(folder):
    """Names, sizes and modification times of everything in a folder, to prove nothing changed."""
    return {name: (os.stat(os.path.join(folder, name)).st_size, os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


@pytest.fixture(autouse=True)
def release_memory():
    """Free what MindSpore caches for each compiled network: the suite builds dozens in one process."""
    yield
    import gc

    import mindspore as ms

    gc.collect()
    ms.ms_memory_recycle()
