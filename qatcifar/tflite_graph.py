"""TFLite models of the int8 file: fully-int8 flatbuffers that LiteRT and TensorFlow Lite Micro run with the int8
reference's numbers (file version 3, whose arithmetic is TFLite's: int8.py).

    >>> model = tflite_graph.from_int8(header, arrays, metadata, logits_range=(-8.0, 15.0))
    >>> open("resnet8.tflite", "wb").write(model)

Built with the `flatbuffers` package and TFLite's schema as TensorFlow Lite Micro's package generates it (no
TensorFlow). The mapping, tensor by tensor (docs/deployment.md#tflite):

- activations: int8 NHWC tensors, the int8 file's uint8 values and zero points shifted by 128 (the same real
  numbers, the same scales);
- a convolution: CONV_2D with per-channel symmetric int8 weights (OHWI; 4-bit weights as TFLite's INT4, two to a
  byte, where both runtimes take them), an int32 bias at input scale x weight scale, ReLU fused; a padding that
  TFLite's SAME places otherwise (stride 2) is an explicit PAD of the zero point before a VALID convolution;
- a residual addition: ADD with ReLU fused; the pooling: MEAN over height and width;
- the classifier: FULLY_CONNECTED with per-channel weights to int8 logits, whose scale and zero point cover
  `logits_range` (the int8 file's logits are float; export.py measures their range), then DEQUANTIZE to float32.

The input is a float32 image (normalized, NHWC) quantized by a QUANTIZE op, or with `int8_input` the int8 image
itself (and int8 logits out), as firmware feeds it. The batch dimension is 1, resizable (shape_signature -1).
The metadata entry METADATA holds the class names, the normalization and the int8 tensors' names as JSON;
the description says what the model is.
"""
import json

import flatbuffers
import numpy as np

from qatcifar import int8

METADATA = "qatcifar"  # the name of the model's metadata entry (a JSON document)
SCHEMA_VERSION = 3
# Operator versions as TFLite numbers them for int8 kernels (a runtime registers a range of versions per operator).
OPS = {"QUANTIZE": 2, "PAD": 2, "CONV_2D": 3, "ADD": 2, "MEAN": 2, "FULLY_CONNECTED": 4, "DEQUANTIZE": 2}
# The versions that take INT4 weights: TFLite Micro's FULLY_CONNECTED refuses them with int8 inputs, so the classifier
# keeps its 4-bit values in int8 (640 bytes in ResNet-8).
INT4_OPS = {"conv": 7}


def schema():
    """TFLite's generated schema module (tflite-micro's package ships it: imported only to write or read .tflite)."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


class Refused(ValueError):
    """A model the format cannot hold; the message says why."""


def check(header):
    """Refused unless the int8 file's arithmetic is TFLite's, its activations have 8 bits and no bias has fraction
    bits (a TFLite bias is an integer multiple of input scale x weight scale), and each addition has two inputs."""
    if not int8.tflite_arithmetic(header):
        raise Refused(f"it is an int8 file of version {header.get('version')}, whose arithmetic is not TFLite's; "
                      "export it again from its checkpoint")
    if any(tensor.get("bits", 8) != 8 for tensor in header["tensors"].values()):
        raise Refused("its activations have fewer than 8 bits, which a TFLite int8 tensor cannot hold: it saturates "
                      "at 127, not below")
    if any(node.get("bias_bits") for node in header["graph"]):
        raise Refused("its biases have fraction bits (bias_bits), which a TFLite int32 bias cannot hold")
    if any(node["op"] == "add" and len(node["inputs"]) != 2 for node in header["graph"]):
        raise Refused("an addition has more than two inputs; TFLite's ADD takes two")


def logits_quantization(low, high):
    """The int8 scale and zero point of logits from `low` to `high` (widened to include 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = float(np.float32(max(high - low, 1e-6) / 255))
    return scale, int(np.clip(np.round(-128 - low / scale), -128, 127))


class Builder:
    """Tensors, buffers and operators of one subgraph."""

    def __init__(self):
        self.fb = schema()
        self.tensors, self.buffers, self.operators, self.codes = [], [self.fb.BufferT()], [], []

    def tensor(self, name, shape, dtype, scale=None, zero_point=None, data=None, axis=0):
        tensor = self.fb.TensorT()
        tensor.name, tensor.shape, tensor.type = name, list(shape), getattr(self.fb.TensorType, dtype)
        if shape and shape[0] == 1 and data is None:
            tensor.shapeSignature = [-1, *shape[1:]]
        if scale is not None:
            quantization = self.fb.QuantizationParametersT()
            quantization.scale = [float(value) for value in np.atleast_1d(scale)]
            quantization.zeroPoint = [int(value) for value in np.atleast_1d(zero_point)]
            quantization.quantizedDimension = axis
            tensor.quantization = quantization
        tensor.buffer = 0
        if data is not None:
            buffer = self.fb.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def operator(self, op, inputs, outputs, options=None, version=None):
        code = getattr(self.fb.BuiltinOperator, op)
        key = (code, version or OPS[op])
        if key not in self.codes:
            self.codes.append(key)
        operator = self.fb.OperatorT()
        operator.opcodeIndex, operator.inputs, operator.outputs = self.codes.index(key), inputs, outputs
        if options is not None:
            operator.builtinOptionsType = getattr(self.fb.BuiltinOptions, type(options).__name__[:-1])
            operator.builtinOptions = options
        self.operators.append(operator)

    def model(self, inputs, outputs, description, metadata):
        fb = self.fb
        subgraph = fb.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs = self.tensors, inputs, outputs
        subgraph.operators, subgraph.name = self.operators, "main"
        model = fb.ModelT()
        model.version, model.description, model.subgraphs = SCHEMA_VERSION, description, [subgraph]
        model.operatorCodes = []
        for code, version in self.codes:
            operator_code = fb.OperatorCodeT()
            operator_code.builtinCode, operator_code.deprecatedBuiltinCode = code, min(code, 127)
            operator_code.version = version
            model.operatorCodes.append(operator_code)
        buffer = fb.BufferT()
        buffer.data = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
        self.buffers.append(buffer)
        entry = fb.MetadataT()
        entry.name, entry.buffer = METADATA, len(self.buffers) - 1
        model.buffers, model.metadata = self.buffers, [entry]
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def from_int8(header, arrays, metadata, logits_range, int8_input=False):
    """The .tflite bytes of the int8 file (int8.load's header and arrays, version 3, `check`ed); `metadata`: what
    the file carries besides (int8_export.metadata)."""
    check(header)
    fb, graph = schema(), Builder()
    tensors, made, shapes = header["tensors"], {}, {}
    bits = header.get("weight_bits", 8)

    def activation(name, shape):
        tensor = tensors[name]
        made[name] = graph.tensor(name, shape, "INT8", np.float32(tensor["scale"]), tensor["zero_point"] - 128)
        shapes[name] = shape
        return made[name]

    def weights(node, layout):
        weight = arrays[node["weight"]].transpose(layout) if layout else arrays[node["weight"]]
        scale = arrays[node["weight_scale"]]
        four = node.get("weight_bits", bits) <= int8.PACKED_BITS and node["op"] in INT4_OPS
        data = int8.pack(weight) if four else weight.astype(np.int8)
        source = tensors[node["input"]]
        index = graph.tensor(f"{node['name']}.weight", weight.shape, "INT4" if four else "INT8", scale,
                             np.zeros(len(scale), np.int64), data)
        bias_scale = np.float32(source["scale"]) * scale.astype(np.float64)
        bias = graph.tensor(f"{node['name']}.bias", [len(scale)], "INT32", bias_scale.astype(np.float32),
                            np.zeros(len(scale), np.int64), arrays[node["bias"]].astype("<i4"))
        return index, bias, four

    image = header["input_shape"]
    first = header["graph"][0]["output"]
    if int8_input:
        inputs = [activation(first, [1, image[1], image[2], image[0]])]
    else:
        inputs = [graph.tensor("image", [1, image[1], image[2], image[0]], "FLOAT32")]
        graph.operator("QUANTIZE", inputs, [activation(first, [1, image[1], image[2], image[0]])])
    relu = {True: fb.ActivationFunctionType.RELU, False: fb.ActivationFunctionType.NONE}
    for node in header["graph"][1:]:
        op = node["op"]
        if op == "conv":
            weight, bias, four = weights(node, (0, 2, 3, 1))
            _, height, width, _ = shapes[node["input"]]
            k, stride, padding = arrays[node["weight"]].shape[2], node["stride"], node["padding"]
            out_shape = [1, (height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1,
                         arrays[node["weight"]].shape[0]]
            source = made[node["input"]]
            options = fb.Conv2DOptionsT()
            options.strideH = options.strideW = stride
            options.fusedActivationFunction = relu[node["relu"]]
            same = stride == 1 and 2 * padding == k - 1
            options.padding = fb.Padding.SAME if same else fb.Padding.VALID
            if padding and not same:  # (the zero point's level: real zero, as the reference pads)
                pads = graph.tensor(f"{node['name']}.pads", [4, 2], "INT32",
                                    data=np.array([[0, 0], [padding] * 2, [padding] * 2, [0, 0]], "<i4"))
                shape = [1, height + 2 * padding, width + 2 * padding, shapes[node["input"]][3]]
                tensor = tensors[node["input"]]
                padded = graph.tensor(f"{node['name']}.padded", shape, "INT8", np.float32(tensor["scale"]),
                                      tensor["zero_point"] - 128)
                graph.operator("PAD", [source, pads], [padded])
                source = padded
            graph.operator("CONV_2D", [source, weight, bias], [activation(node["output"], out_shape)], options,
                           INT4_OPS["conv"] if four else None)
        elif op == "add":
            options = fb.AddOptionsT()
            options.fusedActivationFunction = relu[node["relu"]]
            graph.operator("ADD", [made[name] for name in node["inputs"]],
                           [activation(node["output"], shapes[node["inputs"][0]])], options)
        elif op == "mean":
            axes = graph.tensor(f"{node['output']}.axes", [2], "INT32", data=np.array([1, 2], "<i4"))
            options = fb.ReducerOptionsT()
            options.keepDims = False
            channels = shapes[node["input"]][3]
            graph.operator("MEAN", [made[node["input"]], axes], [activation(node["output"], [1, channels])], options)
        elif op == "dense":
            weight, bias, four = weights(node, None)
            scale, zero_point = logits_quantization(*logits_range)
            classes = arrays[node["weight"]].shape[0]
            logits = graph.tensor("logits.int8" if not int8_input else "logits", [1, classes], "INT8", scale,
                                  zero_point)
            options = fb.FullyConnectedOptionsT()
            options.fusedActivationFunction = fb.ActivationFunctionType.NONE
            graph.operator("FULLY_CONNECTED", [made[node["input"]], weight, bias], [logits], options)
            outputs = [logits]
            if not int8_input:
                outputs = [graph.tensor("logits", [1, classes], "FLOAT32")]
                graph.operator("DEQUANTIZE", [logits], outputs)
    described = dict(metadata, input="int8 NHWC image" if int8_input else "float32 NHWC image, normalized",
                     tensors={name: index for name, index in made.items()}, input_shape=image)
    description = f"{metadata.get('model', 'int8')} ResNet ({metadata.get('source', '')}), by export.py"
    return graph.model(inputs, outputs, description, described)
