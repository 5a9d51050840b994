"""Models for inference, whatever their file: a checkpoint, a MindIR graph, an int8 file or an ONNX model; and
predicting with them.

    >>> import inference
    >>> model = inference.load_model("checkpoints/resnet18_qat-40_1562.int8.npz")
    >>> logits = model.logits(images)      # normalized float32 (N, 3, 32, 32) -> (N, 10), numpy in and out
    >>> dataset = cifar.create_dataset("data/cifar-10-batches-bin", training=False, batch_size=100)
    >>> predictions, labels = inference.predict(model, dataset)

The format follows the file name: `.mindir` (MindSpore's graph, `export.py --format mindir`),
`.npz` (the int8 file, run by int8.py's integer reference), `.onnx` (run by ONNX Runtime on the
CPU, `export.py --format onnx`), else a MindSpore checkpoint. Bad input raises `cli.InputError`.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from qatcifar import cifar, cli, files, int8, ort_kernels
from qatcifar.archs import ARCHS

# MindSpore is imported where a checkpoint or a MindIR graph is loaded: int8 and ONNX models run without it.

INT8_CHUNK = 100  # images per call of the int8 reference, whatever the batch size
# The scales a QuantizeLinear or DequantizeLinear may have: activations and weights here lie far within +-1e4, so
# that no scale export.py writes comes near 1e3, and none is below 1e-12 (the observers' EPS is 1e-8).
QDQ_SCALES = (1e-12, 1e3)
MAX_ONNX_BYTES = 256 << 20  # a float32 ResNet-18 is 44.7 MB; ONNX Runtime would read any size into memory


@dataclass
class Model:
    logits: object           # normalized float32 images (N, 3, 32, 32) -> logits (N, classes), numpy arrays
    description: str         # what eval.py reports as `model`
    fixed_batch: int = None  # the batch size fixed in a MindIR graph (export.py --batch), else None
    class_names: list = None  # the names the model file carries (int8 and ONNX files), else None
    network: object = None    # a checkpoint's network in eval mode (what attacks differentiate), else None
    size: dict = None         # {"arch", "params", "macs"} of the network, where the file says (not MindIR), else None


def uses_mindspore(path):
    """Whether a model file runs in MindSpore (a checkpoint, a MindIR graph): ONNX Runtime and the int8 reference
    need neither MindSpore's device nor its context."""
    return not path.endswith((".onnx", ".npz"))


def load_model(path, threads=None):
    """A Model of a .ckpt, .mindir, int8 .npz or .onnx file; `threads`: ONNX Runtime's (default: its own)."""
    files.check_file(path)
    if threads and not path.endswith(".onnx"):
        raise cli.InputError(f"--threads sets ONNX Runtime's threads; {path} is not an .onnx model (leave it out)")
    if path.endswith(".onnx"):
        return load_onnx(path, threads)
    if path.endswith(".mindir"):
        return load_mindir(path)
    if path.endswith(".npz"):
        try:
            model = int8.load(path)
        except ValueError as e:
            raise cli.InputError(f"{path} is not an int8 model written by export.py ({e})") from None
        check_input(path, model["header"]["input_shape"], model["header"]["num_classes"],
                    model["header"].get("normalization"))
        return Model(lambda images: int8_logits(model, images), "int8 (integer inference)",
                     class_names=names_or_none(model["header"].get("class_names")), size=size_or_none(model["header"]))
    from qatcifar import checkpoint, networks, quant

    net, config = checkpoint.load_network(path, cifar.NUM_CLASSES)
    kind = checkpoint.kind(config)
    description = kind if kind == checkpoint.FLOAT32 else f"{checkpoint.QAT} (int8 fake-quant)"
    model = network_model(quant.freeze(net), description)
    model.network = net
    model.size = size_or_none(networks.profile(net))
    return model


def network_model(net, description, fixed_batch=None):
    """A Model of a MindSpore network or GraphCell; a short batch is padded to a fixed batch size."""
    import mindspore as ms

    def logits(images):
        count = len(images)
        if fixed_batch and count < fixed_batch:
            images = np.concatenate([images, np.zeros((fixed_batch - count,) + images.shape[1:], images.dtype)])
        return net(ms.Tensor(images)).asnumpy()[:count]
    return Model(logits, description, fixed_batch)


def int8_logits(model, images):
    """In chunks: the reference's im2col takes 4.7 MB per image."""
    return np.concatenate([int8.run(model, images[i:i + INT8_CHUNK]) for i in range(0, len(images), INT8_CHUNK)])


def names_or_none(names):
    """A model file's class names, if they are NUM_CLASSES short strings (files are read as untrusted), with the
    characters a terminal acts on escaped (cli.printable)."""
    ok = (isinstance(names, list) and len(names) == cifar.NUM_CLASSES
          and all(isinstance(name, str) and 0 < len(name) <= 100 for name in names))
    return [cli.printable(name) for name in names] if ok else None


def size_or_none(record):
    """{"arch", "params", "macs"} from what a model file says of its network, if it says it plainly (files are read
    as untrusted), else None."""
    if not isinstance(record, dict):
        return None
    size = {key: record.get(key) for key in ("arch", "params", "macs")}
    ok = (size["arch"] in ARCHS and all(type(size[key]) is int and 0 < size[key] < 1 << 40
                                                 for key in ("params", "macs")))
    return size if ok else None


def check_input(path, input_shape, classes, normalization):
    """An int8 or ONNX model must take this pipeline's images (shape and normalization) and give CIFAR-10's
    classes."""
    image = [3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE]
    expected = {"mean": list(cifar.CIFAR10_MEAN), "std": list(cifar.CIFAR10_STD)}
    if input_shape != image or classes != cifar.NUM_CLASSES or normalization != expected:
        raise cli.InputError(f"{path} is a model for other data: input {input_shape}, {classes} classes, "
                             f"normalization {normalization}; this toolkit feeds {image} CIFAR-10 images "
                             f"normalized with {expected} into {cifar.NUM_CLASSES} classes")


def load_onnx(path, threads=None):
    """An ONNX model of this toolkit's input, output and normalization, in an ONNX Runtime CPU session."""
    import onnxruntime as ort  # (here: the other formats do without it)

    if os.path.getsize(path) > MAX_ONNX_BYTES:
        raise cli.InputError(f"{path} is {os.path.getsize(path) / 1e6:.0f} MB, more than a ResNet-18 model "
                             f"({MAX_ONNX_BYTES >> 20} MiB at most); give an .onnx file written by export.py")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings (e.g. initializers also listed as inputs) are not the user's
    if threads:
        options.intra_op_num_threads = cap_threads(threads)
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own Fail, InvalidGraph, InvalidProtobuf, ... errors
        raise cli.InputError(f"{path} is not an ONNX model ONNX Runtime can load ({cli.first_line(e)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shapes = [[dim if isinstance(dim, int) else -1 for dim in value.shape] for value in inputs + outputs]
    if (len(inputs) != 1 or len(outputs) != 1 or inputs[0].type != "tensor(float)" or len(shapes[0]) != 4
            or len(shapes[1]) != 2):
        raise cli.InputError(f"{path} is an ONNX model of another network: inputs {shapes[:len(inputs)]}, outputs "
                             f"{shapes[len(inputs):]}; eval.py runs a batch of float images to class scores, "
                             "[batch, 3, 32, 32] -> [batch, 10]")
    metadata = {}  # lists and dicts are JSON (onnx_graph.py), strings themselves
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            metadata[key] = json.loads(value) if value[:1] in ("[", "{") else value
        except (ValueError, RecursionError):
            metadata[key] = value
    check_input(path, shapes[0][1:], shapes[1][-1], metadata.get("normalization"))
    check_onnx_weights(path)
    name, description = inputs[0].name, f"ONNX {metadata.get('model', '')} (ONNX Runtime)".replace("  ", " ")

    def logits(images):
        return session.run(None, {name: images})[0]
    model = Model(logits, description, class_names=names_or_none(metadata.get("class_names")),
                  size=size_or_none(metadata.get("network")))
    check_finite_output(path, model)
    return model


def cap_threads(threads):
    """At most one thread per CPU this process may use, with a warning: more only wait for each other (1,024 threads
    took 45 s for one image on 2 CPUs, 2 threads 2 s)."""
    cpus = len(os.sched_getaffinity(0))
    if threads > cpus:
        print(f"warning: --threads {threads} is more than the {cpus} CPUs this process may use; running {cpus}",
              file=sys.stderr)
    return min(threads, cpus)


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
    refuse_non_finite(path, weights)
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


def refuse_non_finite(path, weights):
    """InputError naming the first of the (name, array) `weights` whose floating-point values are not all finite."""
    for name, array in weights:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise cli.InputError(f"{path}: weight {name} holds values that are not finite (NaN or infinity); the "
                                 "file is damaged: export it again from its checkpoint")


def check_finite_output(path, model):
    """InputError if the model's class scores for a blank and a noise image are not finite (a weight not stored as
    an initializer, a constant, can still be damaged)."""
    shape = (3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE)
    images = np.stack([np.zeros(shape), np.random.default_rng(0).normal(size=shape)]).astype(np.float32)
    if not np.isfinite(model.logits(images)).all():
        raise cli.InputError(f"{path} gives class scores that are not finite (NaN or infinity) for a test image: the "
                             "file is damaged; export it again from its checkpoint")


def load_mindir(path):
    """A MindIR graph of this toolkit's input and output shapes, and the batch size fixed in it (None: any)."""
    import mindspore as ms
    import mindspore.nn as nn
    from mindspore.train import mind_ir_pb2

    proto, proto_dtype = mind_ir_pb2.ModelProto(), mind_ir_pb2.TensorProto.DataType
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        inputs = [list(tensor.dims) for value in proto.graph.input for tensor in value.tensor]
        outputs = [list(tensor.dims) for value in proto.graph.output for tensor in value.tensor]
    except Exception as e:  # protobuf raises several kinds of errors for a foreign file
        raise cli.InputError(f"{path} is not a MindIR file written by export.py ({type(e).__name__})") from None
    image = [3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE]
    if (len(inputs) != 1 or len(outputs) != 1 or inputs[0][1:] != image or outputs[0][1:] != [cifar.NUM_CLASSES]
            or inputs[0][0] != outputs[0][0] or not (inputs[0][0] == -1 or inputs[0][0] > 0)):
        raise cli.InputError(f"{path} is a MindIR of another network: inputs {inputs}, outputs {outputs}; eval.py "
                             f"runs a batch of {image} images to {cifar.NUM_CLASSES} class scores, "
                             "[batch, 3, 32, 32] -> [batch, 10] (-1: any batch size)")
    dtypes = {proto_dtype.FLOAT: np.float32, proto_dtype.FLOAT16: np.float16, proto_dtype.DOUBLE: np.float64}
    try:
        weights = [(tensor.name, np.frombuffer(tensor.raw_data, dtypes[tensor.data_type]))
                   for tensor in proto.graph.parameter if tensor.data_type in dtypes]
    except ValueError:  # (raw data of a size no whole number of values fills)
        raise cli.InputError(f"{path} is not a MindIR file written by export.py (a weight's data is cut)") from None
    refuse_non_finite(path, weights)
    try:
        with cli.mindspore_log_quiet():
            graph = nn.GraphCell(ms.load(path))
    except Exception as e:  # MindSpore raises RuntimeError, ValueError, ... with dozens of lines
        raise cli.InputError(f"{path} is not a MindIR file MindSpore can load ({cli.first_line(e)})") from None
    return network_model(graph, "MindIR", inputs[0][0] if inputs[0][0] > 0 else None)


def predict(model, dataset):
    """Predicted and true labels of the whole dataset, in dataset order. model: a Model, or a network in eval mode."""
    if not isinstance(model, Model):
        model = network_model(model, "network")
    predictions, labels = [], []
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    for images, batch_labels in cli.progress(batches, dataset.get_dataset_size(), "predicting"):
        predictions.append(model.logits(images).argmax(axis=1))
        labels.append(batch_labels)
    return np.concatenate(predictions), np.concatenate(labels)
