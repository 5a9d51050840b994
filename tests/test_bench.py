"""bench.py end to end at a tiny size: every figure is reported, and consistently (the values are measurements)."""
import json
import math

import bench

KEYS = ("train_ips_float", "train_ips_qat", "qat_over_float", "eval_ips", "int8_ips", "pipeline_ips",
        "pipeline_over_train", "first_step_s", "first_step_s_float", "peak_rss_mb", "peak_rss_mb_qat")


def test_bench_reports_every_figure(capsys):
    results = bench.main(["--device", "CPU", "--batch", "4", "--steps", "2", "--repeats", "1", "--eval_images", "100",
                          "--int8_images", "4", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert all(results[key] > 0 and math.isfinite(results[key]) for key in KEYS)
    assert math.isclose(results["qat_over_float"], results["train_ips_float"] / results["train_ips_qat"])
    assert math.isclose(results["pipeline_over_train"], results["pipeline_ips"] / results["train_ips_float"])
    low, high = results["train_ips_qat_range"]
    assert low <= results["train_ips_qat"] <= high
    assert results["device"] == "CPU" and results["onednn_isa"] == "AVX2"
