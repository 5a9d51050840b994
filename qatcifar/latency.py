"""Speed and memory of one model file as its own runtime runs it, in this process alone.

    python -m qatcifar.latency checkpoints/resnet18_qat-40_1562.onnx --threads 1
    python -m qatcifar.latency checkpoints/resnet18_qat-40_1562.ckpt --batch 0      # latency only

Prints one JSON line: latency at batch 1 (`b1_p50_ms`, `b1_p95_ms`, over at least --seconds and
20 runs, after warm-up runs that compile MindSpore's graph), throughput at batch 100 (`b100_ips`)
and the process's peak memory (`peak_rss_mb`). The process imports only the runtime the format
needs: ONNX Runtime for .onnx, LiteRT for .tflite, NumPy for the int8 reference (.npz), MindSpore for .ckpt and
.mindir, so that its peak memory is what a device would need. `bench.py --deploy` runs it once
per model and thread count.

--threads: ONNX Runtime's and MindSpore's CPU threads (default: theirs, one per core). NumPy's
BLAS, under the int8 reference, reads OMP_NUM_THREADS and OPENBLAS_NUM_THREADS, which must be
set before the process starts (bench.py sets them).
"""
import argparse
import functools
import json
import os
import time

import numpy as np

from qatcifar import cli, interrupts  # (its argument parsing; neither imports MindSpore)

IMAGE = (3, 32, 32)
MIN_RUNS = 20
SUFFIXES = (".onnx", ".tflite", ".npz", ".ckpt", ".mindir")


def bounded(kind, low):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value < 1e6:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} from {low} to "
                                             f"1e6, got {text!r}")
        return value
    return parse


def load(path, threads):
    """logits(images) of the model file: normalized float32 (N, 3, 32, 32) in, numpy logits out."""
    from qatcifar import inference  # (imports the format's runtime only: see inference.FORMATS)

    if inference.uses_mindspore(path):  # a checkpoint or a MindIR graph, as eval.py runs them
        import mindspore as ms

        cli.setup_device("CPU")
        if threads:
            ms.device_context.cpu.op_tuning.threads_num(threads)
    return inference.runner(path, threads)


def latency_ms(logits, seconds):
    """Median and 95th percentile of single-image latency, in ms."""
    image = np.random.default_rng(0).standard_normal((1, *IMAGE)).astype(np.float32)
    for _ in range(3):  # warm-up: MindSpore compiles its graph for this shape
        logits(image)
    times, start = [], time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        logits(image)
        times.append(time.perf_counter() - begin)
    return 1000 * float(np.median(times)), 1000 * float(np.percentile(times, 95)), len(times)


def throughput_ips(logits, batch, seconds):
    """Images per second at a batch size, over at least `seconds` and two batches after one warm-up batch."""
    images = np.random.default_rng(1).standard_normal((batch, *IMAGE)).astype(np.float32)
    logits(images)
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < seconds:
        logits(images)
        count += 1
    return batch * count / (time.perf_counter() - start)


def peak_rss_mb():
    """This process's peak resident memory since it started (VmHWM; getrusage's ru_maxrss would also count the
    parent's peak, which survives fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def main(argv=None):
    parser = cli.ArgumentParser(prog="-m qatcifar.latency", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a .onnx, .tflite, .npz (int8), .ckpt or .mindir file, or a C folder")
    parser.add_argument("--threads", type=bounded(int, 1), default=None, help="CPU threads (default: the runtime's)")
    parser.add_argument("--batch", type=bounded(int, 0), default=100, help="throughput's batch size (0: no throughput)")
    parser.add_argument("--seconds", type=bounded(float, 0), default=2.0, help="least time of each measurement")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model) and (not os.path.isfile(args.model) or not args.model.endswith(SUFFIXES)):
        problem = "is not a model file" if os.path.isfile(args.model) else "is not a file" if os.path.exists(
            args.model) else "does not exist"
        parser.error(f"{args.model} {problem} ({', '.join(SUFFIXES)}, or a C folder); give one train.py or export.py "
                     "wrote")
    interrupts.run(functools.partial(measure, parser), args, interrupted="no figures")


def measure(parser, args):
    """Print the figures of args.model as one JSON line."""
    try:
        logits = load(args.model, args.threads)
    except Exception as e:  # each runtime raises its own errors for a broken file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        parser.error(f"cannot load {args.model} ({first_line}); give one train.py or export.py wrote")
    p50, p95, runs = latency_ms(logits, args.seconds)
    result = {"b1_p50_ms": p50, "b1_p95_ms": p95, "b1_runs": runs}
    if args.batch:
        result[f"b{args.batch}_ips"] = throughput_ips(logits, args.batch, args.seconds)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    interrupts.block()  # (before a runtime starts threads)
    main()
