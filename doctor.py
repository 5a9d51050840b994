"""Check that this machine can run the toolkit: one line per check, `ok`, `warning` or `problem`.

    python doctor.py                                  # the defaults train.py would use
    python doctor.py -data data/demo -dir runs/a      # another data folder and save directory

Checks Python, MindSpore and numpy; the CPU and the oneDNN instruction set the scripts cap it
at; the GPU: the NVIDIA driver, and every library MindSpore's GPU backend links against (read
from the plugin file itself, then looked up as the dynamic loader would: its own folder,
LD_LIBRARY_PATH, the ldconfig cache, the system folders), each missing one with the version
found instead and what installs it; msrun; the data folder; the save directory (writable, free
space, not held by a running train.py). Exit status 0 when training can run (on the CPU if
not on the GPU), 1 when a problem stops it.
"""
import fcntl
import glob
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys

from qatcifar import cli, interrupts  # (neither imports MindSpore, which this script checks)
from qatcifar.cifar import DEFAULT_DATA_DIR  # (nor does this module)

OK, WARNING, PROBLEM = "ok", "warning", "problem"
SYSTEM_LIBRARY_DIRS = ("/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                       "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib")
PIP = "; or pip install {} and add its lib folder to LD_LIBRARY_PATH"
HINTS = {  # library name up to ".so": what provides it
    "libcuda": "the NVIDIA driver (nvidia-smi should then list the GPU)",
    "libcudnn": "cuDNN 8 for CUDA 11" + PIP.format("'nvidia-cudnn-cu11==8.*'"),
    "libnccl": "NCCL 2 for CUDA 11" + PIP.format("nvidia-nccl-cu11"),
    "libcudart": "the CUDA 11.6 runtime" + PIP.format("nvidia-cuda-runtime-cu11"),
    "libnvrtc": "CUDA 11.6's NVRTC" + PIP.format("nvidia-cuda-nvrtc-cu11"),
}
CUDA_HINT = "CUDA 11.6's {} library" + PIP.format("nvidia-{}-cu11")
FREE_SPACE_MB = 1000  # a run's checkpoints: about 135 MB each with Adam's state, --keep 5 of them plus the best one
MIN_FREE_MB = 200


def get_args_parser():
    parser = cli.ArgumentParser(prog="doctor.py", description=__doc__.split("\n")[0])
    parser.add_argument("-data", "--data_dir", default=None,
                        help=f"the data folder train.py would read (default {DEFAULT_DATA_DIR}, train.py's; when it "
                             "is missing, a warning that names the data folders found beside it)")
    parser.add_argument("-dir", "--savedir", default="checkpoints", help="the save directory train.py would write")
    parser.add_argument("--device", choices=("auto", "CPU", "GPU"), default="auto",
                        help="GPU: a GPU that cannot be used is a problem, not a warning")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return interrupts.run(diagnose, args, interrupted="the checks stopped; nothing was written")


def diagnose(args):
    """Print each check's lines; 1 if one found a problem, else 0."""
    results = []
    for check in (check_python, check_numpy, check_mindspore, check_cpu, check_gpu, check_collectives, check_msrun,
                  check_data, check_savedir):
        for status, text in check(args):
            print(f"{status:<8} {text}", flush=True)
            results.append(status)
    return 1 if PROBLEM in results else 0


def check_python(args):
    version = platform.python_version()
    if sys.version_info[:2] == (3, 11):
        yield OK, f"Python {version}"
    else:
        yield WARNING, f"Python {version}: the toolkit is tested with 3.11 (MindSpore 2.10 has wheels for 3.9-3.11)"


def installed(package):
    """The installed version of a package, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_numpy(args):
    version = installed("numpy")
    if version is None:
        yield PROBLEM, "numpy is not installed: pip install -r requirements.txt"
        return
    if int(version.split(".")[0]) >= 2:
        yield PROBLEM, (f"numpy {version}: MindSpore 2.10 was built against numpy 1.x and prints errors under 2.x; "
                        "pip install 'numpy>=1.26,<2'")
    else:
        yield OK, f"numpy {version}"


def check_mindspore(args):
    version = installed("mindspore")
    if version is None:
        yield PROBLEM, "MindSpore is not installed: pip install -r requirements.txt"
        return
    try:
        import mindspore  # noqa: F401  (its log quieted by qatcifar.cli, imported first)
    except Exception as e:  # any failure to load is this check's finding
        yield PROBLEM, f"MindSpore {version} is installed but does not load ({str(e).splitlines()[0]})"
        return
    status = OK if version.startswith("2.10.") else WARNING
    yield status, f"MindSpore {version}" + ("" if status == OK else ": the toolkit is tested with 2.10.0")


def check_cpu(args):
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2")
    note = ""
    if "avx512f" in flags and isa == "AVX2":
        note = " (this CPU has AVX-512, where MindSpore's oneDNN may pick a slow reference convolution)"
    yield OK, (f"CPU: {info.get('model name', platform.machine())}, {os.cpu_count()} logical cores; the scripts run "
               f"oneDNN up to {isa}{note}")


def cpuinfo():
    """The first processor's fields in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def check_gpu(args):
    """The NVIDIA driver, and the libraries of MindSpore's newest GPU plugin."""
    bad = PROBLEM if args.device == "GPU" else WARNING
    plugin = gpu_plugin()
    if plugin is None:
        yield bad, "this MindSpore has no GPU plugin (a CPU-only wheel): training runs on the CPU"
        return
    needed, search = needed_libraries(plugin)
    missing = [name for name in needed if not find_library(name, search)]
    driver = os.path.exists("/proc/driver/nvidia/version") or bool(find_library("libcuda.so.1", search))
    name = os.path.basename(plugin)
    if not missing:
        usable = "mindspore" in sys.modules and sys.modules["mindspore"].hal.is_available("GPU")
        yield (OK if usable else bad), (f"GPU: {name} finds all {len(needed)} libraries it links against" + (
            "" if driver else ", but no NVIDIA driver is loaded (/proc/driver/nvidia/version)") + (
            "; MindSpore can use the GPU" if usable else "; but MindSpore cannot use it (nvidia-smi: is the driver "
                                                         "recent enough for CUDA 11.6?): training runs on the CPU"))
        return
    where = "no NVIDIA driver on this machine" if not driver else "an NVIDIA driver is loaded"
    yield bad, (f"GPU: MindSpore's GPU backend ({name}) cannot load: {len(missing)} of the {len(needed)} libraries it "
                f"links against are missing ({where}); training runs on the CPU")
    for library in missing:
        found = other_versions(library, search)
        instead = f"; found {', '.join(found)} instead, another version" if found else ""
        yield bad, f"  {library} missing{instead}: install {hint(library)}"


def check_collectives(args):
    """NCCL, which msrun's data parallelism on GPUs loads through MindSpore's collective plugin."""
    plugin = gpu_plugin()
    collective = plugin and os.path.join(os.path.dirname(plugin), "gpu" + plugin.rsplit(".so.", 1)[1],
                                         "libnvidia_collective.so")
    if not collective or not os.path.exists(collective):
        yield WARNING, "NCCL: no GPU collective plugin in this MindSpore (data parallel on GPUs unavailable)"
        return
    needed, search = needed_libraries(collective)
    missing = [name for name in needed if not find_library(name, search)]
    if missing:
        yield WARNING, (f"NCCL: {', '.join(missing)} missing for data parallel on GPUs: install "
                        f"{hint(missing[0])}")
    else:
        yield OK, f"NCCL for data parallel on GPUs: {', '.join(needed)} found"


def gpu_plugin():
    """The GPU plugin MindSpore tries first (the newest CUDA version), or None."""
    try:
        spec = importlib.util.find_spec("mindspore")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    plugins = glob.glob(os.path.join(spec.submodule_search_locations[0], "lib", "plugin", "libmindspore_gpu.so.*"))
    return max(plugins, key=lambda path: [int(part) for part in path.rsplit(".so.", 1)[1].split(".")], default=None)


def needed_libraries(path):
    """The DT_NEEDED names of an ELF shared library, but the C and C++ runtime's, and the folders its RPATH or
    RUNPATH, LD_LIBRARY_PATH, the ldconfig cache and the system add to the search, in that order."""
    needed, runpath = read_dynamic_section(path)
    origin = os.path.dirname(path)
    search = [entry.replace("$ORIGIN", origin) for entry in runpath]
    search += [entry for entry in os.environ.get("LD_LIBRARY_PATH", "").split(":") if entry]
    search += ldconfig_dirs() + list(SYSTEM_LIBRARY_DIRS)
    system = ("libc.", "libm.", "libdl.", "libpthread.", "librt.", "libstdc++", "libgcc_s", "libgomp", "ld-linux",
              "libmindspore")  # (and MindSpore's own libraries, which its RUNPATH finds)
    return [name for name in needed if not name.startswith(system)], search


def read_dynamic_section(path):
    """(DT_NEEDED names, RPATH and RUNPATH folders) of a 64-bit little-endian ELF file, read from its headers."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
        section_offset, = struct.unpack_from("<Q", header, 0x28)
        entry_size, count = struct.unpack_from("<HH", header, 0x3A)
        f.seek(section_offset)
        sections = [struct.unpack_from("<IIQQQQIIQQ", f.read(entry_size)) for _ in range(count)]
        dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
        strings = sections[dynamic[6]]  # its sh_link: .dynstr
        f.seek(dynamic[4])
        entries = struct.iter_unpack("<qQ", f.read(dynamic[5]))
        f.seek(strings[4])
        table = f.read(strings[5])
    text = lambda offset: table[offset:table.index(b"\0", offset)].decode()  # noqa: E731
    needed, runpath = [], []
    for tag, value in entries:
        if tag == 1:  # DT_NEEDED
            needed.append(text(value))
        elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
            runpath += text(value).split(":")
    return needed, runpath


def ldconfig_dirs():
    try:
        output = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({os.path.dirname(line.rsplit("=> ", 1)[1]) for line in output.splitlines() if "=> " in line})


def find_library(name, search):
    return next((os.path.join(d, name) for d in search if os.path.exists(os.path.join(d, name))), None)


def other_versions(name, search):
    stem = name.split(".so", 1)[0] + ".so"
    found = {os.path.basename(p) for d in search for p in glob.glob(os.path.join(d, stem + "*"))}
    return sorted(found - {name, stem})


def hint(library):
    stem = library.split(".so", 1)[0]
    return HINTS.get(stem) or CUDA_HINT.format(stem[3:], stem[3:])


def check_msrun(args):
    if shutil.which("msrun"):
        yield OK, f"msrun: {shutil.which('msrun')}"
    else:
        yield WARNING, ("msrun is not on PATH (data-parallel training only; `python -m mindspore.parallel.cluster.run` "
                        "is the same launcher)")


def check_data(args):
    if "mindspore" not in sys.modules:
        yield WARNING, f"data folder {args.data_dir}: not checked (needs MindSpore)"
        return
    from qatcifar import cifar
    folder = args.data_dir or DEFAULT_DATA_DIR
    try:
        cifar.check_data_dir(folder, training=True)
    except cifar.DatasetError as e:
        if args.data_dir is None and not os.path.exists(DEFAULT_DATA_DIR):  # (not asked for: no problem yet)
            yield WARNING, (f"data: no CIFAR-10 in {DEFAULT_DATA_DIR} (python preprocess.py --download puts it there)"
                            f"{data_folders_beside(DEFAULT_DATA_DIR)}; train.py, eval.py and export.py read "
                            "another folder with -data")
            return
        yield PROBLEM, f"data: {e}"
        return
    kind = "synthetic data, not CIFAR-10" if cifar.is_synthetic(folder) else "CIFAR-10"
    try:
        cifar.check_data_dir(folder, training=False)
        test = "with the test split"
    except cifar.DatasetError as e:
        test = f"without a usable test split ({e}): train.py will not validate"
    yield OK, f"data folder {folder}: {kind}, {test}"


def data_folders_beside(folder):
    """", found: data/demo, data/hard" for the folders beside `folder` that hold CIFAR-format training files."""
    parent = os.path.dirname(folder)
    found = sorted(os.path.join(parent, name) for name in (os.listdir(parent) if os.path.isdir(parent) else [])
                   if os.path.isfile(os.path.join(parent, name, "data_batch_1.bin")))
    return f", found: {', '.join(found)}" if found else ""


def check_savedir(args):
    folder = os.path.abspath(args.savedir)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        yield PROBLEM, f"save directory {args.savedir}: {existing} is not a writable folder; give another -dir"
        return
    free_mb = shutil.disk_usage(existing).free / 1e6
    if free_mb < MIN_FREE_MB:
        yield PROBLEM, f"save directory {args.savedir}: {free_mb:.0f} MB free, too little for one checkpoint"
    elif free_mb < FREE_SPACE_MB:
        yield WARNING, f"save directory {args.savedir}: {free_mb:.0f} MB free; a run's checkpoints take about 1 GB"
    else:
        yield OK, f"save directory {args.savedir}: writable, {free_mb / 1000:.1f} GB free"
    if os.path.isdir(folder) and held(folder):
        yield PROBLEM, f"save directory {args.savedir} is in use by a running train.py; give another -dir"


def held(folder):
    """Whether a process holds train.py's lock (flock) on the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)  # (releases the lock if this process took it)


if __name__ == "__main__":
    interrupts.block()  # (before MindSpore is imported to be checked: see qatcifar/interrupts.py)
    sys.exit(main())
