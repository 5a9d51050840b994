"""Benchmark train.py's default path: training, evaluation and data-pipeline speed, and memory.

    python bench.py                      # batch 32, float and QAT, on the GPU if there is one
    python bench.py --batch 128 --json   # ends with one JSON line of all figures

On synthetic CIFAR-format files it writes into a temporary folder, it measures
- training images/s, float32 and QAT, on the same batch, with train.py's network, optimizer
  and training step (GRAPH_MODE); each run in a fresh process (--repeats runs of each,
  alternating), so that each has its own peak memory; the median over all timed steps, after
  one warm-up step that compiles the graph (its time is `first_step_s`);
- evaluation images/s of the QAT checkpoint as eval.py runs it (weights quantized once), and of
  the int8 reference (qatcifar/int8.py, NumPy) of its export;
- data-pipeline images/s: the training pipeline (decode, augmentation, batching) alone;
- with --validation, also train.py's images/s with and without validating
  after every epoch (--eval_every 1 vs 0).

    python bench.py --arch resnet8,resnet20,resnet18   # instead: one table to choose a network by
    python bench.py --deploy --json      # instead: inference as deployed, five models
    python bench.py --adversarial        # instead: the cost of adversarial training and of attacks
    python bench.py --lsq --arch resnet8 # instead: a QAT step with learned step sizes against min/max's
    python bench.py --mcu --arch resnet8 # instead: the C export on an emulated Cortex-M4

--deploy trains a float32 and a QAT checkpoint two steps each (speed does not depend on the
weights), exports the int8 file and both ONNX models, and measures each model, as its own
runtime runs it, in a fresh process (`python -m qatcifar.latency`): MindSpore float32 and QAT fake-quant
(checkpoints), the int8 NumPy reference, ONNX Runtime float32 and int8, and int8 with the
8-bit weights of older checkpoints (stored as uint8: qatcifar/ort_kernels.py). Latency at batch 1
(median and 95th percentile, one thread and all threads), images/s at batch 100 (all threads),
file size and the process's peak memory; and which integer kernels ONNX Runtime takes on this
CPU: whether it has VNNI, the kernels its flags select, and whether a probe finds them exact.

--arch measures, per network: training images/s (float32 and QAT, as above), and ONNX Runtime's
int8 and float32 models of those checkpoints as --deploy does (batch-1 latency, images/s at batch
100, file size, peak memory), besides parameters and multiply-accumulates; one table, one JSON line.

--adversarial times train.py's QAT training step clean, with FGSM from a random start and with
PGD-k (--adv_train; fresh processes, alternating, as above), and eval.py's attacks per image on
the QAT checkpoint: FGSM, PGD-10, APGD-CE-100 and 100 queries of Square, against the clean forward
pass.

--lsq times train.py's QAT training step with learned step sizes (--quantizer lsq) against min/max
observers (the default), in fresh processes, alternating, as above; the same bits for both.

--mcu trains each network (--arch, default resnet8) two steps with 7-bit and with 4-bit weights
(train.py), exports the C folder (export.py --format c) and measures it as a Cortex-M4 would run it
(qatcifar/mcu.py: Debian's arm-none-eabi-gcc, QEMU's mps2-an386 board): flash (model data and code,
arm-none-eabi-size), static RAM (the arena and the 4-bit weights' scratch), the stack's high-water mark
and the instructions per image (QEMU counts instructions, not cycles) of the plain C kernels and of
the M4's SMLAD kernel, whether their logits equal the host build's, and the host build's batch-1
latency beside ONNX Runtime's int8 model; one table, one JSON line.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import argparse  # noqa: E402
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from qatcifar import adversarial, checkpoint, cifar, files, int8, mcu, measure, networks, ort_kernels, quant

ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_BATCH = measure.EVAL_BATCH  # (the measurements' batch)
IMAGES = cli.int_range(1, cifar.RECORDS_PER_FILE)  # its synthetic data: 10,000 training and test images
MCU_ARCH = "resnet8"  # --mcu's default network: MLPerf Tiny's for microcontrollers
MCU_IMAGES = 3  # --mcu: test images per build on the board (the instruction count barely depends on the image)
MCU_WEIGHT_BITS = (7, 4)  # --mcu: train.py's default, and packed 4-bit weights


class MeasurementFailed(Exception):
    """A measurement's process failed; the message is its last error line."""


def parse_args(argv=None):
    """The flags, checked against the mode (check_mode_flags) and with its defaults filled in."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_mode_flags(parser, args)
    return args


def get_args_parser():
    parser = cli.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    cli.add_device_argument(parser, help="device to train on")
    parser.add_argument("--batch", type=IMAGES, default=32, help="training batch size")
    parser.add_argument("--steps", type=cli.positive_int, default=8, help="timed training steps per run")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="training runs of each of float32 and QAT (fresh processes, alternating)")
    parser.add_argument("--eval_images", type=IMAGES, default=500, help="images per evaluation pass")
    parser.add_argument("--int8_images", type=IMAGES, default=200,
                        help="images for the int8 reference (NumPy, slow)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--deploy", action="store_true",
                        help="instead: inference speed, size and memory of the deployable models")
    parser.add_argument("--seconds", type=cli.positive_float, default=None,
                        help="with --deploy or --arch alone: least time of each latency and throughput measurement "
                             "(default 2)")
    parser.add_argument("--arch", type=arch_list, default=None, metavar="A[,B,...]",
                        help=f"alone: training and deployment figures of each network, one table "
                             f"({','.join(networks.ARCHS)}); with --mcu: the networks it measures (default "
                             f"{MCU_ARCH}); with --deploy, --adversarial, --lsq or --validation: the one network they "
                             f"measure (default {networks.DEFAULT_ARCH})")
    parser.add_argument("--adversarial", action="store_true",
                        help="instead: adversarial training steps (FGSM-RS, PGD-k) against clean ones, and attacks "
                             "per image")
    parser.add_argument("--adv_steps", type=cli.int_range(1, 100), default=None,
                        help=f"with --adversarial: k of the PGD-k training step "
                             f"(default {adversarial.DEFAULT_PGD_STEPS})")
    parser.add_argument("--attack_images", type=IMAGES, default=None,
                        help="with --adversarial: images per attack measurement (default 100)")
    parser.add_argument("--lsq", action="store_true",
                        help="instead: QAT training steps with learned step sizes (LSQ) against min/max observers")
    parser.add_argument("--mcu", action="store_true",
                        help="instead: the C export (7-bit and 4-bit weights) on an emulated Cortex-M4: flash, RAM, "
                             "stack, instructions per image, and the host build's latency")
    parser.add_argument("--validation", action="store_true",
                        help="also time train.py with and without validation after every epoch")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help="with --validation: epochs per train.py run, the first warm-up (default 4)")
    parser.add_argument("--val_samples", type=IMAGES, default=None,
                        help="with --validation: validation images per epoch (default 500)")
    return parser


# Flags that only some modes use: {dest: (default, the modes that use it)}; given elsewhere, they are refused.
MODE_FLAGS = {"seconds": (2.0, ("--deploy", "--arch", "--mcu")), "adv_steps": (adversarial.DEFAULT_PGD_STEPS,
                                                                     ("--adversarial",)),
              "attack_images": (100, ("--adversarial",)), "epochs": (4, ("--validation",)),
              "val_samples": (500, ("--validation",))}


def check_mode_flags(parser, args):
    """One mode at a time (--deploy, --adversarial, --lsq; --validation only with the default measurements), and no
    flag that the mode does not use; then fill in the defaults of MODE_FLAGS (parser.error: one line, exit 2)."""
    modes = [flag for flag, given in (("--deploy", args.deploy), ("--adversarial", args.adversarial),
                                      ("--lsq", args.lsq), ("--validation", args.validation), ("--mcu", args.mcu))
             if given]
    if len(modes) > 1:
        parser.error(f"{modes[0]} and {modes[1]} are separate measurements; run them one at a time")
    mode = modes[0] if modes else "--arch" if args.arch else None  # (--arch alone: the table of networks)
    for dest, (default, users) in MODE_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        elif mode not in users:
            names = " and ".join(users) if len(users) < 3 else f"{', '.join(users[:-1])} and {users[-1]}"
            parser.error(f"--{dest} applies to {names} only; drop it, or add {users[0]}")


def arch_list(text):
    """--arch's value: network names separated by commas, each once."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in networks.ARCHS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give networks among {', '.join(networks.ARCHS)}, separated by "
                                         "commas, each once")
    return names


def main(argv=None):
    parser = get_args_parser()
    args = parse_args(argv)
    others = [flag for flag, given in (("--deploy", args.deploy), ("--adversarial", args.adversarial),
                                       ("--validation", args.validation), ("--lsq", args.lsq)) if given]
    if args.arch and len(args.arch) > 1 and others:
        parser.error(f"{' and '.join(others)} measure one network; give one --arch, or drop {' and '.join(others)} "
                     "for the table of several")
    print("note: bench.py measures networks it builds and trains for a few steps on synthetic data, in a temporary "
          "folder: speed, size and memory do not depend on the weights; your checkpoints are not read", flush=True)
    try:
        work = (deployment if args.deploy else adversarial_cost if args.adversarial else quantizer_cost if args.lsq
                else mcu_table if args.mcu else benchmark if args.validation or not args.arch else choice_table)
        return interrupts.run(work, args,
                       interrupted="no figures (the temporary data folder is removed)")
    except (MeasurementFailed, mcu.Failed) as e:
        interrupts.fail(str(e), code=1)


def benchmark(args):
    """Every measurement; prints the report and returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        runs = alternating_runs(args, ("float", "qat"), tmp)
        evaluation = worker("eval", args)  # the last QAT run's checkpoint
        pipeline = pipeline_speed(args.data, args.batch)
        validation = validation_cost(args, tmp) if args.validation else {}
    results = summarize(args, runs, evaluation, pipeline)
    results.update(validation)
    report(results)
    if args.json:
        print(json.dumps(results))
    return results


def write_data(args, tmp):
    """The synthetic data the measurements run on, written into tmp (args.data)."""
    args.data = os.path.join(tmp, "data")
    cifar.write_synthetic(args.data, seed=0)


def alternating_runs(args, kinds, folder):
    """{kind: [measurement, ...]}: --repeats training measurements of each kind, alternating, each in a fresh process
    (checkpoints into folder); a live bar over them on a terminal."""
    runs = {kind: [] for kind in kinds}
    jobs = [(repeat, kind) for repeat in range(args.repeats) for kind in kinds]
    for repeat, kind in cli.progress(jobs, len(jobs), "measuring", unit="run"):
        args.checkpoint = os.path.join(folder, f"{kind}-{repeat}.ckpt")
        runs[kind].append(worker(kind, args))
    return runs


def worker(kind, args):
    """Run one measurement in a fresh process (its own graph compilation and peak memory)."""
    arch = ["--arch", args.arch[0]] if args.arch else []  # (one network: choice_table sets one at a time)
    stdout = run_script(f"the {kind} measurement", "-m", "qatcifar.measure", kind, "--data", args.data, *arch,
                        "--checkpoint", args.checkpoint, "--device", args.device, "--batch", str(args.batch),
                        "--steps", str(args.steps), "--eval_images", str(args.eval_images),
                        "--int8_images", str(args.int8_images), "--adv_steps", str(args.adv_steps),
                        "--attack_images", str(args.attack_images))
    return json.loads(stdout.strip().splitlines()[-1])


def run_script(what, script, *argv, env=None):
    """Run one of the project's scripts (or, with `script` "-m", a module of the library) in a fresh Python process
    (with `env` added to the environment); its stdout, or MeasurementFailed."""
    target = script if script == "-m" else os.path.join(ROOT, script)
    result = subprocess.run([sys.executable, target, *argv], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        raise MeasurementFailed(f"{what} failed: {lines[-1] if lines else result.returncode}")
    return result.stdout


def pipeline_speed(data, batch, passes=3):
    """Images/s of the training pipeline alone over one data file, median of `passes` after a warm-up pass."""
    dataset = cifar.create_dataset(data, training=True, batch_size=batch)
    speeds = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        images = sum(len(batch_) for batch_, _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
        speeds.append(images / (time.perf_counter() - start))
    return {"pipeline_ips": statistics.median(speeds[1:]), "pipeline_workers": cifar.DEFAULT_WORKERS}


def median_ips(args, runs):
    """Training images/s of a kind's runs: the median over all their timed steps."""
    return args.batch / statistics.median(s for run in runs for s in run["step_s"])


def summarize(args, runs, evaluation, pipeline):
    def speeds(kind):
        steps = [s for run in runs[kind] for s in run["step_s"]]
        return median_ips(args, runs[kind]), [args.batch / max(steps), args.batch / min(steps)]

    float_ips, float_range = speeds("float")
    qat_ips, qat_range = speeds("qat")
    # Per repeat (float and QAT run back to back), the ratio of median step times: its spread is this machine's noise.
    ratios = [statistics.median(q["step_s"]) / statistics.median(f["step_s"])
              for f, q in zip(runs["float"], runs["qat"], strict=True)]
    return {"device": runs["qat"][0]["device"], "batch": args.batch, "steps": args.steps,
            "repeats": args.repeats, "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", cli.ONEDNN_ISA),
            "train_ips_float": float_ips, "train_ips_float_range": float_range,
            "train_ips_qat": qat_ips, "train_ips_qat_range": qat_range,
            "qat_over_float": float_ips / qat_ips, "qat_over_float_per_repeat": ratios,
            "eval_ips": evaluation["eval_ips"], "eval_batch": EVAL_BATCH, "int8_ips": evaluation["int8_ips"],
            **pipeline, "pipeline_over_train": pipeline["pipeline_ips"] / float_ips,
            "first_step_s": statistics.median(run["first_step_s"] for run in runs["qat"]),
            "first_step_s_float": statistics.median(run["first_step_s"] for run in runs["float"]),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs["float"]),
            "peak_rss_mb_qat": max(run["peak_rss_mb"] for run in runs["qat"])}


def report(r):
    print(f"training on {r['device']}, batch {r['batch']}, {r['repeats']} x {r['steps']} steps: "
          f"float32 {r['train_ips_float']:.1f} images/s, QAT {r['train_ips_qat']:.1f}; "
          f"QAT step / float step {r['qat_over_float']:.3f} "
          f"(per repeat {', '.join(f'{x:.3f}' for x in r['qat_over_float_per_repeat'])})")
    print(f"first training step (graph compilation): QAT {r['first_step_s']:.1f} s, "
          f"float32 {r['first_step_s_float']:.1f} s")
    print(f"peak memory: float32 {r['peak_rss_mb']:.0f} MB, QAT {r['peak_rss_mb_qat']:.0f} MB "
          f"({r['peak_rss_mb_qat'] / r['peak_rss_mb']:.2f}x)")
    print(f"evaluation, batch {r['eval_batch']}: QAT checkpoint {r['eval_ips']:.1f} images/s, "
          f"int8 reference {r['int8_ips']:.1f} images/s")
    print(f"data pipeline ({r['pipeline_workers']} workers): {r['pipeline_ips']:.0f} images/s, "
          f"{r['pipeline_over_train']:.0f}x what float32 training consumes")
    if "validating_over_plain" in r:
        print(f"train.py with validation after every epoch ({r['val_samples']} images): "
              f"{r['train_ips_validating']:.1f} images/s against {r['train_ips']:.1f} without "
              f"(ratio {r['validating_over_plain']:.3f})")
    print(f"ONEDNN_MAX_CPU_ISA={r['onednn_isa']}")


# --- --deploy: inference as deployed ----------------------------------------------------------------

INT8_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")  # what integer kernels (VNNI, AMX) can use
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def deployment(args):
    """Every deployable model's figures; prints the table and returns them."""
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        files = {}
        for kind, name in (("float", "mindspore_float32"), ("qat", "mindspore_qat")):
            args.checkpoint = files[name] = os.path.join(tmp, f"{kind}.ckpt")
            worker(kind, argparse.Namespace(**{**vars(args), "steps": 1}))
        eight_bit = os.path.join(tmp, "qat-8bit.ckpt")
        without_weight_bits(files["mindspore_qat"], eight_bit)
        for name, source, form, output in (("int8_reference", files["mindspore_qat"], "int8", "model.int8.npz"),
                                           ("onnx_float32", files["mindspore_float32"], "onnx", "float32.onnx"),
                                           ("onnx_int8", files["mindspore_qat"], "onnx", "int8.onnx"),
                                           ("onnx_int8_8bit", eight_bit, "onnx", "int8-8bit.onnx"),
                                           ("tflite_int8", files["mindspore_qat"], "tflite", "int8.tflite")):
            files[name] = os.path.join(tmp, output)
            run_script(f"the {name} export", "export.py", "-loc", source, "--format", form, "-o", files[name],
                       "-data", args.data)
        arena = micro_arena(files["tflite_int8"])
        deploy = {name: measure(path, args.seconds)
                  for name, path in cli.progress(list(files.items()), len(files), "measuring", unit="model")}
    onnx_int8, ms_float, onnx_float = deploy["onnx_int8"], deploy["mindspore_float32"], deploy["onnx_float32"]
    results = {"deploy": deploy, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "int8_isa": int8_isa(),
               "int8_kernels": ort_kernels.describe(),
               "int8_8bit_over_7bit_b1": deploy["onnx_int8_8bit"]["b1_p50_ms"] / onnx_int8["b1_p50_ms"],
               "int8_over_float_onnx_b100": onnx_int8["b100_ips"] / onnx_float["b100_ips"],
               "int8_onnx_over_mindspore_b1": ms_float["b1_p50_ms"] / onnx_int8["b1_p50_ms"],
               "int8_onnx_over_mindspore_b1_1thread": ms_float["b1_p50_ms_1thread"] / onnx_int8["b1_p50_ms_1thread"],
               "onnx_int8_file_over_float32": onnx_int8["file_mb"] / onnx_float["file_mb"],
               "tflite_over_onnx_int8_b1": deploy["tflite_int8"]["b1_p50_ms"] / onnx_int8["b1_p50_ms"],
               "tflm_arena_bytes": arena}
    report_deployment(results)
    if args.json:
        print(json.dumps(results))
    return results


def without_weight_bits(path, output):
    """A copy of a QAT checkpoint without its weight-bits records: a checkpoint of 8-bit weights, as train.py wrote
    them before QAT weights were 7-bit (quant.UNRECORDED_WEIGHT_BITS)."""
    params = checkpoint.read(path)
    checkpoint.save_parameters({name: value for name, value in params.items() if not name.endswith(quant.BITS_SUFFIX)},
                               output)


def measure(path, seconds):
    """qatcifar.latency on one model file: one thread (latency only), then all threads."""
    one = latency(path, seconds, "--threads", "1", "--batch", "0", env=ONE_THREAD)
    every = latency(path, seconds, "--batch", str(EVAL_BATCH))
    return {"b1_p50_ms": every["b1_p50_ms"], "b1_p95_ms": every["b1_p95_ms"],
            "b1_p50_ms_1thread": one["b1_p50_ms"], "b1_p95_ms_1thread": one["b1_p95_ms"],
            "b100_ips": every[f"b{EVAL_BATCH}_ips"], "file_mb": os.path.getsize(path) / 1e6,
            "peak_rss_mb": every["peak_rss_mb"]}


def latency(path, seconds, *argv, env=None):
    """The figures of `python -m qatcifar.latency path` (a model file or C folder) in a fresh process."""
    return json.loads(run_script(f"the measurement of {os.path.basename(path)}", "-m", "qatcifar.latency", path,
                                 "--seconds", str(seconds), *argv, env=env).strip().splitlines()[-1])


def micro_arena(path):
    """The bytes of tensor arena TensorFlow Lite Micro needs for a .tflite model (model_tflite.micro_arena)."""
    from qatcifar import model_tflite

    with open(path, "rb") as f:
        return model_tflite.micro_arena(f.read())


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def int8_isa():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return [name for name in INT8_ISA if name in flags]


def report_deployment(r):
    print(f"inference on {r['cpu']}, {r['cpu_count']} CPUs, int8 instructions: {', '.join(r['int8_isa']) or 'none'}")
    k = r["int8_kernels"]
    print(f"ONNX Runtime's uint8 x int8 kernels here: {k['kernel'] or 'unknown (no CPU flags)'}; VNNI: "
          f"{ {True: 'yes', False: 'no', None: 'unknown'}[k['vnni']]}; probe: "
          f"{'exact' if k['exact'] else 'pairs of products saturate in 16 bits'} (int8 weights of 7 bits are exact "
          "on every CPU; 8-bit ones are stored as uint8, exact everywhere)")
    print(f"{'model':<18} {'file':>8} {'b1 p50 ms 1/all threads':>24} {'b1 p95 ms 1/all':>16} "
          f"{'b100 images/s':>14} {'peak MB':>8}")
    for name, m in r["deploy"].items():
        print(f"{name:<18} {cli.size_text(m['file_mb'] * 1e6):>8} {m['b1_p50_ms_1thread']:>12.2f} / "
              f"{m['b1_p50_ms']:<9.2f} "
              f"{m['b1_p95_ms_1thread']:>7.2f} / {m['b1_p95_ms']:<6.2f} {m['b100_ips']:>14.1f} "
              f"{m['peak_rss_mb']:>8.0f}")
    print(f"ONNX int8 answers {r['int8_over_float_onnx_b100']:.2f}x as many images/s as ONNX float32 at batch 100")
    print(f"ONNX int8 is {r['int8_onnx_over_mindspore_b1']:.1f}x faster than MindSpore float32 at batch 1 "
          f"({r['int8_onnx_over_mindspore_b1_1thread']:.1f}x on one thread)")
    print(f"the ONNX int8 file is {100 * r['onnx_int8_file_over_float32']:.1f}% the size of ONNX float32's")
    print(f"8-bit weights (stored as uint8) take {r['int8_8bit_over_7bit_b1']:.2f}x the batch-1 latency of 7-bit "
          "ones (int8)")
    ratio = r["tflite_over_onnx_int8_b1"]  # (LiteRT's time over ONNX Runtime's)
    print(f"LiteRT takes {ratio:.2f}x the batch-1 latency of ONNX Runtime (TFLite int8 against ONNX int8): "
          f"{'ONNX Runtime' if ratio > 1 else 'LiteRT'} is faster")
    print(f"TensorFlow Lite Micro needs a tensor arena of {r['tflm_arena_bytes']:,} bytes "
          f"({cli.size_text(r['tflm_arena_bytes'])}) for the TFLite model")


# --- --arch: a table to choose a network by ---------------------------------------------------------

def choice_table(args):
    """Per network: training speed (float32 and QAT) and the ONNX models' figures; prints the table and returns
    them."""
    networks = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        names = args.arch
        for name in names:
            args.arch = [name]
            folder = os.path.join(tmp, name)
            os.mkdir(folder)
            runs = alternating_runs(args, ("float", "qat"), folder)
            files = {}
            for kind, form, output in (("float", "onnx", "float32.onnx"), ("qat", "onnx", "int8.onnx"),
                                       ("qat", "int8", "model.int8.npz"), ("qat", "tflite", "int8.tflite")):
                files[output] = os.path.join(folder, output)
                run_script(f"the {name} {output} export", "export.py", "--format", form, "-o", files[output],
                           "-loc", os.path.join(folder, f"{kind}-{args.repeats - 1}.ckpt"), "-data", args.data)
            networks[name] = {**network_size(name), "train_ips_float": median_ips(args, runs["float"]),
                              "train_ips_qat": median_ips(args, runs["qat"]),
                              "int8_file_kb": os.path.getsize(files["model.int8.npz"]) / 1e3,
                              "tflite_kb": os.path.getsize(files["int8.tflite"]) / 1e3,
                              "tflm_arena_bytes": micro_arena(files["int8.tflite"]),
                              "onnx_int8": measure(files["int8.onnx"], args.seconds),
                              "onnx_float32": measure(files["float32.onnx"], args.seconds),
                              "device": runs["qat"][0]["device"]}
        args.arch = names
    results = {"networks": networks, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "batch": args.batch}
    report_choice(results)
    if args.json:
        print(json.dumps(results))
    return results


def network_size(name):
    profile = networks.profile(networks.resnet(name, cifar.NUM_CLASSES))
    return {"params": profile["params"], "macs": profile["macs"]}


def report_choice(r):
    devices = sorted({n["device"] for n in r["networks"].values()})
    print(f"networks on {r['cpu']} ({r['cpu_count']} CPUs); training on {', '.join(devices)}, batch {r['batch']}; "
          "inference: ONNX Runtime, all threads")
    print(f"{'network':<9} {'params':>10} {'MMACs':>7} {'int8 file':>10} {'train images/s':>15} "
          f"{'int8 b1 ms':>10} {'int8 b100/s':>11} {'float32 b1 ms':>13} {'float32 b100/s':>14} {'peak MB':>8}")
    for name, n in r["networks"].items():
        q, f = n["onnx_int8"], n["onnx_float32"]
        print(f"{name:<9} {n['params']:>10,} {n['macs'] / 1e6:>7.1f} {cli.size_text(q['file_mb'] * 1e6):>10} "
              f"{n['train_ips_qat']:>7.1f} QAT {n['train_ips_float']:>5.0f} f32 {q['b1_p50_ms']:>10.2f} "
              f"{q['b100_ips']:>11.0f} {f['b1_p50_ms']:>13.2f} {f['b100_ips']:>14.0f} {q['peak_rss_mb']:>8.0f}")
    print("(int8 file: the ONNX int8 model, the int8.npz file in the JSON; train images/s: QAT, then float32; "
          "peak MB: the int8 model's process)")
    for name, n in r["networks"].items():
        print(f"TFLite int8 file of {name}: {n['tflite_kb']:.0f} KB, TensorFlow Lite Micro's tensor arena "
              f"{n['tflm_arena_bytes'] / 1e3:.1f} KB")


# --- --adversarial: the cost of adversarial training and of attacks ---------------------------------

def adversarial_cost(args):
    """Adversarial training steps against clean ones, and attacks per image; prints them and returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        runs = alternating_runs(args, ("qat", "fgsm", "pgd"), tmp)
        attack = worker("attack", args)  # on the last PGD-trained checkpoint
    figures = step_figures(runs)
    step_s = figures["step_s"]
    results = {"device": runs["qat"][0]["device"], "cpu": cpu_model(), "batch": args.batch, "steps": args.steps,
               "repeats": args.repeats, "adv_steps": args.adv_steps, **figures,
               "fgsm_over_clean": step_s["fgsm"] / step_s["qat"], "pgd_over_clean": step_s["pgd"] / step_s["qat"],
               **attack}
    print(f"QAT training step on {results['device']} ({results['cpu']}), batch {args.batch}, {args.repeats} x "
          f"{args.steps} steps: clean {step_s['qat']:.2f} s, FGSM-RS {step_s['fgsm']:.2f} s "
          f"({results['fgsm_over_clean']:.2f}x), PGD-{args.adv_steps} {step_s['pgd']:.2f} s "
          f"({results['pgd_over_clean']:.2f}x)")
    report_compilation(results)
    print(f"eval.py per image (batch {min(EVAL_BATCH, args.attack_images)}, {args.attack_images} images): clean "
          f"{1000 * attack['clean_s_per_image']:.1f} ms, FGSM {1000 * attack['fgsm_s_per_image']:.1f} ms, PGD-10 "
          f"{1000 * attack['pgd_s_per_image']:.1f} ms, APGD-CE-100 {1000 * attack['apgd_ce_s_per_image']:.0f} ms, "
          f"Square {1000 * attack['square_100_s_per_image']:.0f} ms per 100 queries (AutoAttack: APGD-CE, 9 x "
          "APGD-T and up to 5,000 queries of Square on the images each leaves unbroken)")
    if args.json:
        print(json.dumps(results))
    return results


def step_figures(runs):
    """Per kind of alternating_runs' runs: the median step time, the median first step (compilation), the peak
    memory."""
    return {"step_s": {kind: statistics.median(s for run in runs[kind] for s in run["step_s"]) for kind in runs},
            "first_step_s": {kind: statistics.median(run["first_step_s"] for run in runs[kind]) for kind in runs},
            "peak_rss_mb": {kind: max(run["peak_rss_mb"] for run in runs[kind]) for kind in runs}}


def report_compilation(results):
    print("first step (compilation): " + ", ".join(f"{kind} {s:.1f} s" for kind, s in results["first_step_s"].items())
          + "; peak memory: " + ", ".join(f"{kind} {mb:.0f} MB" for kind, mb in results["peak_rss_mb"].items()))


# --- --lsq: the cost of learned step sizes --------------------------------------------------------

def quantizer_cost(args):
    """QAT training steps with learned step sizes against min/max observers; prints them and returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        runs = alternating_runs(args, ("qat", "lsq"), tmp)
    figures = step_figures(runs)
    step_s = figures["step_s"]
    ratios = [statistics.median(lsq["step_s"]) / statistics.median(minmax["step_s"])
              for minmax, lsq in zip(runs["qat"], runs["lsq"], strict=True)]
    arch = (args.arch or [networks.DEFAULT_ARCH])[0]
    results = {"device": runs["qat"][0]["device"], "cpu": cpu_model(), "arch": arch, "batch": args.batch,
               "steps": args.steps, "repeats": args.repeats, **figures,
               "lsq_over_minmax": step_s["lsq"] / step_s["qat"], "lsq_over_minmax_per_repeat": ratios}
    print(f"QAT training step of {results['arch']} on {results['device']} ({results['cpu']}), batch {args.batch}, "
          f"{args.repeats} x {args.steps} steps: min/max {1000 * step_s['qat']:.1f} ms, LSQ "
          f"{1000 * step_s['lsq']:.1f} ms ({results['lsq_over_minmax']:.2f}x; per repeat "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")
    report_compilation(results)
    if args.json:
        print(json.dumps(results))
    return results


# --- --mcu: the C export on an emulated Cortex-M4 -------------------------------------------------------------



def mcu_table(args):
    """Per network and weight bits: the C folder's flash, RAM, stack and instructions per image on the emulated
    Cortex-M4, and the host build's latency beside ONNX Runtime's int8; prints the table and returns the figures."""
    try:
        versions = mcu.toolchain()
    except mcu.Unavailable as e:
        raise cli.InputError(f"bench.py --mcu needs {e}") from None
    results = {"networks": {}, "cpu": cpu_model(), "toolchain": versions, "mcu_images": MCU_IMAGES,
               "board": f"QEMU {mcu.BOARD} (Cortex-M4)", "cflags": " ".join(mcu.CFLAGS)}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args, tmp)
        images = first_test_images(args.data, MCU_IMAGES)
        for name in args.arch or [MCU_ARCH]:
            for bits in MCU_WEIGHT_BITS:
                folder = os.path.join(tmp, f"{name}-{bits}")
                results["networks"][f"{name} {bits}-bit"] = mcu_network(args, name, bits, folder, images)
    report_mcu(results)
    if args.json:
        print(json.dumps(results))
    return results


def mcu_network(args, name, bits, folder, images):
    """One network's C folder, trained two steps with `bits`-bit weights, measured on the board and on the host."""
    from qatcifar import model_c

    run_script(f"the {name} {bits}-bit training", "train.py", "--arch", name, "-data", args.data, "-dir", folder,
               "-e", "1", "-bsize", "32", "--num_samples", "64", "--weight_bits", str(bits), "--quant_delay", "0",
               "--eval_every", "0", "--device", args.device)
    (run,) = files.RunFiles.in_folder(folder)
    checkpoint_path = os.path.join(folder, f"{run.prefix}-1_2.ckpt")
    exported = {form: os.path.join(folder, output) for form, output in (("c", "model_c"), ("onnx", "int8.onnx"))}
    for form, output in exported.items():
        run_script(f"the {name} {form} export", "export.py", "-loc", checkpoint_path, "--format", form, "-o", output,
                   "-data", args.data)
    host = model_c.runner(exported["c"])
    host(images)
    record = model_c.manifest(exported["c"])
    levels = int8.quantize_input(images, record["input"], record["tflite_arithmetic"]).transpose(0, 2, 3, 1)
    work = os.path.join(folder, "mcu")
    os.mkdir(work)
    return {"weight_bits": bits, "arena_bytes": record["arena_bytes"], "scratch_bytes": record["scratch_bytes"],
            "constant_bytes": record["constant_bytes"], **mcu.measure(exported["c"], levels, host.acc, work),
            **{f"host_{form}_b1_ms": latency(path, args.seconds, "--threads", "1", "--batch", "0",
                                             env=ONE_THREAD)["b1_p50_ms"] for form, path in exported.items()}}


def first_test_images(data_dir, count):
    dataset = cifar.create_dataset(data_dir, training=False, batch_size=count, num_samples=count)
    return next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]


def report_mcu(r):
    tools = r["toolchain"]
    print(f"C export on {r['board']}: {tools['arm-none-eabi-gcc']}, {r['cflags']}; {tools['qemu-system-arm']}; "
          f"host {r['cpu']}")
    print("(instructions: QEMU counts instructions, not cycles; exact: the board's int32 logits equal the host "
          f"build's on {r['mcu_images']} test images)")
    print(f"{'network':<16} {'flash KB':>9} {'RAM KB':>7} {'stack B':>8} {'M instr SMLAD':>14} {'M instr plain':>14} "
          f"{'exact':>6} {'host b1 ms':>11} {'ONNX int8 b1 ms':>16}")
    for name, n in r["networks"].items():
        smlad, plain = n.get("smlad"), n.get("plain")
        board = (f"{smlad['stack_bytes']:>8} {smlad['instructions'] / 1e6:>14.1f} {plain['instructions'] / 1e6:>14.1f} "
                 f"{'yes' if smlad['exact'] and plain['exact'] else 'NO':>6}" if n["fits"]
                 else f"{'does not fit the board':>45}")
        print(f"{name:<16} {n['flash_bytes'] / 1e3:>9.1f} {n['ram_bytes'] / 1e3:>7.1f} {board} "
              f"{n['host_c_b1_ms']:>11.2f} {n['host_onnx_b1_ms']:>16.2f}")
    print("(flash: model data and code, text + data of model.o and qat_kernels.o; RAM: the arena and 4-bit weights' "
          "scratch; latencies: one thread)")


# --- --validation: the cost of validating during training (train.py's own figures) ----------------

def validation_cost(args, tmp):
    plain = train_run(args, os.path.join(tmp, "plain"), eval_every=0)
    validating = train_run(args, os.path.join(tmp, "validating"), eval_every=1)
    return {"train_ips": plain["images_per_s"], "train_ips_validating": validating["images_per_s"],
            "validating_over_plain": validating["images_per_s"] / plain["images_per_s"],
            "epoch_s": plain["epoch_s"], "epoch_s_validating": validating["epoch_s"], "val_samples": args.val_samples}


def train_run(args, folder, eval_every):
    """Median per-epoch figures (its metrics file) of one QAT train.py run, leaving out the first epoch
    (compilation)."""
    arch = ["--arch", args.arch[0]] if args.arch else []
    run_script("train.py", "train.py", *arch, "-data", args.data, "-dir", folder, "-e", str(args.epochs),
               "-bsize", str(args.batch), "--num_samples", str(args.batch * args.steps),
               "--eval_every", str(eval_every), "--val_samples", str(args.val_samples), "--device", args.device)
    (record,) = files.RunFiles.in_folder(folder)  # (a new folder: this run's alone)
    with open(record.metrics) as f:
        records = [json.loads(line) for line in f]
    later = records[1:] or records
    return {"images_per_s": statistics.median(r["images_per_s"] for r in later),
            "epoch_s": statistics.median(r["epoch_s"] + r.get("val_s", 0.0) for r in later)}


if __name__ == "__main__":
    main()
