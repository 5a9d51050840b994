"""Evaluate a ResNet-18 model on the CIFAR-10 test split: a checkpoint, a MindIR graph or an int8 file.

    python eval.py -loc checkpoints/resnet18_qat-40_1562.ckpt
    python eval.py -loc CKPT -data data/demo --num_samples 1000 --json
    python eval.py -loc checkpoints/resnet18_qat-40_1562.int8.npz     # integer-only inference (int8.py)
    python eval.py -loc checkpoints/resnet18_qat-40_1562.mindir

The format follows the file name (.ckpt, .mindir, .npz). Whether a checkpoint is a QAT
model is read from the checkpoint itself (its observer parameters); the network must
match it exactly. Prints the accuracy; with --json the last line of stdout is
{"accuracy": fraction, "correct": n, "total": n, ...}.
"""
import cli  # noqa: F401  (first: quiets MindSpore's log before it loads)

import glob
import json
import os

import mindspore as ms
import mindspore.nn as nn
import numpy as np
from mindspore.train import mind_ir_pb2

import int8
import preprocess
import quant
from resnetv2 import resnet18

DEFAULT_CHECKPOINT_DIR = "checkpoints"  # train.py's default save directory


def get_args_parser():
    parser = cli.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", default=None,
                        help=f"Model checkpoint file (default: the newest .ckpt in {DEFAULT_CHECKPOINT_DIR}/)")
    parser.add_argument("-data", "--data_dir", default=preprocess.DEFAULT_DATA_DIR,
                        help="CIFAR-10 binary folder holding test_batch.bin")
    parser.add_argument("-bsize", "--batchsize", type=cli.positive_int, default=100, help="batch size")
    parser.add_argument("--device", choices=cli.DEVICES, default="auto",
                        help="auto: GPU when MindSpore has a GPU backend, else CPU")
    parser.add_argument("--num_samples", type=cli.positive_int, default=None,
                        help="evaluate the first N test images, in file order (default: all)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--save_predictions", metavar="PATH", default=None,
                        help="write the predicted labels, in dataset order, to PATH (.npy)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.check_point = args.check_point or newest_checkpoint(DEFAULT_CHECKPOINT_DIR)
    cli.setup_device(args.device)
    model, kind, batch_size = load_model(args.check_point)
    try:
        dataset = preprocess.create_dataset(args.data_dir, training=False, batch_size=batch_size or args.batchsize,
                                            num_samples=args.num_samples)
    except preprocess.DatasetError as e:
        cli.fail(str(e))

    predictions, labels = predict(model, dataset, batch_size)
    correct, total = int((predictions == labels).sum()), len(labels)
    accuracy = correct / total
    names = preprocess.class_names(args.data_dir)
    confusion = confusion_matrix(labels, predictions, len(names))
    print(format_per_class(names, confusion))
    print(f"accuracy: {100 * accuracy:.2f}% ({correct}/{total}) of {kind} {args.check_point} on {args.data_dir}")
    if args.save_predictions:
        save_predictions(args.save_predictions, predictions)
    if args.json:
        per_class = {name: (int(row[i]) / int(row.sum()) if row.sum() else None)
                     for i, (name, row) in enumerate(zip(names, confusion))}
        print(json.dumps({"accuracy": accuracy, "correct": correct, "total": total, "model": kind,
                          "check_point": args.check_point, "per_class": per_class,
                          "confusion": confusion.tolist()}))
    return accuracy


def load_model(path):
    """(model, description, fixed batch size or None) for a .ckpt, .mindir or int8 .npz file."""
    check_file(path)
    if path.endswith(".mindir"):
        return load_mindir(path)
    if path.endswith(".npz"):
        try:
            return int8.load(path), "int8 (integer inference)", None
        except ValueError as e:
            cli.fail(f"{path} is not an int8 model written by export.py ({e})")
    net, config = load_network(path)
    return quant.freeze(net), "float32" if config is None else "QAT (int8 fake-quant)", None


def check_file(path, flag="-loc"):
    for problem, found in (("does not exist", not os.path.exists(path)), ("is not a file", not os.path.isfile(path)),
                           ("is an empty file", os.path.isfile(path) and os.path.getsize(path) == 0)):
        if found:
            cli.fail(f"model file {path} {problem}; give a .ckpt file written by train.py with {flag}")


def first_line(error):
    """The first line of an exception's message (MindSpore's run to dozens of lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_mindir(path):
    """A MindIR graph and the batch size fixed in it (other batch sizes would run, but wrongly)."""
    proto = mind_ir_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        batch_size = int(proto.graph.input[0].tensor[0].dims[0])
        graph = nn.GraphCell(ms.load(path))
    except Exception as e:  # protobuf and MindSpore raise several kinds of errors for a foreign file
        cli.fail(f"{path} is not a MindIR file written by export.py ({type(e).__name__})")
    return graph, "MindIR", batch_size


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, -1)


def format_per_class(names, confusion):
    """Per-class accuracy, then the confusion matrix (rows: true class, columns: predicted class)."""
    width = max(len(name) for name in names)
    lines = [f"{'class':<{width}}  accuracy  correct/total"]
    for i, (name, row) in enumerate(zip(names, confusion)):
        share = f"{100 * row[i] / row.sum():7.2f}%" if row.sum() else "       -"
        lines.append(f"{name:<{width}}  {share}  {row[i]}/{row.sum()}")
    cell = max(5, len(str(confusion.max())) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted class, in the order above):")
    lines.append(" " * 4 + "".join(f"{i:>{cell}}" for i in range(len(names))))
    lines += [f"{i:>4}" + "".join(f"{count:>{cell}}" for count in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


def save_predictions(path, predictions):
    try:
        with open(path, "wb") as f:
            np.save(f, predictions.astype(np.int32))
    except OSError as e:
        cli.fail(f"cannot write predictions to {path} ({e.strerror}); give a writable --save_predictions path")


def newest_checkpoint(folder):
    paths = glob.glob(os.path.join(folder, "*.ckpt"))
    if not paths:
        cli.fail(f"no checkpoint given and no .ckpt in {folder}/; give one with -loc (train.py prints its path)")
    return max(paths, key=os.path.getmtime)


def load_network(path):
    """The network a checkpoint was trained as (QAT or float), loaded strictly, in eval mode; and its QuantConfig."""
    check_file(path)
    try:
        params = read_checkpoint(path)
    except (ValueError, RuntimeError, TypeError, OSError) as e:
        cli.fail(f"{path} is not a readable MindSpore checkpoint ({first_line(e)}); give a .ckpt file written by train.py")
    if not params:
        cli.fail(f"{path} holds no parameters; give a .ckpt file written by train.py")
    config = quant.config_from_checkpoint(params)
    net = resnet18(preprocess.NUM_CLASSES)
    if config is not None:
        net = quant.quantize(net, config)
    own = {name: param.shape for name, param in net.parameters_and_names()}
    # Besides the network's parameters a training checkpoint holds optimizer state: slots named
    # `<slot>.<parameter>` (moment1.conv1.weight) and undotted scalars (global_step, epoch_num).
    # Any other dotted name belongs to another network.
    mismatch = describe_mismatch(own, params, ignored=lambda name: "." not in name or name.split(".", 1)[1] in own)
    if mismatch:
        cli.fail(f"{path} does not match ResNet-18 ({'float32' if config is None else 'QAT'}): {mismatch}; "
                 "give a checkpoint written by train.py")
    ms.load_param_into_net(net, params, strict_load=True)
    net.set_train(False)
    return net, config


def read_checkpoint(path, **options):
    """ms.load_checkpoint, verifying the file's CRC32 when it has one (train.py writes one).

    MindSpore reports a wrong CRC as a failed read ("may not have permission"); this says so.
    """
    try:
        return ms.load_checkpoint(path, crc_check=True, **options)
    except ValueError as error:
        try:
            ms.load_checkpoint(path, **options)
        except (ValueError, RuntimeError, TypeError, OSError):
            raise error from None
        raise ValueError("its CRC32 does not match its contents: the file is corrupt") from None


def describe_mismatch(own, params, ignored):
    """'' when every parameter of `own` ({name: shape}) is in the checkpoint with its shape and the
    checkpoint holds nothing else but names that `ignored(name)` accepts; else what differs."""
    missing = [name for name in own if name not in params]
    reshaped = [f"{name} {tuple(params[name].shape)} instead of {tuple(shape)}"
                for name, shape in own.items() if name in params and tuple(params[name].shape) != tuple(shape)]
    unexpected = [name for name in params if name not in own and not ignored(name)]
    problems = []
    for label, names in (("missing", missing), ("with another shape", reshaped), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} parameters {label} (e.g. {', '.join(names[:3])})")
    return "; ".join(problems)


def predict(model, dataset, fixed_batch=None):
    """Predicted and true labels of the whole dataset, in dataset order.

    model: a network or MindIR GraphCell (a last, short batch is padded to `fixed_batch`), or an int8 model.
    """
    predictions, labels = [], []
    for images, batch_labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        count = len(images)
        if isinstance(model, dict):
            logits = int8.run(model, images)
        else:
            if fixed_batch and count < fixed_batch:
                images = np.concatenate([images, np.zeros((fixed_batch - count,) + images.shape[1:], images.dtype)])
            logits = model(ms.Tensor(images)).asnumpy()
        predictions.append(logits[:count].argmax(axis=1))
        labels.append(batch_labels)
    return np.concatenate(predictions), np.concatenate(labels)

if __name__ == "__main__":
    main()
