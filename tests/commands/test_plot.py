"""plot.py end to end: runs compared in one picture, what it cannot draw refused."""
import json
import os

import plot
from conftest import assert_png, expect_error, metric_records, write_metrics
from qatcifar import files


def test_plot_py_compares_runs(tmp_path, capsys):
    write_metrics(tmp_path / "standard", [json.dumps(r) for r in metric_records(4)])
    write_metrics(tmp_path / "adversarial", [json.dumps(r) for r in metric_records(4, robust=True)])
    output = tmp_path / "compare.png"
    assert plot.main([str(tmp_path / "standard"), str(tmp_path / "adversarial"), "-o", str(output)]) == str(output)
    assert_png(output, 1500, 475)  # (and a row of legend below: a run a line, two a row)
    assert plot.main([str(tmp_path / "standard")]) == str(tmp_path / "standard" / "curves.png")  # its own picture


def test_plot_py_draws_every_run_of_a_folder_named_by_what_it_trained(tmp_path, capsys, monkeypatch):
    """Three runs in one save folder: all on the figure, each labelled by its prefix and what its args.json says it
    trained (mixed precision too)."""
    folder = tmp_path / "checkpoints"
    write_metrics(folder, [json.dumps(r) for r in metric_records(3)], "resnet8_qat")
    write_metrics(folder, [json.dumps(r) for r in metric_records(2)], "resnet8_qat_1")
    (folder / "resnet8_qat_1-args.json").write_text(json.dumps(
        {"arch": "resnet8", "qat": True, "weight_bits": 4, "act_bits": 4, "quantizer": "lsq"}))
    (folder / "resnet8_qat-args.json").write_text(json.dumps(
        {"arch": "resnet8", "qat": True, "weight_bits": 7, "first_last_bits": 7, "act_bits": 8, "quantizer": "minmax",
         "bits_per_layer": {"conv1": 7, "layer1.0.conv1": 4, "layer2.0.conv1": 4, "layer2.0.conv2": 7, "fc": 7}}))
    write_metrics(folder, [json.dumps(r) for r in metric_records(2)], "resnet8_qat_2")
    drawn = {}
    monkeypatch.setattr(plot.plots, "save_curves", lambda runs, path: drawn.update(runs))
    plot.main([str(folder)])
    assert list(drawn) == ["resnet8_qat: resnet8, QAT W7A8 minmax, 2 layers at 4 bits",
                           "resnet8_qat_1: resnet8, QAT W4A4 lsq", "resnet8_qat_2"]  # (no args.json: its prefix)
    assert "wrote " + str(folder / "curves.png") + ": 3 runs" in capsys.readouterr().out


def test_plot_py_refuses_what_it_cannot_draw(tmp_path, capsys):
    write_metrics(tmp_path / "a", [json.dumps(r) for r in metric_records(2)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "resnet8-metrics.jsonl").write_bytes(b"garbage\n\xff\xfe\x00\n")  # not even text
    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "resnet8-metrics.jsonl")  # (a read would block)
    for argv, fragments in (([str(tmp_path / "a"), str(tmp_path / "a")], ["name it with -o"]),
                            ([str(tmp_path)], ["has no <prefix>-metrics.jsonl"]),
                            ([str(tmp_path / "empty")], ["has finished an epoch"]),
                            ([str(tmp_path / "fifo")], ["resnet8-metrics.jsonl (not a regular file)"]),
                            ([str(tmp_path / "a"), "-o", files.RunFiles(str(tmp_path / "a"), "resnet8_qat").metrics],
                             ["is a run's record, which this command reads; give another path"]),
                            ([str(tmp_path / "a"), "-o", str(tmp_path / "c.pdf")], ["must end in .png"]),
                            ([str(tmp_path / "a"), "-o", str(tmp_path / "taken.png")], ["exists", "--overwrite"])):
        expect_error(plot.main, argv, capsys, *fragments)
    assert (tmp_path / "taken.png").read_bytes() == b"x"
