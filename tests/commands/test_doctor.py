"""doctor.py: the truth about this machine (CPU only, no CUDA), and the GPU checks against fake library folders."""
import fcntl
import os

import pytest

import doctor
from conftest import expect_error, run_script

STATUSES = ("ok", "warning", "problem")


def report(capsys, *argv):
    status = doctor.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.split()[0] in STATUSES for line in lines), lines
    return status, lines


def line_about(lines, text):
    found = [line for line in lines if text in line]
    assert found, (text, lines)
    return found[0]


@pytest.mark.slow  # (doctor.py in a process of its own, MindSpore imported: seconds)
def test_this_machine_can_train_on_its_cpu(synthetic_dir, tmp_path):
    result = run_script("doctor.py", "-data", synthetic_dir, "-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for text in ("Python 3.11", "numpy 1.", "MindSpore 2.10", "CPU: ", "synthetic data, not CIFAR-10, with the test "
                 "split", "writable"):
        assert line_about(lines, text).startswith("ok"), text
    gpu = line_about(lines, "GPU: ")
    if gpu.startswith("warning"):  # no usable GPU here: each missing library named, with what installs it
        missing = [line for line in lines if " missing" in line and "install" in line]
        assert "training runs on the CPU" in gpu and missing
    assert not os.path.exists(tmp_path / "run")  # a check, not a run: nothing created


def test_doctor_and_latency_parse_flags_without_importing_mindspore():
    """cli.py loads MindSpore only when a function needs it: doctor.py checks MindSpore, and latency.py measures
    another runtime's memory alone."""
    result = run_script("-c", "import sys, doctor; from qatcifar import cli, latency; "
                              "print('mindspore' in sys.modules)")
    assert (result.returncode, result.stdout.strip()) == (0, "False"), result.stderr


def test_a_wrong_flag_is_one_error_line(capsys):
    expect_error(doctor.main, ["--bogus"], capsys, "unrecognized arguments: --bogus", "python doctor.py -h")
    expect_error(doctor.main, ["--device", "TPU"], capsys, "invalid choice: 'TPU'")


def needed():
    plugin = doctor.gpu_plugin()
    if plugin is None:
        pytest.skip("this MindSpore wheel has no GPU plugin to check")  # (the pip wheel has one)
    return doctor.needed_libraries(plugin)[0]


def fake_libraries(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")  # the loader's lookup is by name; doctor does not load them
    return folder


def test_gpu_libraries_are_looked_up_by_name_and_version(tmp_path, monkeypatch, capsys, synthetic_dir):
    names = needed()
    assert "libcudart.so.11.0" in names and "libcudnn.so.8" in names
    folder = fake_libraries(tmp_path / "cuda", [n for n in names if n != "libcudnn.so.8"] + ["libcudnn.so.9"])
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{folder}")
    status, lines = report(capsys, "-data", synthetic_dir, "-dir", str(tmp_path))
    assert status == 0
    gpu = line_about(lines, "GPU: ")
    assert gpu.startswith("warning") and f"1 of the {len(names)} libraries" in gpu
    cudnn = line_about(lines, "libcudnn.so.8 missing")
    assert "found libcudnn.so.9 instead" in cudnn and "cuDNN 8 for CUDA 11" in cudnn
    assert not [line for line in lines if "libcudart" in line]
    # Asked for the GPU, the same finding stops training.
    status, lines = report(capsys, "--device", "GPU", "-data", synthetic_dir, "-dir", str(tmp_path))
    assert status == 1 and line_about(lines, "libcudnn.so.8 missing").startswith("problem")


def test_every_gpu_library_found_but_not_loadable(tmp_path, monkeypatch, capsys, synthetic_dir):
    """Empty files of the right names: found, yet MindSpore (asked too) cannot use them."""
    folder = fake_libraries(tmp_path / "cuda", needed())
    monkeypatch.setenv("LD_LIBRARY_PATH", str(folder))
    status, lines = report(capsys, "-data", synthetic_dir, "-dir", str(tmp_path))
    gpu = line_about(lines, "GPU: ")
    assert status == 0 and "finds all" in gpu
    assert gpu.startswith("warning") and "MindSpore cannot use it" in gpu


def test_problems_stop_training(tmp_path, capsys, monkeypatch, synthetic_dir):
    status, lines = report(capsys, "-data", str(tmp_path / "none"), "-dir", str(tmp_path))
    assert status == 1 and line_about(lines, "does not exist").startswith("problem")
    assert "preprocess.py --download" in line_about(lines, "does not exist")

    held = tmp_path / "held"
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running train.py holds its save folder
    try:
        status, lines = report(capsys, "-data", synthetic_dir, "-dir", str(held))
    finally:
        os.close(fd)
    assert status == 1 and line_about(lines, "in use by a running train.py").startswith("problem")

    real = doctor.importlib.metadata.version
    monkeypatch.setattr(doctor.importlib.metadata, "version", lambda name: "2.0.1" if name == "numpy" else real(name))
    status, lines = report(capsys, "-data", synthetic_dir, "-dir", str(tmp_path))
    assert status == 1 and "numpy>=1.26,<2" in line_about(lines, "numpy 2.0.1")


def test_a_stray_data_file_is_a_problem(synthetic_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in os.listdir(synthetic_dir):
        os.symlink(os.path.join(synthetic_dir, name), data / name)
    (data / "data_batch_1 (copy).bin").write_bytes(b"x")
    status, lines = report(capsys, "-data", str(data), "-dir", str(tmp_path))
    assert status == 1 and "is not a CIFAR-10 file name" in line_about(lines, "data: ")


def test_no_cifar10_yet_is_a_warning_that_names_the_data_folders_found(synthetic_dir, tmp_path, monkeypatch, capsys):
    """After the quick start (data/demo, no download): not a problem, a warning naming data/demo and -data; a
    -data that is asked for and missing is a problem."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    os.symlink(synthetic_dir, os.path.join("data", "demo"))
    args = doctor.get_args_parser().parse_args([])
    [(status, line)] = list(doctor.check_data(args))
    assert status == "warning" and "no CIFAR-10 in data/cifar-10-batches-bin" in line
    assert "found: data/demo" in line and "-data" in line
    [(status, line)] = list(doctor.check_data(doctor.get_args_parser().parse_args(["-data", "data/gone"])))
    assert status == "problem" and "data folder data/gone does not exist" in line
