"""ONNX export (QDQ int8 and float32) run by ONNX Runtime, predict.py on image files, qatcifar.latency and
bench.py --deploy."""
import json
import os

import mindspore as ms
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import eval as evaluate
import export
import predict
from conftest import (
    AGREEMENT_IMAGES,
    ARCH,
    assert_agrees_with_reference,
    expect_error,
    first_test_images,
    high_contrast,
    run_script,
)
from qatcifar import checkpoint, cifar, inference, networks, ort_kernels

SYNTHETIC_NAMES = [f"synthetic_{i}" for i in range(10)]


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


def cifar_images(data_dir, count):
    """The first test images as uint8 (count, 32, 32, 3) arrays."""
    records = np.fromfile(os.path.join(data_dir, "test_batch.bin"), np.uint8, count=count * 3073).reshape(count, -1)
    return records[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)


def save_pngs(data_dir, folder, count):
    paths = [str(folder / f"test{i}.png") for i in range(count)]
    for path, pixels in zip(paths, cifar_images(data_dir, count), strict=True):
        Image.fromarray(pixels).save(path)
    return paths


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    """A float32 ARCH with random BatchNorm statistics (so that folding them is tested) as a checkpoint and
    as ONNX: (checkpoint, onnx)."""
    folder = tmp_path_factory.mktemp("float_onnx")
    net, rng = networks.resnet(ARCH), np.random.default_rng(0)
    ranges = {"gamma": (0.5, 1.5), "beta": (-0.2, 0.2), "moving_mean": (-0.2, 0.2), "moving_variance": (0.5, 2.0)}
    for name, param in net.parameters_and_names():
        low_high = ranges.get(name.rsplit(".", 1)[-1]) if ".bn." in name else None
        if low_high:
            param.set_data(ms.Tensor(rng.uniform(*low_high, param.shape).astype(np.float32)))
    path = str(folder / "float.ckpt")
    checkpoint.save(net, path, {})
    return path, export.main(["-loc", path, "--format", "onnx", "-o", str(folder / "float.onnx")])


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
                 "--threads sets ONNX Runtime's threads", "is not an .onnx model")
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
        f.truncate(inference.MAX_ONNX_BYTES + 1)  # (sparse: no disk used)
    expect_error(evaluate.main, ["-loc", str(tmp_path / "huge.onnx"), "-data", synthetic_dir], capsys,
                 "more than a ResNet-18 model")


# --- predict.py ----------------------------------------------------------------------------------------

def test_predict_classifies_images_of_any_size_and_mode(float_onnx, synthetic_dir, tmp_path, capsys):
    pngs = save_pngs(synthetic_dir, tmp_path, 4)
    pixels = cifar_images(synthetic_dir, 1)[0]
    image = Image.fromarray(pixels)
    others = {"big.jpg": image.resize((640, 480)), "rgba.png": image.convert("RGBA"), "gray.bmp": image.convert("L"),
              "palette.gif": image.convert("P")}
    for name, image in others.items():
        image.save(tmp_path / name)
    paths = pngs + [str(tmp_path / name) for name in others]
    results = predict.main(["-loc", float_onnx[1], *paths, "--json", "--top_k", "4"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["predictions"] == results and len(results) == len(paths)
    assert printed[-1 - len(paths)].startswith(f"{paths[0]}: ")
    for result in results:
        probabilities = [c["probability"] for c in result["top"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-9
        assert all(c["class"] == cifar.CIFAR10_CLASSES[c["index"]] for c in result["top"])
    # A 32x32 PNG of a test image is that image: the probabilities of the test pipeline's image.
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=4, num_samples=4)
    images = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]
    for result, logits in zip(results, inference.load_model(float_onnx[1]).logits(images), strict=False):
        top = result["top"][0]
        assert top["index"] == logits.argmax()
        assert abs(top["probability"] - np.exp(logits.max()) / np.exp(logits).sum()) <= 1e-4


@pytest.mark.slow
def test_predict_runs_every_model_format(trained_exports, synthetic_dir, tmp_path, capsys):
    pngs = save_pngs(synthetic_dir, tmp_path, 20)
    for form in ("checkpoint", "int8", "onnx"):
        results = predict.main(["-loc", trained_exports[form], *pngs, "--top_k", "1", "-data", synthetic_dir])
        assert [r["top"][0]["index"] for r in results] == list(trained_exports["predictions"][form][:20]), form
        assert {r["top"][0]["class"] for r in results} <= set(SYNTHETIC_NAMES)  # (the files' own names)
    mindir = str(tmp_path / "m.mindir")
    export.main(["-loc", trained_exports["checkpoint"], "--format", "mindir", "-o", mindir])
    results = predict.main(["-loc", mindir, *pngs, "--top_k", "1"])
    indices = np.array([r["top"][0]["index"] for r in results])
    agreement = (indices == trained_exports["predictions"]["checkpoint"][:20]).mean()
    assert agreement >= 0.95  # the MindIR runs the fake-quant graph, as the checkpoint does


def test_predict_refuses_what_is_not_an_image(float_onnx, synthetic_dir, tmp_path, capsys):
    png = save_pngs(synthetic_dir, tmp_path, 1)[0]
    (tmp_path / "notes.png").write_text("not an image")
    with open(png, "rb") as f:
        (tmp_path / "truncated.png").write_bytes(f.read()[:200])
    Image.new("L", (8000, 7000)).save(tmp_path / "huge.png")  # 56 million pixels, a few kilobytes
    model = float_onnx[1]
    for path, fragment in ((tmp_path / "missing.jpg", "does not exist"), (tmp_path, "is not a file"),
                           (tmp_path / "notes.png", "is not an image file Pillow reads"),
                           (tmp_path / "truncated.png", "cannot read image"),
                           (tmp_path / "huge.png", "8000x7000 pixels, more than 50,000,000")):
        expect_error(predict.main, ["-loc", model, png, str(path)], capsys, str(path), fragment)
    expect_error(predict.main, ["-loc", model], capsys, "required: IMAGE")
    expect_error(predict.main, ["-loc", model, png, "--top_k", "11"], capsys, "--top_k", "from 1 to 10")
    expect_error(predict.main, ["-loc", str(tmp_path / "none.onnx"), png], capsys, "does not exist")


# --- speed ----------------------------------------------------------------------------------------------

def test_latency_measures_a_model_in_a_process_of_its_own(float_onnx):
    result = run_script("-m", "qatcifar.latency", float_onnx[1], "--seconds", "0.1", "--batch", "4", "--threads", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures) == {"b1_p50_ms", "b1_p95_ms", "b1_runs", "b4_ips", "peak_rss_mb"}
    assert 0 < figures["b1_p50_ms"] <= figures["b1_p95_ms"] and figures["b1_runs"] >= 20
    assert figures["peak_rss_mb"] < 1000  # ONNX Runtime alone, no MindSpore
    bad = run_script("-m", "qatcifar.latency", float_onnx[1] + ".txt")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


@pytest.mark.slow
def test_bench_deploy_reports_every_model():
    result = run_script("bench.py", "--deploy", "--json", "--seconds", "0.2", "--arch", ARCH)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    deploy = figures["deploy"]
    assert list(deploy) == ["mindspore_float32", "mindspore_qat", "int8_reference", "onnx_float32", "onnx_int8",
                            "onnx_int8_8bit"]
    for model in deploy.values():
        assert set(model) == {"b1_p50_ms", "b1_p95_ms", "b1_p50_ms_1thread", "b1_p95_ms_1thread", "b100_ips",
                              "file_mb", "peak_rss_mb"}
        assert 0 < model["b1_p50_ms"] <= model["b1_p95_ms"] and model["b100_ips"] > 0 and model["peak_rss_mb"] > 0
    assert figures["int8_over_float_onnx_b100"] == deploy["onnx_int8"]["b100_ips"] / deploy["onnx_float32"]["b100_ips"]
    assert figures["int8_onnx_over_mindspore_b1"] == \
        deploy["mindspore_float32"]["b1_p50_ms"] / deploy["onnx_int8"]["b1_p50_ms"]
    assert deploy["onnx_int8"]["file_mb"] <= 0.16  # resnet8's (ResNet-18's: test_train_eval.py)
    assert figures["int8_8bit_over_7bit_b1"] == deploy["onnx_int8_8bit"]["b1_p50_ms"] / deploy["onnx_int8"]["b1_p50_ms"]
    assert set(figures["int8_isa"]) <= {"avx512_vnni", "avx_vnni", "amx_int8"} and figures["cpu_count"] >= 1
    assert figures["int8_kernels"] == ort_kernels.describe()  # which kernels, and whether the probe finds them exact
    assert "ONNX Runtime's uint8 x int8 kernels here: " in result.stdout
    assert sum(line.startswith(tuple(deploy)) for line in result.stdout.splitlines()) == 6  # the table's rows
