"""Evaluate a model on the CIFAR-10 test split: a checkpoint, a MindIR graph, an int8 file or ONNX.

    python eval.py -loc checkpoints/resnet18_qat-40_1562.ckpt
    python eval.py -loc CKPT -data data/demo --num_samples 1000 --json
    python eval.py -loc checkpoints/resnet18_qat-40_1562.int8.npz     # integer-only inference (qatcifar/int8.py)
    python eval.py -loc checkpoints/resnet18_qat-40_1562.mindir
    python eval.py -loc checkpoints/resnet18_qat-40_1562.onnx --threads 1   # ONNX Runtime (CPU)
    python eval.py -loc CKPT --attack pgd --eps 8/255 --steps 10 --save_adversarial data/adv   # robustness
    python eval.py -loc checkpoints/resnet8_qat-2_16.onnx --attack square --queries 1000  # any model file

The format follows the file name (.ckpt, .mindir, .npz, .onnx; see qatcifar/inference.py). Whether a checkpoint
is a QAT model is read from the checkpoint itself (its observer parameters); the network must
match it exactly. Prints the accuracy per class, the confusion matrix and the accuracy; with
--json the last line of stdout is {"accuracy": fraction, "correct": n, "total": n, "arch": name,
"params": n, "macs": n, ...} (the network's name, parameters and multiply-accumulates per image, as
the file records them; null for a MindIR graph).

With --attack (see qatcifar/attacks.py; FGSM and PGD differentiate a checkpoint, Square needs only scores and
attacks any model file), every evaluated image is also attacked, and the report adds the robust accuracy, the
accuracy on the adversarial images; --save_adversarial writes them as a CIFAR-format folder on which
`eval.py -data DIR` evaluates any model file.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import csv
import json
import os

import numpy as np

from qatcifar import attacks, checkpoint, cifar, files, inference, int8, networks, plots, quant, sensitivity

DEFAULT_CHECKPOINT_DIR = "checkpoints"  # train.py's default save directory


def get_args_parser():
    parser = cli.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", default=None,
                        help=f"model file: .ckpt, .mindir, .npz or .onnx (default: the newest periodic or interrupt "
                             f"checkpoint in {DEFAULT_CHECKPOINT_DIR}/, the one train.py printed last)")
    parser.add_argument("-data", "--data_dir", default=None,
                        help=f"CIFAR-10 binary folder holding test_batch.bin (default: the folder the model's train.py "
                             f"run trained on, as its args.json says, else {cifar.DEFAULT_DATA_DIR})")
    parser.add_argument("-bsize", "--batchsize", type=cli.positive_int, default=100, help="batch size")
    cli.add_device_argument(parser)
    parser.add_argument("--threads", type=cli.int_range(1, 1024), default=None,
                        help="ONNX models: ONNX Runtime's threads (default: one per physical core)")
    parser.add_argument("--num_samples", type=cli.positive_int, default=None,
                        help="evaluate the first N test images, in file order (default: all)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--save_predictions", metavar="PATH", default=None,
                        help="write the predicted labels, in dataset order, to PATH (.npy)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="draw the confusion matrix and the accuracy per class into PATH (.png)")
    parser.add_argument("--csv", metavar="PATH", default=None,
                        help="write the accuracy per class and the confusion matrix to PATH (.csv, for a spreadsheet)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --save_predictions, --plot or --csv "
                                                                  "file if it exists")
    layers = parser.add_argument_group("per-layer sensitivity (QAT checkpoints)")
    layers.add_argument("--sensitivity", action="store_true",
                        help="also evaluate, layer by layer, the network with that layer's weights at "
                             "--sensitivity_bits, and list the layers by the accuracy they lose")
    layers.add_argument("--sensitivity_bits", type=cli.int_range(2, 8), default=None, metavar="B",
                        help=f"with --sensitivity: the weight bits each layer is tried at (default "
                             f"{sensitivity.DEFAULT_BITS})")
    layers.add_argument("--suggest_layer_bits", metavar="FILE", default=None,
                        help="with --sensitivity and --size_budget: write a train.py --layer_bits file that gives the "
                             "least sensitive layers --sensitivity_bits until the int8 file fits the budget")
    layers.add_argument("--size_budget", type=cli.positive_float, default=None, metavar="KB",
                        help="with --suggest_layer_bits: the int8 file's size to reach, in kilobytes (1,000 bytes)")
    attack = parser.add_argument_group("adversarial robustness (square: any model file; the others: checkpoints only; "
                                       "pixel units: 8/255 or 0.0314)")
    attack.add_argument("--attack", choices=attacks.METHODS, default=None,
                        help="also attack every image (L-infinity) and report the robust accuracy")
    attack.add_argument("--eps", type=attacks.pixel_fraction, default=None, help="the attack's bound (default 8/255)")
    attack.add_argument("--steps", type=cli.int_range(1, 1000), default=None,
                        help="pgd and apgd: steps (default 10; apgd: 100)")
    attack.add_argument("--step_size", type=attacks.pixel_fraction, default=None,
                        help="pgd: size of a step (default 2.5 x eps / steps)")
    attack.add_argument("--restarts", type=cli.int_range(1, 100), default=None,
                        help="pgd and apgd: random starts; an image counts as broken if any breaks it (default 1)")
    attack.add_argument("--queries", type=cli.int_range(1, 100000), default=None,
                        help=f"square (and autoattack's): queries per image, at most (default "
                             f"{attacks.SQUARE_QUERIES})")
    attack.add_argument("--attack_seed", type=cli.seed, default=None,
                        help="pgd, apgd, square, autoattack: seed of the random starts and windows (default 0)")
    attack.add_argument("--save_adversarial", metavar="DIR", default=None,
                        help="write the attacked images as a CIFAR-format test folder (new or empty): the first "
                             "--num_samples images attacked, the rest as they were")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return interrupts.run(evaluate, args, interrupted="evaluation stopped; nothing was written")


def evaluate(args):
    """The accuracy of the model file on the test split; prints the report. Every input is checked first."""
    path = args.check_point or newest_checkpoint(DEFAULT_CHECKPOINT_DIR)
    args.data_dir = cifar.data_dir_for(path, args.data_dir)
    reads = inputs(args, path)
    for flag, output, suffix in (("--save_predictions", args.save_predictions, ".npy"), ("--plot", args.plot, ".png"),
                                 ("--csv", args.csv, ".csv")):
        if output:
            files.check_new_file(output, flag, args.overwrite, reads, suffix)
    if args.save_adversarial:
        files.check_not_input(args.save_adversarial, "--save_adversarial", reads)
    attacks.resolve(args, path)
    check_sensitivity(args, path, reads)
    if inference.uses_mindspore(path):
        cli.setup_device(args.device)
    model = inference.load_model(path, args.threads)
    batch_size = model.fixed_batch or args.batchsize
    if model.fixed_batch and model.fixed_batch != args.batchsize:
        print(f"note: {path} has a fixed batch size of {model.fixed_batch} (export.py --batch {model.fixed_batch}): "
              f"it runs on batches of {model.fixed_batch}, not -bsize {args.batchsize}; export without --batch for a "
              "graph that takes any batch size")
    dataset = cifar.create_dataset(args.data_dir, training=False, batch_size=batch_size,
                                        num_samples=args.num_samples)
    names = cifar.class_names(args.data_dir)
    images = f"the first {args.num_samples}" if args.num_samples else "the"
    print(f"evaluating {model.description} {path} on {images} test images of {args.data_dir}", flush=True)
    if args.attack:
        attack = attacks.build(args, model)
        predictions, robust, labels, records = attacks.evaluate(attack, dataset, keep=bool(args.save_adversarial))
    else:
        predictions, labels = inference.predict(model, dataset)
    correct, total = int((predictions == labels).sum()), len(labels)
    accuracy = correct / total
    confusion = confusion_matrix(labels, predictions, len(names))
    print(format_per_class(names, confusion))
    print(f"accuracy: {100 * accuracy:.2f}% ({correct}/{total}) of {model.description} {path} on {args.data_dir}")
    result = {"accuracy": accuracy, "correct": correct, "total": total, "model": model.description,
              "check_point": path, **(model.size or dict.fromkeys(("arch", "params", "macs"))),
              "per_class": per_class(names, confusion), "confusion": confusion.tolist()}
    if args.attack:
        result.update(report_attack(attack, names, labels, robust, accuracy))
        if args.save_adversarial:
            attacks.save_folder(args.save_adversarial, args.data_dir, records, adversarial_note(attack, path, args))
            print(f"adversarial images: {args.save_adversarial} (evaluate any model file on them with "
                  f"eval.py -data {args.save_adversarial} --num_samples {total})")
    if args.sensitivity:
        result["sensitivity"] = report_sensitivity(args, model, dataset, accuracy, path)
    if args.save_predictions:
        with files.output(args.save_predictions, "--save_predictions"):
            save_predictions(args.save_predictions, predictions, args.overwrite)
    if args.plot:
        with files.output(args.plot, "--plot"):
            plots.save_confusion(confusion, names, args.plot, f"{model.description} {os.path.basename(path)}: "
                                 f"{100 * accuracy:.2f}% of {total} images of {args.data_dir}")
        print(f"wrote {args.plot}")
    if args.csv:
        with files.output(args.csv, "--csv"):
            files.write_atomically(args.csv, lambda tmp: write_csv(tmp, names, confusion), mode=0o644,
                                   overwrite=args.overwrite)
        print(f"wrote {args.csv}")
    if args.json:
        print(json.dumps(result))
    return accuracy


def inputs(args, path):
    """What the command reads, which no output may be: (path, what) pairs for files.check_new_file."""
    return (path, "the model file"), (args.data_dir, "the data folder (-data)")


def check_sensitivity(args, path, reads):
    """Before any work: the sensitivity flags against each other and the model file (a checkpoint)."""
    given = [flag for flag, value in (("--sensitivity_bits", args.sensitivity_bits),
                                      ("--suggest_layer_bits", args.suggest_layer_bits),
                                      ("--size_budget", args.size_budget)) if value]
    if given and not args.sensitivity:
        raise cli.InputError(f"{given[0]} comes from the layers' sensitivity; add --sensitivity")
    if bool(args.suggest_layer_bits) != bool(args.size_budget):
        raise cli.InputError("--suggest_layer_bits FILE and --size_budget KB go together")
    args.sensitivity_bits = args.sensitivity_bits or sensitivity.DEFAULT_BITS
    if args.size_budget and args.sensitivity_bits == 8:
        raise cli.InputError("--sensitivity_bits 8 lowers no layer's bits (QAT trains at most 8), so no suggestion "
                             "can shrink the file to --size_budget; give fewer, like --sensitivity_bits 4")
    if args.sensitivity and not path.endswith(".ckpt"):
        raise cli.InputError(f"--sensitivity changes a layer's weight bits, which only a QAT checkpoint can; {path} "
                             "is not one: give the .ckpt it was exported from")
    if args.suggest_layer_bits:
        files.check_new_file(args.suggest_layer_bits, "--suggest_layer_bits", args.overwrite, reads, ".json")
    if args.sensitivity and args.plot:
        files.check_new_file(sensitivity_chart(args.plot), "--plot", args.overwrite, reads)


def sensitivity_chart(plot):
    """Where --plot's sensitivity bar chart goes: beside the confusion matrix, `<name>-sensitivity.png`."""
    return plot[:-len(".png")] + "-sensitivity.png"


def report_sensitivity(args, model, dataset, accuracy, path):
    """Print the layers by the accuracy they lose at --sensitivity_bits, write the suggested --layer_bits file and
    the bar chart; return the JSON records."""
    if model.network is None or not networks.weighted_layers(model.network) or not isinstance(
            next(iter(networks.weighted_layers(model.network).values())), quant.QuantConvBN):
        raise cli.InputError(f"--sensitivity changes a layer's weight bits; {path} is a float32 checkpoint, which has "
                             "none: give a QAT one")
    records = sensitivity.measure(model.network, dataset, args.sensitivity_bits, accuracy)
    print(f"sensitivity: the accuracy with one layer's weights at {args.sensitivity_bits} bits (the rest as trained; "
          f"{100 * accuracy:.2f}% as trained), the most sensitive layer first:")
    width = max(len(r["layer"]) for r in records)
    for r in records:
        print(f"  {r['layer']:<{width}}  {r['trained_bits']} -> {r['bits']} bits  {r['weights']:>9,} weights  "
              f"{100 * r['accuracy']:6.2f}%  ({100 * (r['accuracy'] - accuracy):+.2f})")
    if args.suggest_layer_bits:
        size = int8.expected_size(networks.profile(model.network))
        chosen, reached = sensitivity.suggest(records, size, 1000 * args.size_budget)
        with files.output(args.suggest_layer_bits, "--suggest_layer_bits"):
            files.write_text(args.suggest_layer_bits, json.dumps(chosen, indent=2, sort_keys=True) + "\n")
        fits = "fits" if reached <= 1000 * args.size_budget else "is the smallest this suggestion reaches and misses"
        print(f"wrote {args.suggest_layer_bits}: {len(chosen)} layers at {args.sensitivity_bits} bits; the int8 file "
              f"would be about {cli.size_text(reached)}, which {fits} the {args.size_budget:g} KB budget (train with "
              f"python train.py --layer_bits {args.suggest_layer_bits} ...)")
    if not any(r["drop"] > 0 for r in records):
        print(f"no layer lost accuracy with its weights at {args.sensitivity_bits} bits on these test images: each "
              "can take them, as far as these images show (a harder set tells more: preprocess.py --difficulty hard)"
              + ("; no sensitivity chart drawn" if args.plot else ""))
    elif args.plot:
        chart = sensitivity_chart(args.plot)
        with files.output(chart, "--plot"):
            plots.save_sensitivity(records, accuracy, chart, f"{os.path.basename(path)}: one layer at "
                                   f"{args.sensitivity_bits}-bit weights")
        print(f"wrote {chart}")
    return records


def per_class(names, confusion):
    return {name: (int(row[i]) / int(row.sum()) if row.sum() else None)
            for i, (name, row) in enumerate(zip(names, confusion, strict=True))}


def report_attack(attack, names, labels, robust, clean_accuracy):
    """Print the robust accuracy; return its JSON fields."""
    robust_accuracy = float((robust == labels).mean())
    confusion = confusion_matrix(labels, robust, len(names))
    print(f"robust accuracy: {100 * robust_accuracy:.2f}% ({int((robust == labels).sum())}/{len(labels)}) under "
          f"{describe(attack)}; clean {100 * clean_accuracy:.2f}%")
    print("robust accuracy per class: " + ", ".join(f"{name} {100 * value:.1f}%" for name, value in
                                                   per_class(names, confusion).items() if value is not None))
    result = {"clean_accuracy": clean_accuracy, "robust_accuracy": robust_accuracy, "attack": attack.settings(),
              "per_class_robust": per_class(names, confusion), "confusion_robust": confusion.tolist()}
    if getattr(attack, "stages", None):  # AutoAttack: the robust accuracy after each of its attacks
        result["stages"] = {name: unbroken / attack.images for name, unbroken in attack.stages.items()}
        print("AutoAttack, robust accuracy after each attack: " + ", ".join(
            f"{name} {100 * value:.2f}%" for name, value in result["stages"].items()))
    return result


def describe(attack):
    s = attack.settings()
    eps = f"eps {s['eps']:.4f} = {255 * s['eps']:.1f}/255"
    if s["method"] == "fgsm":
        return f"FGSM ({eps})"
    if s["method"] == "square":
        return f"Square ({eps}, at most {s['queries']} queries, p_init {s['p_init']}, seed {s['seed']})"
    if s["method"].startswith("apgd"):
        targets = f", {s['targets']} target classes" if "targets" in s else ""
        return (f"{s['method'].upper()} ({eps}, {s['steps']} steps{targets}, {s['restarts']} restart"
                f"{'s' if s['restarts'] > 1 else ''}, seed {s['seed']})")
    if s["method"] == "autoattack":
        return (f"AutoAttack, standard version without FAB-T ({eps}: APGD-CE, APGD-T, Square of "
                f"{s['parts']['square']['queries']} queries; seed {s['seed']})")
    return (f"PGD ({eps}, {s['steps']} steps of {s['step_size']:.4f}, {s['restarts']} restart"
            f"{'s' if s['restarts'] > 1 else ''}, seed {s['seed']})")


def adversarial_note(attack, path, args):
    return (f"Adversarial test images written by eval.py: the first images of {args.data_dir}/test_batch.bin "
            f"(--num_samples {args.num_samples or 'all'}) attacked by {describe(attack)} on {path}, rounded to whole "
            "pixel levels within eps; the remaining records are the originals. Evaluate any model file on them with "
            f"python eval.py -loc MODEL -data <this folder> --num_samples {args.num_samples or 10000}\n")


def newest_checkpoint(folder):
    """The checkpoint train.py printed last: the newest periodic or interrupt checkpoint in folder."""
    paths = checkpoint.newest_first(folder)
    if not paths:
        raise cli.InputError(f"no checkpoint given and no <prefix>-<epoch>_<step>.ckpt in {folder}/; give one with "
                             "-loc (train.py prints its path)")
    path = paths[0]
    print(f"note: evaluating {path}, the newest checkpoint in {folder}/ (give another with -loc)")
    return path


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, -1)


def format_per_class(names, confusion):
    """Per-class accuracy, then the confusion matrix (rows: true class, columns: predicted class)."""
    width = max(len(name) for name in names)
    lines = [f"{'class':<{width}}  accuracy  correct/total"]
    for i, (name, row) in enumerate(zip(names, confusion, strict=True)):
        share = f"{100 * row[i] / row.sum():7.2f}%" if row.sum() else "       -"
        lines.append(f"{name:<{width}}  {share}  {row[i]}/{row.sum()}")
    cell = max(5, len(str(confusion.max())) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted class, in the order above):")
    lines.append(" " * 4 + "".join(f"{i:>{cell}}" for i in range(len(names))))
    lines += [f"{i:>4}" + "".join(f"{count:>{cell}}" for count in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


def write_csv(path, names, confusion):
    """One row per true class: its images, correct ones, accuracy (%), then its confusion row (predicted classes)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "correct", "accuracy_percent"] + [f"predicted {name}" for name in names])
        for i, (name, row) in enumerate(zip(names, confusion, strict=True)):
            total = int(row.sum())
            writer.writerow([name, total, int(row[i]), f"{100 * row[i] / total:.2f}" if total else ""]
                            + [int(count) for count in row])


def save_predictions(path, predictions, overwrite):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, predictions.astype(np.int32))
    files.write_atomically(path, write, mode=0o644, overwrite=overwrite)


if __name__ == "__main__":
    main()
