"""MindSpore checkpoints (`.ckpt`, train.py's), QAT or float32, in MindSpore (inference.py's interface)."""
from qatcifar import checkpoint, cifar, inference, networks, quant

MINDSPORE, THREADS = True, False


def runner(path, threads=None):
    return load(path).logits


def load(path, threads=None):
    """The checkpoint's network (checked and loaded by checkpoint.load_network), frozen for inference: a QAT one
    runs its fake quantization with the observers' final ranges."""
    net, config = checkpoint.load_network(path, cifar.NUM_CLASSES)
    kind = checkpoint.kind(config)
    description = kind if kind == checkpoint.FLOAT32 else f"{checkpoint.QAT} (int8 fake-quant)"
    model = inference.network_model(quant.freeze(net), description)
    model.network = net
    model.size = inference.size_or_none(networks.profile(net))
    return model
