"""Draw the training curves of the runs in one or several train.py save directories, on one figure to compare them.

    python plot.py checkpoints                              # every run in checkpoints/ -> checkpoints/curves.png
    python plot.py runs/standard runs/adversarial -o compare.png

Each run's <prefix>-metrics.jsonl (resumed parts included) gives the loss per epoch with the spread of
its steps, the learning rate, and the validation accuracy (robust accuracy too under --val_attack)
with the best epoch marked; the legend names each run by its prefix and what it trained (network,
bits, quantizer: its <prefix>-args.json). train.py keeps each run's <prefix>-curves.png up to date itself.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import os  # noqa: E402
import sys

from qatcifar import files, plots


def get_args_parser():
    parser = cli.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    parser.add_argument("savedirs", nargs="+", metavar="DIR", help="train.py save directories (-dir)")
    parser.add_argument("-o", "--output", default=None,
                        help="the PNG to write (default, for one folder: DIR/curves.png; needed for several)")
    parser.add_argument("--overwrite", action="store_true", help="replace -o if it exists")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return interrupts.run(draw, args, interrupted="nothing was written")


def draw(args):
    """Write the figure; return its path. Every input is checked first."""
    if args.output is None and len(args.savedirs) > 1:
        raise cli.InputError(f"{len(args.savedirs)} folders go on one figure: name it with -o, like -o compare.png")
    output = args.output or os.path.join(args.savedirs[0], "curves.png")
    records = [record for folder in args.savedirs for record in runs_in(folder)]
    reads = [(path, "a run's record") for record in records for path in (record.metrics, record.args)]
    files.check_new_file(output, "-o", args.overwrite or args.output is None, reads, ".png")
    runs = {}
    for record in records:
        try:
            metrics = plots.read_metrics(record.metrics)
        except OSError as e:
            raise cli.InputError(f"cannot read {record.metrics} ({files.why(e)}); give a save directory whose runs "
                                 "train.py wrote") from None
        if not metrics:
            continue
        label = plots.read_label(record)
        runs[label if label not in runs else f"{record.savedir}/{label}"] = metrics
    if not runs:
        raise cli.InputError(f"no run in {', '.join(args.savedirs)} has finished an epoch; give a save directory "
                             "with a finished epoch")
    with files.output(output, "-o"):
        plots.save_curves(runs, output)
    print(f"wrote {output}: {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return output


def runs_in(folder):
    """The runs (files.RunFiles) of a save directory; InputError if it is none."""
    if not os.path.isdir(folder):
        raise cli.InputError(f"{folder} is not a folder; give a train.py save directory (-dir)")
    records = files.RunFiles.in_folder(folder)
    if not records:
        raise cli.InputError(f"{folder} has no <prefix>-metrics.jsonl: give a train.py save directory (-dir) that "
                             "has finished at least one epoch")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
