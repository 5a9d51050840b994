"""qatcifar.int8: the integer arithmetic of the reference, and the checks of an int8 file before it is used."""
import json
import os

import numpy as np
import pytest

import eval as evaluate
from conftest import expect_error, node
from qatcifar import inference, int8


def test_requantize_rounds_like_real_arithmetic():
    rng = np.random.default_rng(0)
    values = rng.integers(-2 ** 27, 2 ** 27, size=1000).astype(np.int64)
    multipliers = rng.uniform(1e-6, 0.9, size=1000)
    expected = np.floor(values * multipliers + 0.5)
    assert np.abs(int8.requantize(values, multipliers) - expected).max() <= 1
    assert (int8.requantize(values, multipliers) == expected).mean() > 0.99
    m0, shift = int8.quantize_multiplier(multipliers)
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all()
    np.testing.assert_allclose(m0 * 2.0 ** (shift - 31), multipliers, rtol=1e-9)


def test_integer_convolution_is_exact():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, size=(2, 64, 6, 6)).astype(np.uint8)
    weight = rng.integers(-127, 128, size=(8, 64, 3, 3)).astype(np.int8)
    bias = rng.integers(-1000, 1000, size=8).astype(np.int64)
    acc = int8.conv(q, 17, weight, bias, stride=2, padding=1)
    padded = np.pad(q.astype(np.int64) - 17, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 8, 3, 3), np.int64)
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[:, :, i, j] = np.einsum("nckl,ockl->no", patch, weight.astype(np.int64)) + bias
    np.testing.assert_array_equal(acc, expected)


def tampered(int8_file, tmp_path, change):
    """A copy of a valid int8 file with change(header, arrays) applied (a header it returns replaces it)."""
    model = int8.load(int8_file)
    header, arrays = model["header"], dict(model["arrays"])
    replaced = change(header, arrays)
    header = replaced if isinstance(replaced, list) else header
    path = str(tmp_path / "tampered.int8.npz")
    int8.save(path, header, arrays)
    return path


def set_key(mapping, key, value):
    mapping[key] = value


TAMPERINGS = {
    "header a list": (lambda h, a: [h], "(format list, expected 'qat-resnet-int8' version 1, 2 or 3)"),
    "stride 0": (lambda h, a: set_key(node(h, "layer2.0.conv1"), "stride", 0),
                 "operation 5 ('conv', 'layer2.0.conv1'): weight (32, 16, 3, 3), stride 0"),
    "empty graph": (lambda h, a: set_key(h, "graph", []), "the header has no graph"),
    "bias bits 40": (lambda h, a: set_key(node(h, "layer2.0.conv1"), "bias_bits", 40), "bias_bits 40 is not 0 to 16"),
    "bias bits overflowing": (lambda h, a: set_key(node(h, "layer3.0.conv2"), "bias_bits", 12),
                              "576 products per output shifted by 12 bias bits and biases up to"),
    "weight removed": (lambda h, a: a.pop("layer3.0.conv2.weight"), "array 'layer3.0.conv2.weight' is not in the file"),
    "weight reshaped": (lambda h, a: set_key(a, "layer1.0.conv1.weight", a["layer1.0.conv1.weight"][:, :8]),
                        "weight (16, 8, 3, 3), stride 1 and padding 1 do not fit an input of shape (16, 32, 32)"),
    "unknown op": (lambda h, a: set_key(node(h, "layer3.0.add"), "op", "mul"), "unknown operation 'mul'"),
    "100 outputs": (lambda h, a: a.update({"fc.weight": np.zeros((100, 64), np.int8),
                                           "fc.weight_scale": np.ones(100, np.float32),
                                           "fc.bias": np.zeros(100, np.int32)}),
                    "num_classes 10 is not the logits' (100,)"),
    "100 classes": (lambda h, a: a.update({"fc.weight": np.zeros((100, 64), np.int8),
                                           "fc.weight_scale": np.ones(100, np.float32),
                                           "fc.bias": np.zeros(100, np.int32)}) or set_key(h, "num_classes", 100),
                    "is a model for other data: input [3, 32, 32], 100 classes"),
    "zero scale": (lambda h, a: set_key(h["tensors"]["t5"], "scale", 0.0), "tensor 't5' has no scale > 0"),
    "used before defined": (lambda h, a: h["graph"].insert(1, h["graph"].pop(5)), "is not an earlier operation's"),
    "pickled weight": (lambda h, a: set_key(a, "fc.bias", np.array([object()] * 10)), "not an .npz archive of arrays"),
    "endless graph": (lambda h, a: set_key(h, "graph", h["graph"][:1] + [h["graph"][1]] * 2000),
                      "the graph has 2001 operations, more than the 1000"),
    "huge layer": (lambda h, a: a.update({"conv1.weight": np.zeros((2048, 3, 3, 3), np.int8),
                                          "conv1.weight_scale": np.ones(2048, np.float32),
                                          "conv1.bias": np.zeros(2048, np.int32)}),
                   "a 32x32 output of 2048 channels from 3x3x3 windows is more than the 1048576 values per image"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_eval_refuses_a_tampered_int8_file_before_evaluating(case, int8_file, synthetic_dir, tmp_path, capsys,
                                                             monkeypatch):
    change, fragment = TAMPERINGS[case]
    if case == "pickled weight":  # int8.save cannot write one: np.savez with pickling
        monkeypatch.setattr(int8.np, "savez", lambda f, **arrays: np.lib.npyio._savez(f, (), arrays, False, True))
    path = tampered(int8_file, tmp_path, change)
    monkeypatch.setattr(inference, "predict", lambda *args: pytest.fail("evaluated a tampered file"))
    expect_error(evaluate.main, ["-loc", path, "-data", synthetic_dir], capsys, fragment)


def test_the_untampered_int8_file_loads(int8_file):
    assert int8.load(int8_file)["header"]["num_classes"] == 10


def test_oversized_npz_members_are_refused_before_they_are_read(int8_file, tmp_path):
    """A member larger than an int8 ResNet-18 (declared, not read: compressed zeros), and a member whose array
    header claims more data than the member holds."""
    import zipfile

    big = str(tmp_path / "big.int8.npz")
    with zipfile.ZipFile(int8_file) as source, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        with target.open("extra.npy", "w", force_zip64=True) as f:  # (the limit's double; 3 GiB is as refused)
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (128 << 20,)})
            f.write(bytes(128 << 20))
    assert os.path.getsize(big) < 20 << 20
    with pytest.raises(ValueError, match=r"bytes: more than an int8 ResNet-18 holds"):
        int8.load(big)
    lying = str(tmp_path / "lying.int8.npz")
    with zipfile.ZipFile(lying, "w") as target:
        with target.open("header.json.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (1 << 40,)})
    with pytest.raises(ValueError, match=r"claims shape \(1099511627776,\), more than its"):
        int8.load(lying)


def test_an_int8_header_nested_too_deep_is_refused(tmp_path):
    path = tmp_path / "deep.int8.npz"
    np.savez(path, **{"header.json": np.frombuffer(b"[" * 100000 + b"]" * 100000, np.uint8)})
    with pytest.raises(ValueError, match="header.json is not JSON"):
        int8.load(str(path))


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_packing_keeps_every_4_bit_value(count):
    values = np.resize(np.arange(-8, 8, dtype=np.int8), count)
    packed = int8.pack(values.reshape(count, 1))
    assert packed.dtype == np.uint8 and len(packed) == (count + 1) // 2
    np.testing.assert_array_equal(int8.unpack(packed, [count, 1]), values.reshape(count, 1))


def test_a_layer_of_4_bit_weights_is_stored_packed_and_loads_as_it_was(int8_file, tmp_path):
    model = int8.load(int8_file)
    header, arrays = model["header"], model["arrays"]
    layer = node(header, "layer1.0.conv1")
    layer["weight_bits"] = 4
    arrays["layer1.0.conv1.weight"] = np.clip(arrays["layer1.0.conv1.weight"], -8, 7)
    path = str(tmp_path / "packed.int8.npz")
    int8.save(path, header, arrays)
    with np.load(path) as archive:
        stored = archive["layer1.0.conv1.weight"]
    assert stored.dtype == np.uint8 and stored.size == arrays["layer1.0.conv1.weight"].size // 2
    loaded = int8.load(path)
    np.testing.assert_array_equal(loaded["arrays"]["layer1.0.conv1.weight"], arrays["layer1.0.conv1.weight"])
    assert "weight_bits" not in node(header, "layer1.0.conv2")  # (save changed no node of the caller's)
    assert "weight_shape" not in layer
    # A packed array that does not hold the shape its node claims; weights beyond their layer's bits.
    layer["weight_shape"] = [16, 16, 3, 4]
    with np.load(path) as archive:
        payload = dict(archive)
    payload[int8.HEADER_KEY] = np.frombuffer(json.dumps(dict(json.loads(payload[int8.HEADER_KEY].tobytes()),
                                                             graph=header["graph"])).encode(), np.uint8)
    np.savez(str(tmp_path / "cut.npz"), **payload)
    with pytest.raises(ValueError, match="does not hold 3072 packed values of shape"):
        int8.load(str(tmp_path / "cut.npz"))
    del layer["weight_shape"]
    layer["weight_bits"] = 3
    int8.save(str(tmp_path / "wide.int8.npz"), header, dict(arrays, **{"layer1.0.conv1.weight": np.full(
        arrays["layer1.0.conv1.weight"].shape, 7, np.int8)}))
    with pytest.raises(ValueError, match="weights from 7 to 7 are not 3-bit values|not 3-bit"):
        int8.load(str(tmp_path / "wide.int8.npz"))


DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_older_versions_give_the_logits_the_code_of_their_time_gave(version):
    """tests/data: a ResNet-8 int8 file of version 1 (8-bit activations) and of version 2 (4-bit weights and
    activations, biases with fraction bits), and the logits int8.py gave them before version 3 (commit 0ea008c) on
    16 fixed images: the arithmetic of older files is kept bit for bit."""
    images = (((np.arange(16 * 3 * 32 * 32) * 7919) % 1000) / 250.0 - 2.0).astype(np.float32).reshape(16, 3, 32, 32)
    model = int8.load(os.path.join(DATA, f"version{version}.int8.npz"))
    assert model["header"]["version"] == version
    with np.load(os.path.join(DATA, "old_versions_logits.npz")) as expected:
        assert np.array_equal(int8.run(model, images), expected[f"version{version}"])
