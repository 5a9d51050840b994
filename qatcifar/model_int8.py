"""int8 files (`.npz`, export.py --format int8) run by int8.py's integer reference (inference.py's interface)."""
import numpy as np

from qatcifar import cli, inference, int8

MINDSPORE, THREADS = False, False
CHUNK = 100  # images per call of the reference, whatever the batch size: its im2col takes 4.7 MB per image


def run_chunked(model, images):
    return np.concatenate([int8.run(model, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)])


def runner(path, threads=None):
    model = int8.load(path)
    return lambda images: run_chunked(model, images)


def load(path, threads=None):
    try:
        model = int8.load(path)
    except ValueError as e:
        raise cli.InputError(f"{path} is not an int8 model written by export.py ({e})") from None
    header = model["header"]
    inference.check_input(path, header["input_shape"], header["num_classes"], header.get("normalization"))
    return inference.Model(lambda images: run_chunked(model, images), "int8 (integer inference)",
                           class_names=inference.names_or_none(header.get("class_names")),
                           size=inference.size_or_none(header))
