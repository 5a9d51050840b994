"""Models for inference, whatever their file, and predicting with them.

    >>> import inference
    >>> model = inference.load_model("checkpoints/resnet18_qat-40_1562.int8.npz")
    >>> logits = model.logits(images)      # normalized float32 (N, 3, 32, 32) -> (N, 10), numpy in and out
    >>> dataset = cifar.create_dataset("data/cifar-10-batches-bin", training=False, batch_size=100)
    >>> predictions, labels = inference.predict(model, dataset)

One module per format, picked by the file's suffix (FORMATS): `model_checkpoint` (a MindSpore
checkpoint, any other suffix), `model_mindir` (`.mindir`, MindSpore's graph), `model_int8` (`.npz`,
the int8 file run by int8.py's integer reference), `model_onnx` (`.onnx`, ONNX Runtime on the CPU),
`model_tflite` (`.tflite`, LiteRT) and `model_c` (a folder: export.py's C, built for this machine). Each
has the same small interface:

    MINDSPORE        whether it runs in MindSpore (the command then sets up its device)
    THREADS          whether --threads sets its runtime's threads
    load(path, threads=None) -> Model     the file checked (cli.InputError, one line, for a foreign or
                                          damaged file), its runtime ready: Model.logits runs a batch,
                                          Model.class_names are the names it carries
    runner(path, threads) -> logits(images)   the runtime alone, unchecked (latency.py times it)

The checks several formats share are here: input shape, classes and normalization, class names, what a
file says of its network, finite weights and scores. A new format is one more module and one FORMATS entry.
"""
import importlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from qatcifar import cifar, cli, files
from qatcifar.archs import ARCHS

# A format's module is imported when a file of that format is loaded: each needs its own runtime only.
FORMATS = {".onnx": "model_onnx", ".mindir": "model_mindir", ".npz": "model_int8", ".tflite": "model_tflite"}
OTHER = "model_checkpoint"  # any other suffix: a MindSpore checkpoint
FOLDER = "model_c"  # a folder: export.py's C


@dataclass
class Model:
    logits: object           # normalized float32 images (N, 3, 32, 32) -> logits (N, classes), numpy arrays
    description: str         # what eval.py reports as `model`
    fixed_batch: int = None  # the batch size fixed in a MindIR graph (export.py --batch), else None
    class_names: list = None  # the names the model file carries (int8, ONNX and TFLite files), else None
    network: object = None    # a checkpoint's network in eval mode (what attacks differentiate), else None
    size: dict = None         # {"arch", "params", "macs"} of the network, where the file says (not MindIR), else None


def format_module(path):
    """The module of the model file's format (by its suffix; a folder's: FOLDER)."""
    suffix = next((suffix for suffix in FORMATS if path.endswith(suffix)), None)
    return importlib.import_module(f"qatcifar.{FOLDER if os.path.isdir(path) else FORMATS.get(suffix, OTHER)}")


def is_checkpoint(path):
    """Whether a model file is a MindSpore checkpoint (any other suffix, not a folder): the one format with
    gradients, which attacks need."""
    return not os.path.isdir(path) and not any(path.endswith(suffix) for suffix in FORMATS)


def uses_mindspore(path):
    """Whether a model file runs in MindSpore (a checkpoint, a MindIR graph): the other runtimes need neither
    MindSpore's device nor its context."""
    suffix = next((suffix for suffix in FORMATS if path.endswith(suffix)), None)
    return suffix in (None, ".mindir") and not os.path.isdir(path)


def load_model(path, threads=None):
    """A Model of a model file (see FORMATS) or C folder; `threads`: its runtime's, where it takes them (default: its
    own)."""
    if not os.path.isdir(path):
        files.check_file(path)
    module = format_module(path)
    if threads and not module.THREADS:
        raise cli.InputError(f"--threads sets ONNX Runtime's and LiteRT's threads; {path} is neither an .onnx nor a "
                             ".tflite model (leave it out)")
    return module.load(path, threads)


def runner(path, threads=None):
    """logits(images) of a model file's runtime alone, without the checks of load_model (latency.py)."""
    return format_module(path).runner(path, threads)


def network_model(net, description, fixed_batch=None):
    """A Model of a MindSpore network or GraphCell; a short batch is padded to a fixed batch size."""
    import mindspore as ms

    def logits(images):
        count = len(images)
        if fixed_batch and count < fixed_batch:
            images = np.concatenate([images, np.zeros((fixed_batch - count,) + images.shape[1:], images.dtype)])
        return net(ms.Tensor(images)).asnumpy()[:count]
    return Model(logits, description, fixed_batch)


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


def cap_threads(threads):
    """At most one thread per CPU this process may use, with a warning: more only wait for each other (1,024 threads
    took 45 s for one image on 2 CPUs, 2 threads 2 s)."""
    cpus = len(os.sched_getaffinity(0))
    if threads > cpus:
        print(f"warning: --threads {threads} is more than the {cpus} CPUs this process may use; running {cpus}",
              file=sys.stderr)
    return min(threads, cpus)


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
