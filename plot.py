"""Draw the training curves of one or several train.py save directories, on one figure to compare runs.

    python plot.py checkpoints                              # redraws checkpoints/curves.png
    python plot.py runs/standard runs/adversarial -o compare.png

Each folder's metrics.jsonl (its latest run, resumed parts included) gives the loss per epoch with
the spread of its steps, the learning rate, and the validation accuracy (robust accuracy too under
--val_attack) with the best epoch marked. train.py keeps <save dir>/curves.png up to date itself.
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
    output = args.output or os.path.join(args.savedirs[0], plots.CURVES_FILE)
    if not output.endswith(".png"):
        raise cli.InputError(f"-o {output} must end in .png")
    runs = {}
    for folder in args.savedirs:
        path = os.path.join(folder, files.METRICS_FILE)
        if not os.path.isfile(path):
            raise cli.InputError(f"{folder} has no {files.METRICS_FILE}: give a train.py save directory (-dir) that "
                                 "has finished at least one epoch")
        records = plots.read_metrics(path)
        if not records:
            raise cli.InputError(f"{path} holds no epoch record; give a save directory with a finished epoch")
        label = os.path.basename(os.path.abspath(folder))
        runs[label if label not in runs else folder] = records
    files.check_new_file(output, "-o", overwrite=args.overwrite or args.output is None)
    with files.output(output, "-o"):
        plots.save_curves(runs, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
