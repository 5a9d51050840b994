"""The int8 model file and its integer-arithmetic reference inference (numpy only, no MindSpore).

    >>> import int8
    >>> model = int8.load("checkpoints/resnet18_qat.int8.npz")
    >>> logits = int8.run(model, images)       # images: float32 (N, 3, 32, 32), normalized

The file (written by `python export.py --format int8`) is a numpy .npz archive: the key
`header.json` holds a JSON document describing the graph, every other key is an array:
int8 weights (of `weight_bits` bits: 7 from QAT, 8 from older checkpoints and post-training
quantization; a layer's own `weight_bits` where the layers differ), float32 per-channel weight
scales and int32 biases per layer. Weights of at most 4 bits are packed, two to a byte (PACKED_BITS):
a flat uint8 array, the first value of each pair in the low half of its byte, the layer's
`weight_shape` in its node. Every tensor
between layers is uint8 with its own scale and zero point (real = scale * (q - zero_point)),
saturated at 255, or at 2^bits - 1 where the tensor has `bits` (activations of fewer bits).

The inference follows Jacob et al. 2018, section 2: a layer multiplies int8 by int8 and
accumulates in int32, adds an int32 bias (scale: input scale x weight scale), and
requantizes to its output's uint8 with a fixed-point multiplier (an int32 and a shift)
derived from the stored scales. Where activations have fewer than 8 bits, that bias's rounding
is a sizeable part of an output level (docs/benchmarks.md#learned-step-sizes measures what it
costs a model of 4-bit activations): a layer's `bias_bits` k then gives its bias k fraction
bits (scale: input scale x weight scale / 2^k), and the accumulator is shifted left by k before
the bias is added (file version 2; ONNX's QLinearConv has no such field, and ONNX export
refuses those activations anyway). Only the network's input (quantize) and the logits
(dequantize) touch floating point.

File version 3 computes what TensorFlow Lite's reference kernels compute (TensorFlow Lite Micro's
arithmetic, `tflite_arithmetic`), so that the same numbers come out of this reference, a .tflite
export run by TFLite Micro, and the C export: scales are float32 numbers; a multiplier is a
rounding doubling high multiply by an int32 followed by a rounding right shift (TFLite's
MultiplyByQuantizedMultiplier, `tflite_requantize`); an addition rescales both inputs, shifted
left by 20 bits, to twice the larger input scale before it rescales the sum (TFLite's int8 ADD);
the mean's multiplier takes the division by the count into its int32 and its shift (TFLite's MEAN);
the input is quantized as TFLite's QUANTIZE does (float32 division, rounding half away from
zero). Files of versions 1 and 2 run as they always did (rounding half up, one multiplier per
addition with 16 extra fraction bits, an integer mean).
"""
import io
import json
import math
import zipfile

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FORMAT = "qat-resnet-int8"
VERSION = 3  # the newest this module writes and runs
VERSIONS = {1: "8-bit activations", 2: "biases with fraction bits (bias_bits), for activations of fewer bits",
            3: "TensorFlow Lite's arithmetic, bias_bits as in version 2"}
TFLITE_VERSION = 3  # the first version whose arithmetic is TFLite's
TFLITE_ADD_SHIFT = 20  # TFLite's int8 ADD shifts its inputs left by this many bits before rescaling them
MAX_BIAS_BITS = 16
HEADER_KEY = "header.json"
ADD_PRECISION_BITS = 16  # extra fraction bits of residual additions, rounded away once at the end
MAX_MEMBERS, MAX_BYTES = 1000, 64 << 20  # an int8 ResNet-18 file: 84 arrays, 11.2 MB
MAX_NODES = 1000  # operations; ResNet-18 has 31
PACKED_BITS = 4  # weights of at most this many bits are stored two to a byte
MAX_COLUMNS = 1 << 20  # values per image of a convolution's im2col or output (ResNet-18: at most 589,824)


# What a layer costs in the file besides its values: three arrays' .npy headers (128 bytes each) and zip records,
# its node and tensors in header.json; measured on files export.py wrote (test_export.py checks the estimate).
BYTES_PER_LAYER = 1200
BYTES_PER_PACKED_LAYER = 40  # and a packed layer's weight_shape in header.json, and its flat array's longer header


def expected_size(profile):
    """The size of the int8 file of a network, from networks.profile: its weights' bytes (one a weight, packed
    weights half of one), an int32 bias and a float32 scale per output channel, and each layer's records (a packed
    layer's longer)."""
    return (profile["weight_bytes"] + 8 * profile["channels"] + BYTES_PER_LAYER * profile["layers"]
            + BYTES_PER_PACKED_LAYER * profile["packed_layers"])


def save(path, header, arrays):
    """Write header and arrays as one .npz file (to exactly `path`; np.savez would append .npz), the weights of layers
    of at most PACKED_BITS bits packed (`pack`)."""
    payload = dict(arrays)
    if isinstance(header, dict) and isinstance(header.get("graph"), list):  # (the tests write broken ones too)
        header = dict(header, graph=[dict(node) for node in header["graph"]])
        for node in header["graph"]:
            if "weight" in node and node.get("weight_bits", header.get("weight_bits", 8)) <= PACKED_BITS:
                node["weight_shape"] = list(payload[node["weight"]].shape)
                payload[node["weight"]] = pack(payload[node["weight"]])
    payload[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    archive = io.BytesIO()  # (in memory first: a zip archive cut short by a full disk raises again when collected)
    np.savez(archive, **payload)
    with open(path, "wb") as f:
        f.write(archive.getbuffer())


def pack(weight):
    """Signed values of at most 4 bits, two to a byte: the first of each pair in the low half (a flat uint8 array)."""
    nibbles = (weight.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack(packed, shape):
    """`pack`'s values back, as int8 of `shape`; ValueError if the bytes do not hold that many."""
    count = math.prod(shape)
    if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) != (count + 1) // 2:
        raise ValueError(f"{packed.dtype} {packed.shape} does not hold {count} packed values of shape {shape}")
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


def _unpack_weights(header, arrays):
    """Unpack, in place, the weights the file's nodes say are packed (`weight_shape`)."""
    for i, node in enumerate(header.get("graph") or []):
        if not isinstance(node, dict) or "weight_shape" not in node:
            continue
        shape, name = node["weight_shape"], node.get("weight")
        if not (isinstance(shape, list) and len(shape) in (2, 4) and all(_int(n, 1, 1 << 16) for n in shape)
                and isinstance(name, str) and name in arrays):
            raise ValueError(f"operation {i}: weight_shape {shape!r} of weight {name!r} is not an array's shape")
        try:
            arrays[name] = unpack(arrays[name], shape)
        except ValueError as e:
            raise ValueError(f"operation {i}: weight {name!r}: {e}") from None


def load(path):
    """{"header": dict, "arrays": {name: array}}; raises ValueError, saying why, if the file is not an int8 model
    this module can run (see `check`). Sizes are checked before anything is read; nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_members(archive)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"not an .npz archive of arrays ({e})") from None
    if HEADER_KEY not in arrays:
        raise ValueError(f"no {HEADER_KEY} in the archive")
    try:
        header = json.loads(arrays.pop(HEADER_KEY).tobytes())
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError; nesting too deep a RecursionError)
        raise ValueError(f"{HEADER_KEY} is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") not in VERSIONS:
        found = (header.get("format"), header.get("version")) if isinstance(header, dict) else type(header).__name__
        *older, newest = map(str, VERSIONS)
        raise ValueError(f"format {found}, expected {FORMAT!r} version {', '.join(older)} or {newest}")
    _unpack_weights(header, arrays)
    model = {"header": header, "arrays": arrays}
    check(model)
    return model


def tflite_arithmetic(header):
    """Whether a file's numbers are TFLite's (version 3 on), else the reference's of versions 1 and 2."""
    return header.get("version", 1) >= TFLITE_VERSION


def check_members(archive):
    """Every member an .npy array of a plain dtype whose data fits the member, sizes within the limits."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_BYTES:
        raise ValueError(f"{len(members)} members, {sum(m.file_size for m in members)} bytes: more than an int8 "
                         f"ResNet-18 holds (at most {MAX_MEMBERS} members, {MAX_BYTES} bytes)")
    for member in members:
        if not member.filename.endswith(".npy"):
            raise ValueError(f"member {member.filename} is not an array")
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"member {member.filename} holds Python objects")
        if math.prod(shape) * dtype.itemsize > member.file_size:
            raise ValueError(f"member {member.filename} claims shape {shape}, more than its {member.file_size} bytes")


def check(model):
    """Raise ValueError unless the graph is one `run` can execute: known operations in order, every input
    defined before it is used, weights of the right dtypes and shapes for their inputs, valid quantization
    parameters, integer accumulators that fit int32, and the logits last."""
    header, arrays = model["header"], model["arrays"]
    graph, tensors = header.get("graph"), header.get("tensors")
    if not (isinstance(graph, list) and graph and all(isinstance(node, dict) for node in graph)
            and isinstance(tensors, dict)):
        raise ValueError("the header has no graph (a list of operations) or no tensors")
    if len(graph) > MAX_NODES:
        raise ValueError(f"the graph has {len(graph)} operations, more than the {MAX_NODES} this reference runs")
    input_shape = header.get("input_shape")
    if not (isinstance(input_shape, list) and len(input_shape) == 3 and all(_int(n, 1, 4096) for n in input_shape)):
        raise ValueError(f"input_shape {input_shape!r} is not [channels, height, width]")
    shapes = {}  # tensor name -> shape of one image's tensor
    bits = header.get("weight_bits", 8)  # (a layer's own, where it says)
    if not _int(bits, 2, 8):
        raise ValueError(f"weight_bits {bits!r} is not 2 to 8")
    for i, node in enumerate(graph):
        try:
            _check_node(node, tensors, arrays, shapes, input_shape, last=i == len(graph) - 1, bits=bits)
        except (KeyError, TypeError, ValueError) as e:
            what = (e.args[0] if isinstance(e, ValueError) else f"{e.args[0]!r} is missing" if isinstance(e, KeyError)
                    else f"{type(e).__name__}: {e}")
            raise ValueError(f"operation {i} ({node.get('op')!r}, {node.get('name', node.get('output'))!r}): "
                             f"{what}") from None
    if shapes.get("logits") != (header.get("num_classes"),):
        raise ValueError(f"num_classes {header.get('num_classes')!r} is not the logits' {shapes.get('logits')}")


def _check_node(node, tensors, arrays, shapes, input_shape, last, bits):
    op, out = node["op"], node["output"]
    if op not in ("quantize", "conv", "add", "mean", "dense"):
        raise ValueError(f"unknown operation {op!r}")
    if out in shapes or out == "image":
        raise ValueError(f"output {out!r} is defined twice")
    if (op == "dense") != last or (op == "dense") != (out == "logits"):
        raise ValueError("the graph must end in one dense operation writing 'logits'")
    if op != "dense":
        _quantization(tensors, out)
    if op == "quantize":
        if node["input"] != "image" or shapes:
            raise ValueError("only the first operation quantizes the input image")
        shapes[out] = tuple(input_shape)
        return
    sources = node["inputs"] if op == "add" else [node["input"]]
    for source in sources:
        if source not in shapes:
            raise ValueError(f"input {source!r} is not an earlier operation's output")
        _quantization(tensors, source)
    shape = shapes[sources[0]]
    if op == "conv":
        stride, padding = node["stride"], node["padding"]
        weight = _array(arrays, node["weight"], np.int8, 4)
        out_channels, channels, k, k2 = weight.shape
        if len(shape) != 3 or channels != shape[0] or k != k2 or not (_int(stride, 1, 64) and _int(padding, 0, k - 1)):
            raise ValueError(f"weight {weight.shape}, stride {stride!r} and padding {padding!r} do not fit an "
                             f"input of shape {shape}")
        height, width = ((n + 2 * padding - k) // stride + 1 for n in shape[1:])
        if height < 1 or width < 1:
            raise ValueError(f"a {k}x{k} kernel does not fit an input of shape {shape}")
        if height * width * max(channels * k * k, out_channels) > MAX_COLUMNS:
            raise ValueError(f"a {height}x{width} output of {out_channels} channels from {channels}x{k}x{k} windows is "
                             f"more than the {MAX_COLUMNS} values per image this reference computes in memory")
        scale = _weight_parameters(node, arrays, weight, bits, tensors[sources[0]])
        _multiplier(tensors[sources[0]]["scale"] * scale.astype(np.float64) / tensors[out]["scale"]
                    / 2 ** node.get("bias_bits", 0))
        shapes[out] = (out_channels, height, width)
    elif op == "add":
        if len(sources) < 2 or any(shapes[source] != shape for source in sources):
            raise ValueError(f"inputs of shapes {[shapes[source] for source in sources]} cannot be added")
        _multiplier([tensors[source]["scale"] / tensors[out]["scale"] for source in sources])
        shapes[out] = shape
    elif op == "mean":
        if len(shape) != 3:
            raise ValueError(f"input of shape {shape} has no spatial dimensions to average")
        _multiplier(tensors[sources[0]]["scale"] / (shape[1] * shape[2] * tensors[out]["scale"]))
        shapes[out] = shape[:1]
    elif op == "dense":
        weight = _array(arrays, node["weight"], np.int8, 2)
        if shape != weight.shape[1:]:
            raise ValueError(f"weight {weight.shape} does not fit an input of shape {shape}")
        _weight_parameters(node, arrays, weight, bits, tensors[sources[0]])
        shapes[out] = weight.shape[:1]
    if op in ("conv", "add") and not isinstance(node["relu"], bool):
        raise ValueError(f"relu {node['relu']!r} is not true or false")


def _quantization(tensors, name):
    tensor = tensors[name]
    bits = tensor.get("bits", 8) if isinstance(tensor, dict) else 8
    if not (isinstance(tensor, dict) and _real(tensor.get("scale"), 1e-30, 1e30) and _int(bits, 2, 8)
            and _int(tensor.get("zero_point"), 0, 2 ** bits - 1)):
        raise ValueError(f"tensor {name!r} has no scale > 0, bits 2 to 8 and zero_point in 0..2^bits - 1: {tensor!r}")


def _weight_parameters(node, arrays, weight, bits, source):
    """Per-output-channel scales and int32 biases, accumulators (of inputs of tensor `source`'s bits, shifted by the
    layer's bias_bits) that stay within int32, and weights within the layer's bits (its own `weight_bits`, else the
    file's `bits`)."""
    channels = weight.shape[0]
    bits = node.get("weight_bits", bits)
    if not _int(bits, 2, 8):
        raise ValueError(f"weight_bits {bits!r} is not 2 to 8")
    limit = 2 ** (bits - 1)
    if weight.size and (weight.min() < -limit or weight.max() > limit - 1):
        raise ValueError(f"weights from {weight.min()} to {weight.max()} are not {bits}-bit values")
    scale = _array(arrays, node["weight_scale"], np.float32, 1)
    bias = _array(arrays, node["bias"], np.int32, 1)
    if scale.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(f"weight_scale {scale.shape} and bias {bias.shape} do not fit {channels} output channels")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("weight_scale holds a value that is not finite and > 0")
    fraction = node.get("bias_bits", 0)
    if not _int(fraction, 0, MAX_BIAS_BITS):
        raise ValueError(f"bias_bits {fraction!r} is not 0 to {MAX_BIAS_BITS}")
    terms = math.prod(weight.shape[1:])
    largest = (2 ** source.get("bits", 8) - 1) * limit * terms << fraction
    if largest + int(np.abs(bias.astype(np.int64)).max()) >= 2 ** 31:
        raise ValueError(f"{terms} products per output{f' shifted by {fraction} bias bits' if fraction else ''} and "
                         f"biases up to {np.abs(bias).max()} can overflow int32")
    return scale


def _multiplier(multipliers):
    """Requantization (`requantize`) takes multipliers in (0, 2^16) here, whose products stay within int64."""
    multipliers = np.asarray(multipliers, dtype=np.float64)
    if not (np.isfinite(multipliers).all() and (multipliers > 0).all() and (multipliers < 2 ** 16).all()):
        raise ValueError("the scales give a requantization multiplier outside (0, 65536)")


def _array(arrays, name, dtype, ndim):
    if not isinstance(name, str) or name not in arrays:
        raise ValueError(f"array {name!r} is not in the file")
    array = arrays[name]
    if array.dtype != dtype or array.ndim != ndim:
        raise ValueError(f"array {name!r} is {array.dtype} {array.shape}, not {ndim}-D {np.dtype(dtype)}")
    return array


def _int(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value, low, high):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


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


def tflite_multiplier(multiplier):
    """TFLite's QuantizeMultiplier: real multipliers (> 0, float64) as int64 m0 in [2^30, 2^31) and shifts, with
    multiplier = m0 * 2^(shift - 31), the mantissa rounded half away from zero; below 2^-32, 0 (m0 = 0, shift 0)."""
    mantissa, shift = np.frexp(np.asarray(multiplier, dtype=np.float64))
    m0 = np.floor(mantissa * (1 << 31) + 0.5).astype(np.int64)  # (exact: the mantissa has 53 bits)
    carry = m0 == (1 << 31)
    m0, shift = np.where(carry, m0 // 2, m0), np.where(carry, shift + 1, shift).astype(np.int64)
    tiny = shift < -31
    return np.where(tiny, 0, m0), np.where(tiny, 0, shift)


def tflite_requantize(values, multiplier):
    """TFLite's MultiplyByQuantizedMultiplier of int32 values (in int64): a left shift where the multiplier is >= 1,
    the rounding doubling high multiply by m0 (SaturatingRoundingDoublingHighMul: the product plus 2^30, or 1 - 2^30
    below zero, divided by 2^31 toward zero), then a right shift that rounds half away from zero
    (RoundingDivideByPOT)."""
    return _multiply(values, *tflite_multiplier(multiplier))


def _multiply(values, m0, shift):
    """TFLite's MultiplyByQuantizedMultiplier of values by m0 * 2^(shift - 31) (tflite_requantize)."""
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    product = (values << left) * m0  # |values << left| < 2^31 (check), m0 < 2^31
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
    mask = (np.int64(1) << right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def round_half_away(x):
    """std::round, TFLite's TfLiteRound, of float32 values: halves away from zero (np.round takes them to even),
    exactly (the integer part and the fraction are exact in float32)."""
    whole = np.floor(np.abs(x))
    return np.copysign(whole + (np.abs(x) - whole >= 0.5), x).astype(x.dtype)


def quantize_input(x, tensor, tflite=False):
    """uint8 levels of float32 images; `tflite`: as TFLite's QUANTIZE, rounding halves away from zero."""
    top = 2 ** tensor.get("bits", 8) - 1
    levels = x / np.float32(tensor["scale"])
    levels = round_half_away(levels) if tflite else np.round(levels)
    return np.clip(levels + tensor["zero_point"], 0, top).astype(np.uint8)


def conv(q, zero_point, weight, bias, stride, padding, bias_bits=0):
    """int32 accumulators of a convolution of uint8 q (N, C, H, W) with int8 weight (O, C, k, k), shifted left by
    bias_bits before the bias is added."""
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
    acc = (acc.astype(np.int64) << bias_bits) + bias
    return acc.reshape(n, h, w, out_channels).transpose(0, 3, 1, 2)


def to_uint8(q, tensor, relu):
    """Add the output's zero point and saturate (at 2^bits - 1: 255, or fewer levels); ReLU is the clamp at the zero
    point."""
    q = q + tensor["zero_point"]
    return np.clip(q, tensor["zero_point"] if relu else 0, 2 ** tensor.get("bits", 8) - 1).astype(np.uint8)


def run(model, images):
    """Logits (float32, N x classes) of normalized float32 images (N, 3, 32, 32)."""
    return run_all(model, images)["logits"]


def scale_of(tensor, tflite):
    """A tensor's scale as the file's arithmetic takes it: TFLite's are float32 numbers."""
    return float(np.float32(tensor["scale"])) if tflite else tensor["scale"]


def run_all(model, images):
    """Every tensor of the graph for normalized float32 images (N, 3, 32, 32): {name: uint8 array} of the
    activations, "logits" (float32) and "logits.acc", the classifier's int64 accumulators (bias included)."""
    header, arrays = model["header"], model["arrays"]
    tensors, tflite = header["tensors"], tflite_arithmetic(header)
    rescale = tflite_requantize if tflite else requantize
    values = {}
    for node in header["graph"]:
        op = node["op"]
        out = tensors.get(node["output"])
        if op == "quantize":
            values[node["output"]] = quantize_input(images, out, tflite)
        elif op == "conv":
            source = tensors[node["input"]]
            weight_scale = arrays[node["weight_scale"]].astype(np.float64)
            fraction = node.get("bias_bits", 0)
            acc = conv(values[node["input"]], source["zero_point"], arrays[node["weight"]],
                       arrays[node["bias"]].astype(np.int64), node["stride"], node["padding"], fraction)
            multiplier = (scale_of(source, tflite) * weight_scale / scale_of(out, tflite)
                          / 2 ** fraction)[None, :, None, None]
            values[node["output"]] = to_uint8(rescale(acc, multiplier), out, node["relu"])
        elif op == "add":
            total = (tflite_add if tflite else add)(values, [(name, tensors[name]) for name in node["inputs"]], out)
            values[node["output"]] = to_uint8(total, out, node["relu"])
        elif op == "mean":
            values[node["output"]] = (tflite_mean if tflite else mean)(values[node["input"]], tensors[node["input"]],
                                                                       out)
        elif op == "dense":
            source = tensors[node["input"]]
            centered = values[node["input"]].astype(np.float64) - source["zero_point"]
            fraction = node.get("bias_bits", 0)
            acc = ((centered @ arrays[node["weight"]].T.astype(np.float64)).astype(np.int64) << fraction) \
                + arrays[node["bias"]]
            weight_scale = arrays[node["weight_scale"]].astype(np.float64)
            values["logits.acc"] = acc
            step = scale_of(source, tflite) * weight_scale / 2 ** fraction
            values[node["output"]] = (acc * step).astype(np.float32)
        else:
            raise ValueError(f"unknown operation {op!r} in the int8 graph")
    values["logits"] = values[header["graph"][-1]["output"]]
    return values


def logits_bound(model):
    """The lowest and the highest logit the classifier can give, its inputs anywhere within their levels."""
    header, arrays = model["header"], model["arrays"]
    node = header["graph"][-1]
    source = header["tensors"][node["input"]]
    weight = arrays[node["weight"]].astype(np.float64)
    ends = np.array([0, 2 ** source.get("bits", 8) - 1], np.float64) - source["zero_point"]
    bias = arrays[node["bias"]] / 2 ** node.get("bias_bits", 0)
    step = scale_of(source, tflite_arithmetic(header)) * arrays[node["weight_scale"]].astype(np.float64)
    low = (np.minimum(weight * ends[0], weight * ends[1]).sum(axis=1) + bias) * step
    high = (np.maximum(weight * ends[0], weight * ends[1]).sum(axis=1) + bias) * step
    return float(low.min()), float(high.max())


def add(values, sources, out):
    """Versions 1 and 2: the sum of the inputs rescaled to the output's scale with ADD_PRECISION_BITS extra bits,
    rounded once (without the output's zero point)."""
    total = 0
    for name, source in sources:
        centered = values[name].astype(np.int64) - source["zero_point"]
        total = total + requantize(centered << ADD_PRECISION_BITS, source["scale"] / out["scale"])
    return (total + (np.int64(1) << (ADD_PRECISION_BITS - 1))) >> ADD_PRECISION_BITS


def tflite_add(values, sources, out):
    """TFLite's int8 ADD of two inputs (without the output's zero point): each, shifted left by TFLITE_ADD_SHIFT,
    rescaled to twice the larger input scale, their sum rescaled to the output's."""
    scales = [scale_of(source, True) for _, source in sources]
    twice = 2 * max(scales)
    total = sum(tflite_requantize((values[name].astype(np.int64) - source["zero_point"]) << TFLITE_ADD_SHIFT,
                                  scale / twice) for (name, source), scale in zip(sources, scales, strict=True))
    return tflite_requantize(total, twice / ((1 << TFLITE_ADD_SHIFT) * scale_of(out, True)))


def mean(q, source, out):
    """Versions 1 and 2: the sum of the centered values times one multiplier, to the output's uint8."""
    centered = q.astype(np.int64) - source["zero_point"]
    multiplier = source["scale"] / (centered.shape[2] * centered.shape[3] * out["scale"])
    return to_uint8(requantize(centered.sum(axis=(2, 3)), multiplier), out, relu=False)


def tflite_mean(q, source, out):
    """TFLite's int8 MEAN (its reference kernel, what TensorFlow Lite Micro computes): the sum of the centered values
    times the multiplier of input scale / output scale, whose int32 is multiplied by 2^k / count (k: the highest
    power of 2 in the count, at most 32 and 31 + its shift) and truncated, its shift lowered by k."""
    count = q.shape[2] * q.shape[3]
    m0, shift = tflite_multiplier(scale_of(source, True) / scale_of(out, True))
    k = min(count.bit_length() - 1, 32, 31 + int(shift))
    m0, shift = (int(m0) << k) // count, int(shift) - k
    total = q.astype(np.int64).sum(axis=(2, 3)) - source["zero_point"] * count
    return to_uint8(_multiply(total, np.int64(m0), np.int64(shift)), out, relu=False)
