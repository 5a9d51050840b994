"""qatcifar.inference: a model file whose weights or class scores are not finite is refused when it is loaded, in
every format (a NaN weight made eval.py report 6 % and predict.py print `nan%` and JSON that is not JSON)."""
import os

import mindspore as ms
import numpy as np
import onnx
import pytest
from mindspore.train import mind_ir_pb2
from onnx import helper, numpy_helper

import export
from conftest import ARCH, expect_error, observed_qat_net
from qatcifar import checkpoint, cifar, cli, inference, networks
from qatcifar.quant import QuantConfig, quantize


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


@pytest.mark.parametrize("log_step", [1000.0, -1000.0, 25.0])
def test_a_learned_step_size_beyond_any_trained_one_is_refused_at_load(log_step, tmp_path, capsys):
    """An LSQ checkpoint whose log step is finite but absurd (exp() gives inf or 0): eval.py said 10.00 %, predict.py
    "airplane nan%" and export.py wrote an int8 file of infinite scale; now every loader refuses it, and so does
    --resume (commands/test_train_crash.py)."""
    net = quantize(networks.resnet(ARCH), QuantConfig(quantizer="lsq", weight_bits=4, act_bits=4))
    name = "layer1.0.conv1.weight_quant.log_step"
    param = dict(net.parameters_and_names())[name]
    param.set_data(ms.Tensor(np.full(param.shape, log_step, np.float32)))
    path = str(tmp_path / "lsq.ckpt")
    checkpoint.save(net, path, {})
    with pytest.raises(cli.InputError, match=f"parameter {name} is a learned step size's logarithm outside"):
        inference.load_model(path)
    expect_error(export.main, ["-loc", path, "--format", "int8", "-o", str(tmp_path / "m.int8.npz")], capsys,
                 "learned step size's logarithm outside [-20, 20]")
    assert sorted(os.listdir(tmp_path)) == ["lsq.ckpt"]


@pytest.mark.parametrize("scale, fragment", [(0.0, "QuantizeLinear .* has scale 0, not within \\[1e-12, 1000\\]"),
                                             (-0.01, "has scale -0.01, not within"), (1e30, "has scale 1e\\+30"),
                                             (np.nan, "scale holds values that are not finite")])
def test_an_onnx_quantization_scale_that_cannot_be_is_refused(scale, fragment, synthetic_dir, tmp_path):
    """The input's QuantizeLinear with a scale of 0, below 0 or 1e30 was evaluated silently (8 % against 30 %)."""
    checkpoint.save(observed_qat_net(), str(tmp_path / "qat.ckpt"), {})
    path = export.main(["-loc", str(tmp_path / "qat.ckpt"), "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                        "-data", synthetic_dir])
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    tensor = next(t for t in model.graph.initializer if t.name == node.input[1])
    tensor.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(tensor).shape, scale, np.float32),
                                            tensor.name))
    onnx.save(model, path)
    with pytest.raises(cli.InputError, match=fragment):
        inference.load_model(path)


def test_class_names_from_files_are_printed_escaped(tmp_path):
    """A newline or an ANSI escape in a class name (a model file's, or batches.meta.txt's) would forge an `error:`
    line or colour the terminal: shown as Python escapes."""
    names = ["cat\nerror: forged", "\x1b[31mred"] + [f"class{i}" for i in range(8)]
    assert inference.names_or_none(names)[:2] == ["cat\\nerror: forged", "\\x1b[31mred"]
    (tmp_path / "batches.meta.txt").write_text("\n".join(["\x1b[31mred\x07", *[f"c{i}" for i in range(9)]]))
    assert cifar.class_names(str(tmp_path))[0] == "\\x1b[31mred\\x07"
