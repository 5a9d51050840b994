"""The int8 model file and its integer-arithmetic reference inference (numpy only, no MindSpore).

    >>> import int8
    >>> model = int8.load("checkpoints/resnet18_qat.int8.npz")
    >>> logits = int8.run(model, images)       # images: float32 (N, 3, 32, 32), normalized

The file (written by `python export.py --format int8`) is a numpy .npz archive: the key
`header.json` holds a JSON document describing the graph, every other key is an array:
int8 weights, float32 per-channel weight scales and int32 biases per layer. Every tensor
between layers is uint8 with its own scale and zero point (real = scale * (q - zero_point)).

The inference follows Jacob et al. 2018, section 2: a layer multiplies int8 by int8 and
accumulates in int32, adds an int32 bias (scale: input scale x weight scale), and
requantizes to its output's uint8 with a fixed-point multiplier (an int32 and a shift)
derived from the stored scales. Only the network's input (quantize) and the logits
(dequantize) touch floating point.
"""
import json

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FORMAT = "qat-resnet-int8"
VERSION = 1
HEADER_KEY = "header.json"
ADD_PRECISION_BITS = 16  # extra fraction bits of residual additions, rounded away once at the end


def save(path, header, arrays):
    """Write header and arrays as one .npz file (to exactly `path`; np.savez would append .npz)."""
    payload = dict(arrays)
    payload[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **payload)


def load(path):
    """{"header": dict, "arrays": {name: array}}; raises ValueError if the file is not an int8 model."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"not an .npz archive ({e})") from None
    if HEADER_KEY not in arrays:
        raise ValueError(f"no {HEADER_KEY} in the archive")
    header = json.loads(arrays.pop(HEADER_KEY).tobytes())
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
    return {"header": header, "arrays": arrays}


def quantize_multiplier(multiplier):
    """Real multipliers (> 0) as int64 m0 in [2^30, 2^31) and shifts, with multiplier = m0 * 2^(shift - 31)."""
    multiplier = np.asarray(multiplier, dtype=np.float64)
    mantissa, shift = np.frexp(multiplier)  # multiplier = mantissa * 2^shift, mantissa in [0.5, 1)
    m0 = np.round(mantissa * (1 << 31)).astype(np.int64)
    carry = m0 == (1 << 31)  # mantissa rounded up to 1.0
    return np.where(carry, m0 // 2, m0), np.where(carry, shift + 1, shift).astype(np.int64)


def requantize(values, multiplier):
    """round(values * multiplier) in integer arithmetic (values int64, |values| < 2^31; 0 < multiplier < 2^30)."""
    m0, shift = quantize_multiplier(multiplier)
    # Products stay below 2^62; a shift of 62 already rounds them to 0 (a multiplier below 2^-31).
    right = np.minimum(31 - shift, 62)
    product = values * m0
    return (product + (np.int64(1) << (right - 1))) >> right


def quantize_input(x, scale, zero_point):
    return np.clip(np.round(x / np.float32(scale)) + zero_point, 0, 255).astype(np.uint8)


def conv(q, zero_point, weight, bias, stride, padding):
    """int32 accumulators of a convolution of uint8 q (N, C, H, W) with int8 weight (O, C, k, k)."""
    centered = q.astype(np.int32) - zero_point  # real zero is the zero point: zero padding is exact
    if padding:
        centered = np.pad(centered, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_channels, _, k, _ = weight.shape
    windows = sliding_window_view(centered, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, h, w = windows.shape[:4]
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)
    # int8 x uint8 products summed over at most 4,608 terms stay below 2^28, so float64 matrix
    # multiplication (BLAS) is exact here and gives the int32 accumulator bit for bit, much faster
    # than numpy's integer matmul.
    acc = columns.astype(np.float64) @ weight.reshape(out_channels, -1).T.astype(np.float64)
    acc = acc.astype(np.int64) + bias
    return acc.reshape(n, h, w, out_channels).transpose(0, 3, 1, 2)


def to_uint8(q, tensor, relu):
    """Add the output's zero point and saturate; ReLU is the clamp at the zero point."""
    q = q + tensor["zero_point"]
    return np.clip(q, tensor["zero_point"] if relu else 0, 255).astype(np.uint8)


def run(model, images):
    """Logits (float32, N x classes) of normalized float32 images (N, 3, 32, 32)."""
    header, arrays = model["header"], model["arrays"]
    tensors = header["tensors"]
    values = {}
    for node in header["graph"]:
        op = node["op"]
        out = tensors.get(node["output"])
        if op == "quantize":
            values[node["output"]] = quantize_input(images, out["scale"], out["zero_point"])
        elif op == "conv":
            source = tensors[node["input"]]
            weight_scale = arrays[node["weight_scale"]].astype(np.float64)
            acc = conv(values[node["input"]], source["zero_point"], arrays[node["weight"]],
                       arrays[node["bias"]].astype(np.int64), node["stride"], node["padding"])
            multiplier = (source["scale"] * weight_scale / out["scale"])[None, :, None, None]
            values[node["output"]] = to_uint8(requantize(acc, multiplier), out, node["relu"])
        elif op == "add":
            total = 0
            for name in node["inputs"]:
                source = tensors[name]
                centered = values[name].astype(np.int64) - source["zero_point"]
                total = total + requantize(centered << ADD_PRECISION_BITS, source["scale"] / out["scale"])
            half = np.int64(1) << (ADD_PRECISION_BITS - 1)
            values[node["output"]] = to_uint8((total + half) >> ADD_PRECISION_BITS, out, node["relu"])
        elif op == "mean":
            source = tensors[node["input"]]
            centered = values[node["input"]].astype(np.int64) - source["zero_point"]
            count = centered.shape[2] * centered.shape[3]
            multiplier = source["scale"] / (count * out["scale"])
            values[node["output"]] = to_uint8(requantize(centered.sum(axis=(2, 3)), multiplier), out, relu=False)
        elif op == "dense":
            source = tensors[node["input"]]
            centered = values[node["input"]].astype(np.float64) - source["zero_point"]
            acc = (centered @ arrays[node["weight"]].T.astype(np.float64)).astype(np.int64) + arrays[node["bias"]]
            weight_scale = arrays[node["weight_scale"]].astype(np.float64)
            values[node["output"]] = (acc * (source["scale"] * weight_scale)).astype(np.float32)
        else:
            raise ValueError(f"unknown operation {op!r} in the int8 graph")
    return values[header["graph"][-1]["output"]]
