"""The layout (docs/architecture.md): the commands at the root, the library in qatcifar/, arrows from commands to the
library only, and commands that do not need MindSpore do not load it."""
import ast
import glob
import os

import pytest
from PIL import Image

from conftest import ROOT, run_script

COMMANDS = {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))}
LIBRARY = {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "qatcifar", "*.py"))} - {"__init__"}
SEED_SHARED = {"preprocess", "resnetv2"}  # the seed's modules, which its train.py and eval.py import


def imported_modules(path):
    """The top-level names of the modules a file imports, anywhere in it (qatcifar.x counts as qatcifar.x)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module == "qatcifar":
                names.update(f"qatcifar.{alias.name}" for alias in node.names)
    return names


def test_the_root_holds_the_commands_and_the_package_the_library():
    assert COMMANDS == {"bench", "doctor", "eval", "export", "plot", "predict", "preprocess", "resnetv2", "train"}
    assert len(COMMANDS) <= 10 and len(LIBRARY) >= 8


def test_arrows_run_from_commands_to_the_library_only():
    for name in COMMANDS:
        others = imported_modules(os.path.join(ROOT, f"{name}.py")) & (COMMANDS - SEED_SHARED - {name})
        assert not others, f"{name}.py imports the commands {others}"
    for name in LIBRARY:
        commands = imported_modules(os.path.join(ROOT, "qatcifar", f"{name}.py")) & COMMANDS
        assert not commands, f"qatcifar/{name}.py imports the commands {commands}"


@pytest.fixture(scope="module")
def models(int8_file, tmp_path_factory):
    """An int8 file and its ONNX model: {"int8": path, "onnx": path}."""
    import onnx

    from qatcifar import int8, onnx_graph

    model = int8.load(int8_file)
    header = model["header"]
    network = {key: header[key] for key in ("arch", "params", "macs")}
    path = str(tmp_path_factory.mktemp("layout") / "model.onnx")
    onnx.save(onnx_graph.from_int8(header, model["arrays"], {"model": "int8 QDQ", "network": network,
                                                             "normalization": header["normalization"]}), path)
    return {"int8": int8_file, "onnx": path}


@pytest.mark.parametrize("case", ["plot -h", "doctor -h", "predict onnx", "predict int8"])
def test_commands_that_do_not_need_mindspore_do_not_load_it(case, models, tmp_path):
    image = str(tmp_path / "image.png")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    argv = {"plot -h": ["plot", "-h"], "doctor -h": ["doctor", "-h"],
            "predict onnx": ["predict", "-loc", models["onnx"], image],
            "predict int8": ["predict", "-loc", models["int8"], image]}[case]
    code = (f"import sys; sys.argv = {argv!r}; import {argv[0]}\n"
            f"try:\n    {argv[0]}.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('mindspore' in sys.modules)")
    result = run_script("-c", code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout


def exits(path):
    """The functions (or "module") of a file where it ends the process: sys.exit, SystemExit, os._exit."""
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.function = "module"

        def visit_FunctionDef(self, node):
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        def visit_Attribute(self, node):
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in (("sys", "exit"), ("os", "_exit")):
                found.append(self.function)
            self.generic_visit(node)

        def visit_Name(self, node):
            if node.id == "SystemExit":
                found.append(self.function)

    Visitor().visit(ast.parse(open(path).read()))
    return found


def test_the_process_ends_only_in_a_main_or_in_the_interrupt_helper():
    for name in COMMANDS:  # (the module level: `if __name__ == "__main__": sys.exit(main())`)
        assert set(exits(os.path.join(ROOT, f"{name}.py"))) <= {"main", "module"}, name
    for name in LIBRARY - {"interrupts"}:
        assert set(exits(os.path.join(ROOT, "qatcifar", f"{name}.py"))) <= {"main"}, name  # (latency's worker)


def calls(path, function):
    """The names of the functions `function` of a file calls as interrupts.<name>."""
    tree = ast.parse(open(path).read())
    bodies = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function]
    return {node.func.attr for body in bodies for node in ast.walk(body) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "interrupts"}


def blocks_signals_when_run(path):
    """Whether the file calls interrupts.block() in an `if __name__ == "__main__":` block."""
    tree = ast.parse(open(path).read())
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "interrupts.block()" in
               ast.unparse(node) for node in tree.body)


def test_every_command_takes_ctrl_c_and_sigterm_one_way():
    """One mechanism (qatcifar/interrupts.py): signals blocked before MindSpore starts threads, the work run inside
    interrupts.run, which says one line and exits 130 or 143."""
    paths = [os.path.join(ROOT, f"{name}.py") for name in COMMANDS - {"resnetv2"}]  # (resnetv2: the networks' names)
    paths += [os.path.join(ROOT, "qatcifar", f"{name}.py") for name in ("latency", "measure")]  # bench's workers
    for path in paths:
        assert blocks_signals_when_run(path), path
        assert "run" in calls(path, "main"), path
    for name in LIBRARY - {"interrupts"}:  # nothing else installs a handler or waits for a signal
        text = open(os.path.join(ROOT, "qatcifar", f"{name}.py")).read()
        assert "signal.signal(" not in text and "sigwait" not in text and "sigpending" not in text, name


def test_the_tests_follow_the_layout():
    """tests/unit/test_<module>.py for a library module, tests/commands/test_<command>[_<topic>].py for a command (and
    test_interruptions.py, which cuts several short, and test_readme.py, which runs README.md's commands); shared
    helpers only in conftest.py (no test imports another)."""
    unit = {os.path.basename(path)[5:-3] for path in glob.glob(os.path.join(ROOT, "tests", "unit", "test_*.py"))}
    assert unit <= LIBRARY, unit - LIBRARY
    for path in glob.glob(os.path.join(ROOT, "tests", "commands", "test_*.py")):
        name = os.path.basename(path)[5:-3]
        assert name.split("_")[0] in COMMANDS or name in {"interruptions", "progress_bars", "readme"}, name
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True):
        assert not {name for name in imported_modules(path) if name.startswith("test_")}, path
