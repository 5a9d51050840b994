"""Shared fixtures: CIFAR-format files written by the tests themselves (no download, no GPU)."""
import os

# Before MindSpore runs a convolution (see cli.py): the fast oneDNN kernels, and a quiet log.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import pytest  # noqa: E402

import preprocess  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A learnable synthetic CIFAR-format folder: data_batch_1.bin and test_batch.bin, 10,000 images each."""
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    preprocess.write_synthetic(path, seed=0)
    return path


def snapshot(folder):
    """Names, sizes and modification times of everything in a folder, to prove nothing changed."""
    return {name: (os.stat(os.path.join(folder, name)).st_size, os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}
