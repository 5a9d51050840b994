"""Benchmark: does validation during training (--eval_every) slow the training step?

    python bench.py                      # QAT, batch 32, 8 steps per epoch, 4 epochs per run
    python bench.py --batch 16 --steps 4 --json

Trains twice on synthetic CIFAR-format data it writes into a temporary folder, each run in a
fresh train.py process: without validation (--eval_every 0) and validating after every epoch
(--eval_every 1). It compares training images/s (train.py's per-epoch figure, which counts
only training steps and leaves out the first one, the graph compilation) and the time per
epoch, with the validation's. The first epoch is left out of the medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import cli
import preprocess

ROOT = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = cli.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=cli.DEVICES, default="auto", help="device to train on")
    parser.add_argument("--batch", type=cli.positive_int, default=32, help="batch size")
    parser.add_argument("--steps", type=cli.positive_int, default=8, help="training steps per epoch")
    parser.add_argument("--epochs", type=cli.positive_int, default=4, help="epochs per run (the first is warm-up)")
    parser.add_argument("--val_samples", type=cli.positive_int, default=500, help="validation images per epoch")
    parser.add_argument("--qat", action=argparse.BooleanOptionalAction, default=True, help="QAT or float32")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    return parser


def train_run(data, folder, args, eval_every):
    """Per-epoch records (metrics.jsonl) of one train.py run."""
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "-data", data, "-dir", folder,
            "-e", str(args.epochs), "-bsize", str(args.batch), "--num_samples", str(args.batch * args.steps),
            "--eval_every", str(eval_every), "--val_samples", str(args.val_samples), "--device", args.device,
            "--qat" if args.qat else "--no-qat"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        cli.fail(f"train.py failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(records):
    later = records[1:] or records  # the first epoch holds the graph compilation
    speeds = [r["images_per_s"] for r in later]
    return {"images_per_s": statistics.median(speeds), "images_per_s_range": [min(speeds), max(speeds)],
            "epoch_s": statistics.median(r["epoch_s"] + r.get("val_s", 0.0) for r in later)}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        preprocess.write_synthetic(data, seed=0)
        plain = summary(train_run(data, os.path.join(tmp, "plain"), args, eval_every=0))
        validating = summary(train_run(data, os.path.join(tmp, "validating"), args, eval_every=1))
    results = {"model": "QAT" if args.qat else "float32", "batch": args.batch, "steps_per_epoch": args.steps,
               "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", cli.ONEDNN_ISA),
               "train_ips": plain["images_per_s"], "train_ips_range": plain["images_per_s_range"],
               "train_ips_validating": validating["images_per_s"],
               "train_ips_validating_range": validating["images_per_s_range"],
               "validating_over_plain": validating["images_per_s"] / plain["images_per_s"],
               "epoch_s": plain["epoch_s"], "epoch_s_validating": validating["epoch_s"],
               "val_samples": args.val_samples}
    print(f"training images/s ({results['model']}, batch {args.batch}): {results['train_ips']:.1f} without "
          f"validation, {results['train_ips_validating']:.1f} with --eval_every 1 "
          f"(ratio {results['validating_over_plain']:.3f})")
    print(f"epoch time: {results['epoch_s']:.1f} s without validation, {results['epoch_s_validating']:.1f} s with "
          f"{args.val_samples} validation images")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
