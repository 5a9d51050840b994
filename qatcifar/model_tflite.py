"""TFLite models (`.tflite`, export.py --format tflite) run by LiteRT on the CPU (inference.py's interface).

The file is read as untrusted before LiteRT sees it: a flatbuffer of TFLite's schema (its identifier, a parse of
the whole model), one subgraph of the operators export.py writes, int8 or INT4 weights (no float32 weights), one
image input of this pipeline's shape (NHWC, float32 or int8) and one output of its classes, and the metadata
entry export.py writes (the normalization, the class names). Images come in NCHW as everywhere in the toolkit
and are transposed here; an int8 input is quantized as TFLite's QUANTIZE would, int8 logits dequantized.
"""
import json
import os
import re
import sys

import numpy as np

from qatcifar import cifar, cli, inference, int8, tflite_graph

MINDSPORE, THREADS = False, True
MAX_BYTES = 64 << 20  # an int8 ResNet-18 is 11 MB
OPERATORS = {"QUANTIZE", "PAD", "CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "DEQUANTIZE"}
WEIGHT_TYPES = {"INT8", "INT4", "INT32"}  # constant tensors: weights, biases, paddings and axes


def interpreter(content, threads=None):
    from ai_edge_litert.interpreter import Interpreter  # (here: the other formats do without it)

    with cli.native_quiet():  # (LiteRT logs an INFO line on its CPU delegate)
        running = Interpreter(model_content=content, num_threads=threads or None)
        running.allocate_tensors()
    return running


def runner(path, threads=None):
    with open(path, "rb") as f:
        return logits_function(interpreter(f.read(), threads))


def logits_function(running):
    """logits(images) of a LiteRT interpreter of export.py's model: NCHW float32 in, float32 logits out."""
    source, target = running.get_input_details()[0], running.get_output_details()[0]
    batch = [None]

    def logits(images):
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        if source["dtype"] == np.int8:  # (as its QUANTIZE does: float32 division, halves away from zero)
            scale, zero_point = source["quantization"]
            levels = int8.round_half_away(images / np.float32(scale)) + zero_point
            images = np.clip(levels, -128, 127).astype(np.int8)
        if batch[0] != len(images):
            running.resize_tensor_input(source["index"], [len(images), *images.shape[1:]])
            with cli.native_quiet():
                running.allocate_tensors()
            batch[0] = len(images)
        running.set_tensor(source["index"], images)
        running.invoke()
        out = running.get_tensor(target["index"])
        if target["dtype"] == np.int8:
            scale, zero_point = target["quantization"]
            out = (out.astype(np.float32) - zero_point) * np.float32(scale)
        return out.astype(np.float32)
    return logits


def micro_arena(content, arena=16 << 20):
    """The bytes of tensor arena TensorFlow Lite Micro's interpreter allocates for the model and one inference (its
    allocation report, RecordingMicroAllocator's total): what a microcontroller must set aside besides the model."""
    import tempfile

    from tflite_micro.python.tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(content, arena_size=arena)
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    interpreter.invoke()
    with tempfile.TemporaryFile("w+") as report:  # (it prints to file descriptor 2)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(report.fileno(), 2)
        try:
            interpreter.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        report.seek(0)
        found = re.search(r"Arena allocation total (\d+) bytes", report.read())
    if not found:
        raise ValueError("TensorFlow Lite Micro printed no allocation report")
    return int(found[1])


def read_model(path):
    """The file's bytes and its schema object (ModelT); InputError for a file that is not a TFLite flatbuffer."""
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise cli.InputError(f"{path} is {size / 1e6:.0f} MB, more than an int8 ResNet-18 model "
                             f"({MAX_BYTES >> 20} MiB at most); give a .tflite file written by export.py")
    with open(path, "rb") as f:
        content = f.read()
    fb = tflite_graph.schema()
    if len(content) < 8 or not fb.Model.ModelBufferHasIdentifier(content, 0):
        raise cli.InputError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier); give a .tflite file "
                             "written by export.py")
    try:
        model = fb.ModelT.InitFromObj(fb.Model.GetRootAs(content, 0))
    except Exception as e:  # (a cut or forged flatbuffer raises struct.error, IndexError, ... from anywhere in it)
        raise cli.InputError(f"{path} is a damaged TFLite model ({type(e).__name__}: {cli.first_line(e)}); export "
                             "it again from its checkpoint") from None
    return content, model


def describe(model):
    """What export.py's metadata entry says (a dict), else {}."""
    for entry in model.metadata or []:
        if entry.name == tflite_graph.METADATA.encode() and 0 <= entry.buffer < len(model.buffers or []):
            data = model.buffers[entry.buffer].data
            try:
                found = json.loads(bytes(bytearray(data if data is not None else [])).decode())
            except (ValueError, RecursionError):
                return {}
            return found if isinstance(found, dict) else {}
    return {}


def check_graph(path, model):
    """InputError unless the model is one subgraph of export.py's operators and weight types, from one image to the
    classes."""
    fb = tflite_graph.schema()
    names = {value: name for name, value in vars(fb.BuiltinOperator).items() if not name.startswith("_")}
    types = {value: name for name, value in vars(fb.TensorType).items() if not name.startswith("_")}
    if len(model.subgraphs or []) != 1:
        raise cli.InputError(f"{path} has {len(model.subgraphs or [])} subgraphs; export.py writes one")
    graph, codes = model.subgraphs[0], model.operatorCodes or []
    for operator in graph.operators or []:
        if not 0 <= operator.opcodeIndex < len(codes):
            raise cli.InputError(f"{path} is a damaged TFLite model (an operator code out of range)")
        code = codes[operator.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "a custom operator")
        if name not in OPERATORS:
            raise cli.InputError(f"{path} holds {name}, an operator export.py does not write (it writes "
                                 f"{', '.join(sorted(OPERATORS))}); give a .tflite file written by export.py")
    tensors = graph.tensors or []
    for tensor in tensors:
        if 0 < tensor.buffer < len(model.buffers or []) and model.buffers[tensor.buffer].data is not None:
            kind = types.get(tensor.type, str(tensor.type))
            if kind not in WEIGHT_TYPES:
                raise cli.InputError(f"{path}: weight {tensor.name.decode(errors='replace')} is {kind}, not int8; "
                                     "this toolkit runs fully-int8 models: export the checkpoint with --format tflite")
    ends = [[tensors[i] for i in indices if 0 <= i < len(tensors)] for indices in (graph.inputs, graph.outputs)]
    shapes = [[list(tensor.shape) if tensor.shape is not None else [] for tensor in end] for end in ends]
    image = [cifar.IMAGE_SIZE, cifar.IMAGE_SIZE, 3]
    if (len(ends[0]) != 1 or len(ends[1]) != 1 or len(shapes[0][0]) != 4 or shapes[0][0][1:] != image
            or len(shapes[1][0]) != 2 or shapes[1][0][1] != cifar.NUM_CLASSES
            or any(types.get(tensor.type) not in ("FLOAT32", "INT8") for tensor in ends[0] + ends[1])):
        raise cli.InputError(f"{path} is a TFLite model of another network: inputs {shapes[0]}, outputs {shapes[1]}; "
                             f"eval.py runs a batch of [batch, {', '.join(map(str, image))}] float32 or int8 images "
                             f"to [batch, {cifar.NUM_CLASSES}] class scores")


def load(path, threads=None):
    content, model = read_model(path)
    check_graph(path, model)
    metadata = describe(model)
    inference.check_input(path, metadata.get("input_shape"), cifar.NUM_CLASSES, metadata.get("normalization"))
    try:
        running = interpreter(content, threads and inference.cap_threads(threads))
    except Exception as e:  # LiteRT raises ValueError and RuntimeError with its kernels' messages
        raise cli.InputError(f"{path} is not a TFLite model LiteRT can run ({cli.first_line(e)})") from None
    description = f"{metadata.get('model') or 'TFLite'} (LiteRT)"
    result = inference.Model(logits_function(running), description,
                             class_names=inference.names_or_none(metadata.get("class_names")),
                             size=inference.size_or_none(metadata.get("network")))
    inference.check_finite_output(path, result)
    return result
