"""ONNX models (`.onnx`, export.py --format onnx) in an ONNX Runtime CPU session (inference.py's interface)."""
import json
import os
import sys

import numpy as np

from qatcifar import cli, inference, ort_kernels

MINDSPORE, THREADS = False, True
# The scales a QuantizeLinear or DequantizeLinear may have: activations and weights here lie far within +-1e4, so
# that no scale export.py writes comes near 1e3, and none is below 1e-12 (the observers' EPS is 1e-8).
QDQ_SCALES = (1e-12, 1e3)
MAX_ONNX_BYTES = 256 << 20  # a float32 ResNet-18 is 44.7 MB; ONNX Runtime would read any size into memory


def session(path, threads=None):
    import onnxruntime as ort  # (here: the other formats do without it)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings (e.g. initializers also listed as inputs) are not the user's
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def runner(path, threads=None):
    running = session(path, threads)
    name = running.get_inputs()[0].name
    return lambda images: running.run(None, {name: images})[0]


def load(path, threads=None):
    """An ONNX model of this toolkit's input, output and normalization, in an ONNX Runtime CPU session."""
    if os.path.getsize(path) > MAX_ONNX_BYTES:
        raise cli.InputError(f"{path} is {os.path.getsize(path) / 1e6:.0f} MB, more than a ResNet-18 model "
                             f"({MAX_ONNX_BYTES >> 20} MiB at most); give an .onnx file written by export.py")
    try:
        running = session(path, threads and inference.cap_threads(threads))
    except Exception as e:  # ONNX Runtime raises its own Fail, InvalidGraph, InvalidProtobuf, ... errors
        raise cli.InputError(f"{path} is not an ONNX model ONNX Runtime can load ({cli.first_line(e)})") from None
    inputs, outputs = running.get_inputs(), running.get_outputs()
    shapes = [[dim if isinstance(dim, int) else -1 for dim in value.shape] for value in inputs + outputs]
    if (len(inputs) != 1 or len(outputs) != 1 or inputs[0].type != "tensor(float)" or len(shapes[0]) != 4
            or len(shapes[1]) != 2):
        raise cli.InputError(f"{path} is an ONNX model of another network: inputs {shapes[:len(inputs)]}, outputs "
                             f"{shapes[len(inputs):]}; eval.py runs a batch of float images to class scores, "
                             "[batch, 3, 32, 32] -> [batch, 10]")
    metadata = {}  # lists and dicts are JSON (onnx_graph.py), strings themselves
    for key, value in running.get_modelmeta().custom_metadata_map.items():
        try:
            metadata[key] = json.loads(value) if value[:1] in ("[", "{") else value
        except (ValueError, RecursionError):
            metadata[key] = value
    inference.check_input(path, shapes[0][1:], shapes[1][-1], metadata.get("normalization"))
    check_onnx_weights(path)
    name, description = inputs[0].name, f"ONNX {metadata.get('model', '')} (ONNX Runtime)".replace("  ", " ")

    def logits(images):
        return running.run(None, {name: images})[0]
    model = inference.Model(logits, description, class_names=inference.names_or_none(metadata.get("class_names")),
                  size=inference.size_or_none(metadata.get("network")))
    inference.check_finite_output(path, model)
    return model


def check_onnx_weights(path):
    """InputError for weights that are not finite; one warning line if ONNX Runtime on this CPU sums the model's
    integer products wrongly (ort_kernels.py): int8 weights beyond 7 bits, from an export.py older than 7-bit QAT, on
    a CPU without VNNI."""
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(path, load_external_data=False)
        weights = [(tensor.name, numpy_helper.to_array(tensor)) for tensor in proto.graph.initializer]
    except Exception:  # (a model ONNX Runtime loads but onnx does not read whole: it has no weights to judge here)
        return
    inference.refuse_non_finite(path, weights)
    check_scales(path, proto, dict(weights))
    inexact = ort_kernels.inexact_weights(proto)
    if inexact and not ort_kernels.probe():
        print(f"warning: {path} has int8 weights beyond 7 bits ({len(inexact)} layers), and ONNX Runtime's integer "
              "kernels on this CPU add pairs of their products in 16 bits, where these overflow: its answers can "
              "differ from the int8 model's; export the checkpoint again with export.py, which stores such weights "
              "so that every CPU computes them exactly", file=sys.stderr)


def check_scales(path, proto, weights):
    """InputError for a QuantizeLinear or DequantizeLinear whose scale (an initializer among `weights`, {name: array})
    is not within QDQ_SCALES: 0 or below divides by nothing, and a scale of 1e30 quantizes every image to its zero
    point."""
    low, high = QDQ_SCALES
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            scale = np.asarray(weights.get(node.input[1], 1.0), np.float64).reshape(-1)
            bad = scale[~((scale >= low) & (scale <= high))]  # (NaN too)
            if bad.size:
                raise cli.InputError(f"{path}: {node.op_type} {node.name or node.output[0]} has scale {bad[0]:g}, "
                                     f"not within [{low:g}, {high:g}]; the file is damaged: export it again from its "
                                     "checkpoint")
