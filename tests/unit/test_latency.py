"""qatcifar.latency: one model file's speed and memory, measured in a process of its own."""
import json

from conftest import (
    run_script,
)


def test_latency_measures_a_model_in_a_process_of_its_own(float_onnx):
    result = run_script("-m", "qatcifar.latency", float_onnx[1], "--seconds", "0.1", "--batch", "4", "--threads", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures) == {"b1_p50_ms", "b1_p95_ms", "b1_runs", "b4_ips", "peak_rss_mb"}
    assert 0 < figures["b1_p50_ms"] <= figures["b1_p95_ms"] and figures["b1_runs"] >= 20
    assert figures["peak_rss_mb"] < 1000  # ONNX Runtime alone, no MindSpore
    bad = run_script("-m", "qatcifar.latency", float_onnx[1] + ".txt")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
