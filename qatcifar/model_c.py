"""C folders (export.py --format c) built for this machine and run through ctypes (inference.py's interface).

The folder is checked before anything is compiled: its manifest (model.json) names the files export.py wrote and
their digests, so a folder edited or damaged since is refused rather than built. Building runs the C compiler
($CC, else cc) on the folder's code and loading runs it: as for any C, build only folders you trust. The shared
library is cached beside the model, in `.build/` (a temporary folder where the model's folder cannot be
written), under a name that holds the digest of the sources, the compiler and its flags: an edit or another
compiler builds anew. Images come normalized in NCHW as everywhere in the toolkit; they are quantized as the int8
reference quantizes them, and the int32 logits dequantized by the folder's own model_logits_float.
"""
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from qatcifar import c_export, cli, files, inference, int8

MINDSPORE, THREADS = False, False
HOST_FLAGS = ("-std=c99", "-O2", "-fPIC", "-shared")
BUILD = ".build"
COMPILE_SECONDS = 300
_scratch = []  # temporary build folders of this process (removed at exit with the TemporaryDirectory objects)


def compiler():
    """The C compiler's command ($CC, else cc) and its version line; cli.InputError if there is none."""
    command = os.environ.get("CC") or "cc"
    if shutil.which(command) is None:
        raise cli.InputError(f"no C compiler: {command} is not installed; install gcc (apt-get install gcc), or set "
                             "CC, to build a C folder for this machine")
    version = subprocess.run([command, "--version"], capture_output=True, text=True, check=False).stdout
    return command, (version.splitlines() or ["unknown"])[0]


def manifest(path):
    """The folder's model.json, checked: the format, its files present and as export.py wrote them."""
    where = os.path.join(path, c_export.MANIFEST)
    if not os.path.isfile(where):
        raise cli.InputError(f"{path} is a folder without {c_export.MANIFEST}; give a folder written by export.py "
                             "--format c, or a model file")
    try:
        record = files.load_json(where)
    except (OSError, ValueError) as e:
        raise cli.InputError(f"{where} is not readable JSON ({files.why(e)}); export the C folder again") from None
    if not isinstance(record, dict) or record.get("format") != c_export.FORMAT or \
            record.get("version") != c_export.VERSION:
        found = (record.get("format"), record.get("version")) if isinstance(record, dict) else type(record).__name__
        raise cli.InputError(f"{where} is not the manifest of export.py's C ({found}, expected {c_export.FORMAT!r} "
                             f"version {c_export.VERSION}); export the C folder again")
    digests = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
    for name in c_export.FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file) or name not in digests:
            raise cli.InputError(f"{path} has no {name}; export the C folder again")
        with open(file, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digests[name]:
                raise cli.InputError(f"{file} was changed after export.py wrote it (its digest differs from "
                                     f"{c_export.MANIFEST}'s); export the C folder again")
    _check_input(where, record.get("input"))
    return record


def _check_input(where, tensor):
    if not (isinstance(tensor, dict) and isinstance(tensor.get("scale"), float) and 0 < tensor["scale"] < 1e30
            and tensor.get("bits") in range(2, 9) and tensor.get("zero_point") in range(2 ** tensor["bits"])):
        raise cli.InputError(f"{where}: its input {tensor!r} is no scale, bits and zero point; export the C folder "
                             "again")


def build(path, record):
    """The path of the folder's shared library for this machine, compiled unless cached."""
    command, version = compiler()
    digest = hashlib.sha256(json_bytes([version, HOST_FLAGS, record["sha256"]])).hexdigest()[:16]
    folder = os.path.join(path, BUILD)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:  # (a read-only folder: build for this process only)
        if not _scratch:
            _scratch.append(tempfile.TemporaryDirectory(prefix="qatcifar-c-"))
        folder = _scratch[0].name
    library = os.path.join(folder, f"host-{digest}.so")
    if not os.path.isfile(library):
        sources = [os.path.join(path, name) for name in ("model.c", "qat_kernels.c")]

        def compile_into(tmp):
            result = subprocess.run([command, *HOST_FLAGS, "-o", tmp, *sources], capture_output=True, text=True,
                                    timeout=COMPILE_SECONDS, check=False)
            if result.returncode:
                raise cli.InputError(f"{command} could not build {path}: "
                                     f"{cli.first_line(result.stderr or result.stdout)}; export the C folder again")
        with files.output(library, "-loc"):
            files.write_atomically(library, compile_into)
    return library


def json_bytes(value):
    return json.dumps(value, sort_keys=True).encode()


def logits_function(library, record):
    """logits(images) of a built folder: normalized float32 NCHW in, float32 logits out (as int8.run gives them)."""
    lib = ctypes.CDLL(library)
    lib.model_run.argtypes = lib.model_logits_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    tensor, classes = record["input"], record["num_classes"]
    tflite = bool(record.get("tflite_arithmetic"))

    def logits(images):
        levels = np.ascontiguousarray(int8.quantize_input(images, tensor, tflite).transpose(0, 2, 3, 1))
        acc = np.zeros((len(images), classes), np.int32)
        out = np.zeros((len(images), classes), np.float32)
        for image, row, real in zip(levels, acc, out, strict=True):
            lib.model_run(image.ctypes.data, row.ctypes.data)
            lib.model_logits_float(row.ctypes.data, real.ctypes.data)
        logits.acc = acc  # (the int32 logits of the last batch: what the tests compare with int8's)
        return out
    return logits


def runner(path, threads=None):
    record = manifest(path)
    return logits_function(build(path, record), record)


def load(path, threads=None):
    record = manifest(path)
    inference.check_input(path, record["input"].get("shape"), record.get("num_classes"),
                          record.get("normalization"))
    return inference.Model(logits_function(build(path, record), record), "C (integer arithmetic, host build)",
                           class_names=inference.names_or_none(record.get("class_names")),
                           size=inference.size_or_none(record.get("network") or {}))
