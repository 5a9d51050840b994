"""Data-parallel training under msrun: two CPU workers on loopback, as on several GPUs or hosts."""
import argparse
import json
import os
import re
import socket
import sys

import pytest

import eval as evaluate
from conftest import SMALL, run_script
from qatcifar import cli, training

WORKER_LINE = re.compile(r"^worker (\d) of 2: (\d+) training images per epoch, parameter checksum (\w+), "
                         r"validation accuracy ([\d.]+)%$", re.M)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(workers, log_dir, *argv):
    """Run train.py under msrun with `workers` local workers; msrun starts them with the `python` on PATH."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return run_script("-m", "mindspore.parallel.cluster.run", f"--worker_num={workers}",
                      f"--local_worker_num={workers}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                      f"--log_dir={log_dir}", "--join=True", "train.py", *argv, env=env)


@pytest.fixture(scope="module")
def two_workers(synthetic_dir, tmp_path_factory):
    """A 2-worker msrun run of 64 images in batches of 8 per worker: (save dir, the workers' logs)."""
    savedir, logs = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("logs")
    result = msrun(2, logs, *SMALL, "-data", synthetic_dir, "-dir", str(savedir), "-e", "1", "-bsize", "8",
                   "--num_samples", "64", "--save_steps", "2", "--val_samples", "100", "--scale_lr",
                   "--distributed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return savedir, [(logs / f"worker_{rank}.log").read_text() for rank in (0, 1)]


@pytest.mark.slow
def test_worker_0_alone_writes_the_checkpoints(two_workers):
    savedir, logged = two_workers
    # One set of checkpoints, written by worker 0 only: steps 2 and 4 of 64 / 2 workers / batch 8.
    assert sorted(os.listdir(savedir)) == ["resnet8_qat-1_2.ckpt", "resnet8_qat-1_4.ckpt", "resnet8_qat-args.json",
                                           "resnet8_qat-best.ckpt", "resnet8_qat-curves.png",
                                           "resnet8_qat-metrics.jsonl"]
    assert "data parallel: 2 workers, batch 8 per worker, global batch 16" in logged[0]
    assert "--scale_lr: learning rate 0.001 x 2 worker(s) = 0.002" in logged[0]
    assert json.loads((savedir / "resnet8_qat-args.json").read_text())["learningRate"] == pytest.approx(0.002)
    assert "epoch 1/1 step 4/4" in logged[0] and "epoch 1/" not in logged[1]  # progress: worker 0 only


def worker_summaries(logged):
    summaries = [WORKER_LINE.findall(text) for text in logged]
    assert [len(found) for found in summaries] == [1, 1], logged
    return summaries[0][0], summaries[1][0]


@pytest.mark.slow
def test_the_workers_train_one_network_on_their_own_halves(two_workers):
    # The same network and validation on both workers, each trained on its own half of the 64 images.
    (rank0, images0, checksum0, accuracy0), (rank1, images1, checksum1, accuracy1) = worker_summaries(two_workers[1])
    assert (rank0, rank1) == ("0", "1")
    assert int(images0) + int(images1) == 64 and images0 == images1
    assert checksum0 == checksum1
    assert accuracy0 == accuracy1


@pytest.mark.slow
def test_a_data_parallel_checkpoint_is_an_ordinary_one(two_workers, synthetic_dir):
    """eval.py gives the validation's accuracy on the same images."""
    savedir, logged = two_workers
    accuracy0 = worker_summaries(logged)[0][3]
    accuracy = evaluate.main(["-loc", str(savedir / "resnet8_qat-1_4.ckpt"), "-data", synthetic_dir,
                              "--num_samples", "100"])
    assert 100 * accuracy == pytest.approx(float(accuracy0), abs=0.01)


def test_more_workers_than_the_data_can_shard(synthetic_dir):
    run = argparse.Namespace(data_dir=synthetic_dir, batchsize=8, repeatNum=1, num_samples=24, workers=4)
    with pytest.raises(cli.InputError) as error:
        training.load_data(run, rank=3)  # 24 images / 4 workers: 6 each, less than a batch
    assert str(error.value).startswith("4 workers x batch size 8 is more than 24 training images per epoch")
    assert "use fewer workers" in str(error.value)


@pytest.mark.slow
def test_adversarial_training_under_msrun_keeps_the_workers_identical(synthetic_dir, tmp_path):
    """Each worker attacks its own images from its own random starts, and sets its learned steps (--quantizer lsq)
    from its own first batch; the network stays one."""
    result = msrun(2, tmp_path / "logs", *SMALL, "-data", synthetic_dir, "-dir", str(tmp_path / "run"), "-e", "1",
                   "-bsize", "8", "--num_samples", "32", "--val_samples", "100", "--adv_train", "fgsm",
                   "--adv_ratio", "0.5", "--quantizer", "lsq")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [(tmp_path / "logs" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
    assert "adversarial training: FGSM from a random start" in logged[0] and "on 4 of the 8 images" in logged[0]
    (_, _, checksum0, accuracy0), (_, _, checksum1, accuracy1) = worker_summaries(logged)
    assert checksum0 == checksum1 and accuracy0 == accuracy1
