"""Portable C99 of the int8 file: the network as const arrays and a fixed sequence of kernel calls over one static
arena, computing int8.py's integer arithmetic bit for bit (export.py --format c).

    >>> c_export.write_folder("resnet8_c", header, arrays, metadata)   # model.h, model.c, qat_kernels.[ch], model.json

What the folder holds (docs/deployment.md#c-for-microcontrollers):

- `model.h`: the API (model_run, model_input, model_quantize_rgb, model_logits_float) and the model's figures as
  #defines: input shape, scale and zero point, normalization, class names, arena and weight bytes;
- `model.c`: the weights (channels last, four output channels interleaved; packed two a byte where they have at
  most 4 bits), biases, each channel's weight sum, and the fixed-point multipliers and shifts, all computed here
  from the file's scales with int8.py's own functions, so C never touches a scale; then the layers in order;
- `qat_kernels.c`, `qat_kernels.h`: the kernels, the same for every model (qatcifar/c/);
- `model.json`: what eval.py and predict.py need to run the folder (model_c.py) and a digest of each file.

The arena: every tensor between layers is a buffer of height x width x channels bytes, placed by a greedy planner
(largest first, each at the lowest offset free for its lifetime). A convolution whose output only feeds the
residual addition right after it computes the addition at once, into the other input's buffer when that input is
not needed afterwards, so a block holds its input and one intermediate, not three tensors.
"""
import hashlib
import json
import os

import numpy as np

from qatcifar import int8

FORMAT = "qat-resnet-c"
VERSION = 1
SOURCES = ("qat_kernels.h", "qat_kernels.c")  # copied from qatcifar/c/
FILES = ("model.h", "model.c", *SOURCES)
MANIFEST = "model.json"
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")
BLOCK = 4  # output channels computed together (the weights of four interleaved)
GROUP = 4  # input channels whose weights lie together where the channels are a multiple of it (qat_kernels.c)
ALIGN = 4  # bytes: every buffer's offset in the arena
PRODUCT_BITS = 31  # tflite_multiply's |x| * 2^left stays within int32, as in TFLite


class Refused(ValueError):
    """An int8 model the C kernels do not compute; the message says why."""


# --- the plan: steps, buffers and their offsets --------------------------------------------------------------

def shapes_of(header, arrays):
    """{tensor: (height, width, channels)} of every tensor between layers (the int8 file was checked by int8.check)."""
    c, h, w = header["input_shape"]
    shapes = {}
    for node in header["graph"]:
        if node["op"] == "quantize":
            shapes[node["output"]] = (h, w, c)
        elif node["op"] == "conv":
            ih, iw, _ = shapes[node["input"]]
            out_c, _, k, _ = arrays[node["weight"]].shape
            s, p = node["stride"], node["padding"]
            shapes[node["output"]] = ((ih + 2 * p - k) // s + 1, (iw + 2 * p - k) // s + 1, out_c)
        elif node["op"] == "add":
            shapes[node["output"]] = shapes[node["inputs"][0]]
        elif node["op"] == "mean":
            shapes[node["output"]] = (1, 1, shapes[node["input"]][2])
    return shapes


def steps_of(graph, shapes):
    """The layers as the C code calls them: a convolution whose output only feeds the addition right after it is
    one step with that addition (`add`, `other`: the addition's other input); a convolution of channels that are
    not a multiple of GROUP (the image's three) reads a copy padded with the zero point to a multiple (`pad`,
    whose tensor is added to `shapes`), so that every convolution takes the grouped kernel."""
    uses = {}
    for node in graph:
        for name in node.get("inputs") or [node.get("input")]:
            uses[name] = uses.get(name, 0) + 1
    steps, i = [], 1  # (the quantize node is the caller's: model_run takes the quantized image)
    while i < len(graph):
        node, after = graph[i], graph[i + 1] if i + 1 < len(graph) else None
        source = node.get("input")
        if node["op"] == "conv" and shapes[source][2] % GROUP:
            padded = f"{source}_padded"
            if padded not in shapes:
                h, w, c = shapes[source]
                shapes[padded] = (h, w, -(-c // GROUP) * GROUP)
                steps.append({"node": {"op": "pad"}, "inputs": [source], "output": padded})
            source = padded
        if (node["op"] == "conv" and after is not None and after["op"] == "add" and node["output"] in after["inputs"]
                and uses[node["output"]] == 1):
            other = [name for name in after["inputs"] if name != node["output"]][0]
            steps.append({"node": node, "add": after, "other": other, "output": after["output"],
                          "inputs": [source, other]})
            i += 2
        else:
            steps.append({"node": node, "output": node["output"],
                          "inputs": node["inputs"] if node["op"] == "add" else [source]})
            i += 1
    return steps


def plan(header, arrays):
    """(steps, shapes, {tensor: offset}, arena bytes): each step's output in its own buffer, or in place of an input
    that dies at that step where the kernel allows it (an addition; a fused convolution's `other`)."""
    shapes = shapes_of(header, arrays)
    steps = steps_of(header["graph"], shapes)
    last = {}
    for i, step in enumerate(steps):
        for name in step["inputs"]:
            last[name] = i
    first_tensor = header["graph"][0]["output"]
    owner = {first_tensor: first_tensor}  # tensor -> the tensor whose buffer it is written into
    live = {first_tensor: [0, last.get(first_tensor, 0)]}  # buffer -> [first step, last step]
    for i, step in enumerate(steps):
        out = step["output"]
        if step["node"]["op"] == "dense":
            continue  # (the caller's logits)
        candidates = ([step["other"]] if "add" in step and step["other"] != step["inputs"][0]
                      else step["inputs"] if step["node"]["op"] == "add" else [])
        into = next((name for name in candidates if last[name] == i and shapes[name] == shapes[out]), None)
        if into is not None:
            owner[out] = owner[into]
            live[owner[out]][1] = last.get(out, i)
        else:
            owner[out] = out
            live[out] = [i, last.get(out, i)]
    sizes = {name: int(np.prod(shapes[name])) for name in live}
    offsets = _first_fit(live, sizes)
    arena = max(offsets[name] + sizes[name] for name in live)
    return steps, shapes, {tensor: offsets[buffer] for tensor, buffer in owner.items()}, _aligned(arena)


def _first_fit(live, sizes):
    """Offsets of the buffers, largest first, each at the lowest aligned offset where it overlaps no placed buffer
    that is alive at the same time."""
    offsets = {}
    for name in sorted(live, key=lambda name: (-sizes[name], live[name][0])):
        taken = sorted((offsets[o], offsets[o] + sizes[o]) for o in offsets if _overlap(live[o], live[name]))
        offset = 0
        for start, end in taken:
            if offset + sizes[name] <= start:
                break
            offset = max(offset, _aligned(end))
        offsets[name] = offset
    return offsets


def _overlap(a, b):
    return a[0] <= b[1] and b[0] <= a[1]


def _aligned(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --- the layers' constants, from the file's scales with int8.py's functions -------------------------------------

def check(header, arrays):
    """Refused unless the C kernels compute every operation of the (checked) int8 model exactly."""
    for node in header["graph"]:
        if node["op"] == "add" and len(node["inputs"]) != 2:
            raise Refused(f"addition {node.get('name')!r} has {len(node['inputs'])} inputs; the C kernel adds two")
    shapes = shapes_of(header, arrays)
    if any(max(shape) >= 1 << 16 for shape in shapes.values()):
        raise Refused("a tensor has a side or channel count of 65,536 or more, beyond the kernels' 16-bit sizes")


def multipliers(real, tflite, bound=(1 << 31) - 1):
    """(m0, shift) int arrays of real multipliers as the file's arithmetic takes them: TFLite's (shift as
    tflite_multiplier gives it), else int8.requantize's, whose right shift 31 - shift (at most 62) is stored."""
    if tflite:
        m0, shift = int8.tflite_multiplier(real)
        if (bound << int(np.max(np.maximum(shift, 0)))) >= 1 << PRODUCT_BITS:
            raise Refused("a requantization multiplier of 1 or more (an output scale finer than its input's) takes "
                          "values beyond TFLite's int32 arithmetic")
        return m0, shift
    m0, shift = int8.quantize_multiplier(real)
    return m0, np.minimum(31 - shift, 62)


def conv_layer(node, arrays, tensors, tflite, bits, inputs):
    """The constants of a convolution of `inputs` channels (its weights' or, padded, more): weights blocked by four
    output channels, channels last; those of padded channels 0."""
    source, out = tensors[node["input"]], tensors[node["output"]]
    weight = arrays[node["weight"]]
    channels, k = weight.shape[0], weight.shape[2]
    blocked = np.zeros((-(-channels // BLOCK) * BLOCK, inputs, k, k), np.int8)
    blocked[:channels, :weight.shape[1]] = weight
    blocked = blocked.transpose(0, 2, 3, 1).reshape(-1, BLOCK, k, k, inputs)  # [block][output][ky][kx][input]
    if inputs % GROUP == 0:  # [block][ky][kx][group][output][input of the group]
        blocked = blocked.reshape(-1, BLOCK, k, k, inputs // GROUP, GROUP).transpose(0, 2, 3, 4, 1, 5)
    else:  # [block][ky][kx][input][output]
        blocked = blocked.transpose(0, 2, 3, 4, 1)
    fraction = node.get("bias_bits", 0)
    real = (int8.scale_of(source, tflite) * arrays[node["weight_scale"]].astype(np.float64)
            / int8.scale_of(out, tflite) / 2 ** fraction)  # (as int8.run_all computes it)
    m0, shift = multipliers(real, tflite)
    return {"weight": blocked.reshape(-1), "packed": packed(node, bits), "bias": arrays[node["bias"]],
            "weight_sum": weight.astype(np.int64).sum(axis=(1, 2, 3)), "m0": m0, "shift": shift,
            "k": k, "stride": node["stride"], "pad": node["padding"], "bias_bits": fraction, "relu": node["relu"],
            "in_zero": source["zero_point"], "out_zero": out["zero_point"], "out_max": top(out)}


def packed(node, bits):
    """Whether a layer's weights have at most int8.PACKED_BITS bits (its own weight_bits, else the file's)."""
    return node.get("weight_bits", bits) <= int8.PACKED_BITS


def top(tensor):
    return 2 ** tensor.get("bits", 8) - 1


def add_layer(node, inputs, tensors, tflite):
    """The constants of an addition of `inputs` (in the order the C code passes them): each input's table of its
    levels rescaled (as int8.tflite_add, or int8.add, rescales them), then the sum's rescaling."""
    out = tensors[node["output"]]
    sources = [tensors[name] for name in inputs]
    levels = np.arange(256, dtype=np.int64)
    if tflite:  # (as int8.tflite_add)
        scales = [int8.scale_of(source, True) for source in sources]
        twice = 2 * max(scales)
        terms = [int8.tflite_requantize((levels - source["zero_point"]) << int8.TFLITE_ADD_SHIFT, scale / twice)
                 for source, scale in zip(sources, scales, strict=True)]
        out_m0, out_shift = multipliers(twice / ((1 << int8.TFLITE_ADD_SHIFT) * int8.scale_of(out, True)), True,
                                        int(np.abs(terms[0]).max() + np.abs(terms[1]).max()))
    else:  # (as int8.add)
        terms = [int8.requantize((levels - source["zero_point"]) << int8.ADD_PRECISION_BITS,
                                 source["scale"] / out["scale"]) for source in sources]
        out_m0 = out_shift = 0
    if int(np.abs(terms[0]).max() + np.abs(terms[1]).max()) >= 1 << 31:
        raise Refused(f"addition {node.get('name')!r} rescales its inputs beyond int32")
    return {"terms": terms, "relu": node["relu"], "out_zero": out["zero_point"], "out_max": top(out),
            "out_m0": int(out_m0), "out_shift": int(out_shift)}


def mean_layer(node, tensors, shape, tflite):
    source, out = tensors[node["input"]], tensors[node["output"]]
    count = shape[0] * shape[1]
    if tflite:  # (as int8.tflite_mean)
        m0, shift = int8.tflite_multiplier(int8.scale_of(source, True) / int8.scale_of(out, True))
        k = min(count.bit_length() - 1, 32, 31 + int(shift))
        m0, shift = (int(m0) << k) // count, int(shift) - k
        if (255 * count) << max(shift, 0) >= 1 << PRODUCT_BITS:
            raise Refused("the mean's multiplier takes its sums beyond the kernels' int64 products")
    else:  # (as int8.mean)
        m0, shift = multipliers(source["scale"] / (shape[0] * shape[1] * out["scale"]), False)
    return {"pixels": count, "channels": shape[2], "in_zero": source["zero_point"], "out_zero": out["zero_point"],
            "out_max": top(out), "m0": int(m0), "shift": int(shift)}


def dense_layer(node, arrays, tensors, tflite, bits):
    source = tensors[node["input"]]
    fraction = node.get("bias_bits", 0)
    step = int8.scale_of(source, tflite) * arrays[node["weight_scale"]].astype(np.float64) / 2 ** fraction
    return {"weight": arrays[node["weight"]].reshape(-1), "packed": packed(node, bits), "bias": arrays[node["bias"]],
            "in_zero": source["zero_point"], "bias_bits": fraction, "step": step}


def input_table(tensor, normalization, tflite):
    """[channel][8-bit value] -> the input's level: the toolkit's normalization in float32 (cifar.normalization:
    value / 255, less the mean, over the standard deviation), then int8.quantize_input."""
    values = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(normalization["mean"], np.float32)[:, None]
    std = np.asarray(normalization["std"], np.float32)[:, None]
    return int8.quantize_input((values[None, :] - mean) / std, tensor, tflite)


# --- the C text ------------------------------------------------------------------------------------------------

PER_LINE = 24  # array values per line


def c_array(name, ctype, values):
    """A static const array definition; its bytes."""
    values = [int(v) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(map(str, values[i:i + PER_LINE])) for i in range(0, len(values), PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(values)}] = {{\n    {body}\n}};\n", len(values) * SIZES[ctype]


SIZES = {"int8_t": 1, "uint8_t": 1, "int32_t": 4, "double": 8}


def c_name(name):
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def c_string(text):
    """A C string literal of any text: printable ASCII as it is, everything else (and " \\ ?, against trigraphs)
    as octal escapes of its UTF-8 bytes."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?' else f"\\{b:03o}"
                         for b in text.encode()) + '"'


class Source:
    """model.c as it is written: the constants, then the layers' structures and calls."""

    def __init__(self):
        self.data, self.layers, self.calls = [], [], []
        self.weight_bytes = self.constant_bytes = self.scratch_bytes = 0

    def array(self, name, ctype, values, weights=False):
        text, size = c_array(name, ctype, values)
        self.data.append(text)
        self.constant_bytes += size
        self.weight_bytes += size if weights else 0
        return name

    def layer(self, ctype, name, fields):
        body = ",\n    ".join(f".{key} = {value}" for key, value in fields.items())
        self.layers.append(f"static const {ctype} {name} = {{\n    {body}\n}};\n")
        return f"&{name}"


def conv_source(src, name, layer, in_shape, out_shape, tflite):
    weight = int8.pack(layer["weight"]) if layer["packed"] else layer["weight"]
    if layer["packed"]:  # (a block's weights, unpacked)
        src.scratch_bytes = max(src.scratch_bytes, layer["k"] ** 2 * in_shape[2] * BLOCK)
    fields = {"weight": src.array(f"{name}_weight", "int8_t", weight.view(np.int8) if layer["packed"] else weight,
                                  weights=True),
              "scratch": "scratch" if layer["packed"] else "0",
              "bias": src.array(f"{name}_bias", "int32_t", layer["bias"]),
              "weight_sum": src.array(f"{name}_weight_sum", "int32_t", layer["weight_sum"]),
              "scale": f"{{{src.array(f'{name}_m0', 'int32_t', layer['m0'])}, "
                       f"{src.array(f'{name}_shift', 'int8_t', layer['shift'])}}}",
              "in_h": in_shape[0], "in_w": in_shape[1], "in_c": in_shape[2],
              "out_h": out_shape[0], "out_w": out_shape[1], "out_c": out_shape[2],
              "k": layer["k"], "stride": layer["stride"], "pad": layer["pad"], "packed": int(layer["packed"]),
              "bias_bits": layer["bias_bits"], "relu": int(layer["relu"]), "tflite": int(tflite),
              "in_zero": layer["in_zero"], "out_zero": layer["out_zero"], "out_max": layer["out_max"]}
    return src.layer("qat_conv", name, fields)


def add_source(src, name, layer, tflite):
    terms = [src.array(f"{name}_term{i}", "int32_t", term) for i, term in enumerate(layer["terms"])]
    fields = {"term": f"{{{terms[0]}, {terms[1]}}}", "tflite": int(tflite), "relu": int(layer["relu"]),
              "out_zero": layer["out_zero"], "out_max": layer["out_max"], "out_m0": layer["out_m0"],
              "out_shift": layer["out_shift"]}
    return src.layer("qat_add", name, fields)


def model_source(header, arrays, steps, shapes, offsets):
    """(model.c's text, {"weight_bytes", "constant_bytes", "scratch_bytes"})."""
    tensors, tflite, bits = header["tensors"], int8.tflite_arithmetic(header), header.get("weight_bits", 8)
    src = Source()
    at = {name: f"arena + {offset}" for name, offset in offsets.items()}
    for step in steps:
        node = step["node"]
        name = c_name(node.get("name") or f"{node['op']}_{step['output']}")
        if node["op"] == "pad":
            (source,), (h, w, c) = step["inputs"], shapes[step["output"]]
            src.calls.append(f"qat_pad_channels({at[source]}, {at[step['output']]}, {h * w}u, {shapes[source][2]}, "
                             f"{c}, {tensors[source]['zero_point']});")
        elif node["op"] == "conv":
            source = step["inputs"][0]
            layer = conv_layer(node, arrays, tensors, tflite, bits, shapes[source][2])
            conv = conv_source(src, name, layer, shapes[source], shapes[node["output"]], tflite)
            if "add" in step:
                add = step["add"]
                added = add_source(src, c_name(add.get("name") or f"add_{add['output']}"),
                                   add_layer(add, [node["output"], step["other"]], tensors, tflite), tflite)
                src.calls.append(f"qat_conv_run({conv}, {at[source]}, {at[step['output']]}, {added}, "
                                 f"{at[step['other']]});")
            else:
                src.calls.append(f"qat_conv_run({conv}, {at[source]}, {at[node['output']]}, 0, 0);")
        elif node["op"] == "add":
            added = add_source(src, name, add_layer(node, node["inputs"], tensors, tflite), tflite)
            a, b = node["inputs"]
            src.calls.append(f"qat_add_run({added}, {at[a]}, {at[b]}, {at[node['output']]}, "
                             f"{int(np.prod(shapes[a]))}u);")
        elif node["op"] == "mean":
            layer = mean_layer(node, tensors, shapes[node["input"]], tflite)
            fields = {key: layer[key] for key in ("pixels", "channels", "in_zero", "out_zero", "out_max", "m0",
                                                  "shift")}
            mean = src.layer("qat_mean", name, {"tflite": int(tflite), **fields})
            src.calls.append(f"qat_mean_run({mean}, {at[node['input']]}, {at[node['output']]});")
        else:
            layer = dense_layer(node, arrays, tensors, tflite, bits)
            weight = int8.pack(layer["weight"]).view(np.int8) if layer["packed"] else layer["weight"]
            fields = {"weight": src.array(f"{name}_weight", "int8_t", weight, weights=True),
                      "bias": src.array(f"{name}_bias", "int32_t", layer["bias"]),
                      "in_c": shapes[node["input"]][2], "out_c": len(layer["bias"]), "packed": int(layer["packed"]),
                      "bias_bits": layer["bias_bits"], "in_zero": layer["in_zero"]}
            dense = src.layer("qat_dense", name, fields)
            src.calls.append(f"qat_dense_run({dense}, {at[node['input']]}, logits);")
            steps_text = ",\n    ".join(repr(float(v)) for v in layer["step"])
            src.data.append(f"/* a logit's real value per unit of its int32 */\n"
                            f"static const double logit_step[{len(layer['step'])}] = {{\n    {steps_text}\n}};\n")
            src.constant_bytes += 8 * len(layer["step"])
    table = input_table(tensors[header["graph"][0]["output"]], header["normalization"], tflite)
    src.array("input_table", "uint8_t", table)
    calls = "\n    ".join(src.calls)
    text = f"""/* Generated by export.py --format c from {header.get('source', 'an int8 model')} ({header.get('arch')},
 * int8 file version {header['version']}): do not edit, export again. The weights, biases and fixed-point multipliers
 * are const (flash); the tensors between layers share one static arena of MODEL_ARENA_BYTES. */
#include "model.h"
#include "qat_kernels.h"

{chr(10).join(src.data)}
static uint8_t arena[MODEL_ARENA_BYTES];
{"static int8_t scratch[MODEL_SCRATCH_BYTES];  /* 4-bit weights unpacked, four output channels at a time */" + chr(10)
 if src.scratch_bytes else ""}
{chr(10).join(src.layers)}
uint8_t *model_input(void)
{{
    return {at[header['graph'][0]['output']]};
}}

void model_run(const uint8_t image[MODEL_INPUT_BYTES], int32_t logits[MODEL_NUM_CLASSES])
{{
    uint8_t *input = model_input();
    uint32_t i;
    if (image != input)
        for (i = 0; i < MODEL_INPUT_BYTES; i++)
            input[i] = image[i];
    {calls}
}}

void model_quantize_rgb(const uint8_t rgb[MODEL_INPUT_BYTES], uint8_t image[MODEL_INPUT_BYTES])
{{
    uint32_t i;
    for (i = 0; i < MODEL_INPUT_BYTES; i++)
        image[i] = input_table[(i % MODEL_INPUT_CHANNELS) * 256u + rgb[i]];
}}

void model_logits_float(const int32_t logits[MODEL_NUM_CLASSES], float out[MODEL_NUM_CLASSES])
{{
    int i;
    for (i = 0; i < MODEL_NUM_CLASSES; i++)
        out[i] = (float)((double)logits[i] * logit_step[i]);
}}
"""
    return text, {"weight_bytes": src.weight_bytes, "constant_bytes": src.constant_bytes,
                  "scratch_bytes": src.scratch_bytes}


def model_header(header, arena, sizes):
    c, h, w = header["input_shape"]
    tensor = header["tensors"][header["graph"][0]["output"]]
    names = header.get("class_names") or [str(i) for i in range(header["num_classes"])]
    norm = header["normalization"]
    floats = ", ".join  # (C float literals)
    return f"""/* {header.get('arch')} from {header.get('source', 'an int8 model')}: int8 integer arithmetic in
 * portable C99 (export.py --format c; docs/deployment.md#c-for-microcontrollers).
 *
 *     uint8_t *image = model_input();                  (or any buffer of MODEL_INPUT_BYTES)
 *     model_quantize_rgb(rgb, image);                  an 8-bit RGB image, rows of pixels, R G B each
 *     model_run(image, logits);                        int32 logits, before dequantization
 *     model_logits_float(logits, scores);              optional: the real logits (floating point)
 *
 * The top class is the highest of the real logits: each class has its own scale, so compare them, not the int32s.
 * model_run is not reentrant: one static arena, no heap, no stdio, no libm. */
#ifndef MODEL_H
#define MODEL_H

#include <stdint.h>

#define MODEL_INPUT_HEIGHT {h}
#define MODEL_INPUT_WIDTH {w}
#define MODEL_INPUT_CHANNELS {c}
#define MODEL_INPUT_BYTES {h * w * c}  /* height x width x channels (channels last), uint8 levels */
#define MODEL_INPUT_SCALE {float(np.float32(tensor['scale'])):.9g}f  /* real = scale * (level - zero point) */
#define MODEL_INPUT_ZERO_POINT {tensor['zero_point']}
#define MODEL_NORMALIZATION_MEAN {{{floats(f'{v}f' for v in norm['mean'])}}}  /* of the 8-bit value / 255 */
#define MODEL_NORMALIZATION_STD {{{floats(f'{v}f' for v in norm['std'])}}}
#define MODEL_NUM_CLASSES {header['num_classes']}
#define MODEL_CLASS_NAMES {{{", ".join(c_string(str(name)) for name in names)}}}
#define MODEL_ARENA_BYTES {arena}  /* RAM: every tensor between layers, the input included */
#define MODEL_SCRATCH_BYTES {sizes['scratch_bytes']}  /* RAM: 4-bit weights unpacked (0: none) */
#define MODEL_WEIGHT_BYTES {sizes['weight_bytes']}  /* flash: the weights */
#define MODEL_CONSTANT_BYTES {sizes['constant_bytes']}  /* flash: weights, biases, multipliers and tables */

/* The arena's input buffer (MODEL_INPUT_BYTES): an image written here is not copied by model_run. */
uint8_t *model_input(void);
/* The logits of a quantized image (levels, as model_quantize_rgb gives them): the classifier's int32 accumulators,
 * bias included; model_logits_float scales them. */
void model_run(const uint8_t image[MODEL_INPUT_BYTES], int32_t logits[MODEL_NUM_CLASSES]);
/* An 8-bit RGB image quantized as the toolkit does: / 255, normalized, to the input's levels (a table). */
void model_quantize_rgb(const uint8_t rgb[MODEL_INPUT_BYTES], uint8_t image[MODEL_INPUT_BYTES]);
/* The real logits: each int32 times its class's step (the classifier's input scale x weight scale). */
void model_logits_float(const int32_t logits[MODEL_NUM_CLASSES], float out[MODEL_NUM_CLASSES]);

#endif
"""


def write_folder(folder, header, arrays, metadata):
    """Write the C of an int8 model (int8.check'ed) into the existing, empty `folder`; returns the manifest (also
    written as MANIFEST). Refused if the kernels do not compute some operation of the model."""
    check(header, arrays)
    steps, shapes, offsets, arena = plan(header, arrays)
    source, sizes = model_source(header, arrays, steps, shapes, offsets)
    texts = {"model.h": model_header(header, arena, sizes), "model.c": source}
    for name in SOURCES:
        with open(os.path.join(KERNELS, name)) as f:
            texts[name] = f.read()
    for name, text in texts.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    tensor = header["tensors"][header["graph"][0]["output"]]
    manifest = {"format": FORMAT, "version": VERSION, "int8_version": header["version"],
                "tflite_arithmetic": int8.tflite_arithmetic(header), **metadata,
                "input": {"scale": tensor["scale"], "zero_point": tensor["zero_point"], "bits": tensor.get("bits", 8),
                          "shape": header["input_shape"]},
                "num_classes": header["num_classes"], "arena_bytes": arena, **sizes,
                "sha256": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
