"""Run README.md's commands as a new user would: in a fresh copy of the project, in order, as written.

    python tests/readme.py                          # the Quick start, then Fewer bits (about 12 minutes on 2 cores)
    python tests/readme.py --section "Quick start"  # one section (tests/commands/test_readme.py runs this one)

The sections run are those whose commands work on this machine as written: the Quick start (on the demo data) and
Fewer bits (on the harder synthetic set). The Workflow on CIFAR-10 needs the real data set (no internet here) and
hours of training, and is left out. Within a section, `pip install` (the environment is this one) and `python -m
pytest` (this suite) lines are left out; every other line runs with bash in the copy, which holds the files git
tracks, as a fresh clone does. The first command that fails ends the run with its status, its output shown.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("Quick start", "Fewer bits")
SKIPPED = ("pip install", "python -m pytest")


def commands(readme, section):
    """The lines of the ```bash blocks under the `## section` heading of README.md's text, less SKIPPED ones."""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if not match:
        raise SystemExit(f"error: README.md has no section {section!r}")
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith(SKIPPED)]


def fresh_copy(folder):
    """The files git tracks, copied into `folder` (what a clone holds, with this work tree's changes)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))


def run(sections, keep=None):
    """Run the sections' commands in a fresh copy; return the exit status (0: all ran)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        folder = keep or tmp
        fresh_copy(folder)
        for section in sections:
            for command in commands(readme, section):
                start = time.time()
                result = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True)
                print(f"[{time.time() - start:6.1f} s] {command}", flush=True)
                if result.returncode:
                    print(result.stdout[-3000:] + result.stderr[-3000:], flush=True)
                    print(f"error: exit status {result.returncode}: {command}", file=sys.stderr)
                    return result.returncode
    print(f"all commands of {', '.join(sections)} ran")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", action="append", choices=SECTIONS, help="a section to run (default: all)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (a new folder) and keep it, to look at the files")
    args = parser.parse_args(argv)
    if args.keep and os.path.exists(args.keep):
        parser.error(f"--keep {args.keep} exists; give a new folder")
    return run(args.section or SECTIONS, args.keep)


if __name__ == "__main__":
    sys.exit(main())
