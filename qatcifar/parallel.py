"""Data-parallel training under MindSpore's own launcher, msrun: one process per device.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True train.py -e 40

msrun starts a scheduler process and the workers, all running the same script, with its
cluster in their environment (MS_ROLE, MS_SCHED_HOST, MS_SCHED_PORT, MS_WORKER_NUM). `init`
joins that cluster (NCCL on GPU, MindSpore's own TCP collectives on CPU) and sets
DATA_PARALLEL mode: every worker computes the gradients of its own batch, and the training
step averages them over the workers before the update, so the trained weights stay identical.

BatchNorm's moving statistics and the QAT observers are not trained: each worker would update
them from its own batches (and LSQ's steps start from each worker's first batch).
`DataParallelStep` averages them over the workers after every step, so that every worker holds
the same network (and a checkpoint from any of them is the model).
"""
import hashlib
import os

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
from mindspore import ParameterTuple

from qatcifar import cli, quant

CLUSTER_VARIABLES = ("MS_ROLE", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_WORKER_NUM")
LAUNCH_HINT = "msrun --worker_num=N --local_worker_num=N --master_port=8118 --join=True train.py ..."


def launched_by_msrun():
    return all(os.environ.get(name) for name in CLUSTER_VARIABLES)


def init(requested):
    """Join msrun's cluster when started by msrun (or `requested`, --distributed); return (rank, workers).

    Not started by msrun: (0, 1), a single process. msrun's scheduler process, which runs the
    same script, runs the cluster inside mindspore.communication.init and exits there.
    """
    if not launched_by_msrun():
        if requested:
            missing = ", ".join(name for name in CLUSTER_VARIABLES if not os.environ.get(name))
            raise cli.InputError(f"--distributed: this process was not started by msrun ({missing} unset); "
                                 f"launch it as: {LAUNCH_HINT}")
        return 0, 1
    from mindspore.communication import get_group_size, get_rank
    from mindspore.communication import init as join_cluster
    try:
        join_cluster()
    except (RuntimeError, ValueError) as e:
        if os.environ["MS_ROLE"] == "MS_SCHED":  # the scheduler stops when a worker fails
            raise cli.InputError(f"msrun's scheduler stopped ({cli.first_line(e)}); the workers' logs say "
                                 "why") from None
        where = f"{os.environ['MS_SCHED_HOST']}:{os.environ['MS_SCHED_PORT']}"
        raise cli.InputError(f"could not join the msrun cluster at {where} ({cli.first_line(e)}); check msrun's "
                             "--master_addr, --master_port and --worker_num on every host") from None
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


class DataParallelStep(nn.Cell):
    """A training step (`step`, a TrainOneStepCell or AMP's) of `net` on one of `workers` workers.

    After the update it averages the network's non-trained float state (BatchNorm's moving
    statistics, the QAT observers' ranges) over the workers, in one all-reduce, so the workers
    stay identical; and it returns the loss averaged over the workers (every worker sees the
    same loss, stops at the same step when it is not finite, and the progress lines show the
    global batch's loss). The moving mean is then exactly that of the global batch; the moving
    variance is the mean of the workers' batch variances.
    """

    def __init__(self, step, net, workers):
        super().__init__(auto_prefix=False)  # the step's parameters keep their names in checkpoints
        self.step = step
        # (and LSQ's learned steps: each worker sets them from its own first batch; after that the averaged
        # gradients keep them equal, and their average is themselves)
        self.state = ParameterTuple([p for p in net.get_parameters() if p.dtype == ms.float32
                                     and (not p.requires_grad or p.name.endswith(quant.LSQ_SUFFIX))])
        self.sizes = tuple(p.size for p in self.state)
        self.shapes = tuple(p.shape for p in self.state)
        self.all_reduce = ops.AllReduce()
        self.workers = float(workers)

    def construct(self, *inputs):
        out = self.step(*inputs)
        flat = ops.concat([p.reshape(-1) for p in self.state])
        mean = self.all_reduce(flat) / self.workers
        offset = 0
        for i in range(len(self.state)):
            ops.assign(self.state[i], mean[offset:offset + self.sizes[i]].reshape(self.shapes[i]))
            offset += self.sizes[i]
        if isinstance(out, tuple):  # AMP: (loss, overflow, loss scale)
            return (self.all_reduce(out[0]) / self.workers,) + out[1:]
        return self.all_reduce(out) / self.workers


class _Sum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()  # on CPU, AllReduce only sums, and only floats

    def construct(self, x):
        return self.all_reduce(x)


def check_same_step(step, workers):
    """Fail unless every worker starts at the same training step (they would wait for each other forever).

    Each worker compares the sum over workers with workers x its own step, split into two parts
    that float32 holds exactly; where steps differ, at least one worker fails, and msrun then
    stops the others.
    """
    if workers == 1:
        return
    own = np.array([step // 4096, step % 4096], np.float32)
    total = _Sum()(ms.Tensor(own)).asnumpy()
    if not np.array_equal(total, own * workers):
        raise cli.InputError(f"the workers start from different steps (this one from step {step}): with --resume, "
                             "every host must see the same checkpoint at the same path (a shared save directory, "
                             "or a copy)")


def report(rank, workers, images, net, accuracy=None):
    """This worker's line in its own log: the same checksum (and accuracy) on every worker shows they agree."""
    validated = f", validation accuracy {100 * accuracy:.2f}%" if accuracy is not None else ""
    print(f"worker {rank} of {workers}: {images} training images per epoch, parameter checksum "
          f"{checksum(net)}{validated}", flush=True)


def checksum(net):
    """A short SHA-256 of every parameter of `net` (name and value): equal on workers holding the same network."""
    digest = hashlib.sha256()
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(param.asnumpy().tobytes())
    return digest.hexdigest()[:16]
