"""qatcifar.onnx_graph: the ONNX models (QDQ int8 and float32) run by ONNX Runtime on its integer kernels, agreeing
with the int8 reference and the checkpoint; eval.py on them."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import eval as evaluate
import export
from conftest import (
    AGREEMENT_IMAGES,
    SYNTHETIC_NAMES,
    assert_agrees_with_reference,
    expect_error,
    first_test_images,
    high_contrast,
)
from qatcifar import cifar, inference, model_onnx


def metadata(path):
    """Lists and dicts are JSON, strings themselves."""
    return {prop.key: json.loads(prop.value) if prop.value[:1] in "[{" else prop.value
            for prop in onnx.load(path).metadata_props}


def optimized_ops(path, tmp_path):
    """The operators of the graph ONNX Runtime runs, after its optimizations (QDQ fusion among them)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


# --- the int8 model in QDQ form ---------------------------------------------------------------------

@pytest.mark.slow
def test_int8_onnx_is_standard_qdq_and_runs_on_integer_kernels(trained_exports, tmp_path):
    path = trained_exports["onnx"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert os.path.getsize(path) <= 160_000  # resnet8 (ResNet-18's is 0.27 x its float32 parameters: bench.py below)
    dims = [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in (*model.graph.input, *model.graph.output)]
    assert dims == [["batch", 3, 32, 32], ["batch", 10]]
    types = {t.name: t.data_type for t in model.graph.initializer}
    weights = [name for name in types if name.endswith(".weight")]
    biases = [name for name in types if name.endswith(".bias")]
    assert len(weights) == len(biases) == 10  # 9 convolutions (BatchNorm folded) and the classifier
    assert {types[name] for name in weights} == {onnx.TensorProto.INT8}
    assert {types[name] for name in biases} == {onnx.TensorProto.INT32}
    assert metadata(path) == {"model": "int8 QDQ", "source": os.path.basename(trained_exports["checkpoint"]),
                              "class_names": SYNTHETIC_NAMES,
                              "network": {"arch": "resnet8", "params": 78_042, "macs": 12_501_632},
                              "normalization": {"mean": list(cifar.CIFAR10_MEAN),
                                                "std": list(cifar.CIFAR10_STD)}}
    # ONNX Runtime fuses every quantized operation into an integer kernel: no float convolution is left.
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 9 and ops.count("QLinearAdd") == 3 and ops.count("QGemm") == 1
    assert not {"Conv", "Add", "Gemm", "DequantizeLinear", "Relu"} & set(ops), ops
    logits = inference.load_model(path).logits
    for batch in (1, 3):
        assert logits(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 10)


@pytest.mark.slow
def test_int8_onnx_agrees_with_the_int8_reference_and_the_checkpoint(trained_exports, synthetic_dir):
    """Logit for logit with the integer reference, on the test images and on high-contrast ones (large activations,
    where 16-bit pair sums would saturate: ort_kernels.py); class for class, nearly, with the checkpoint."""
    logits, predictions = trained_exports["logits"], trained_exports["predictions"]
    assert len(logits["onnx"]) == AGREEMENT_IMAGES
    assert_agrees_with_reference(logits["onnx"], logits["int8"])
    images = high_contrast(first_test_images(synthetic_dir, 100))
    onnx_model, reference = (inference.load_model(trained_exports[form]) for form in ("onnx", "int8"))
    assert_agrees_with_reference(onnx_model.logits(images), reference.logits(images))
    assert (predictions["onnx"] == predictions["checkpoint"]).mean() >= 0.99


@pytest.mark.slow
def test_eval_runs_the_onnx_model_with_threads(trained_exports, synthetic_dir, capsys):
    accuracy = evaluate.main(["-loc", trained_exports["onnx"], "-data", synthetic_dir, "--num_samples", "200",
                              "--threads", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "ONNX int8 QDQ (ONNX Runtime)" and result["total"] == 200
    labels = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8).reshape(-1, 3073)[:200, 0]
    assert accuracy == (trained_exports["predictions"]["onnx"][:200] == labels).mean()


# --- the float32 model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_float_onnx_agrees_with_the_float_checkpoint(float_onnx, synthetic_dir):
    checkpoint_path, path = float_onnx
    assert metadata(path)["model"] == "float32" and metadata(path)["class_names"] == list(cifar.CIFAR10_CLASSES)
    names = {t.name for t in onnx.load(path).graph.initializer}
    assert {"conv1.weight", "layer3.0.conv2.bias", "layer2.0.shortcut.weight", "fc.weight"} <= names
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=100, num_samples=AGREEMENT_IMAGES)
    onnx_model, checkpoint_model = inference.load_model(path), inference.load_model(checkpoint_path)
    assert (inference.predict(onnx_model, dataset)[0] == inference.predict(checkpoint_model, dataset)[0]).mean() \
        >= 0.999
    images = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]
    expected = checkpoint_model.logits(images)
    assert np.abs(onnx_model.logits(images) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_onnx_export_and_eval_refuse_bad_input(untrained, float_onnx, synthetic_dir, tmp_path, capsys):
    expect_error(export.main, ["-loc", untrained["float32"], "--format", "onnx", "-o", str(tmp_path / "m.mindir")],
                 capsys, "does not end in .onnx")
    expect_error(export.main, ["-loc", untrained["QAT"], "--format", "onnx", "-o", str(tmp_path / "m.onnx")],
                 capsys, "activations are not quantized yet")
    assert os.listdir(tmp_path) == []
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    expect_error(evaluate.main, ["-loc", str(garbage), "-data", synthetic_dir], capsys,
                 "is not an ONNX model ONNX Runtime can load")
    expect_error(evaluate.main, ["-loc", untrained["float32"], "--threads", "1", "-data", synthetic_dir], capsys,
                 "--threads sets ONNX Runtime's and LiteRT's threads", "is neither an .onnx nor a .tflite model")
    expect_error(evaluate.main, ["-loc", float_onnx[1], "--threads", "0"], capsys, "--threads", "from 1 to")
    # A model without this pipeline's normalization, and a model of another network.
    stripped = onnx.load(float_onnx[1])
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "stripped.onnx"))
    expect_error(evaluate.main, ["-loc", str(tmp_path / "stripped.onnx"), "-data", synthetic_dir], capsys,
                 "is a model for other data", "normalization None")
    mnist = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["x"], ["y"])], "mnist",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, 28, 28])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 784])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)])
    mnist.ir_version = 8
    onnx.save(mnist, str(tmp_path / "mnist.onnx"))
    expect_error(evaluate.main, ["-loc", str(tmp_path / "mnist.onnx"), "-data", synthetic_dir], capsys,
                 "is a model for other data: input [1, 28, 28], 784 classes")
    with open(tmp_path / "huge.onnx", "wb") as f:
        f.truncate(model_onnx.MAX_ONNX_BYTES + 1)  # (sparse: no disk used)
    expect_error(evaluate.main, ["-loc", str(tmp_path / "huge.onnx"), "-data", synthetic_dir], capsys,
                 "more than a ResNet-18 model")


# --- predict.py ----------------------------------------------------------------------------------------


# --- speed ----------------------------------------------------------------------------------------------


