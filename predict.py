"""Classify image files with a trained model: the top classes of each image, with names and probabilities.

    python predict.py -loc checkpoints/resnet18_qat-40_1562.onnx cat.png ship.jpg
    python predict.py -loc checkpoints/resnet18_qat-40_1562.ckpt --top_k 5 --json photos/*.jpg

Any model eval.py runs: a checkpoint (.ckpt), a MindIR graph, an int8 file (.npz) or an ONNX
model (.onnx). Images are decoded by Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM), in any size
and mode: converted to RGB (an alpha channel is dropped), resized to 32x32 with Pillow's
antialiased bilinear filter (CIFAR-10's images are photos reduced to 32x32, whatever their
aspect) and normalized as in training. Every image is read before the model is loaded.

Class names: those the model file carries (int8 and ONNX files), else -data's batches.meta.txt,
else CIFAR-10's. With --json the last line of stdout is {"model": ..., "predictions": [{"image":
path, "top": [{"class": name, "index": i, "probability": p}, ...]}, ...]}.
"""
from qatcifar import cli, interrupts  # noqa: I001  (first: cli quiets MindSpore's log before it loads)

if __name__ == "__main__":
    interrupts.block()  # Ctrl-C and SIGTERM wait for interrupts.run (see there), also in MindSpore's threads

import json
import os
import warnings

import numpy as np
from PIL import Image

from qatcifar import cifar, files, inference

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # what Pillow may decode here
MAX_PIXELS = 50_000_000  # larger images (a 7,000 x 7,000 photo) are refused before they are decoded
BATCH = 100


def get_args_parser():
    parser = cli.ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    parser.add_argument("-loc", "--check_point", required=True, help="model file: .ckpt, .mindir, .npz or .onnx")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, ...)")
    parser.add_argument("--top_k", type=cli.int_range(1, cifar.NUM_CLASSES), default=3,
                        help="classes shown per image")
    parser.add_argument("-data", "--data_dir", default=cifar.DEFAULT_DATA_DIR,
                        help="where batches.meta.txt names the classes, for models that carry no names "
                             "(CIFAR-10's names if it has none)")
    parser.add_argument("--threads", type=cli.int_range(1, 1024), default=None,
                        help="ONNX models: ONNX Runtime's threads (default: one per physical core)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the predictions")
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return interrupts.run(predict, args, interrupted="nothing was classified")


def predict(args):
    """Print (and return) the top classes of each image."""
    images = np.stack([load_image(path) for path in args.images])
    if inference.uses_mindspore(args.check_point):
        cli.setup_device(args.device)
    model = inference.load_model(args.check_point, args.threads)
    names = model.class_names or cifar.class_names(args.data_dir, default=cifar.CIFAR10_CLASSES)
    logits = np.concatenate([model.logits(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
    results = [{"image": path, "top": top_classes(row, names, args.top_k)}
               for path, row in zip(args.images, logits, strict=True)]
    for result in results:
        print(f"{result['image']}: " + ", ".join(f"{c['class']} {100 * c['probability']:.1f}%" for c in result["top"]))
    if args.json:
        print(json.dumps({"model": model.description, "check_point": args.check_point, "predictions": results}))
    return results


def to_rgb(image):
    """The 8-bit RGB image of an image of any mode. Pillow's own conversion clips images of more than 8 bits (16-bit
    PNGs and TIFFs come as I;16 or I, float TIFFs as F) into 0..255: here they are scaled from their range, 0..65535
    (0..2**31 - 1 for larger 32-bit values), and 0..1 for floats (0..255 where a value is above 1). ValueError for
    float values outside those ranges or not finite."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image.convert("RGB")
    values = np.asarray(image, np.float64)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
            raise ValueError(f"float pixels from {values.min():g} to {values.max():g}; give values from 0 to 1")
        top = 1.0 if values.max() <= 1 else 255.0
    else:
        values = np.maximum(values, 0)  # (signed 32-bit pixels below 0: black)
        top = 65535.0 if values.max() <= 65535 else 2.0 ** 31 - 1
    gray = np.round(values * (255 / top)).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def load_image(path):
    """A normalized float32 (3, 32, 32) image from an image file; InputError naming the file if it cannot be."""
    if not os.path.isfile(path):
        raise cli.InputError(f"image {path} {'is not a file' if os.path.exists(path) else 'does not exist'}; "
                             "give image files (PNG, JPEG, BMP, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ValueError(f"{image.width}x{image.height} pixels, more than {MAX_PIXELS:,}")
                image = to_rgb(image).resize((cifar.IMAGE_SIZE,) * 2, Image.Resampling.BILINEAR)
    except Image.UnidentifiedImageError:
        raise cli.InputError(f"{path} is not an image file Pillow reads ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise cli.InputError(f"cannot read image {path} ({files.why(e)}); give a readable image file") from None
    pixels = np.asarray(image, np.float32) / 255.0
    normalized = (pixels - np.float32(cifar.CIFAR10_MEAN)) / np.float32(cifar.CIFAR10_STD)
    return normalized.transpose(2, 0, 1).astype(np.float32)  # HWC -> CHW


def top_classes(logits, names, k):
    """The k most probable classes (softmax of the logits), most probable first."""
    logits = logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


if __name__ == "__main__":
    main()
