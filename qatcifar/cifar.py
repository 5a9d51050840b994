"""CIFAR-10 data: the MindSpore input pipeline, checks of the data folder, synthetic data, download.

`create_dataset(data_dir, training, batch_size, ...)` builds the pipeline that train.py and
eval.py share, on `mindspore.dataset.Cifar10Dataset` reading the binary version of CIFAR-10
(`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`; each record is 1 label byte
and 3072 pixel bytes: the R, G and B planes of a 32x32 image). `download` fetches the real
data set, `write_synthetic` writes a learnable stand-in (preprocess.py is their command).
"""
import hashlib
import http.client
import os
import re
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from qatcifar import cli, files, interrupts

NUM_CLASSES = 10
IMAGE_SIZE = 32
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)   # per channel, of the training images scaled to [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD_BYTES = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE
RECORDS_PER_FILE = 10000  # Cifar10Dataset reads nothing else: it fails on shorter files
FILE_BYTES = RECORD_BYTES * RECORDS_PER_FILE
TRAIN_PATTERN = "data_batch_*.bin"
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
SYNTHETIC_MARKER = "SYNTHETIC.txt"
MAX_META_BYTES = 4096  # batches.meta.txt: ten short class names

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_FOLDER = "cifar-10-batches-bin"  # the folder the official archive extracts to
MAX_ARCHIVE_MEMBERS = 20  # the official archive has 9: the folder, 6 .bin files, batches.meta.txt, readme.html
MAX_DOWNLOAD_BYTES = MAX_ARCHIVE_MEMBERS * FILE_BYTES  # 615 MB: 20 members of at most a CIFAR-10 file's size
DEFAULT_DATA_DIR = os.path.join("data", ARCHIVE_FOLDER)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


class DatasetError(cli.InputError):
    """The data folder or a download is unusable; the message says what is wrong and how to fix it."""


def split_files(data_dir, training):
    """Every entry of data_dir that Cifar10Dataset reads for the split, as it picks them: at the top level, every
    name ending in .bin that contains data_batch (training) or test_batch (test), hidden ones too."""
    key = "data_batch" if training else "test_batch"
    names = [name for name in os.listdir(data_dir) if name.endswith(".bin") and key in name]
    return sorted(os.path.join(data_dir, name) for name in names)


def data_dir_for(model, given):
    """The data folder of a command that reads `model`: -data as `given`; else that of the train.py run that wrote
    the model (its args.json, files.RunFiles.of_model), said in a note, where that folder exists; else
    DEFAULT_DATA_DIR."""
    if given is not None:
        return given
    record = files.RunFiles.of_model(model) if model else None
    remembered = record.settings().get("data_dir") if record else None
    if isinstance(remembered, str) and remembered != DEFAULT_DATA_DIR and os.path.isdir(remembered):
        print(f"note: data folder {remembered}, the one {record.prefix}'s run trained on ({record.args}); give "
              "another with -data", flush=True)
        return remembered
    return DEFAULT_DATA_DIR


def check_data_dir(data_dir, training):
    """Raise DatasetError naming what is wrong with the split's files (each file Cifar10Dataset would read is
    checked); return the files."""
    fix = (f"give the folder of CIFAR-10's .bin files with -data, or fill this one with `python preprocess.py "
           f"--download -data {data_dir}` (or --synthetic {data_dir} for test data)")
    if os.path.islink(data_dir) and not os.path.exists(data_dir):
        raise DatasetError(f"data folder {data_dir} is a broken symbolic link (or a loop); point it at the "
                           "CIFAR-10 folder or give that folder with -data")
    if not os.path.exists(data_dir):
        raise DatasetError(f"data folder {data_dir} does not exist; {fix}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data folder {data_dir} is a file; give the folder holding the .bin files with -data")
    try:
        files = split_files(data_dir, training)
    except OSError as e:
        raise DatasetError(f"cannot read data folder {data_dir} ({e.strerror}); give a readable -data") from None
    if not files:
        wanted = TRAIN_PATTERN if training else TEST_FILE
        inner = os.path.join(data_dir, ARCHIVE_FOLDER)
        if os.path.isdir(inner):  # the parent of the extracted folder was given
            fix = f"did you mean -data {inner}?"
        raise DatasetError(f"no {wanted} in data folder {data_dir}; {fix}")
    for path in files:
        name = os.path.basename(path)
        if not (re.fullmatch(r"data_batch_\d+\.bin", name) if training else name == TEST_FILE):
            split = "training" if training else "test"
            raise DatasetError(f"{path} is not a CIFAR-10 file name, but MindSpore's Cifar10Dataset would read it "
                               f"as {split} data (it reads every *.bin whose name holds "
                               f"{'data_batch' if training else 'test_batch'}); move it out of {data_dir}")
        check_file(path)
    return files


def check_file(path):
    try:
        size = os.stat(path).st_size
    except OSError as e:  # a broken symbolic link, a loop, no permission
        raise DatasetError(f"cannot read {path} ({e.strerror}); replace it with the real file") from None
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is not a file; move it out of the data folder")
    if size != FILE_BYTES:
        raise DatasetError(
            f"{path} is {size} bytes ({size / RECORD_BYTES:.2f} records of {RECORD_BYTES} bytes); a CIFAR-10 "
            f"file holds exactly {RECORDS_PER_FILE} records ({FILE_BYTES} bytes): download it again")
    try:
        labels = np.memmap(path, dtype=np.uint8, mode="r", shape=(RECORDS_PER_FILE, RECORD_BYTES))[:, 0]
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror}); give a readable data folder") from None
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DatasetError(f"{path}: record {bad[0]} has label {labels[bad[0]]} (labels are 0-{NUM_CLASSES - 1}); "
                           f"the file is corrupt or not CIFAR-10: download it again")


def create_dataset(data_dir, training, batch_size, repeat_num=1, num_parallel_workers=DEFAULT_WORKERS,
                   num_shards=None, shard_id=None, num_samples=None):
    """The CIFAR-10 pipeline: augmented and shuffled when `training`, in file order otherwise.

    num_samples: training draws that many images at random each epoch; evaluation takes
    the first num_samples images of the test file.
    """
    import mindspore as ms  # (here: the constants and checks of this module serve commands without MindSpore)
    import mindspore.dataset as ds
    import mindspore.dataset.transforms as transforms
    import mindspore.dataset.vision as vision

    check_data_dir(data_dir, training)
    data = ds.Cifar10Dataset(data_dir, usage="train" if training else "test", num_samples=num_samples,
                             shuffle=training, num_parallel_workers=num_parallel_workers,
                             num_shards=num_shards, shard_id=shard_id)
    image_ops = []
    if training:
        image_ops += [vision.RandomCrop(IMAGE_SIZE, padding=4), vision.RandomHorizontalFlip()]
    image_ops += normalization(vision)
    data = data.map(image_ops, input_columns="image", num_parallel_workers=num_parallel_workers)
    data = data.map(transforms.TypeCast(ms.int32), input_columns="label", num_parallel_workers=num_parallel_workers)
    data = data.batch(batch_size, drop_remainder=training)
    return data.repeat(repeat_num)


def calibration_dataset(data_dir, count, batch_size):
    """The first `count` training images in file order, as evaluation sees images (no augmentation), in batches:
    what post-training quantization measures activation ranges on (ptq.py)."""
    import mindspore.dataset as ds
    import mindspore.dataset.vision as vision

    check_data_dir(data_dir, True)
    data = ds.Cifar10Dataset(data_dir, usage="train", num_samples=count, shuffle=False)
    return data.map(normalization(vision), input_columns="image").batch(batch_size)


def normalization(vision):
    """The pipeline's last operations on an image (mindspore.dataset.vision's): pixels to [0, 1], normalized, CHW."""
    return [vision.Rescale(1.0 / 255.0, 0.0), vision.Normalize(CIFAR10_MEAN, CIFAR10_STD), vision.HWC2CHW()]


def class_names(data_dir, default=None):
    """Names from the folder's batches.meta.txt (UTF-8, one per line) when it names the 10 classes, else
    `default` if the folder has no such file, else the class indices; DatasetError for a file that is not small
    UTF-8 text."""
    path = os.path.join(data_dir, META_FILE)
    if not os.path.exists(path):
        return list(default or (str(i) for i in range(NUM_CLASSES)))
    if not os.path.isfile(path):  # (a FIFO would block the read)
        raise DatasetError(f"{path} is not a file; move it out of the data folder")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_META_BYTES + 1)
        if len(data) > MAX_META_BYTES:
            raise ValueError(f"it is over {MAX_META_BYTES} bytes")
        names = [cli.printable(line.strip()) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text" if isinstance(e, UnicodeError) else e
        raise DatasetError(f"cannot read the class names in {path} ({why}); replace it with CIFAR-10's, "
                           "or remove it to number the classes") from None
    if len(names) != NUM_CLASSES:
        print(f"warning: {path} names {len(names)} classes, not {NUM_CLASSES}; classes are numbered instead",
              file=sys.stderr)
        return [str(i) for i in range(NUM_CLASSES)]
    return names


# --- synthetic data -----------------------------------------------------------------------

# The synthetic sets' class signal and noise, in pixel levels: (tint amplitude, stripe amplitude, noise's standard
# deviation). `easy` is learned to 100 % by every network in an epoch or two: for trying the commands. `hard` (the
# same classes, fainter, noisier) leaves a ResNet-8 at 82-87 % after six short epochs, where fewer bits,
# distillation and per-layer sensitivity show differences (docs/benchmarks.md#fewer-bits).
SAMPLES_FOLDER = "samples"  # a synthetic set's test images as PNG files, one a class (predict.py's input)
DIFFICULTIES = {"easy": (70, 35, 25), "hard": (8, 8, 60)}


def synthetic_images(labels, rng, difficulty="easy"):
    """Class-dependent images: a class colour plus a class-oriented stripe pattern, with noise (DIFFICULTIES).

    Each class has its own tint and stripe frequency/orientation; the stripe phase is random
    per image, so a random crop or flip keeps the class evident but no pixel position is.
    """
    tint, stripe, noise = DIFFICULTIES[difficulty]
    n = len(labels)
    class_rng = np.random.default_rng(1234)  # the same classes for every seed, so train and test agree
    tints = class_rng.uniform(-1, 1, size=(NUM_CLASSES, 3, 1, 1))
    freqs = class_rng.uniform(1, 4, size=(NUM_CLASSES, 2)) * class_rng.choice([-1, 1], size=(NUM_CLASSES, 2))
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = np.sin(2 * np.pi * (freqs[labels, 0, None, None] * xx + freqs[labels, 1, None, None] * yy) + phase)
    images = (128 + tint * tints[labels] + stripe * stripes[:, None]
              + rng.normal(0, noise, size=(n, 3, IMAGE_SIZE, IMAGE_SIZE)))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def write_records(path, labels, images):
    """Write a CIFAR-10 binary file (label byte, then the R, G, B planes), atomically."""
    records = np.empty((len(labels), RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(len(labels), -1)
    files.write_atomically(path, lambda tmp: files.write_array(tmp, records))


def write_synthetic(data_dir, seed=0, difficulty="easy"):
    """Write a learnable CIFAR-format set of a difficulty (DIFFICULTIES): data_batch_1.bin and test_batch.bin,
    10,000 images each."""
    def write(tmp):
        rng = np.random.default_rng(seed)
        for name in ("data_batch_1.bin", TEST_FILE):
            labels = rng.permutation(np.arange(RECORDS_PER_FILE) % NUM_CLASSES).astype(np.uint8)
            images = synthetic_images(labels, rng, difficulty)
            write_records(os.path.join(tmp, name), labels, images)
        write_samples(os.path.join(tmp, SAMPLES_FOLDER), labels, images)
        files.write_text(os.path.join(tmp, META_FILE), "".join(f"synthetic_{i}\n" for i in range(NUM_CLASSES)))
        files.write_text(os.path.join(tmp, SYNTHETIC_MARKER),
                         f"SYNTHETIC data written by `python preprocess.py --synthetic DIR --difficulty {difficulty}`, "
                         "not CIFAR-10.\nClass-dependent colours and stripes plus noise: learnable, for trying the "
                         "commands offline.\n")
    write_folder(data_dir, write)


def write_samples(folder, labels, images):
    """The first test image of each class as a PNG, `<class>.png`, to try predict.py on."""
    from PIL import Image

    os.mkdir(folder)
    for label in range(NUM_CLASSES):
        image = images[np.flatnonzero(labels == label)[0]].transpose(1, 2, 0)  # (HWC, as Pillow takes it)
        Image.fromarray(image).save(os.path.join(folder, f"synthetic_{label}.png"))


def check_new_folder(data_dir):
    """Raise DatasetError unless data_dir is a new or an empty folder that can be written (before any work)."""
    ancestor = os.path.dirname(os.path.abspath(data_dir))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "not a folder" if not os.path.isdir(ancestor) else "not writable"
        raise DatasetError(f"cannot write {data_dir}: {ancestor} is {problem}; choose another folder")
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise DatasetError(f"{data_dir} exists and is not a folder; choose an empty or new folder")
    existing = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    if existing:
        cifar = [name for name in existing if name.endswith(".bin")]
        raise DatasetError(f"{data_dir} is not empty: it holds {(cifar or existing)[0]}"
                           f"{' and more' if len(existing) > 1 else ''}; choose an empty or new folder")


def write_folder(data_dir, write):
    """write(tmp) fills a hidden folder beside data_dir (a new or empty folder), which is then renamed into place
    when complete: never half a data set."""
    check_new_folder(data_dir)
    parent = os.path.dirname(os.path.abspath(data_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        with (tempfile.TemporaryDirectory(dir=parent, prefix=".cifar-", ignore_cleanup_errors=True) as tmp,
              interrupts.temporary(tmp)):
            write(tmp)
            os.chmod(tmp, 0o755)  # (mkdtemp makes it 0700)
            os.rename(tmp, data_dir)  # (onto an empty folder too)
    except OSError as e:  # a full disk, or a folder that appeared meanwhile
        raise DatasetError(f"cannot write {data_dir} ({files.why(e)}); nothing was written, choose another folder") \
            from None


def is_synthetic(data_dir):
    return os.path.exists(os.path.join(data_dir, SYNTHETIC_MARKER))


# --- download ------------------------------------------------------------------------------

def download(data_dir=DEFAULT_DATA_DIR, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Fetch, verify and extract the CIFAR-10 binary archive so that `data_dir` holds its files.

    Everything happens in a hidden temporary folder beside `data_dir`, which is renamed into
    place only when complete and checked; any failure (or Ctrl-C) removes it.
    """
    if is_synthetic(data_dir):
        raise DatasetError(f"{data_dir} holds synthetic data ({SYNTHETIC_MARKER}), not CIFAR-10; give another "
                           f"-data folder for the real data set (the default is {DEFAULT_DATA_DIR})")
    if os.path.islink(data_dir) and not os.path.exists(data_dir):
        raise DatasetError(f"{data_dir} is a broken symbolic link; remove it or give another -data folder")
    if os.path.exists(data_dir):
        try:
            check_data_dir(data_dir, True)
            check_data_dir(data_dir, False)
        except DatasetError as e:
            raise DatasetError(f"{data_dir} exists but is not a complete CIFAR-10 folder ({e}); "
                               "remove it or pick another -data folder") from None
        print(f"{data_dir} already holds CIFAR-10; nothing to do")
        return data_dir
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".cifar10-download-") as tmp, interrupts.temporary(tmp):
        archive = os.path.join(tmp, "cifar-10-binary.tar.gz")
        fetch(url, archive, md5)
        extracted = os.path.join(tmp, "extracted")
        extract(archive, extracted)
        source = os.path.join(extracted, ARCHIVE_FOLDER)
        if not os.path.isdir(source):
            raise DatasetError(f"the archive from {url} has no {ARCHIVE_FOLDER}/ folder; "
                               "is it CIFAR-10 (binary version)?")
        check_data_dir(source, True)
        check_data_dir(source, False)
        os.rename(source, data_dir)
    print(f"CIFAR-10 is ready in {data_dir}")
    return data_dir


def fetch(url, path, md5, chunk=1 << 20):
    """Stream `url` to `path`, printing progress to stderr and checking the MD5 digest. A file:// URL must name a
    regular file (a FIFO would block for ever, a device stream without end)."""
    split = urllib.parse.urlsplit(url)
    if split.scheme == "file":
        local = urllib.request.url2pathname(split.path)
        what = file_kind(local)
        if what != "a file":
            raise DatasetError(f"{url}: {local} is {what}, not the archive's file; give file:///path/to/"
                               "cifar-10-binary.tar.gz")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            step = total // 10 if total else 16 << 20  # report every 10 %, or every 16 MB of an unknown size
            done, next_report = 0, 0
            while block := response.read(chunk):
                out.write(block)
                digest.update(block)
                done += len(block)
                if done > MAX_DOWNLOAD_BYTES:
                    raise DatasetError(f"{url} sends more than {MAX_DOWNLOAD_BYTES} bytes, more than any archive "
                                       "of CIFAR-10's files can be; give the CIFAR-10 binary archive's URL")
                if done >= next_report or done == total:
                    next_report = done + step
                    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"downloading {url}: {size}", file=sys.stderr)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DatasetError(f"download of {url} failed ({getattr(e, 'reason', e)}); check the network "
                           "or give a mirror with --url") from None
    if total and done != total:
        raise DatasetError(f"download of {url} stopped after {done} of {total} bytes; run it again")
    if digest.hexdigest() != md5:
        raise DatasetError(f"checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected {md5}; "
                           "the file is corrupt or not the CIFAR-10 binary archive: run again or use another --url")


def file_kind(path):
    """What is at path: "a file", "a folder", "a FIFO", "a device", "a socket" or "missing" (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "a socket")


def extract(archive, target):
    """Extract the archive's folders and regular files (never a link, device or member that would land outside
    target), each member's size checked before it is read, at most MAX_ARCHIVE_MEMBERS of them."""
    count = 0

    def member_filter(member, path):  # tarfile's "data" filter (nothing outside target), and member_problem
        nonlocal count
        count += 1
        problem = member_problem(member, count)
        if problem:
            raise DatasetError(f"the archive's member {member.name} is {problem}: this is not the CIFAR-10 binary "
                               "archive; use the official one (another --url)")
        return tarfile.data_filter(member, path)

    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(target, filter=member_filter)
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"cannot extract {archive}: {e}") from None


def member_problem(member, number):
    """What is wrong with the archive's member `number` (counted from 1), or None: the official archive holds 9
    folders and files, none larger than a CIFAR-10 file."""
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "not a file or folder"
    if member.size > FILE_BYTES:
        return f"{member.size} bytes, larger than a CIFAR-10 file"
    if number > MAX_ARCHIVE_MEMBERS:
        return f"number {number}, more than the {MAX_ARCHIVE_MEMBERS} allowed"
    return None
