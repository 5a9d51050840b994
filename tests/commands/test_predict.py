"""predict.py end to end: images of any size and mode, every model format, what is not an image."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import export
import predict
from conftest import (
    SYNTHETIC_NAMES,
    expect_error,
)
from qatcifar import cifar, inference


def cifar_images(data_dir, count):
    """The first test images as uint8 (count, 32, 32, 3) arrays."""
    records = np.fromfile(os.path.join(data_dir, "test_batch.bin"), np.uint8, count=count * 3073).reshape(count, -1)
    return records[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)


def save_pngs(data_dir, folder, count):
    paths = [str(folder / f"test{i}.png") for i in range(count)]
    for path, pixels in zip(paths, cifar_images(data_dir, count), strict=True):
        Image.fromarray(pixels).save(path)
    return paths


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


def test_images_of_more_than_8_bits_are_scaled_not_clipped(float_onnx, synthetic_dir, tmp_path, capsys):
    """A 16-bit PNG, a 32-bit integer TIFF and a float TIFF (0..1) of a gray picture are that picture: the same
    classes as its 8-bit PNG. (Pillow's convert clipped them: nearly white, confidently wrong.)"""
    gray = cifar_images(synthetic_dir, 1)[0].mean(axis=2).round().astype(np.uint8)
    pictures = {"8bit.png": gray, "16bit.png": gray.astype(np.uint16) * 257,
                "32bit.tif": gray.astype(np.int32) * 257, "float.tif": gray.astype(np.float32) / 255}
    paths = []
    for name, pixels in pictures.items():
        paths.append(str(tmp_path / name))
        Image.fromarray(pixels).save(paths[-1])
    assert [Image.open(path).mode for path in paths] == ["L", "I;16", "I", "F"]
    results = predict.main(["-loc", float_onnx[1], *paths, "--top_k", "3"])
    assert all(result["top"] == results[0]["top"] for result in results), results
    Image.fromarray(np.full((32, 32), 300.0, np.float32)).save(tmp_path / "bright.tif")
    capsys.readouterr()
    expect_error(predict.main, ["-loc", float_onnx[1], str(tmp_path / "bright.tif")], capsys,
                 "float pixels from 300 to 300; give values from 0 to 1")


def test_threads_beyond_the_cpus_are_capped_with_a_warning(float_onnx, synthetic_dir, tmp_path, capsys):
    png = save_pngs(synthetic_dir, tmp_path, 1)[0]
    predict.main(["-loc", float_onnx[1], png, "--threads", "1024"])
    cpus = len(os.sched_getaffinity(0))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --threads 1024 is more than the {cpus} CPUs this process may use; running {cpus}"]


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
