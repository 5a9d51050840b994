"""plot.py end to end: runs compared in one picture, what it cannot draw refused."""
import json

import plot
from conftest import assert_png, expect_error, metric_records, write_metrics


def test_plot_py_compares_runs(tmp_path, capsys):
    write_metrics(tmp_path / "standard", [json.dumps(r) for r in metric_records(4)])
    write_metrics(tmp_path / "adversarial", [json.dumps(r) for r in metric_records(4, robust=True)])
    output = tmp_path / "compare.png"
    assert plot.main([str(tmp_path / "standard"), str(tmp_path / "adversarial"), "-o", str(output)]) == str(output)
    assert_png(output, 1500, 450)
    assert plot.main([str(tmp_path / "standard")]) == str(tmp_path / "standard" / "curves.png")  # its own picture


def test_plot_py_refuses_what_it_cannot_draw(tmp_path, capsys):
    write_metrics(tmp_path / "a", [json.dumps(r) for r in metric_records(2)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_bytes(b"garbage\n\xff\xfe\x00\n")  # not even text
    (tmp_path / "taken.png").write_bytes(b"x")
    for argv, fragments in (([str(tmp_path / "a"), str(tmp_path / "a")], ["name it with -o"]),
                            ([str(tmp_path)], ["has no metrics.jsonl"]),
                            ([str(tmp_path / "empty")], ["holds no epoch record"]),
                            ([str(tmp_path / "a"), "-o", str(tmp_path / "c.pdf")], ["must end in .png"]),
                            ([str(tmp_path / "a"), "-o", str(tmp_path / "taken.png")], ["exists", "--overwrite"])):
        expect_error(plot.main, argv, capsys, *fragments)
    assert (tmp_path / "taken.png").read_bytes() == b"x"
