"""Export a checkpoint for deployment: a MindIR graph, or a true int8 model file.

    python export.py -loc checkpoints/resnet18_qat-40_1562.ckpt --format int8     # -> ...-40_1562.int8.npz
    python export.py -loc CKPT --format mindir --batch 1 -o model.mindir

- `mindir`: `mindspore.export` of the inference network (QAT fake-quant or float32) with a
  fixed input shape (batch, 3, 32, 32); it runs in any MindSpore runtime
  (`mindspore.load` + `nn.GraphCell`, or MindSpore Lite after conversion).
- `int8`: BatchNorm folded into the convolutions, int8 weights with per-channel scales, int32
  biases and the observers' activation scales and zero points, in one .npz file that
  `int8.py` runs with integer arithmetic only (see there). Needs a QAT checkpoint.

The output is written under a temporary name and renamed into place when complete.
"""
import cli  # noqa: F401  (first: quiets MindSpore's log before it loads)

import os
import tempfile

import mindspore as ms
import mindspore.nn as nn
import numpy as np

import eval as evaluate
import int8
import preprocess
import quant
from resnetv2 import Bottleneck

FORMATS = {"mindir": ".mindir", "int8": ".int8.npz"}


def get_args_parser():
    parser = cli.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", required=True, help="Model checkpoint file (.ckpt)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="int8", help="what to write")
    parser.add_argument("-o", "--output", default=None,
                        help="output file (default: the checkpoint's path with .mindir or .int8.npz)")
    parser.add_argument("--batch", type=cli.positive_int, default=1, help="batch size fixed in the MindIR graph")
    parser.add_argument("--device", choices=cli.DEVICES, default="auto",
                        help="auto: GPU when MindSpore has a GPU backend, else CPU")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.check_point.endswith(".ckpt"):
        cli.fail(f"{args.check_point} is not a .ckpt file; export.py reads checkpoints written by train.py")
    output = args.output or args.check_point[: -len(".ckpt")] + FORMATS[args.format]
    check_output(output)
    cli.setup_device(args.device)
    net, config = evaluate.load_network(args.check_point)
    if args.format == "int8":
        if config is None:
            cli.fail(f"{args.check_point} is a float32 checkpoint; int8 export needs a QAT one (train without --no-qat)")
        header, arrays = int8_model(net)
        header["source"] = os.path.basename(args.check_point)
        write_atomically(output, lambda tmp: int8.save(tmp, header, arrays))
    else:
        image = ms.Tensor(np.zeros((args.batch, 3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE), np.float32))
        write_atomically(output, lambda tmp: ms.export(net, image, file_name=tmp, file_format="MINDIR"))
    report_sizes(net, output)
    return output


def check_output(path):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        cli.fail(f"output {path} is a folder; give a file name with -o")
    if not os.path.isdir(folder):
        cli.fail(f"output folder {folder} does not exist; create it or give another -o")


def write_atomically(path, write):
    """write(tmp) into a temporary file beside `path`, then rename it to `path`; no partial file on failure."""
    folder, name = os.path.split(os.path.abspath(path))
    suffix = ".mindir" if name.endswith(".mindir") else ".tmp"  # mindspore.export appends .mindir otherwise
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # a deployable file, readable by the runtime's user (mkstemp and export make it private)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cli.fail(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); give a writable -o")
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def report_sizes(net, path):
    float_bytes = 4 * sum(p.size for p in net.trainable_params())
    size = os.path.getsize(path)
    print(f"wrote {path}: {size / 1e6:.1f} MB ({100 * size / float_bytes:.1f}% of the "
          f"{float_bytes / 1e6:.1f} MB of float32 parameters)")


# --- int8 model --------------------------------------------------------------------------------

def int8_model(net):
    """The header and arrays of the int8 file, from a QAT ResNet in eval mode."""
    graph = Int8Graph(net)
    t = graph.quantize_input(net.conv1.input_quant)
    t = graph.conv(net.conv1, t)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            units = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
            branch = t
            for unit in units:
                branch = graph.conv(unit, branch)
            shortcut = t if isinstance(block.shortcut, nn.Identity) else graph.conv(block.shortcut, t)
            t = graph.add(block.add, [branch, shortcut])
    t = graph.mean(t, net.fc.input_quant)
    graph.dense(net.fc, t)
    header = {"format": int8.FORMAT, "version": int8.VERSION, "arch": "resnet18",
              "num_classes": net.fc.out_channels, "input_shape": [3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE],
              "normalization": {"mean": preprocess.CIFAR10_MEAN, "std": preprocess.CIFAR10_STD},
              "tensors": graph.tensors, "graph": graph.nodes}
    return header, graph.arrays


class Int8Graph:
    """Collects the nodes, tensor quantization parameters and arrays of the int8 file."""

    def __init__(self, net):
        self.names = {id(cell): name for name, cell in net.cells_and_names()}
        self.nodes, self.tensors, self.arrays = [], {}, {}

    def _tensor(self, observer):
        steps, delay = int(observer.steps.asnumpy()), int(observer.quant_delay.asnumpy())
        if steps <= delay:
            cli.fail(f"{self.names[id(observer)]} has seen {steps} training steps, not more than its quant_delay "
                     f"{delay}: activations are not quantized yet; train longer or with a smaller --quant_delay")
        scale, zero_point = quant.activation_qparams(observer.min_val.value(), observer.max_val.value(), 255)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = {"scale": float(scale.asnumpy()), "zero_point": int(zero_point.asnumpy())}
        return name

    def _weights(self, name, weight, bias, input_scale):
        scale = quant.weight_scale(weight, 8)
        self.arrays[f"{name}.weight"] = quant.weight_levels(weight, scale).asnumpy().astype(np.int8)
        scale = scale.asnumpy().reshape(-1).astype(np.float32)
        self.arrays[f"{name}.weight_scale"] = scale
        bias_scale = np.float64(input_scale) * scale.astype(np.float64)
        self.arrays[f"{name}.bias"] = np.round(bias.asnumpy().astype(np.float64) / bias_scale).astype(np.int32)
        return {"weight": f"{name}.weight", "weight_scale": f"{name}.weight_scale", "bias": f"{name}.bias"}

    def quantize_input(self, observer):
        out = self._tensor(observer)
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

    def mean(self, source, observer):
        out = self._tensor(observer)
        self.nodes.append({"op": "mean", "input": source, "output": out})
        return out

    def dense(self, cell, source):
        name = self.names[id(cell)]
        node = {"op": "dense", "name": name, "input": source, "output": "logits"}
        node.update(self._weights(name, cell.weight.value(), cell.bias.value(), self.tensors[source]["scale"]))
        self.nodes.append(node)


if __name__ == "__main__":
    main()
