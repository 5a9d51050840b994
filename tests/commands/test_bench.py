"""bench.py: its figures derived consistently from the measurements, and end to end at a tiny size
(every figure reported; the values are this machine's measurements and not asserted)."""
import argparse
import json
import math

import pytest

import bench
from conftest import (
    ARCH,
    expect_error,
    run_script,
)
from qatcifar import networks, ort_kernels

KEYS = ("train_ips_float", "train_ips_qat", "qat_over_float", "eval_ips", "int8_ips", "pipeline_ips",
        "pipeline_over_train", "first_step_s", "first_step_s_float", "peak_rss_mb", "peak_rss_mb_qat")


def test_summary_derives_speeds_and_ratios_from_step_times(capsys):
    args = argparse.Namespace(batch=10, steps=2, repeats=2)
    runs = {"float": [{"device": "CPU", "first_step_s": 3.0, "step_s": [1.0, 1.0], "peak_rss_mb": 1000},
                      {"device": "CPU", "first_step_s": 5.0, "step_s": [2.0, 2.0], "peak_rss_mb": 1100}],
            "qat": [{"device": "CPU", "first_step_s": 8.0, "step_s": [1.25, 1.25], "peak_rss_mb": 1500},
                    {"device": "CPU", "first_step_s": 9.0, "step_s": [2.5, 2.5], "peak_rss_mb": 1400}]}
    results = bench.summarize(args, runs, {"eval_ips": 100.0, "int8_ips": 10.0},
                              {"pipeline_ips": 6000.0, "pipeline_workers": 2})
    assert results["train_ips_float"] == pytest.approx(10 / 1.5)  # the median of all four step times
    assert results["train_ips_float_range"] == pytest.approx([5.0, 10.0])
    assert results["qat_over_float_per_repeat"] == pytest.approx([1.25, 1.25])
    assert results["qat_over_float"] == pytest.approx(results["train_ips_float"] / results["train_ips_qat"])
    assert results["pipeline_over_train"] == pytest.approx(6000 / (10 / 1.5))
    assert (results["first_step_s"], results["first_step_s_float"]) == (8.5, 4.0)
    assert (results["peak_rss_mb"], results["peak_rss_mb_qat"]) == (1100, 1500)
    bench.report(results)
    assert "QAT step / float step 1.250 (per repeat 1.250, 1.250)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_reports_every_figure(capsys):
    """bench.py's default measurements, on resnet8 (main() takes ResNet-18 for them; the code is the same)."""
    args = bench.parse_args(["--device", "CPU", "--batch", "4", "--steps", "2", "--repeats", "1",
                                               "--eval_images", "100", "--int8_images", "4", "--json"])
    args.arch = [ARCH]
    results = bench.benchmark(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert all(results[key] > 0 and math.isfinite(results[key]) for key in KEYS)
    assert math.isclose(results["qat_over_float"], results["train_ips_float"] / results["train_ips_qat"])
    assert math.isclose(results["pipeline_over_train"], results["pipeline_ips"] / results["train_ips_float"])
    low, high = results["train_ips_qat_range"]
    assert low <= results["train_ips_qat"] <= high
    assert results["device"] == "CPU" and results["onednn_isa"] == "AVX2"


def test_bench_flags_are_bounded_by_its_data(capsys):
    """Its synthetic data has 10,000 images a split: a larger batch or image count is refused, not attempted."""
    expect_error(bench.main, ["--batch", "10001"], capsys, "argument --batch: must be an integer from 1 to 10000")
    expect_error(bench.main, ["--int8_images", "0"], capsys, "argument --int8_images: must be an integer from 1")
    expect_error(bench.main, ["--arch", "resnet8,resnet9"], capsys, "--arch: 'resnet8,resnet9': give networks among "
                 "resnet8, resnet20, resnet18, separated by commas, each once")
    expect_error(bench.main, ["--arch", "resnet8,resnet8"], capsys, "each once")
    expect_error(bench.main, ["--arch", "resnet8,resnet20", "--deploy"], capsys, "--deploy measure one network; "
                 "give one --arch, or drop --deploy for the table of several")
    expect_error(bench.main, ["--arch", "resnet8,resnet20", "--lsq"], capsys, "--lsq measure one network")


@pytest.mark.parametrize("flags, fragment", [
    (["--lsq", "--deploy"], "--deploy and --lsq are separate measurements; run them one at a time"),
    (["--adversarial", "--lsq"], "--adversarial and --lsq are separate measurements"),
    (["--deploy", "--validation"], "--deploy and --validation are separate measurements"),
    (["--seconds", "1"], "--seconds applies to --deploy, --arch and --mcu only; drop it, or add --deploy"),
    (["--lsq", "--seconds", "1"], "--seconds applies to --deploy"),
    (["--adv_steps", "3"], "--adv_steps applies to --adversarial only"),
    (["--deploy", "--attack_images", "5"], "--attack_images applies to --adversarial only"),
    (["--epochs", "2"], "--epochs applies to --validation only"),
    (["--adversarial", "--val_samples", "9"], "--val_samples applies to --validation only"),
])
def test_bench_refuses_flags_its_measurement_does_not_use(flags, fragment, capsys):
    expect_error(bench.main, flags, capsys, fragment)


def test_bench_help_points_nowhere_it_does_not_show(capsys):
    with pytest.raises(SystemExit):
        bench.main(["-h"])
    assert "see above" not in capsys.readouterr().out


@pytest.mark.slow
def test_bench_reports_the_cost_of_adversarial_training_and_attacks(capsys):
    results = bench.main(["--adversarial", "--device", "CPU", "--batch", "4", "--steps", "2", "--repeats", "1",
                          "--adv_steps", "2", "--attack_images", "4", "--json", "--arch", ARCH])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    steps = results["step_s"]
    assert set(steps) == {"qat", "fgsm", "pgd"} and all(s > 0 for s in steps.values())
    assert results["fgsm_over_clean"] == steps["fgsm"] / steps["qat"]
    assert results["pgd_over_clean"] == steps["pgd"] / steps["qat"]
    assert all(results[f"{name}_s_per_image"] > 0 for name in ("clean", "fgsm", "pgd", "apgd_ce", "square_100"))


def test_bench_reports_the_cost_of_learned_step_sizes(monkeypatch, capsys):
    """--lsq: min/max and LSQ runs alternate, and the ratio is of their median step times (the measurements stand
    in: bench.py's end-to-end tests run the same workers; measure.py's `lsq` kind is tested in unit/test_measure.py)."""
    times = iter([[0.10, 0.12], [0.13, 0.15], [0.20, 0.10], [0.30, 0.24]])  # qat, lsq, qat, lsq
    kinds = []

    def worker(kind, args):
        kinds.append(kind)
        return {"device": "CPU", "first_step_s": 1.0, "step_s": next(times), "peak_rss_mb": 100.0}

    monkeypatch.setattr(bench, "worker", worker)
    monkeypatch.setattr(bench.cifar, "write_synthetic", lambda folder, seed: None)  # (no worker reads it)
    results = bench.main(["--lsq", "--batch", "4", "--steps", "2", "--repeats", "2", "--json", "--arch", ARCH])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == results and kinds == ["qat", "lsq", "qat", "lsq"]
    assert results["step_s"] == pytest.approx({"qat": 0.11, "lsq": 0.195}) and results["arch"] == ARCH
    assert results["lsq_over_minmax"] == pytest.approx(0.195 / 0.11)
    assert results["lsq_over_minmax_per_repeat"] == pytest.approx([0.14 / 0.11, 0.27 / 0.15])
    assert "min/max 110.0 ms, LSQ 195.0 ms (1.77x; per repeat 1.27, 1.80)" in out


@pytest.mark.slow
def test_bench_tabulates_networks_to_choose_from(capsys):
    """One network (resnet8) of the table: each takes the same measurements, in a loop over --arch's names."""
    results = bench.main(["--arch", ARCH, "--batch", "4", "--steps", "2", "--repeats", "1", "--seconds", "0.1",
                          "--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == results
    assert list(results["networks"]) == [ARCH]
    for name, network in results["networks"].items():
        profile = networks.profile(networks.resnet(name))
        assert (network["params"], network["macs"]) == (profile["params"], profile["macs"])
        assert network["train_ips_float"] > 0 and network["train_ips_qat"] > 0 and network["int8_file_kb"] > 0
        for model in (network["onnx_int8"], network["onnx_float32"]):
            assert 0 < model["b1_p50_ms"] and model["b100_ips"] > 0 and model["file_mb"] > 0
        assert network["onnx_int8"]["file_mb"] < network["onnx_float32"]["file_mb"]
        assert 0 < network["tflite_kb"] <= 100 and 20_000 < network["tflm_arena_bytes"] < 200_000
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("resnet")]
    assert rows == [ARCH]  # one row a network


@pytest.mark.slow
def test_bench_deploy_reports_every_model():
    result = run_script("bench.py", "--deploy", "--json", "--seconds", "0.2", "--arch", ARCH)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    deploy = figures["deploy"]
    assert list(deploy) == ["mindspore_float32", "mindspore_qat", "int8_reference", "onnx_float32", "onnx_int8",
                            "onnx_int8_8bit", "tflite_int8"]
    for model in deploy.values():
        assert set(model) == {"b1_p50_ms", "b1_p95_ms", "b1_p50_ms_1thread", "b1_p95_ms_1thread", "b100_ips",
                              "file_mb", "peak_rss_mb"}
        assert 0 < model["b1_p50_ms"] <= model["b1_p95_ms"] and model["b100_ips"] > 0 and model["peak_rss_mb"] > 0
    assert figures["int8_over_float_onnx_b100"] == deploy["onnx_int8"]["b100_ips"] / deploy["onnx_float32"]["b100_ips"]
    assert figures["int8_onnx_over_mindspore_b1"] == \
        deploy["mindspore_float32"]["b1_p50_ms"] / deploy["onnx_int8"]["b1_p50_ms"]
    assert deploy["onnx_int8"]["file_mb"] <= 0.16  # resnet8's (ResNet-18's: commands/test_train.py)
    assert figures["int8_8bit_over_7bit_b1"] == deploy["onnx_int8_8bit"]["b1_p50_ms"] / deploy["onnx_int8"]["b1_p50_ms"]
    assert set(figures["int8_isa"]) <= {"avx512_vnni", "avx_vnni", "amx_int8"} and figures["cpu_count"] >= 1
    assert figures["int8_kernels"] == ort_kernels.describe()  # which kernels, and whether the probe finds them exact
    assert "ONNX Runtime's uint8 x int8 kernels here: " in result.stdout
    assert sum(line.startswith(tuple(deploy)) for line in result.stdout.splitlines()) == 7  # the table's rows
    assert deploy["tflite_int8"]["file_mb"] <= 0.1  # MLPerf Tiny's reference .tflite: 99 KB
    assert figures["tflite_over_onnx_int8_b1"] == deploy["tflite_int8"]["b1_p50_ms"] / deploy["onnx_int8"]["b1_p50_ms"]
    assert 20_000 < figures["tflm_arena_bytes"] < 200_000  # resnet8's activations: 32 KB the largest pair
    faster = "ONNX Runtime" if figures["tflite_over_onnx_int8_b1"] > 1 else "LiteRT"
    assert f"{faster} is faster" in result.stdout


def test_bench_says_first_that_it_measures_networks_of_its_own(capsys, monkeypatch):
    monkeypatch.setattr(bench, "benchmark", lambda args: {})
    bench.main([])
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "note: bench.py measures networks it builds and trains for a few steps on synthetic data")


def test_bench_mcu_without_the_cross_tools_is_one_error_line_naming_the_packages(monkeypatch, capsys):
    from qatcifar import mcu

    monkeypatch.setattr(mcu, "TOOLS", {**mcu.TOOLS, "no-such-arm-gcc": "a-package"})
    expect_error(bench.main, ["--mcu"], capsys, "bench.py --mcu needs no-such-arm-gcc not installed",
                 "apt-get install a-package")


def test_bench_mcu_tabulates_each_network_and_says_what_does_not_fit(capsys):
    build = {"instructions": 31e6, "stack_bytes": 260, "exact": True, "images": 3}
    board = {"flash_bytes": 87_600, "ram_bytes": 32_768, "fits": True, "smlad": build, "plain": dict(build),
             "host_c_b1_ms": 5.0, "host_onnx_b1_ms": 0.2}
    figures = {"networks": {"resnet8 7-bit": board, "resnet18 7-bit": {
        **board, "flash_bytes": 11_300_000, "ram_bytes": 300_000, "fits": False}}, "cpu": "a CPU",
        "toolchain": {"arm-none-eabi-gcc": "gcc 12", "qemu-system-arm": "QEMU 7.2"}, "mcu_images": 3,
        "board": "QEMU mps2-an386 (Cortex-M4)", "cflags": "-O2"}
    bench.report_mcu(figures)
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("resnet8 7-bit")).split()
    assert row[2:9] == ["87.6", "32.8", "260", "31.0", "31.0", "yes", "5.00"]
    assert "does not fit the board" in next(line for line in lines if line.startswith("resnet18"))
