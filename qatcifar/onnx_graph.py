"""ONNX models of the ResNets for ONNX Runtime: the int8 file's graph in QDQ form, or a float32 network.

    >>> model = onnx_graph.from_int8(header, arrays, metadata)   # export.int8_model's output
    >>> model = onnx_graph.from_float(net, metadata)              # a float32 ResNet in eval mode
    >>> onnx.save(model, "resnet18.onnx")

QDQ form (ONNX's way to write a quantized model with standard operators): every tensor between
layers is a QuantizeLinear to uint8 with the int8 file's scale and zero point, followed by one
DequantizeLinear per consumer; weights are int8 initializers with per-channel scales behind a
DequantizeLinear, biases int32 initializers (scale: input scale x weight scale) behind another.
Weights beyond 7 bits (checkpoints trained with 8-bit weights), which ONNX Runtime's int8
kernels would sum wrongly on CPUs without VNNI, are stored as uint8 with zero point 128 instead:
the same numbers, run by its exact uint8 kernels (see ort_kernels.py).
ONNX Runtime fuses each DequantizeLinear -> Conv -> (Relu ->) QuantizeLinear into one integer
QLinearConv, an Add into QLinearAdd, the classifier into QGemm; only the input's quantization
and the logits are float. The numbers are the int8 file's, nothing is quantized a second time.

BatchNorm is folded into the convolutions in both forms. The batch dimension is dynamic; the
metadata (`metadata_props`) carries the normalization and the class names (as JSON), what the
model is and the checkpoint it came from (plain strings).
"""
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qatcifar import networks, ort_kernels, quant

OPSET = 13     # per-channel (axis) DequantizeLinear
IR_VERSION = 8  # what opset 13 needs: ONNX Runtime 1.10 (2021) and later read it
INPUT, OUTPUT = "image", "logits"


class Builder:
    """Nodes and initializers of one graph, with fresh names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def constant(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, output=None, **attributes):
        self.count += 1
        output = output or f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{op}_{self.count}", **attributes))
        return output

    def model(self, name, image_shape, num_classes, metadata):
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *image_shape])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", num_classes])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="export.py")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, {key: value if isinstance(value, str) else json.dumps(value)
                                       for key, value in metadata.items()})
        onnx.checker.check_model(model, full_check=True)
        return model


def from_int8(header, arrays, metadata):
    """The int8 model (int8.py's header and arrays) as a QDQ ONNX model."""
    b = Builder()
    for name, tensor in header["tensors"].items():
        b.constant(f"{name}.scale", np.float32(tensor["scale"]))
        b.constant(f"{name}.zero_point", np.uint8(tensor["zero_point"]))
    quantized = {}  # int8 file's tensor name -> its uint8 ONNX tensor

    def dequantize(name):  # one DequantizeLinear per consumer, the pattern ONNX Runtime fuses
        return b.node("DequantizeLinear", [quantized[name], f"{name}.scale", f"{name}.zero_point"])

    def requantize(value, name, relu):
        if relu:  # removed by ONNX Runtime where the zero point is 0, as after every ReLU here
            value = b.node("Relu", [value])
        quantized[name] = b.node("QuantizeLinear", [value, f"{name}.scale", f"{name}.zero_point"], output=name)

    def weights(node, source):
        if node.get("bias_bits"):  # (only models of activations below 8 bits have them: export refuses those)
            raise ValueError("an ONNX QLinearConv's bias has the scale input scale x weight scale, no fraction bits")
        weight, scale = arrays[node["weight"]], arrays[node["weight_scale"]]
        bias_scale = (np.float32(header["tensors"][source]["scale"]) * scale).astype(np.float32)
        weight, zero_point = stored_weight(weight)
        w = b.node("DequantizeLinear", [b.constant(node["weight"], weight), b.constant(node["weight_scale"], scale),
                                        b.constant(node["weight"] + ".zero_point", zero_point)], axis=0)
        bias = b.node("DequantizeLinear", [b.constant(node["bias"], arrays[node["bias"]]),
                                           b.constant(node["bias"] + ".scale", bias_scale),
                                           b.constant(node["bias"] + ".zero_point", np.zeros(len(scale), np.int32))],
                      axis=0)
        return w, bias

    for node in header["graph"]:
        op, out = node["op"], node["output"]
        if op == "quantize":
            requantize(INPUT, out, relu=False)
        elif op == "conv":
            k, stride, padding = arrays[node["weight"]].shape[-1], node["stride"], node["padding"]
            y = b.node("Conv", [dequantize(node["input"]), *weights(node, node["input"])], kernel_shape=[k, k],
                       strides=[stride, stride], pads=[padding] * 4)
            requantize(y, out, node["relu"])
        elif op == "add":
            requantize(b.node("Add", [dequantize(name) for name in node["inputs"]]), out, node["relu"])
        elif op == "mean":
            requantize(b.node("GlobalAveragePool", [dequantize(node["input"])]), out, relu=False)
            quantized[out] = b.node("Flatten", [quantized[out]])  # (uint8: only the shape changes)
        elif op == "dense":
            b.node("Gemm", [dequantize(node["input"]), *weights(node, node["input"])], output=OUTPUT, transB=1)
    return b.model(f"{header.get('arch', 'resnet18')}-int8-qdq", header["input_shape"], header["num_classes"], metadata)


def stored_weight(weight):
    """An int8 weight (out_channels, ...) as the model stores it, and its per-channel zero points: as it is, if
    ONNX Runtime multiplies it exactly on every CPU, else as uint8 plus 128 with zero point 128."""
    channels = len(weight)
    if ort_kernels.pairs_fit_16_bits(weight):
        return weight, np.zeros(channels, np.int8)
    return (weight.astype(np.int16) + 128).astype(np.uint8), np.full(channels, 128, np.uint8)


def uint8_weights(model):
    """The names of a model's weights stored as uint8 (stored_weight)."""
    return [t.name for t in model.graph.initializer if t.name.endswith(".weight") and t.data_type == TensorProto.UINT8]


def from_float(net, metadata):
    """A float32 ResNet (eval mode) as an ONNX model, BatchNorm folded into the convolutions."""
    graph = FloatGraph(net)
    networks.walk(net, graph)
    return graph.b.model(f"{net.arch}-float32", [3, 32, 32], net.fc.out_channels, metadata)


class FloatGraph:
    """networks.walk's calls as float ONNX nodes; initializers are named after the network's cells."""

    def __init__(self, net):
        self.b = Builder()
        self.names = {id(cell): name for name, cell in net.cells_and_names()}

    def input(self, net):
        return INPUT

    def conv(self, unit, source):
        weight, bias = (t.asnumpy() for t in quant.fold_batchnorm(unit.conv.weight, unit.bn))
        name, k = self.names[id(unit)], weight.shape[-1]
        padding = unit.conv.padding if unit.conv.pad_mode == "pad" else 0
        y = self.b.node("Conv", [source, self.b.constant(f"{name}.weight", weight),
                                 self.b.constant(f"{name}.bias", bias)],
                        kernel_shape=[k, k], strides=[unit.conv.stride[0]] * 2, pads=[padding] * 4)
        return self.b.node("Relu", [y]) if unit.relu else y

    def add(self, cell, sources):
        return self.b.node("Relu", [self.b.node("Add", sources)])

    def mean(self, source, fc):
        return self.b.node("Flatten", [self.b.node("GlobalAveragePool", [source])])

    def dense(self, fc, source):
        name = self.names[id(fc)]
        return self.b.node("Gemm", [source, self.b.constant(f"{name}.weight", fc.weight.asnumpy()),
                                    self.b.constant(f"{name}.bias", fc.bias.asnumpy())], output=OUTPUT, transB=1)
