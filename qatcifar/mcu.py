"""An exported C folder on an emulated Cortex-M4: cross-compiled with Debian's arm-none-eabi-gcc and newlib, run in
qemu-system-arm's mps2-an386 board with semihosting (bench.py --mcu, and the tests).

    >>> elf = mcu.build("resnet8_c", workdir)                    # the folder's model.c and kernels + mcu_main.c
    >>> result = mcu.run(elf, levels, workdir)                   # levels: quantized images, (N, H, W, C) uint8
    >>> result["logits"], result["instructions"], result["stack_bytes"]

The harness (qatcifar/c/mcu_main.c) reads the images from a file, writes each image's int32 logits to another and
reports SysTick's ticks per image. QEMU does not model cycles: with -icount shift=0 it runs one instruction a
nanosecond, and SysTick counts the board's 25 MHz clock, so a tick is 40 instructions (the harness checks it on a
loop of known length). The figures are instructions, not time on a real device.
"""
import os
import shutil
import subprocess

import numpy as np

from qatcifar import c_export

BOARD = "mps2-an386"  # QEMU's Cortex-M4 board: 4 MB of code RAM at 0, 4 MB of data RAM at 0x20000000
BOARD_CODE_BYTES = 4 << 20
CLOCK_HZ = 25_000_000  # the board's clock, SysTick's source
INSTRUCTIONS_PER_TICK = 1_000_000_000 // CLOCK_HZ  # (-icount shift=0: an instruction a nanosecond)
CALIBRATION_TURNS = 1_000_000  # the harness's check: a loop of two instructions a turn
CFLAGS = ("-mcpu=cortex-m4", "-mthumb", "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic")
PLAIN = "-DQAT_PLAIN_C"  # the kernels without the M4's SMLAD (plain C only)
LINK = ("--specs=rdimon.specs", "-Wl,--section-start=.vectors=0x0")  # semihosting newlib; the vector table at 0
TOOLS = {"arm-none-eabi-gcc": "gcc-arm-none-eabi and libnewlib-arm-none-eabi",
         "arm-none-eabi-size": "binutils-arm-none-eabi", "qemu-system-arm": "qemu-system-arm"}
HARNESS = os.path.join(c_export.KERNELS, "mcu_main.c")
SECONDS_PER_IMAGE = 5  # QEMU runs ResNet-8's 25 to 40 M instructions in well under a second


class Unavailable(RuntimeError):
    """A tool is missing; the message names the Debian package."""


class Failed(RuntimeError):
    """Compiling or running failed; the message is the tool's first error line."""


def missing():
    """The tools that are not installed, each with its Debian package: {tool: package}."""
    return {tool: package for tool, package in TOOLS.items() if shutil.which(tool) is None}


def require():
    absent = missing()
    if absent:
        packages = " ".join(sorted(set(absent.values())))
        raise Unavailable(f"{', '.join(absent)} not installed: apt-get install {packages}")


def _run(command, what, timeout=600, cwd=None):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise Failed(f"{what} failed: {lines[0] if lines else result.returncode}")
    return result.stdout


def build(folder, workdir, plain=False, warnings_fatal=True):
    """The ELF of the folder's model with the harness, for the board (plain: the kernels in plain C); its path."""
    require()
    elf = os.path.join(workdir, "plain.elf" if plain else "smlad.elf")
    sources = [HARNESS] + [os.path.join(folder, name) for name in ("model.c", "qat_kernels.c")]
    flags = [*CFLAGS, *(["-Werror"] if warnings_fatal else []), *([PLAIN] if plain else [])]
    _run(["arm-none-eabi-gcc", *flags, f"-I{folder}", *LINK, "-o", elf, *sources], "arm-none-eabi-gcc")
    return elf


def sizes(folder, workdir):
    """What the model takes on the device, from the objects of model.c and qat_kernels.c (arm-none-eabi-size):
    {"flash_bytes": code and constants, "ram_bytes": the arena (static data), per object too}."""
    require()
    figures = {}
    for name in ("model.c", "qat_kernels.c"):
        obj = os.path.join(workdir, name.replace(".c", ".o"))
        _run(["arm-none-eabi-gcc", *CFLAGS, "-c", "-o", obj, os.path.join(folder, name)], "arm-none-eabi-gcc")
        text, data, bss = (int(v) for v in _run(["arm-none-eabi-size", obj], "arm-none-eabi-size")
                           .splitlines()[1].split()[:3])
        figures[name] = {"flash": text + data, "ram": data + bss}
    return {"flash_bytes": sum(f["flash"] for f in figures.values()),
            "ram_bytes": sum(f["ram"] for f in figures.values()), "objects": figures}


def run(elf, levels, workdir):
    """Run the harness on quantized images (N, H, W, C) uint8: {"logits": (N, classes) int32, "instructions": per
    image (mean), "instructions_max", "stack_bytes": the most stack model_run used (at most 64 bytes over)}."""
    require()
    levels = np.ascontiguousarray(levels, dtype=np.uint8)
    with open(os.path.join(workdir, "images.bin"), "wb") as f:
        f.write(levels.tobytes())
    logits_path = os.path.join(workdir, "logits.bin")
    if os.path.exists(logits_path):
        os.remove(logits_path)
    output = _run(["qemu-system-arm", "-M", BOARD, "-nographic", "-monitor", "none", "-semihosting-config",
                   "enable=on,target=native", "-icount", "shift=0", "-kernel", elf], "qemu-system-arm",
                  timeout=30 + SECONDS_PER_IMAGE * len(levels), cwd=workdir)
    line = next((line for line in output.splitlines() if line.startswith("images ")), None)
    if line is None:
        raise Failed(f"the harness said no figures: {output.strip()[:200]!r}")
    words = line.split()
    figures = {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    if figures["calibration"] * INSTRUCTIONS_PER_TICK != 2 * CALIBRATION_TURNS:
        raise Failed(f"SysTick counted {figures['calibration']} ticks for {2 * CALIBRATION_TURNS:,} instructions, not "
                     f"one per {INSTRUCTIONS_PER_TICK}: QEMU does not run -icount shift=0 as expected")
    logits = np.fromfile(logits_path, np.int32).reshape(figures["images"], -1)
    return {"logits": logits, "instructions": figures["ticks"] * INSTRUCTIONS_PER_TICK / max(figures["images"], 1),
            "instructions_max": figures["most"] * INSTRUCTIONS_PER_TICK, "stack_bytes": figures["stack"]}


def toolchain():
    """The versions of the cross-compiler and of QEMU (their first lines)."""
    require()
    return {tool: _run([tool, "--version"], tool).splitlines()[0] for tool in ("arm-none-eabi-gcc", "qemu-system-arm")}


def measure(folder, levels, expected, workdir):
    """A C folder's figures on the board: flash and static RAM (`sizes`), and per kernel build ("smlad", "plain")
    its instructions per image on `levels`, its stack, and whether its logits equal `expected` (N, classes)."""
    figures = sizes(folder, workdir)
    if figures["flash_bytes"] > BOARD_CODE_BYTES:
        return {**figures, "fits": False}
    for name, plain in (("smlad", False), ("plain", True)):
        result = run(build(folder, workdir, plain=plain), levels, workdir)
        figures[name] = {"instructions": result["instructions"], "stack_bytes": result["stack_bytes"],
                         "exact": bool(np.array_equal(result["logits"], expected)), "images": len(levels)}
    return {**figures, "fits": True}
