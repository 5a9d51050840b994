"""qatcifar.model_tflite: a .tflite file is read as untrusted. A truncated, non-flatbuffer or foreign file (another
network's classes or input, float32 weights, an operator export.py does not write) is one error line at load, in
eval.py and predict.py, before LiteRT runs it; export.py's own file runs with the int8 reference's answers."""
import flatbuffers
import numpy as np
import pytest

import eval as evaluate
import predict
from conftest import expect_error, observed_qat_net
from qatcifar import cifar, inference, int8, int8_export, model_tflite, tflite_graph
from qatcifar.quant import QuantConfig

IMAGE = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def observed_tflite(tmp_path_factory):
    """An observed (untrained) QAT network's int8 model and its .tflite file: (model, path)."""
    header, arrays = int8_export.int8_model(observed_qat_net(), QuantConfig())
    header["class_names"] = [f"class {i}" for i in range(cifar.NUM_CLASSES)]
    model = {"header": header, "arrays": arrays}
    metadata = int8_export.metadata("int8 TFLite", "observed", header["class_names"], None)
    path = tmp_path_factory.mktemp("tflite") / "observed.tflite"
    path.write_bytes(tflite_graph.from_int8(header, arrays, metadata, int8.logits_bound(model)))
    return model, str(path)


def test_litert_runs_the_export_with_its_names(observed_tflite):
    model, path = observed_tflite
    loaded = inference.load_model(path)
    assert loaded.class_names[1] == "class 1" and loaded.description == "int8 TFLite (LiteRT)"
    logits = loaded.logits(IMAGE)
    assert logits.shape == (4, cifar.NUM_CLASSES) and np.isfinite(logits).all()
    assert loaded.logits(IMAGE[:1]).shape == (1, cifar.NUM_CLASSES)  # (a batch of another size: resized)
    assert not inference.uses_mindspore(path)


def edited(path, tmp_path, edit):
    """The .tflite at path with `edit(ModelT)` applied, written anew: its path."""
    fb = tflite_graph.schema()
    with open(path, "rb") as f:
        model = fb.ModelT.InitFromObj(fb.Model.GetRootAs(f.read(), 0))
    edit(model, fb)
    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = tmp_path / "edited.tflite"
    out.write_bytes(bytes(builder.Output()))
    return str(out)


def output_of_five(model, fb):
    graph = model.subgraphs[0]
    graph.tensors[graph.outputs[0]].shape = [1, 5]


def input_of_64(model, fb):
    graph = model.subgraphs[0]
    graph.tensors[graph.inputs[0]].shape = [1, 64, 64, 3]


def float_weights(model, fb):
    tensor = next(t for t in model.subgraphs[0].tensors if t.name == b"conv1.weight")
    tensor.type = fb.TensorType.FLOAT32


def softmax(model, fb):
    model.operatorCodes[-1].builtinCode = model.operatorCodes[-1].deprecatedBuiltinCode = fb.BuiltinOperator.SOFTMAX


def no_metadata(model, fb):
    model.metadata = []


@pytest.mark.parametrize("edit, fragment", [
    (output_of_five, "a TFLite model of another network"),
    (input_of_64, "a TFLite model of another network"),
    (float_weights, "is FLOAT32, not int8"),
    (softmax, "holds SOFTMAX, an operator export.py does not write"),
    (no_metadata, "is a model for other data"),
])
def test_a_foreign_tflite_model_is_one_error_line(observed_tflite, tmp_path, capsys, edit, fragment):
    path = edited(observed_tflite[1], tmp_path, edit)
    expect_error(evaluate.main, ["-loc", path, "-data", str(tmp_path)], capsys, fragment)


def test_a_cut_or_foreign_file_is_one_error_line(observed_tflite, tmp_path, capsys):
    with open(observed_tflite[1], "rb") as f:
        content = f.read()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(content[: len(content) // 3])
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"TFL3" * 4 + bytes(range(256)) * 8)
    text = tmp_path / "text.tflite"
    text.write_bytes(b"not a flatbuffer")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for path in (cut, garbage, text):
        expect_error(predict.main, ["-loc", str(path), str(image)], capsys, str(path), "TFLite")


def test_the_size_is_capped_before_reading(tmp_path, capsys):
    big = tmp_path / "big.tflite"
    with open(big, "wb") as f:
        f.truncate(model_tflite.MAX_BYTES + 1)  # (sparse: no disk used)
    expect_error(evaluate.main, ["-loc", str(big), "-data", str(tmp_path)], capsys, "more than an int8 ResNet-18")
