"""MindIR graphs (`.mindir`, export.py --format mindir) in MindSpore (inference.py's interface)."""
import numpy as np

from qatcifar import cifar, cli, inference

MINDSPORE, THREADS = True, False


def runner(path, threads=None):
    return load(path).logits


def load(path, threads=None):
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
    inference.refuse_non_finite(path, weights)
    try:
        with cli.mindspore_log_quiet():
            graph = nn.GraphCell(ms.load(path))
    except Exception as e:  # MindSpore raises RuntimeError, ValueError, ... with dozens of lines
        raise cli.InputError(f"{path} is not a MindIR file MindSpore can load ({cli.first_line(e)})") from None
    return inference.network_model(graph, "MindIR", inputs[0][0] if inputs[0][0] > 0 else None)
