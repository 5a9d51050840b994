"""Per-layer sensitivity of a QAT network to fewer weight bits, and the --layer_bits file it suggests.

    >>> records = sensitivity.measure(net, dataset, bits=4)   # a QAT network in eval mode, eval.py's test images

Each weighted layer in turn has its weights quantized to `bits` bits (the per-channel scales of
that width, from its trained float weights, without retraining), every other layer as trained;
the accuracy on the dataset against the network's own says what the layer loses. The records
come sorted by that drop, the least sensitive layers last: those are the ones to train with
fewer bits (`suggest`), as mixed-precision methods (HAWQ, Dong et al. 2019) rank layers by a
sensitivity before they choose widths. Runs in PYNATIVE_MODE, where changing a layer's frozen
weights needs no new compilation.
"""
import mindspore as ms
import numpy as np

from qatcifar import inference, int8, networks, quant

DEFAULT_BITS = 4  # the weight bits each layer is tried at (eval.py --sensitivity_bits)


def measure(net, dataset, bits, baseline):
    """[{layer, bits, weights, accuracy, drop}] of each weighted layer of the QAT network `net` (eval mode) with
    its weights at `bits` bits, sorted by drop (the largest first); `baseline`: the network's own accuracy."""
    records = []
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for name, cell in networks.weighted_layers(net).items():
            records.append({"layer": name, "bits": bits, "trained_bits": cell.weight_quant.num_bits,
                            "weights": int(np.prod(weight_of(cell).shape)),
                            "accuracy": accuracy(net, dataset, cell, bits)})
    finally:
        ms.set_context(mode=mode)
    for record in records:
        record["drop"] = baseline - record["accuracy"]
    return sorted(records, key=lambda r: (-r["drop"], r["layer"]))


def weight_of(cell):
    """The float weight a quantized layer quantizes (BatchNorm folded in, with --bn_fold)."""
    if isinstance(cell, quant.QuantConvBN):
        return cell.folded_weight_and_bias()[0] if cell.bn_fold else cell.conv.weight
    return cell.weight


def accuracy(net, dataset, cell, bits):
    """The network's accuracy on the dataset with `cell`'s weights at `bits` bits; the cell is put back after."""
    trained, frozen = cell.weight_quant.num_bits, cell.weight_quant.frozen
    cell.weight_quant.num_bits = bits
    cell.weight_quant.freeze(weight_of(cell))
    try:
        predictions, labels = inference.predict(net, dataset)
    finally:
        cell.weight_quant.num_bits, cell.weight_quant.frozen = trained, frozen
    return float((predictions == labels).mean())


def suggest(records, size, budget):
    """{layer: bits} for train.py --layer_bits: the least sensitive layers (the first and the last left out, as
    train.py keeps them wider) at their records' bits, one after another, until the int8 file of `size` bytes fits
    `budget` bytes (packed weights of at most int8.PACKED_BITS bits take half a byte); and the size it comes to."""
    chosen = {}
    for record in sorted(records, key=lambda r: (r["drop"], r["layer"])):
        if size <= budget:
            break
        if record["layer"] in networks.EDGE_LAYERS or record["bits"] >= record["trained_bits"]:
            continue
        chosen[record["layer"]] = record["bits"]
        if record["bits"] <= int8.PACKED_BITS < record["trained_bits"]:
            size -= record["weights"] - (record["weights"] + 1) // 2
    return chosen, size
