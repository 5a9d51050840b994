"""ONNX Runtime's integer kernels on this CPU: which ones it takes, whether they are exact, and which int8 weights
they multiply exactly everywhere.

    >>> import ort_kernels
    >>> ort_kernels.pairs_fit_16_bits(weight)  # int8 (out_channels, ...): exact on every CPU?
    >>> ort_kernels.describe()                 # {"vnni": True, "kernel": "AVX-512 VNNI", "exact": True, ...}

Why it matters: ONNX Runtime multiplies uint8 activations by int8 weights (QLinearConv, QGemm)
with the fastest instructions the CPU has (MLAS picks them at start-up from CPUID). With VNNI
(AVX-512 VNNI, AVX-VNNI) or AMX every product is added into 32 bits: exact. Without them
(AVX2, and AVX-512 without VNNI: Intel Haswell to Skylake, AMD Zen 1 to 3) VPMADDUBSW adds each
pair of neighbouring products into 16 bits and saturates there: 255 x 127 + 255 x 127 = 64,770
does not fit in 32,767. The same model then answers differently on such a CPU.

A pair cannot saturate when, in every output channel, the two largest positive weights add up
to at most 128 and the two most negative ones to at least -128 (255 x 128 = 32,640), whatever
the uint8 activations and however the kernel pairs the weights. 7-bit weights ([-63, 63], what
QAT trains: quant.QuantConfig) always pass; 8-bit ones ([-127, 127]) do not. onnx_graph.py stores
weights that pass as int8, and others as uint8 with zero point 128, the same numbers, which ONNX
Runtime multiplies with its u8 x u8 kernels: exact on every CPU (16-bit products added in 32
bits), but without the u8 x s8 kernels' speed.
"""
import numpy as np

PAIR_LIMIT = 128  # the largest sum of two same-signed weights whose products with 255 fit in int16 (255 x 128)


def pairs_fit_16_bits(weight):
    """True if no two products of uint8 activations with this int8 weight's rows (output channels) can overflow
    16 bits when added, whichever two of a row the kernel pairs."""
    rows = np.asarray(weight, np.int16).reshape(len(weight), -1)
    rows = rows[np.abs(rows).max(axis=1) > PAIR_LIMIT // 2]  # (any two of a row within +-64 fit: a quick pass)
    if rows.shape[1] < 2 or len(rows) == 0:  # (a lone product fits too: 255 x 128)
        return True
    positive, negative = np.maximum(rows, 0), np.maximum(-rows, 0)
    top_two = [np.partition(side, -2, axis=1)[:, -2:].sum(axis=1) for side in (positive, negative)]
    return bool(max(side.max() for side in top_two) <= PAIR_LIMIT)


def inexact_weights(model):
    """The names of an ONNX model's (onnx.ModelProto) int8 weights whose products some CPUs sum wrongly: those of
    two or more dimensions that fail pairs_fit_16_bits (biases are int32)."""
    from onnx import TensorProto, numpy_helper

    return [t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2
            and not pairs_fit_16_bits(numpy_helper.to_array(t))]


# --- this CPU ------------------------------------------------------------------------------------

def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags as Linux lists them (a set), or None where it does not say."""
    try:
        with open(path) as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def u8s8_kernel(flags):
    """(name, pairs in 16 bits?) of the uint8 x int8 kernels ONNX Runtime's MLAS picks on an x86-64 CPU with these
    flags, in its order (onnxruntime/core/mlas/lib/platform.cpp, 1.32): a later match replaces an earlier one.
    (None, None) without flags."""
    if flags is None:
        return None, None
    kernel = ("SSE2 (16-bit products, added in 32 bits)", False)
    if "avx2" in flags:
        kernel = ("AVX2 (VPMADDUBSW: pairs of products in 16 bits)", True)
        if "avx_vnni" in flags:
            kernel = ("AVX-VNNI", False)
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            kernel = ("AVX-512 (VPMADDUBSW: pairs of products in 16 bits)", True)
            if "avx512_vnni" in flags:
                kernel = ("AVX-512 VNNI", False)
        if {"amx_tile", "amx_int8"} <= flags and not kernel[1]:
            kernel = (f"AMX for matrix products, {kernel[0]} for convolutions", False)
    return kernel


def probe():
    """True if ONNX Runtime's fused integer kernels on this CPU compute exactly where pairs of products overflow 16
    bits: a QDQ convolution and a QDQ dense layer of 255 x 127 products, run and compared with the exact result."""
    import onnxruntime as ort

    model, images, expected = probe_model()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": images})
    return all(np.array_equal(got, want) for got, want in zip(outputs, expected, strict=True))


PROBE_CHANNELS = 64  # input channels of the probe: a 3x3 convolution of 576 products per output


def probe_model():
    """(ONNX model, its input, its exact outputs): uint8 255s times int8 127s, the worst case for 16-bit pairs,
    through a 3x3 convolution (quantized output) and a dense layer (float output), as export.py writes them."""
    from onnx import TensorProto, helper, numpy_helper

    channels, size, out = PROBE_CHANNELS, 4, 8
    conv_weight = np.full((out, channels, 3, 3), 127, np.int8)
    dense_weight = np.full((out, channels * size * size), 127, np.int8)
    y_scale = np.float32(1 << 17)  # 255 x 127 x 576 / 2^17 = 142.3: within uint8, and far from its saturated value

    def constant(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    initializers = [constant("one", np.float32(1)), constant("zero", np.uint8(0)), constant("y_scale", y_scale),
                    constant("conv.w", conv_weight), constant("dense.w", dense_weight),
                    constant("w.scale", np.ones(out, np.float32)), constant("w.zero", np.zeros(out, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "one", "zero"], ["dq_conv"]),
             helper.make_node("Flatten", ["q"], ["q_flat"]),
             helper.make_node("DequantizeLinear", ["q_flat", "one", "zero"], ["dq_dense"]),
             helper.make_node("DequantizeLinear", ["conv.w", "w.scale", "w.zero"], ["conv.wf"], axis=0),
             helper.make_node("DequantizeLinear", ["dense.w", "w.scale", "w.zero"], ["dense.wf"], axis=0),
             helper.make_node("Conv", ["dq_conv", "conv.wf"], ["conv"], kernel_shape=[3, 3]),
             helper.make_node("QuantizeLinear", ["conv", "y_scale", "zero"], ["conv_q"]),
             helper.make_node("Gemm", ["dq_dense", "dense.wf"], ["dense"], transB=1)]
    graph = helper.make_graph(
        nodes, "int8-pair-probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("conv_q", TensorProto.UINT8, [1, out, size - 2, size - 2]),
         helper.make_tensor_value_info("dense", TensorProto.FLOAT, [1, out])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    images = np.full((1, channels, size, size), 255, np.float32)
    conv = np.full((1, out, size - 2, size - 2), np.rint(255 * 127 * channels * 9 / y_scale), np.uint8)
    dense = np.full((1, out), 255 * 127 * channels * size * size, np.float32)
    return model, images, [conv, dense]


def describe():
    """What ONNX Runtime's int8 path is on this CPU: {"vnni": bool or None, "kernel": name or None,
    "pairs_in_16_bits": bool or None (from the CPU's flags), "exact": bool (the probe)}."""
    flags = cpu_flags()
    name, pairs = u8s8_kernel(flags)
    vnni = None if flags is None else bool({"avx512_vnni", "avx_vnni"} & flags)
    return {"vnni": vnni, "kernel": name, "pairs_in_16_bits": pairs, "exact": probe()}
