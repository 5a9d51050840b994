"""From a trained QAT network to the int8 file's numbers (int8.py holds the format and its reference inference):
BatchNorm folded into the convolutions, int8 weights with per-channel scales, int32 biases, the observers'
activation scales and zero points; and what a model file says of its network and its data (`metadata`).

    >>> header, arrays = int8_export.int8_model(net, config)     # a QAT network in eval mode, its QuantConfig
    >>> int8.save("model.int8.npz", header, arrays)
"""
import numpy as np

from qatcifar import cifar, cli, int8, networks, quant


def metadata(model, source, class_names, network):
    """What an ONNX model carries besides the graph (each value JSON in its metadata_props); `network`:
    network_record's."""
    return {"model": model, "source": source, "class_names": class_names, "network": network,
            "normalization": {"mean": cifar.CIFAR10_MEAN, "std": cifar.CIFAR10_STD}}


def network_record(net):
    """What a model file says of its network (eval.py --json reports it): {"arch", "params", "macs"}."""
    profile = networks.profile(net)
    return {key: profile[key] for key in ("arch", "params", "macs")}


def int8_model(net, config):
    """The header and arrays of the int8 file, from a QAT ResNet in eval mode and its QuantConfig."""
    graph = Int8Graph(net, config)
    networks.walk(net, graph)
    header = {"format": int8.FORMAT, "version": int8.VERSION, **network_record(net),
              "weight_bits": config.weight_bits, "num_classes": net.fc.out_channels,
              "input_shape": [3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE],
              "normalization": {"mean": cifar.CIFAR10_MEAN, "std": cifar.CIFAR10_STD},
              "tensors": graph.tensors, "graph": graph.nodes}
    return header, graph.arrays


BIAS_BITS = 8  # fraction bits of biases where activations have fewer than 8 bits: 1/256 of the accumulator's step


class Int8Graph:
    """Collects the nodes, tensor quantization parameters and arrays of the int8 file."""

    def __init__(self, net, config):
        self.names = {id(cell): name for name, cell in net.cells_and_names()}
        self.weight_bits = config.weight_bits  # (the file's; layers have their own)
        # Activations of fewer than 8 bits: biases with fraction bits (int8.py), up to BIAS_BITS
        self.bias_bits = BIAS_BITS if config.act_bits < quant.ACT_BITS else 0
        self.nodes, self.tensors, self.arrays = [], {}, {}

    def _tensor(self, observer):
        steps, delay = int(observer.steps.asnumpy()), int(observer.quant_delay.asnumpy())
        if steps <= delay:
            raise cli.InputError(f"{self.names[id(observer)]} has seen {steps} training steps, not more than its "
                                 f"quant_delay {delay}: activations are not quantized yet; train longer or with a "
                                 "smaller --quant_delay")
        scale, zero_point = observer.qparams()
        name = f"t{len(self.tensors)}"
        # (a float32 number, as TFLite stores scales and the file's arithmetic takes them: int8.py)
        self.tensors[name] = {"scale": float(np.float32(scale.asnumpy())), "zero_point": int(zero_point.asnumpy())}
        if observer.num_bits != quant.ACT_BITS:  # (fewer levels: saturated at 2^bits - 1)
            self.tensors[name]["bits"] = observer.num_bits
        return name

    def _weights(self, name, cell, source):
        levels, scale, bias = quant.integer_weights(cell)
        weight = levels.asnumpy().astype(np.int8)
        self.arrays[f"{name}.weight"] = weight
        scale = scale.asnumpy().astype(np.float32)
        self.arrays[f"{name}.weight_scale"] = scale
        bits = cell.weight_quant.num_bits
        input_scale = np.float64(self.tensors[source]["scale"])
        bias = bias.asnumpy().astype(np.float64) / (input_scale * scale.astype(np.float64))
        # As many fraction bits as the int32 accumulator holds, up to self.bias_bits (int8.py checks the same bound).
        largest = (2 ** self.tensors[source].get("bits", 8) - 1) * 2 ** (bits - 1) * int(np.prod(weight.shape[1:]))
        fraction = self.bias_bits
        while fraction and (largest << fraction) + np.abs(bias).max() * 2 ** fraction >= 2 ** 31 - 1:
            fraction -= 1
        if not np.abs(bias).max() < 2 ** 31 - 1:  # (an int32 would wrap around, silently)
            raise cli.InputError(f"{name}'s bias reaches {np.abs(bias).max():.3g} times its accumulator's step (input "
                                 "scale x weight scale), beyond int32: the int8 file cannot hold this layer; its "
                                 "weights are nearly all zero, or the checkpoint is damaged")
        self.arrays[f"{name}.bias"] = np.round(bias * 2 ** fraction).astype(np.int32)
        node = {"weight": f"{name}.weight", "weight_scale": f"{name}.weight_scale", "bias": f"{name}.bias"}
        if fraction:
            node["bias_bits"] = fraction
        return node if bits == self.weight_bits else dict(node, weight_bits=bits)

    def input(self, net):
        out = self._tensor(net.conv1.input_quant)
        self.nodes.append({"op": "quantize", "input": "image", "output": out})
        return out

    def conv(self, unit, source):
        name = self.names[id(unit)]
        node = {"op": "conv", "name": name, "input": source, "stride": unit.conv.stride[0],
                "padding": unit.conv.padding if unit.conv.pad_mode == "pad" else 0, "relu": bool(unit.relu)}
        node.update(self._weights(name, unit, source))
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
        node.update(self._weights(name, cell, source))
        self.nodes.append(node)
