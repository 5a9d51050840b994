"""Post-training quantization (PTQ): a trained float32 network made into the QAT network export.py writes as an
int8 file or an int8 ONNX model, with its activation ranges measured on calibration images instead of trained.

    >>> qnet, config, images = ptq.calibrate(float_net, cifar.calibration_dataset(data_dir, 512, 64), "minmax")

- Weights: symmetric, per output channel, as QAT's, but 8 bits (WEIGHT_BITS), from the float
  weights; BatchNorm is folded into them when the int8 model is written (int8_export.py). A
  network trained in float has not learned to live with QAT's 7 bits: on a ResNet-8 at 69.4 %,
  7-bit weights cost 1.6-1.9 points and 8-bit ones none (docs/benchmarks.md). The ONNX model
  then stores them as uint8 (exact on every CPU, slower: onnx_graph.py).
- Activations: every quantizer of quant.quantize sees the calibration images pass through the
  network unquantized (a quantizer that has seen no training step passes its input through, its
  ReLU applied) and takes their range: `minmax`, the lowest and highest value; `percentile`, the
  0.01th and 99.99th percentiles of a sample of its values, which leaves out rare outliers for
  finer steps. The quantizers then count one step, so that eval, export and the int8 file use
  the ranges.

Calibration runs in PYNATIVE_MODE, with a forward hook on each quantizer.
"""
import mindspore as ms
import numpy as np

from qatcifar import cli
from qatcifar.cifar import CIFAR10_MEAN, CIFAR10_STD
from qatcifar.quant import ActQuant, QuantConfig, quantize

METHODS = ("minmax", "percentile")
WEIGHT_BITS = 8
PERCENTILE = 99.99  # and 100 - PERCENTILE at the low end
SAMPLE = 20_000     # values kept of each quantizer's output per batch, for `percentile`
MIN_LEVELS = 32     # pixel levels the calibration images must span between their darkest and brightest value
MEAN = np.array(CIFAR10_MEAN, np.float32)[:, None, None]  # (the pipeline's normalization undone: pixels in [0, 1])
STD = np.array(CIFAR10_STD, np.float32)[:, None, None]


def calibrate(net, dataset, method="minmax"):
    """Quantize the float32 network `net` (in place) and set its activation ranges from `dataset`'s images (a
    pipeline of normalized batches); return (the network in eval mode, its QuantConfig, the images seen)."""
    config = QuantConfig(weight_bits=WEIGHT_BITS)
    qnet = quantize(net, config).set_train(False)
    quantizers = [cell for _, cell in qnet.cells_and_names() if isinstance(cell, ActQuant)]
    seen = {id(cell): [] for cell in quantizers}
    rng = np.random.default_rng(0)

    def observe(cell, args, output):
        values = output.asnumpy().reshape(-1)
        if method == "percentile" and values.size > SAMPLE:
            values = np.concatenate([rng.choice(values, SAMPLE, replace=False), [values.min(), values.max()]])
        seen[id(cell)].append(values if method == "percentile" else np.array([values.min(), values.max()]))

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # (hooks run in PYNATIVE_MODE only)
    handles = [cell.register_forward_hook(observe) for cell in quantizers]
    seen_images, low, high = 0, np.inf, -np.inf
    try:
        for (images, _) in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
            qnet(ms.Tensor(images))
            seen_images += len(images)
            pixels = images * STD + MEAN
            low, high = min(low, pixels.min()), max(high, pixels.max())
    finally:
        for handle in handles:
            handle.remove()
        ms.set_context(mode=mode)
    if not seen[id(quantizers[0])]:
        raise cli.InputError("the calibration set holds no image; give a data folder with training images")
    levels = int(round(255 * (high - low)))
    if levels < MIN_LEVELS:
        raise cli.InputError(f"the {seen_images} calibration images span {levels} pixel level(s) of 255 (blank or "
                             "constant images?): every activation range measured on them would be too narrow for "
                             "real images; calibrate on real training images (-data), or more of them (--calibrate)")
    for cell in quantizers:
        values = np.concatenate(seen[id(cell)])
        low, high = ((values.min(), values.max()) if method == "minmax"
                     else np.percentile(values, [100 - PERCENTILE, PERCENTILE]))
        cell.min_val.set_data(ms.Tensor(float(low), ms.float32))
        cell.max_val.set_data(ms.Tensor(float(high), ms.float32))
        cell.steps.set_data(ms.Tensor(1, ms.int32))  # (one step past quant_delay 0: eval quantizes)
    return qnet, config, seen_images
