"""Get CIFAR-10, or write a synthetic stand-in; and the seed's data module: the pipeline train.py and eval.py share.

    python preprocess.py --download [-data data/cifar-10-batches-bin]   # fetch the real data set (163 MB)
    python preprocess.py --synthetic data/demo                          # a learnable offline stand-in
    python preprocess.py --synthetic data/hard --difficulty hard        # one where fewer bits show a difference

The pipeline itself (`create_dataset(data_dir, training, batch_size, ...)`, the folder checks,
the download) is `qatcifar.cifar`; its names are importable from here too, as in the seed.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import urllib.parse  # noqa: E402

from qatcifar.cifar import (  # noqa: E402, F401  (the seed's names)
    CIFAR10_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    DEFAULT_DATA_DIR,
    DIFFICULTIES,
    NUM_CLASSES,
    SAMPLES_FOLDER,
    TEST_FILE,
    create_dataset,
    download,
    write_synthetic,
)

# --- command line --------------------------------------------------------------------------

def get_args_parser():
    parser = cli.ArgumentParser(prog="preprocess.py", description="Get CIFAR-10, or write a synthetic stand-in.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--download", action="store_true", help="download and extract CIFAR-10 into -data")
    action.add_argument("--synthetic", metavar="DIR", help="write a learnable synthetic CIFAR-format set into DIR")
    parser.add_argument("-data", "--data_dir", default=DEFAULT_DATA_DIR,
                        help="where --download puts the data set")
    parser.add_argument("--url", type=url, default=CIFAR10_URL,
                        help="archive URL (http, https or file), e.g. a mirror")
    parser.add_argument("--md5", type=md5_digest, default=CIFAR10_MD5,
                        help="expected MD5 of the archive")
    parser.add_argument("--seed", type=cli.seed, default=0, help="random seed of --synthetic")
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default=None,
                        help="with --synthetic: easy (the default), learned to 100 %% in an epoch or two, for trying "
                             "the commands; hard, fainter classes in more noise, where fewer bits, distillation and "
                             "per-layer sensitivity show differences")
    return parser


def url(text):
    if urllib.parse.urlsplit(text).scheme not in ("http", "https", "file"):
        raise argparse.ArgumentTypeError(f"takes an http://, https:// or file:// URL, got {text!r}; for an archive "
                                         "on this machine give file:///its/absolute/path")
    return text


def md5_digest(text):
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"takes an MD5 digest (32 hexadecimal digits), got {text!r}")
    return text.lower()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # download() removes its temporary folder, write_atomically() its partial file, whatever stops them.
    return interrupts.run(prepare, args, interrupted="no data was completed")


def prepare(args):
    if args.difficulty and not args.synthetic:
        raise cli.InputError("--difficulty chooses how hard the synthetic set is; add --synthetic DIR")
    difficulty = args.difficulty or "easy"
    try:
        if args.download:
            return download(args.data_dir, args.url, args.md5)
        write_synthetic(args.synthetic, args.seed, difficulty)
    except OSError as e:
        raise cli.InputError(f"cannot write {e.filename}: {e.strerror}; choose another folder") from None
    print(f"wrote synthetic CIFAR-format data ({difficulty}) to {args.synthetic} (data_batch_1.bin, {TEST_FILE}; "
          f"a test image of each class in {os.path.join(args.synthetic, SAMPLES_FOLDER)}/)")
    return args.synthetic


if __name__ == "__main__":
    main()
