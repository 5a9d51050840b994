"""Export a checkpoint for deployment: a MindIR graph, a true int8 model file, an ONNX model, or a TFLite model.

    python export.py -loc checkpoints/resnet18_qat-40_1562.ckpt --format int8     # -> ...-40_1562.int8.npz
    python export.py -loc checkpoints/resnet18_qat-40_1562.ckpt --format onnx     # -> ...-40_1562.onnx
    python export.py -loc checkpoints/resnet8_qat-2_16.ckpt --format tflite        # -> ...-2_16.tflite
    python export.py -loc checkpoints/resnet8_qat-2_16.ckpt --format c             # -> folder ...-2_16_c/
    python export.py -loc CKPT --format mindir -o model.mindir
    python export.py -loc FLOAT.ckpt --format int8 --calibrate 512 -data data/cifar-10-batches-bin   # PTQ

- `mindir`: `mindspore.export` of the inference network (QAT fake-quant or float32), its input
  (any batch, 3, 32, 32), or with --batch N a fixed (N, 3, 32, 32); it runs in any MindSpore
  runtime (`mindspore.load` + `nn.GraphCell`, or MindSpore Lite after conversion).
- `int8`: BatchNorm folded into the convolutions, int8 weights with per-channel scales, int32
  biases and the observers' activation scales and zero points, in one .npz file that
  `qatcifar/int8.py` runs with integer arithmetic only (see there). From a QAT checkpoint; from a
  float32 one with `--calibrate N` (post-training quantization, qatcifar/ptq.py: activation
  ranges measured on the first N training images of -data).
- `onnx`: for ONNX Runtime and other ONNX runtimes, any batch size. From a QAT checkpoint the
  int8 model above in QDQ form, which ONNX Runtime runs with integer kernels; from a float32
  checkpoint a float32 graph (see qatcifar/onnx_graph.py). The class names (from -data) and the
  normalization travel in the file's metadata.
- `tflite`: the int8 model as a fully-int8 TFLite flatbuffer (qatcifar/tflite_graph.py) for
  LiteRT, TensorFlow Lite Micro and the edge compilers that start from .tflite; a float32 input
  quantized inside the model, or with --tflite_input int8 the int8 image itself (firmware). Its
  int8 logits cover the range the int8 model's logits take on the first LOGITS_IMAGES training
  images of -data (a bound from the weights where -data has none). From a QAT or calibrated
  checkpoint with 8-bit activations.
- `c`: a folder of portable C99 (qatcifar/c_export.py): the int8 model's constants and a fixed
  sequence of integer kernels over one static arena, no heap, no floating point in the network,
  computing the int8 file's int32 logits bit for bit, for a microcontroller's firmware; eval.py
  and predict.py build it for this machine and run it (qatcifar/model_c.py). From a QAT or
  calibrated checkpoint, any bits.

The output is written under a temporary name and renamed into place when complete; an existing
file is replaced only with --overwrite, the checkpoint itself never (and an existing folder only
if it is a C folder export.py wrote).
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import os

import mindspore as ms
import numpy as np
import onnx

from qatcifar import (
    c_export,
    checkpoint,
    cifar,
    files,
    int8,
    int8_export,
    networks,
    onnx_graph,
    ptq,
    quant,
    tflite_graph,
)

FORMATS = {"mindir": ".mindir", "int8": ".int8.npz", "onnx": ".onnx", "tflite": ".tflite", "c": "_c"}  # (c: a folder)
LOGITS_IMAGES = 500  # training images whose int8 logits give the range of a .tflite model's int8 logits
CALIBRATION_BATCH = 64
MAX_BATCH = 65536  # a fixed batch is traced with a zero batch of that size: 786 MB at most


def get_args_parser():
    parser = cli.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", required=True, help="Model checkpoint file (.ckpt)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="int8", help="what to write")
    parser.add_argument("-o", "--output", default=None,
                        help="output file, ending in .mindir, .npz, .onnx or .tflite as --format says, or c's folder "
                             "(default: the checkpoint's path with .mindir, .int8.npz, .onnx, .tflite or _c)")
    parser.add_argument("--tflite_input", choices=("float32", "int8"), default=None,
                        help="tflite: the model's input, a normalized float32 image quantized inside the model (the "
                             "default), or the int8 image itself with int8 logits out (for firmware)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output file if it exists (a folder: only a C folder export.py wrote)")
    parser.add_argument("-data", "--data_dir", default=None,
                        help="int8, onnx and tflite: the data folder whose batches.meta.txt names the classes in the "
                             "model file (CIFAR-10's names if it has none); default: the folder the checkpoint's "
                             f"train.py run trained on, as its args.json says, else {cifar.DEFAULT_DATA_DIR}")
    parser.add_argument("--calibrate", type=cli.int_range(1, 50000), default=None, metavar="N",
                        help="int8, onnx and tflite of a float32 checkpoint: post-training quantization, its "
                             "activation ranges measured on the first N training images of -data (a few hundred do)")
    parser.add_argument("--calibration", choices=ptq.METHODS, default=None,
                        help="with --calibrate: an activation's range is its lowest and highest value (minmax, the "
                             "default) or its 0.01th and 99.99th percentiles (percentile)")
    parser.add_argument("--batch", type=cli.int_range(1, MAX_BATCH), default=None,
                        help="fix the MindIR graph's batch size, for runtimes that need a static shape "
                             "(default: any batch size)")
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return interrupts.run(export, args, interrupted="no file was written")


def export(args):
    """Write the model file; return its path."""
    if not args.check_point.endswith(".ckpt"):
        raise cli.InputError(f"{args.check_point} is not a .ckpt file; export.py reads checkpoints written by train.py")
    files.check_file(args.check_point)
    if args.format != "mindir":  # (a MindIR graph holds no class names)
        args.data_dir = cifar.data_dir_for(args.check_point, args.data_dir)
    output = args.output or args.check_point[: -len(".ckpt")] + FORMATS[args.format]
    check_output(output, args)
    check_calibration(args)
    source = os.path.basename(args.check_point)
    names = None if args.format == "mindir" else cifar.class_names(args.data_dir, cifar.CIFAR10_CLASSES)
    cli.setup_device(args.device)
    net, config = checkpoint.load_network(args.check_point, cifar.NUM_CLASSES)
    if args.calibrate and config is not None:
        raise cli.InputError(f"{args.check_point} is a QAT checkpoint, quantized in training; --calibrate quantizes "
                             "a float32 one: export it without --calibrate")
    if args.calibrate:
        calibration = cifar.calibration_dataset(args.data_dir, args.calibrate, CALIBRATION_BATCH)
        net, config, images = ptq.calibrate(net, calibration, args.calibration or "minmax")
        print(f"post-training quantization: activation ranges ({args.calibration or 'minmax'}) of the first {images} "
              f"training images of {args.data_dir}{' (all it has)' if images < args.calibrate else ''}")
    if args.format == "mindir":
        shape = (args.batch, 3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE)
        image = (ms.Tensor(np.zeros(shape, np.float32)) if args.batch
                 else ms.Tensor(shape=(None, *shape[1:]), dtype=ms.float32))  # a dynamic batch dimension
        write(output, lambda tmp: ms.export(net, image, file_name=tmp, file_format="MINDIR"), args.overwrite)
    elif args.format != "onnx" or config is not None:  # onnx of a QAT checkpoint: the int8 model in QDQ form
        if config is None:
            raise cli.InputError(f"{args.check_point} is a float32 checkpoint; quantize it after training with "
                                 "--calibrate N -data DIR (post-training quantization on N training images), or "
                                 "train a QAT one (without --no-qat)")
        header, arrays = int8_export.int8_model(net, config)
        if args.format in ("onnx", "tflite") and config.act_bits < quant.ACT_BITS:
            what = "an ONNX" if args.format == "onnx" else "a TFLite"
            raise cli.InputError(f"{args.check_point} has {config.act_bits}-bit activations, which {what} model "
                                 f"cannot hold: its 8-bit tensors saturate at level 255, not at "
                                 f"{2 ** config.act_bits - 1}; export --format int8 (the integer reference runs it)")
        header.update(source=source, class_names=names)
        if args.calibrate:
            header["calibration"] = {"method": args.calibration or "minmax", "images": images}
        if args.format == "int8":
            write(output, lambda tmp: int8.save(tmp, header, arrays), args.overwrite)
        elif args.format == "c":
            network = int8_export.network_record(net)
            kind = "int8 C, post-training" if args.calibrate else "int8 C"
            return write_c(output, header, arrays, int8_export.metadata(kind, source, names, network), args)
        elif args.format == "tflite":
            network = int8_export.network_record(net)
            kind = "int8 TFLite, post-training" if args.calibrate else "int8 TFLite"
            model = tflite_model(header, arrays, int8_export.metadata(kind, source, names, network), args)
            write(output, lambda tmp: write_bytes(tmp, model), args.overwrite)
        else:
            network = int8_export.network_record(net)
            kind = "int8 QDQ, post-training" if args.calibrate else "int8 QDQ"
            model = onnx_graph.from_int8(header, arrays, int8_export.metadata(kind, source, names, network))
            write(output, lambda tmp: onnx.save(model, tmp), args.overwrite)
    else:
        network = int8_export.network_record(net)
        model = onnx_graph.from_float(net, int8_export.metadata(checkpoint.FLOAT32, source, names, network))
        write(output, lambda tmp: onnx.save(model, tmp), args.overwrite)
    report_sizes(net, output)
    if args.format == "onnx" and onnx_graph.uint8_weights(model):
        has = "is quantized after training with" if args.calibrate else "has"
        print(f"note: {args.check_point} {has} {config.weight_bits}-bit weights: {output} stores them as uint8 with "
              "zero point 128, which ONNX Runtime runs exactly on every CPU but more slowly than the int8 weights of "
              f"a model trained with {quant.QuantConfig.weight_bits}-bit weights, train.py's default "
              "(docs/deployment.md#exact-on-every-cpu)")
    return output


def tflite_model(header, arrays, metadata, args):
    """The .tflite bytes of the int8 model; its logits' range measured on LOGITS_IMAGES training images of -data."""
    try:
        tflite_graph.check(header)
    except tflite_graph.Refused as e:
        raise cli.InputError(f"{args.check_point} cannot be a TFLite model: {e}; export --format int8 (the integer "
                             "reference runs it)") from None
    model = {"header": header, "arrays": arrays}
    try:
        cifar.check_data_dir(args.data_dir, True)
    except cifar.DatasetError:
        low, high = int8.logits_bound(model)
        print(f"note: {args.data_dir} has no training images to measure the logits' range on: the int8 logits of the "
              f"TFLite model cover their bound from the weights, {low:.1f} to {high:.1f} (coarser steps); give -data "
              "for finer ones")
    else:
        batches = cifar.calibration_dataset(args.data_dir, LOGITS_IMAGES, CALIBRATION_BATCH)
        logits = np.concatenate([int8.run(model, images) for images, _ in
                                 batches.create_tuple_iterator(num_epochs=1, output_numpy=True)])
        low, high = float(logits.min()), float(logits.max())
    return tflite_graph.from_int8(header, arrays, metadata, (low, high), int8_input=args.tflite_input == "int8")


def write_c(folder, header, arrays, metadata, args):
    """The C folder of the int8 model (qatcifar/c_export.py); its path. Refused where the kernels cannot compute it."""
    try:
        int8.check({"header": header, "arrays": arrays})
        c_export.check(header, arrays)
        with files.output(folder, "-o"):
            files.write_folder_atomically(folder, lambda tmp: c_export.write_folder(tmp, header, arrays, metadata),
                                          args.overwrite)
    except (ValueError, c_export.Refused) as e:
        raise cli.InputError(f"{args.check_point} cannot be exported as C: {e}; export --format int8 (the integer "
                             "reference runs it)") from None
    record = files.load_json(os.path.join(folder, c_export.MANIFEST))
    print(f"wrote {folder}: C99 of {header.get('arch')} (model.h, model.c, qat_kernels.c): "
          f"{record['constant_bytes']:,} bytes of constants ({record['weight_bytes']:,} of weights) for flash, an "
          f"arena of {record['arena_bytes']:,} bytes for RAM; see its model.h")
    return folder


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def check_calibration(args):
    """Before any work: --calibrate makes an int8 model of a float32 checkpoint, from the training images of -data."""
    if args.calibration and not args.calibrate:
        raise cli.InputError("--calibration chooses how --calibrate measures activation ranges; add --calibrate N")
    if args.tflite_input and args.format != "tflite":
        raise cli.InputError(f"--tflite_input chooses a TFLite model's input; add --format tflite (not {args.format})")
    if args.calibrate and args.format == "mindir":
        raise cli.InputError("--calibrate makes an int8 model; give --format int8, onnx, tflite or c")
    if args.calibrate:
        cifar.check_data_dir(args.data_dir, True)


def check_output(path, args):
    """Before any work: -o has the format's suffix and names a new file (or --overwrite), not the checkpoint; c's a
    new folder, or with --overwrite one that export.py wrote."""
    reads = ((args.check_point, "the checkpoint being exported"), (args.data_dir, "the data folder (-data)"))
    if args.format == "c":
        files.check_new_folder(path, "-o", args.overwrite, reads,
                               replaceable=lambda folder: os.path.isfile(os.path.join(folder, c_export.MANIFEST)))
        return
    suffix = {"int8": ".npz"}.get(args.format, FORMATS[args.format])  # what eval.py and qatcifar/inference.py go by
    if not path.endswith(suffix):
        raise cli.InputError(f"output {path} does not end in {suffix}, the suffix of --format {args.format}; "
                             f"give a -o ending in {suffix}")
    files.check_new_file(path, "-o", args.overwrite, reads)


def write(path, write_file, overwrite):
    """write_file(tmp), then into place at `path`, readable by the runtime's user; no partial file on failure,
    no file replaced unless `overwrite`."""
    try:
        with files.output(path, "-o"):
            files.write_atomically(path, write_file, mode=0o644, overwrite=overwrite)
    except RuntimeError as e:  # (MindSpore's export says a full disk so)
        raise cli.InputError(f"cannot write {path} ({cli.first_line(e)}); free space or give another -o") from None


def report_sizes(net, path):
    float_bytes = 4 * networks.profile(net)["params"]  # (the float network's: not LSQ's learned steps)
    size = os.path.getsize(path)
    print(f"wrote {path}: {cli.size_text(size)} ({size:,} bytes, {100 * size / float_bytes:.1f}% of the "
          f"{cli.size_text(float_bytes)} of {net.arch}'s float32 parameters)")


if __name__ == "__main__":
    main()
