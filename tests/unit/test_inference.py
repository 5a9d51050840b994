"""qatcifar.inference: a model file whose weights or class scores are not finite is refused when it is loaded, in
every format (a NaN weight made eval.py report 6 % and predict.py print `nan%` and JSON that is not JSON)."""
import mindspore as ms
import numpy as np
import onnx
import pytest
from mindspore.train import mind_ir_pb2
from onnx import helper, numpy_helper

import export
from conftest import ARCH
from qatcifar import checkpoint, cli, inference, networks


def damaged(path, tmp_path):
    """The ONNX model at path with its largest float initializer set to NaN at one place: (path, its name)."""
    model = onnx.load(path)
    tensor = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(tensor).copy()
    values.flat[len(values.flat) // 2] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    out = str(tmp_path / "damaged.onnx")
    onnx.save(model, out)
    return out, tensor.name


def test_an_onnx_weight_that_is_not_finite_is_named(float_onnx, tmp_path):
    path, name = damaged(float_onnx[1], tmp_path)
    with pytest.raises(cli.InputError, match=f"weight {name} holds values that are not finite"):
        inference.load_model(path)


def test_an_onnx_model_whose_class_scores_are_not_finite_is_refused(float_onnx, tmp_path):
    """A damaged weight held in a Constant node, not an initializer: the scores of a test image show it."""
    path, name = damaged(float_onnx[1], tmp_path)
    model = onnx.load(path)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(tensor)
    model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))
    onnx.save(model, path)
    with pytest.raises(cli.InputError, match="gives class scores that are not finite"):
        inference.load_model(path)


def test_a_checkpoint_parameter_that_is_not_finite_is_named(tmp_path):
    net = networks.resnet(ARCH)
    name, weight = next(iter(net.parameters_and_names()))
    values = weight.asnumpy().copy()
    values.flat[5] = np.inf
    weight.set_data(ms.Tensor(values))
    path = str(tmp_path / "inf.ckpt")
    checkpoint.save(net, path, {})
    with pytest.raises(cli.InputError, match=f"parameter {name} holds values that are not finite"):
        inference.load_model(path)


def test_a_mindir_weight_that_is_not_finite_is_named(untrained, tmp_path):
    path = export.main(["-loc", untrained["float32"], "--format", "mindir", "-o", str(tmp_path / "m.mindir")])
    proto = mind_ir_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    tensor = max((t for t in proto.graph.parameter if t.data_type == mind_ir_pb2.TensorProto.FLOAT),
                 key=lambda t: len(t.raw_data))
    values = np.frombuffer(tensor.raw_data, np.float32).copy()
    values[0] = np.nan
    tensor.raw_data = values.tobytes()
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    with pytest.raises(cli.InputError, match=f"weight {tensor.name} holds values that are not finite"):
        inference.load_model(path)
