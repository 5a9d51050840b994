"""qatcifar.tflite_graph: the .tflite export computes the int8 reference's numbers in the runtimes nobody on this
team wrote: TensorFlow Lite Micro's interpreter (its reference kernels, the microcontroller builds' arithmetic) and
LiteRT. Every int8 tensor is compared, read back with TFLite Micro's GetTensor."""
import json

import numpy as np
import pytest

import export
from conftest import first_test_images
from qatcifar import int8, tflite_graph

IMAGES = 40  # TensorFlow Lite Micro runs one image at a time
pytestmark = pytest.mark.slow  # (the trained model)


@pytest.fixture(scope="module")
def tflite_exports(trained_exports, synthetic_dir, tmp_path_factory):
    """The trained QAT model as .tflite, with a float32 and with an int8 input: {"float32": path, "int8": path}."""
    folder = tmp_path_factory.mktemp("tflite")
    return {kind: export.main(["-loc", trained_exports["checkpoint"], "--format", "tflite", "--tflite_input", kind,
                               "-o", str(folder / f"{kind}.tflite"), "-data", synthetic_dir])
            for kind in ("float32", "int8")}


def micro(content):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(content, intrepreter_config=runtime.InterpreterConfig.kPreserveAllTensors)


def metadata(content):
    fb = tflite_graph.schema()
    model = fb.ModelT.InitFromObj(fb.Model.GetRootAs(content, 0))
    return json.loads(bytes(bytearray(model.buffers[model.metadata[0].buffer].data)).decode()), model


def expected_int8_logits(model, reference, scale, zero_point):
    """The classifier's int8 output as TFLite computes it from the reference's int32 accumulators."""
    node, tensors = model["header"]["graph"][-1], model["header"]["tensors"]
    multiplier = (np.float64(np.float32(tensors[node["input"]]["scale"])) * model["arrays"][node["weight_scale"]]
                  .astype(np.float64) / np.float64(np.float32(scale)))
    return np.clip(int8.tflite_requantize(reference["logits.acc"], multiplier[None]) + zero_point, -128, 127)


def compare_on_micro(content, model, images, int8_input=False):
    """Run each image on TFLite Micro; assert every int8 tensor equals the reference's, shifted by 128, and the int8
    logits TFLite's requantization of the reference's accumulators. Returns (micro's top-1, the int8 logits)."""
    described, _ = metadata(content)
    reference = int8.run_all(model, images)
    interpreter = micro(content)
    tops, outputs = [], []
    for i, image in enumerate(images):
        nhwc = image.transpose(1, 2, 0)[None]
        if int8_input:
            nhwc = (reference[model["header"]["graph"][0]["output"]][i].transpose(1, 2, 0)[None].astype(np.int16)
                    - 128).astype(np.int8)
        interpreter.set_input(nhwc, 0)
        interpreter.invoke()
        for name, index in described["tensors"].items():
            got = interpreter.GetTensor(index, 0)["tensor_data"].astype(np.int16) + 128
            want = reference[name][i]
            want = want.transpose(1, 2, 0) if want.ndim == 3 else want
            assert np.array_equal(got.reshape(want.shape), want), (i, name)
        out = interpreter.get_output(0)
        outputs.append(out.reshape(-1))
        tops.append(int(np.argmax(out)))
    return np.array(tops), np.array(outputs), reference


def test_tflite_micro_computes_the_references_int8_tensors_bit_for_bit(trained_exports, tflite_exports,
                                                                          synthetic_dir):
    model = int8.load(trained_exports["int8"])
    images = first_test_images(synthetic_dir, IMAGES)
    with open(tflite_exports["int8"], "rb") as f:
        content = f.read()
    tops, outputs, reference = compare_on_micro(content, model, images, int8_input=True)
    _, flat = metadata(content)
    graph = flat.subgraphs[0]
    quantization = graph.tensors[graph.outputs[0]].quantization
    want = expected_int8_logits(model, reference, quantization.scale[0], quantization.zeroPoint[0])
    assert np.array_equal(outputs, want)
    differ = tops != reference["logits"].argmax(axis=1)
    ties = np.array([np.sort(row)[-1] == np.sort(row)[-2] for row in want])
    assert not (differ & ~ties).any()  # the top class differs only where the int8 logits tie
    assert differ.mean() <= 0.05


def test_the_float_input_is_quantized_inside_the_model_as_the_reference_does(trained_exports, tflite_exports,
                                                                               synthetic_dir):
    model = int8.load(trained_exports["int8"])
    with open(tflite_exports["float32"], "rb") as f:
        content = f.read()
    compare_on_micro(content, model, first_test_images(synthetic_dir, 10))  # (the QUANTIZE op's output included)
    assert len(content) <= 100_000  # resnet8: MLPerf Tiny's reference .tflite is 99 KB


def test_litert_reference_kernels_agree_bit_for_bit_and_its_default_ones_on_the_top_class(
        trained_exports, tflite_exports, synthetic_dir):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model = int8.load(trained_exports["int8"])
    images = first_test_images(synthetic_dir, 200)
    reference = int8.run_all(model, images)
    with open(tflite_exports["float32"], "rb") as f:
        content = f.read()
    described, _ = metadata(content)
    tops = {}
    for kind in (OpResolverType.BUILTIN_REF, OpResolverType.AUTO):
        interpreter = Interpreter(model_content=content, experimental_op_resolver_type=kind,
                                  experimental_preserve_all_tensors=kind == OpResolverType.BUILTIN_REF)
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(source["index"], [len(images), 32, 32, 3])
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
        interpreter.invoke()
        tops[kind] = interpreter.get_tensor(target["index"]).argmax(axis=1)
        if kind == OpResolverType.BUILTIN_REF:
            for name, index in described["tensors"].items():
                got = interpreter.get_tensor(index).astype(np.int16) + 128
                want = reference[name].transpose(0, 2, 3, 1) if reference[name].ndim == 4 else reference[name]
                assert np.array_equal(got.reshape(want.shape), want), name
    top = reference["logits"].argmax(axis=1)
    assert (tops[OpResolverType.BUILTIN_REF] == top).mean() >= 0.95  # (differences: ties of the int8 logits)
    assert (tops[OpResolverType.AUTO] == top).mean() >= 0.95


def four_bit(model):
    """The model with every weight cut to 4 bits (weight_bits 4): a 4-bit file's layout."""
    arrays = dict(model["arrays"])
    header = dict(model["header"], weight_bits=4)
    for node in header["graph"]:
        if "weight" in node:
            arrays[node["weight"]] = np.clip(arrays[node["weight"]] // 16, -8, 7).astype(np.int8)
    return {"header": header, "arrays": arrays}


def test_4_bit_weights_are_int4_in_the_convolutions_and_run_exactly(trained_exports, synthetic_dir):
    model = four_bit(int8.load(trained_exports["int8"]))
    content = tflite_graph.from_int8(model["header"], model["arrays"], {}, (-10.0, 10.0))
    _, flat = metadata(content)
    types = {tensor.name.decode(): tensor.type for tensor in flat.subgraphs[0].tensors}
    assert types["conv1.weight"] == tflite_graph.schema().TensorType.INT4
    assert types["fc.weight"] == tflite_graph.schema().TensorType.INT8  # (TFLite Micro's FULLY_CONNECTED)
    assert len(content) < 60_000
    compare_on_micro(content, model, first_test_images(synthetic_dir, 5))


@pytest.mark.parametrize("change, reason", [
    (lambda h: h.update(version=2), "whose arithmetic is not TFLite's"),
    (lambda h: h["tensors"]["t3"].update(bits=4), "fewer than 8 bits"),
    (lambda h: h["graph"][1].update(bias_bits=8), "fraction bits"),
])
def test_what_tflite_cannot_hold_is_refused_saying_why(trained_exports, change, reason):
    model = int8.load(trained_exports["int8"])
    header = json.loads(json.dumps(model["header"]))
    change(header)
    with pytest.raises(tflite_graph.Refused, match=reason):
        tflite_graph.from_int8(header, model["arrays"], {}, (-1.0, 1.0))
