"""The int8 ONNX model is exact on every x86 CPU: no pair of its weights' products can overflow the 16-bit sums of
ONNX Runtime's kernels on CPUs without VNNI (ort_kernels.py), which the tests also run on an emulated one (QEMU's
EPYC-Milan: AMD Zen 3, AVX2 without VNNI) where qemu-user is installed."""
import itertools
import os
import platform
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from PIL import Image

import eval as evaluate
import export
import predict
from conftest import (
    ROOT,
    assert_agrees_with_reference,
    expect_error,
    first_test_images,
    high_contrast,
    observed_qat_net,
)
from qatcifar import checkpoint, inference, int8, int8_export, onnx_graph, ort_kernels, quant
from qatcifar.quant import QuantConfig

EMULATED_CPU = "EPYC-Milan"  # AMD Zen 3: AVX2 without VNNI, the kind of CPU where the int8 model was inexact
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
    reason="qemu-x86_64 (Debian's qemu-user, which .ci/run installs) is not here to emulate a CPU without VNNI")
INTEGER_OPS = {"QLinearConv": 9, "QGemm": 1}


def optimized_ops(model, tmp_path):
    """The operators ONNX Runtime runs for `model` (onnx.ModelProto), after its optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def int8_storage(model):
    """A copy of `model` with its uint8 weights (zero point 128) stored as int8 (zero point 0), as export.py stored
    every weight before QAT weights were 7-bit: the same numbers."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.initializer:
        if tensor.name.endswith(".weight") and tensor.data_type == TensorProto.UINT8:
            values = numpy_helper.to_array(tensor).astype(np.int16) - 128
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.int8), tensor.name))
        elif tensor.name.endswith(".weight.zero_point") and tensor.data_type == TensorProto.UINT8:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(tensor.dims, np.int8), tensor.name))
    return model


def onnx_model(header, arrays):
    network = {key: header[key] for key in ("arch", "params", "macs")}
    return onnx_graph.from_int8(header, arrays, int8_export.metadata("int8 QDQ", "test.ckpt", None, network))


@pytest.fixture(scope="module")
def observed():
    """One observed QAT network exported with 7-bit (QAT's) and with 8-bit weights: {bits: (header, arrays)}."""
    configs = {bits: QuantConfig(weight_bits=bits) for bits in (7, 8)}
    return {bits: int8_export.int8_model(observed_qat_net(config=config), config) for bits, config in configs.items()}


# --- which weights are exact everywhere ------------------------------------------------------------------

def test_weights_fit_exactly_when_no_two_products_can_overflow_16_bits():
    """Against every pair and every extreme of the activations (0 or 255: the sums are linear in them)."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(-128, 128, (300, 4)), rng.integers(-70, 71, (3000, 4))])
    for row in rows:
        overflows = any(not -32768 <= a * row[i] + b * row[j] <= 32767
                        for i, j in itertools.combinations(range(len(row)), 2)
                        for a, b in itertools.product((0, 255), repeat=2))
        assert ort_kernels.pairs_fit_16_bits(row[None]) == (not overflows), row
    edges = {(64, 64): True, (65, 64): False, (-64, -64): True, (-65, -64): False, (127, -128): True,
             (127, 1): True, (127, 2): False}
    for pair, fits in edges.items():
        assert ort_kernels.pairs_fit_16_bits(np.array([pair], np.int8)) == fits, pair
    assert ort_kernels.pairs_fit_16_bits(np.array([[-128]], np.int8))  # one product alone always fits
    assert not ort_kernels.pairs_fit_16_bits(np.array([[1, 1], [100, 100]], np.int8))  # any channel decides


def test_qat_trains_7_bit_weights_which_fit_where_8_bit_ones_do_not():
    assert QuantConfig().weight_bits == 7
    unit = observed_qat_net().layer1[0].conv1
    weight = unit.folded_weight_and_bias()[0]
    for bits, fits in ((7, True), (8, False)):
        levels = quant.weight_levels(weight, quant.weight_scale(weight, bits)).asnumpy()
        assert np.abs(levels).max() == 2 ** (bits - 1) - 1
        assert ort_kernels.pairs_fit_16_bits(levels) == fits


# --- this CPU's kernels -----------------------------------------------------------------------------------

AVX512 = {"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("flags, kernel, pairs", [
    ({"sse2"}, "SSE2", False),
    ({"avx2"}, "AVX2", True),                                      # Intel Haswell to Comet Lake, AMD Zen 1 to 3
    ({"avx2", "avx_vnni"}, "AVX-VNNI", False),                     # Intel Alder Lake
    (AVX512, "AVX-512 (VPMADDUBSW", True),                         # Intel Skylake-SP
    (AVX512 | {"avx512_vnni"}, "AVX-512 VNNI", False),             # Intel Cascade Lake, Ice Lake; AMD Zen 4, 5
    (AVX512 | {"avx512_vnni", "amx_tile", "amx_int8"}, "AMX", False),  # Intel Sapphire Rapids
    (None, None, None)])
def test_the_kernels_follow_onnx_runtimes_choice_by_cpu_flags(flags, kernel, pairs):
    name, in_16_bits = ort_kernels.u8s8_kernel(flags)
    assert in_16_bits is pairs and (name == kernel if kernel is None else name.startswith(kernel))


def test_the_probe_runs_on_the_integer_kernels_and_agrees_with_the_flags(tmp_path):
    model, images, expected = ort_kernels.probe_model()
    onnx.checker.check_model(model, full_check=True)
    ops = optimized_ops(model, tmp_path)
    assert {"QLinearConv", "QGemm"} <= set(ops) and not {"Conv", "Gemm", "DequantizeLinear"} & set(ops), ops
    description = ort_kernels.describe()
    assert description["exact"] == ort_kernels.probe()
    if description["pairs_in_16_bits"] is not None:  # (a Linux CPU: its flags say which kernels ONNX Runtime picks)
        assert description["exact"] is not description["pairs_in_16_bits"], description


# --- what export.py writes --------------------------------------------------------------------------------

def test_qat_models_keep_int8_weights_that_no_cpu_sums_wrongly(observed, tmp_path):
    model = onnx_model(*observed[7])
    weights = [t for t in model.graph.initializer if t.name.endswith(".weight")]
    assert len(weights) == 10 and {t.data_type for t in weights} == {TensorProto.INT8}
    assert ort_kernels.inexact_weights(model) == [] and onnx_graph.uint8_weights(model) == []
    ops = optimized_ops(model, tmp_path)
    assert all(ops.count(op) == n for op, n in INTEGER_OPS.items()) and "Conv" not in ops, ops
    # What export.py wrote before QAT weights were 7-bit, int8 weights of 8 bits, fails this check in every layer.
    assert len(ort_kernels.inexact_weights(int8_storage(onnx_model(*observed[8])))) == 10


def test_8_bit_weights_are_stored_as_uint8_with_zero_point_128_on_integer_kernels(observed, synthetic_dir, tmp_path):
    header, arrays = observed[8]
    model = onnx_model(header, arrays)
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [name for name in arrays if name.endswith(".weight")]
    assert sorted(onnx_graph.uint8_weights(model)) == sorted(weights)
    for name in weights:
        np.testing.assert_array_equal(stored[name].astype(np.int16) - 128, arrays[name])
        assert stored[name + ".zero_point"].dtype == np.uint8 and (stored[name + ".zero_point"] == 128).all()
    ops = optimized_ops(model, tmp_path)
    assert all(ops.count(op) == n for op, n in INTEGER_OPS.items()) and "Conv" not in ops, ops
    # The same integers: on a CPU whose kernels are exact anyway, the logits of the int8 storage, bit for bit (the
    # emulated CPU without VNNI, below, checks the rest).
    paths = {"uint8": str(tmp_path / "uint8.onnx"), "int8": str(tmp_path / "int8.onnx")}
    onnx.save(model, paths["uint8"])
    onnx.save(int8_storage(model), paths["int8"])
    images = high_contrast(first_test_images(synthetic_dir, 8))
    logits = {storage: inference.load_model(path).logits(images) for storage, path in paths.items()}
    if ort_kernels.probe():
        np.testing.assert_array_equal(logits["uint8"], logits["int8"])


def test_a_model_this_cpu_sums_wrongly_gets_one_warning_line(observed, synthetic_dir, tmp_path, capsys,
                                                             monkeypatch):
    """eval.py and predict.py on an ONNX model of 8-bit int8 weights (an earlier export.py's) where the probe finds
    saturating kernels; no warning for export.py's models or on an exact CPU."""
    old, new = str(tmp_path / "old.onnx"), str(tmp_path / "new.onnx")
    model = onnx_model(*observed[8])
    onnx.save(int8_storage(model), old)
    onnx.save(model, new)
    png = str(tmp_path / "image.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png)
    monkeypatch.setattr(ort_kernels, "probe", lambda: False)
    runs = {"eval.py": lambda path: evaluate.main(["-loc", path, "-data", synthetic_dir, "--num_samples", "10"]),
            "predict.py": lambda path: predict.main(["-loc", path, png])}
    for script, run in runs.items():
        run(old)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: {old} has int8 weights beyond 7 bits (10 layers)"), \
            (script, lines)
        assert "export the checkpoint again" in lines[0]
        run(new)
        assert capsys.readouterr().err == "", script
    monkeypatch.setattr(ort_kernels, "probe", lambda: True)
    runs["eval.py"](old)
    assert capsys.readouterr().err == ""


def test_a_checkpoint_without_weight_bits_is_an_8_bit_one(untrained, tmp_path, capsys):
    """Checkpoints written before layers recorded their weight bits load, evaluate and export as the 8-bit models
    they are."""
    params = checkpoint.read(untrained["QAT"])
    assert {int(value.asnumpy()) for name, value in params.items() if name.endswith(quant.BITS_SUFFIX)} == {7}
    old = str(tmp_path / "old.ckpt")
    checkpoint.save_parameters({name: value for name, value in params.items()
                                if not name.endswith(quant.BITS_SUFFIX)}, old)
    net, config = checkpoint.load_network(old, 10)
    assert config.weight_bits == 8 and net.conv1.weight_quant.num_bits == 8
    assert int(net.conv1.weight_quant.bits.asnumpy()) == 8


@pytest.mark.parametrize("layer, value, fragment", [
    ("fc", ms.Tensor(1, ms.int32), "its layers record weight bits [1, 7]: this version trains 2 to 8 bits"),
    ("all", ms.Tensor(9, ms.int32), "its layers record weight bits [9]"),
    ("all", ms.Tensor(7.0, ms.float32), "a weight-bits record is not one int32 number"),
    ("all", ms.Tensor(np.array([7, 7], np.int32)), "a weight-bits record is not one int32 number"),
    ("steps", ms.Tensor(1.0, ms.float32),
     "parameters of another shape or type (e.g. conv1.input_quant.steps Float32 instead of Int32)")])
def test_a_tampered_record_is_one_error_line(layer, value, fragment, untrained, synthetic_dir, tmp_path, capsys):
    params = checkpoint.read(untrained["QAT"])
    for name in params:
        if (layer == "all" and name.endswith(quant.BITS_SUFFIX)) or name in (f"{layer}.weight_quant.bits",
                                                                             "conv1.input_quant." + layer):
            params[name] = ms.Parameter(value, name=name)
    path = str(tmp_path / "tampered.ckpt")
    checkpoint.save_parameters(params, path)
    expect_error(evaluate.main, ["-loc", path, "-data", synthetic_dir], capsys, path, fragment)
    expect_error(export.main, ["-loc", path, "--format", "onnx", "-o", str(tmp_path / "m.onnx")], capsys, fragment)
    assert sorted(os.listdir(tmp_path)) == ["tampered.ckpt"]


# --- on an emulated CPU without VNNI ----------------------------------------------------------------------

EMULATED_LOGITS = """
import sys
import numpy as np
import onnxruntime as ort
images = np.load(sys.argv[1])
for path in sys.argv[2:]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    np.save(path + ".npy", session.run(None, {"image": images})[0])
"""


def emulated(*argv):
    """python argv... in the project's folder on QEMU's EMULATED_CPU: the CompletedProcess, its stderr without
    QEMU's own warnings (the host features its model of the CPU lacks)."""
    result = subprocess.run(["qemu-x86_64", "-cpu", EMULATED_CPU, sys.executable, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    result.stderr = "".join(line for line in result.stderr.splitlines(keepends=True)
                            if not line.startswith("qemu-x86_64: warning"))
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
@needs_qemu
def test_the_probe_finds_the_emulated_cpu_inexact():
    assert emulated("-c", "from qatcifar import ort_kernels; print(ort_kernels.probe())").stdout.strip() == "False"


@pytest.mark.slow
@needs_qemu
def test_predict_warns_on_the_emulated_cpu_about_an_older_export(observed, tmp_path):
    old = str(tmp_path / "old.onnx")
    onnx.save(int8_storage(onnx_model(*observed[8])), old)
    png = str(tmp_path / "image.png")
    Image.new("RGB", (32, 32), (250, 250, 250)).save(png)
    result = emulated("predict.py", "-loc", old, png)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {old} has int8 weights beyond 7 bits"), lines
    assert result.stdout.strip().splitlines()[-1].startswith(png)


@pytest.mark.slow
@needs_qemu
def test_int8_onnx_agrees_with_the_integer_reference_on_a_cpu_without_vnni(trained_exports, synthetic_dir,
                                                                           tmp_path):
    """The trained model's export (7-bit weights), and its network with 8-bit weights as export.py stores them
    (uint8), on high-contrast images; the 8-bit weights stored as int8, as before, are wrong on every image."""
    images = high_contrast(first_test_images(synthetic_dir, 12))
    np.save(tmp_path / "images.npy", images)
    params = checkpoint.read(trained_exports["checkpoint"])
    eight = str(tmp_path / "eight.ckpt")  # the trained network, as an 8-bit checkpoint (no weight bits recorded)
    checkpoint.save_parameters({name: value for name, value in params.items()
                                if not name.endswith(quant.BITS_SUFFIX)}, eight)
    header, arrays = int8_export.int8_model(*checkpoint.load_network(eight, 10))
    models = {"qat": trained_exports["onnx"], "eight": str(tmp_path / "eight.onnx"),
              "eight_int8": str(tmp_path / "eight_int8.onnx")}
    onnx.save(onnx_model(header, arrays), models["eight"])
    onnx.save(int8_storage(onnx_model(header, arrays)), models["eight_int8"])
    emulated("-c", EMULATED_LOGITS, str(tmp_path / "images.npy"), *models.values())
    logits = {name: np.load(path + ".npy") for name, path in models.items()}
    qat_reference = inference.load_model(trained_exports["int8"]).logits(images)
    eight_reference = int8.run({"header": header, "arrays": arrays}, images)
    assert_agrees_with_reference(logits["qat"], qat_reference)
    assert_agrees_with_reference(logits["eight"], eight_reference)
    with pytest.raises(AssertionError):  # what these checks would see without the uint8 storage
        assert_agrees_with_reference(logits["eight_int8"], eight_reference)
