"""Models for inference, whatever their file: a checkpoint, a MindIR graph or an int8 file; and predicting with them.

    >>> import inference
    >>> model = inference.load_model("checkpoints/resnet18_qat-40_1562.int8.npz")
    >>> dataset = preprocess.create_dataset("data/cifar-10-batches-bin", training=False, batch_size=100)
    >>> predictions, labels = inference.predict(model, dataset)

The format follows the file name: `.mindir` (MindSpore's graph, `export.py --format mindir`),
`.npz` (the int8 file, run by int8.py's integer reference), else a MindSpore checkpoint. Bad
input raises `cli.InputError`.
"""
from dataclasses import dataclass

import mindspore as ms
import mindspore.nn as nn
import numpy as np
from mindspore.train import mind_ir_pb2

import checkpoint
import cli
import int8
import preprocess
import quant

INT8_CHUNK = 100  # images per call of the int8 reference, whatever the batch size


@dataclass
class Model:
    run: object              # a network or GraphCell (MindSpore tensors in and out), or an int8 model (a dict)
    description: str         # what eval.py reports as `model`
    fixed_batch: int = None  # the batch size fixed in a MindIR graph (export.py --batch), else None


def load_model(path):
    """A Model of a .ckpt, .mindir or int8 .npz file."""
    checkpoint.check_file(path)
    if path.endswith(".mindir"):
        return load_mindir(path)
    if path.endswith(".npz"):
        try:
            model = int8.load(path)
        except ValueError as e:
            raise cli.InputError(f"{path} is not an int8 model written by export.py ({e})") from None
        check_int8_input(path, model["header"])
        return Model(model, "int8 (integer inference)")
    net, config = checkpoint.load_network(path, preprocess.NUM_CLASSES)
    kind = checkpoint.kind(config)
    return Model(quant.freeze(net), kind if kind == checkpoint.FLOAT32 else f"{checkpoint.QAT} (int8 fake-quant)")


def check_int8_input(path, header):
    """The int8 file must take this pipeline's images (its shape and normalization) and give CIFAR-10's classes."""
    image = [3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE]
    normalization = header.get("normalization")
    expected = {"mean": list(preprocess.CIFAR10_MEAN), "std": list(preprocess.CIFAR10_STD)}
    classes = header["num_classes"]
    if header["input_shape"] != image or classes != preprocess.NUM_CLASSES or normalization != expected:
        raise cli.InputError(f"{path} is an int8 model for other data: input {header['input_shape']}, "
                             f"{classes} classes, normalization {normalization}; this toolkit feeds "
                             f"{image} CIFAR-10 images normalized with {expected} into {preprocess.NUM_CLASSES} "
                             "classes")


def load_mindir(path):
    """A MindIR graph of this toolkit's input and output shapes, and the batch size fixed in it (None: any)."""
    proto = mind_ir_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        inputs = [list(tensor.dims) for value in proto.graph.input for tensor in value.tensor]
        outputs = [list(tensor.dims) for value in proto.graph.output for tensor in value.tensor]
    except Exception as e:  # protobuf raises several kinds of errors for a foreign file
        raise cli.InputError(f"{path} is not a MindIR file written by export.py ({type(e).__name__})") from None
    image = [3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE]
    if (len(inputs) != 1 or len(outputs) != 1 or inputs[0][1:] != image or outputs[0][1:] != [preprocess.NUM_CLASSES]
            or inputs[0][0] != outputs[0][0] or not (inputs[0][0] == -1 or inputs[0][0] > 0)):
        raise cli.InputError(f"{path} is a MindIR of another network: inputs {inputs}, outputs {outputs}; eval.py "
                             f"runs a batch of {image} images to {preprocess.NUM_CLASSES} class scores, "
                             "[batch, 3, 32, 32] -> [batch, 10] (-1: any batch size)")
    try:
        with cli.mindspore_log_quiet():
            graph = nn.GraphCell(ms.load(path))
    except Exception as e:  # MindSpore raises RuntimeError, ValueError, ... with dozens of lines
        raise cli.InputError(f"{path} is not a MindIR file MindSpore can load ({cli.first_line(e)})") from None
    return Model(graph, "MindIR", inputs[0][0] if inputs[0][0] > 0 else None)


def predict(model, dataset):
    """Predicted and true labels of the whole dataset, in dataset order.

    model: a Model, or a network in eval mode. A last, short batch is padded to a MindIR graph's fixed batch.
    """
    if not isinstance(model, Model):
        model = Model(model, "network")
    predictions, labels = [], []
    for images, batch_labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        count = len(images)
        if isinstance(model.run, dict):  # in chunks: the reference's im2col takes 4.7 MB per image
            logits = np.concatenate([int8.run(model.run, images[i:i + INT8_CHUNK])
                                     for i in range(0, count, INT8_CHUNK)])
        else:
            if model.fixed_batch and count < model.fixed_batch:
                padding = np.zeros((model.fixed_batch - count,) + images.shape[1:], images.dtype)
                images = np.concatenate([images, padding])
            logits = model.run(ms.Tensor(images)).asnumpy()
        predictions.append(logits[:count].argmax(axis=1))
        labels.append(batch_labels)
    return np.concatenate(predictions), np.concatenate(labels)
