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


@dataclass
class Model:
    run: object              # a network or GraphCell (MindSpore tensors in and out), or an int8 model (a dict)
    description: str         # what eval.py reports as `model`
    fixed_batch: int = None  # the batch size a MindIR graph was exported with


def load_model(path):
    """A Model of a .ckpt, .mindir or int8 .npz file."""
    checkpoint.check_file(path)
    if path.endswith(".mindir"):
        return load_mindir(path)
    if path.endswith(".npz"):
        try:
            return Model(int8.load(path), "int8 (integer inference)")
        except ValueError as e:
            raise cli.InputError(f"{path} is not an int8 model written by export.py ({e})") from None
    net, config = checkpoint.load_network(path, preprocess.NUM_CLASSES)
    kind = checkpoint.kind(config)
    return Model(quant.freeze(net), kind if kind == checkpoint.FLOAT32 else f"{checkpoint.QAT} (int8 fake-quant)")


def load_mindir(path):
    """A MindIR graph and the batch size fixed in it (other batch sizes would run, but wrongly)."""
    proto = mind_ir_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        batch_size = int(proto.graph.input[0].tensor[0].dims[0])
        graph = nn.GraphCell(ms.load(path))
    except Exception as e:  # protobuf and MindSpore raise several kinds of errors for a foreign file
        raise cli.InputError(f"{path} is not a MindIR file written by export.py ({type(e).__name__})") from None
    return Model(graph, "MindIR", batch_size)


def predict(model, dataset):
    """Predicted and true labels of the whole dataset, in dataset order.

    model: a Model, or a network in eval mode. A last, short batch is padded to a MindIR graph's fixed batch.
    """
    if not isinstance(model, Model):
        model = Model(model, "network")
    predictions, labels = [], []
    for images, batch_labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        count = len(images)
        if isinstance(model.run, dict):
            logits = int8.run(model.run, images)
        else:
            if model.fixed_batch and count < model.fixed_batch:
                padding = np.zeros((model.fixed_batch - count,) + images.shape[1:], images.dtype)
                images = np.concatenate([images, padding])
            logits = model.run(ms.Tensor(images)).asnumpy()
        predictions.append(logits[:count].argmax(axis=1))
        labels.append(batch_labels)
    return np.concatenate(predictions), np.concatenate(labels)
