"""Export a checkpoint for deployment: a MindIR graph, a true int8 model file, or an ONNX model.

    python export.py -loc checkpoints/resnet18_qat-40_1562.ckpt --format int8     # -> ...-40_1562.int8.npz
    python export.py -loc checkpoints/resnet18_qat-40_1562.ckpt --format onnx     # -> ...-40_1562.onnx
    python export.py -loc CKPT --format mindir -o model.mindir

- `mindir`: `mindspore.export` of the inference network (QAT fake-quant or float32), its input
  (any batch, 3, 32, 32), or with --batch N a fixed (N, 3, 32, 32); it runs in any MindSpore
  runtime (`mindspore.load` + `nn.GraphCell`, or MindSpore Lite after conversion).
- `int8`: BatchNorm folded into the convolutions, int8 weights with per-channel scales, int32
  biases and the observers' activation scales and zero points, in one .npz file that
  `int8.py` runs with integer arithmetic only (see there). Needs a QAT checkpoint.
- `onnx`: for ONNX Runtime and other ONNX runtimes, any batch size. From a QAT checkpoint the
  int8 model above in QDQ form, which ONNX Runtime runs with integer kernels; from a float32
  checkpoint a float32 graph (see onnx_graph.py). The class names (from -data) and the
  normalization travel in the file's metadata.

The output is written under a temporary name and renamed into place when complete; an existing
file is replaced only with --overwrite, the checkpoint itself never.
"""
import signal

if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Ctrl-C: see cli.py

import cli  # noqa: E402, I001  (first: quiets MindSpore's log before it loads)

import os

import mindspore as ms
import numpy as np
import onnx

import checkpoint
import int8
import onnx_graph
import preprocess
import quant
import resnetv2

FORMATS = {"mindir": ".mindir", "int8": ".int8.npz", "onnx": ".onnx"}
MAX_BATCH = 65536  # a fixed batch is traced with a zero batch of that size: 786 MB at most


def get_args_parser():
    parser = cli.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", required=True, help="Model checkpoint file (.ckpt)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="int8", help="what to write")
    parser.add_argument("-o", "--output", default=None,
                        help="output file, ending in .mindir, .npz or .onnx as --format says (default: the "
                             "checkpoint's path with .mindir, .int8.npz or .onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("-data", "--data_dir", default=preprocess.DEFAULT_DATA_DIR,
                        help="int8 and onnx: the data folder whose batches.meta.txt names the classes in the model "
                             "file (CIFAR-10's names if it has none)")
    parser.add_argument("--batch", type=cli.int_range(1, MAX_BATCH), default=None,
                        help="fix the MindIR graph's batch size, for runtimes that need a static shape "
                             "(default: any batch size)")
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return cli.run(export, args, interrupted="no file was written")


def export(args):
    """Write the model file; return its path."""
    if not args.check_point.endswith(".ckpt"):
        raise cli.InputError(f"{args.check_point} is not a .ckpt file; export.py reads checkpoints written by train.py")
    checkpoint.check_file(args.check_point)
    output = args.output or args.check_point[: -len(".ckpt")] + FORMATS[args.format]
    check_output(output, args)
    source = os.path.basename(args.check_point)
    names = None if args.format == "mindir" else preprocess.class_names(args.data_dir, preprocess.CIFAR10_CLASSES)
    cli.setup_device(args.device)
    net, config = checkpoint.load_network(args.check_point, preprocess.NUM_CLASSES)
    if args.format == "mindir":
        shape = (args.batch, 3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE)
        image = (ms.Tensor(np.zeros(shape, np.float32)) if args.batch
                 else ms.Tensor(shape=(None, *shape[1:]), dtype=ms.float32))  # a dynamic batch dimension
        write(output, lambda tmp: ms.export(net, image, file_name=tmp, file_format="MINDIR"), args.overwrite)
    elif args.format == "int8" or config is not None:  # onnx of a QAT checkpoint: the int8 model in QDQ form
        if config is None:
            raise cli.InputError(f"{args.check_point} is a float32 checkpoint; int8 export needs a QAT one "
                                 "(train without --no-qat)")
        header, arrays = int8_model(net, config)
        header.update(source=source, class_names=names)
        if args.format == "int8":
            write(output, lambda tmp: int8.save(tmp, header, arrays), args.overwrite)
        else:
            model = onnx_graph.from_int8(header, arrays, metadata("int8 QDQ", source, names, network_record(net)))
            write(output, lambda tmp: onnx.save(model, tmp), args.overwrite)
    else:
        model = onnx_graph.from_float(net, metadata(checkpoint.FLOAT32, source, names, network_record(net)))
        write(output, lambda tmp: onnx.save(model, tmp), args.overwrite)
    report_sizes(net, output)
    if args.format == "onnx" and onnx_graph.uint8_weights(model):
        print(f"note: {args.check_point} has {config.weight_bits}-bit weights: {output} stores them as uint8 with "
              "zero point 128, which ONNX Runtime runs exactly on every CPU but more slowly than the int8 weights of "
              f"a model trained with {quant.QuantConfig.weight_bits}-bit weights, train.py's default "
              "(docs/deployment.md#exact-on-every-cpu)")
    return output


def metadata(model, source, class_names, network):
    """What an ONNX model carries besides the graph (each value JSON in its metadata_props); `network`:
    network_record's."""
    return {"model": model, "source": source, "class_names": class_names, "network": network,
            "normalization": {"mean": preprocess.CIFAR10_MEAN, "std": preprocess.CIFAR10_STD}}


def network_record(net):
    """What a model file says of its network (eval.py --json reports it): {"arch", "params", "macs"}."""
    profile = resnetv2.profile(net)
    return {key: profile[key] for key in ("arch", "params", "macs")}


def check_output(path, args):
    """Before any work: -o has the format's suffix and names a new file (or --overwrite), not the checkpoint."""
    suffix = {"int8": ".npz"}.get(args.format, FORMATS[args.format])  # what eval.py and inference.py go by
    if not path.endswith(suffix):
        raise cli.InputError(f"output {path} does not end in {suffix}, the suffix of --format {args.format}; "
                             f"give a -o ending in {suffix}")
    checkpoint.check_new_file(path, "-o", args.overwrite, args.check_point, "the checkpoint being exported")


def write(path, write_file, overwrite):
    """write_file(tmp), then into place at `path`, readable by the runtime's user; no partial file on failure,
    no file replaced unless `overwrite`."""
    try:
        checkpoint.write_atomically(path, write_file, mode=0o644, overwrite=overwrite)
    except FileExistsError:
        raise cli.InputError(f"output {path} appeared while exporting; give another -o, or add --overwrite") from None
    except (OSError, RuntimeError) as e:
        raise cli.InputError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); give a writable -o") from None


def report_sizes(net, path):
    float_bytes = 4 * sum(p.size for p in net.trainable_params())
    size = os.path.getsize(path)
    print(f"wrote {path}: {cli.size_text(size)} ({size:,} bytes, {100 * size / float_bytes:.1f}% of the "
          f"{cli.size_text(float_bytes)} of {net.arch}'s float32 parameters)")


# --- int8 model --------------------------------------------------------------------------------

def int8_model(net, config):
    """The header and arrays of the int8 file, from a QAT ResNet in eval mode and its QuantConfig."""
    if config.weight_bits > 8 or config.act_bits != 8:
        raise cli.InputError(f"the int8 file holds weights of at most 8 bits and 8-bit activations; this checkpoint "
                             f"has {config.weight_bits}-bit weights and {config.act_bits}-bit activations")
    graph = Int8Graph(net, config)
    resnetv2.walk(net, graph)
    header = {"format": int8.FORMAT, "version": int8.VERSION, **network_record(net),
              "weight_bits": config.weight_bits, "num_classes": net.fc.out_channels,
              "input_shape": [3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE],
              "normalization": {"mean": preprocess.CIFAR10_MEAN, "std": preprocess.CIFAR10_STD},
              "tensors": graph.tensors, "graph": graph.nodes}
    return header, graph.arrays


class Int8Graph:
    """Collects the nodes, tensor quantization parameters and arrays of the int8 file."""

    def __init__(self, net, config):
        self.names = {id(cell): name for name, cell in net.cells_and_names()}
        self.levels, self.weight_bits = 2 ** config.act_bits - 1, config.weight_bits
        self.nodes, self.tensors, self.arrays = [], {}, {}

    def _tensor(self, observer):
        steps, delay = int(observer.steps.asnumpy()), int(observer.quant_delay.asnumpy())
        if steps <= delay:
            raise cli.InputError(f"{self.names[id(observer)]} has seen {steps} training steps, not more than its "
                                 f"quant_delay {delay}: activations are not quantized yet; train longer or with a "
                                 "smaller --quant_delay")
        scale, zero_point = quant.activation_qparams(observer.min_val.value(), observer.max_val.value(), self.levels)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = {"scale": float(scale.asnumpy()), "zero_point": int(zero_point.asnumpy())}
        return name

    def _weights(self, name, weight, bias, input_scale):
        scale = quant.weight_scale(weight, self.weight_bits)
        self.arrays[f"{name}.weight"] = quant.weight_levels(weight, scale).asnumpy().astype(np.int8)
        scale = scale.asnumpy().reshape(-1).astype(np.float32)
        self.arrays[f"{name}.weight_scale"] = scale
        bias_scale = np.float64(input_scale) * scale.astype(np.float64)
        self.arrays[f"{name}.bias"] = np.round(bias.asnumpy().astype(np.float64) / bias_scale).astype(np.int32)
        return {"weight": f"{name}.weight", "weight_scale": f"{name}.weight_scale", "bias": f"{name}.bias"}

    def input(self, net):
        out = self._tensor(net.conv1.input_quant)
        self.nodes.append({"op": "quantize", "input": "image", "output": out})
        return out

    def conv(self, unit, source):
        name = self.names[id(unit)]
        weight, bias = unit.folded_weight_and_bias()
        node = {"op": "conv", "name": name, "input": source, "stride": unit.conv.stride[0],
                "padding": unit.conv.padding if unit.conv.pad_mode == "pad" else 0, "relu": bool(unit.relu)}
        node.update(self._weights(name, weight, bias, self.tensors[source]["scale"]))
        node["output"] = self._tensor(unit.output_quant)
        self.nodes.append(node)
        return node["output"]

    def add(self, cell, sources):
        out = self._tensor(cell.output_quant)
        self.nodes.append({"op": "add", "name": self.names[id(cell)], "inputs": sources, "relu": True, "output": out})
        return out

    def mean(self, source, fc):
        out = self._tensor(fc.input_quant)
        self.nodes.append({"op": "mean", "input": source, "output": out})
        return out

    def dense(self, cell, source):
        name = self.names[id(cell)]
        node = {"op": "dense", "name": name, "input": source, "output": "logits"}
        node.update(self._weights(name, cell.weight.value(), cell.bias.value(), self.tensors[source]["scale"]))
        self.nodes.append(node)


if __name__ == "__main__":
    main()
