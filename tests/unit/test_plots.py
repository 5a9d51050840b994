"""qatcifar.plots: metrics read back, train.py's curves.png and --summary_dir events (valid PNGs of the expected size; a
plotting failure never stops training). The pictures themselves were checked by looking at them. (plot.py and eval.py
--plot: commands/.)"""
import json
import os
import time

import mindspore.nn as nn
import pytest

from conftest import SMALL, FakeRunContext, assert_png, expect_error, metric_records, train_in_subprocess, write_metrics
from qatcifar import callbacks, files, plots


def test_read_metrics_keeps_the_latest_run_with_its_resumed_part(tmp_path):
    earlier = [json.dumps(r) for r in metric_records(3)]  # a run of 3 epochs, then a new run into the same folder
    latest = ([json.dumps(r) for r in metric_records(2)] + ["not json", "[1, 2]"]
              + [json.dumps(r) for r in metric_records(2, first=3)])
    path = write_metrics(tmp_path / "run", earlier + latest)
    assert [r["epoch"] for r in plots.read_metrics(path)] == [1, 2, 3, 4]


def test_read_metrics_skips_what_it_cannot_draw(tmp_path):
    """Bytes that are not text, records with a string or missing figure: skipped, not a traceback."""
    good = metric_records(4)
    broken = [dict(good[0], loss="x"), {k: v for k, v in good[0].items() if k != "lr"},
              dict(good[1], val_accuracy=None), dict(good[0], epoch=True)]
    folder = tmp_path / "run"
    path = write_metrics(folder, [json.dumps(r) for r in good[:2] + broken])
    with open(path, "ab") as f:
        f.write(b"\x00\xff\xfe garbage\n" + "".join(json.dumps(r) + "\n" for r in good[2:]).encode())
    assert plots.read_metrics(path) == good


@pytest.mark.parametrize("robust", [False, True])
def test_curves_are_drawn_from_metrics_records(robust, tmp_path):
    path = tmp_path / "curves.png"
    plots.save_curves({"run": metric_records(6, robust)}, str(path))
    assert_png(path, 1500, 450)


def test_progress_redraws_the_curves_and_a_plotting_failure_is_one_warning(tmp_path, capsys, monkeypatch):
    optimizer = nn.Adam(nn.Dense(3, 2).trainable_params(), learning_rate=0.01)
    metrics = tmp_path / "run-metrics.jsonl"
    progress = callbacks.Progress(8, steps_per_epoch=1, epochs=3, first_step=0, every=50,
                                  record=files.RunFiles.of_metrics(str(metrics)), label="run",
                                  optimizer=optimizer, guard=callbacks.Guard(0, 1))
    progress.on_train_begin(None)

    def epoch(number):
        progress.on_train_epoch_begin(None)
        progress.on_train_step_begin(None)
        progress.on_train_step_end(FakeRunContext(number, number, loss=1.0 / number))
        progress.on_train_epoch_end(FakeRunContext(number, number))

    epoch(1)
    curves = tmp_path / "run-curves.png"
    assert_png(curves, 1500, 450)
    before = curves.read_bytes()
    monkeypatch.setattr(plots, "save_curves", lambda runs, path, title: 1 / 0)
    capsys.readouterr()
    epoch(2)
    epoch(3)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: could not draw {curves} (division by zero); training goes on, {metrics} has "
                        "the figures"]
    assert curves.read_bytes() == before  # the last good picture stays whole
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_train_py_leaves_the_runs_curves_beside_its_metrics(trained):
    assert_png(files.RunFiles(trained[1], "resnet8_qat").curves, 1500, 450)


@pytest.mark.slow
def test_summary_dir_holds_what_tensorboard_reads(synthetic_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    summary = tmp_path / "tb"
    train_in_subprocess(*SMALL, "-data", synthetic_dir, "-dir", str(tmp_path / "run"), "-e", "2", "-bsize", "16",
                        "--num_samples", "32", "--val_samples", "100", "--summary_dir", str(summary))
    events = EventAccumulator(str(summary)).Reload()  # TensorBoard's own reader, as its dashboard loads the folder
    metrics = [json.loads(line) for line in (tmp_path / "run" / "resnet8_qat-metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("train/step_loss")] == [1, 2, 3, 4]
    for key in ("loss", "lr", "images_per_s", "val_accuracy"):
        scalars = events.Scalars(f"epoch/{key}")
        assert [e.step for e in scalars] == [2, 4]
        assert [e.value for e in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


def test_a_summary_dir_that_is_a_file_is_refused_before_training(synthetic_dir, tmp_path, capsys):
    import train
    (tmp_path / "tb").write_text("x")
    (tmp_path / "kept").mkdir()  # a folder that was there stays, empty or not; the folders the run made go
    for savedir in (tmp_path / "runs" / "run", tmp_path / "kept"):
        expect_error(train.main, ["-data", synthetic_dir, "-dir", str(savedir), "-e", "1", "--num_samples", "32",
                                  "--summary_dir", str(tmp_path / "tb")], capsys, "--summary_dir", "is a file")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept", "tb"] and not any((tmp_path / "kept").iterdir())




@pytest.mark.parametrize("epochs_done, kept_latest", [(4, [1, 2, 3, 4]), (2, [1, 2]), (0, [])])
def test_trim_metrics_removes_cut_lines_and_the_records_of_epochs_to_train_again(epochs_done, kept_latest, tmp_path):
    """An earlier run's records (epochs 1-5, written before the checkpoint) stay whatever their epochs; of the latest
    run's (epochs 1-4) those after the checkpoint's epoch go; a line cut short goes wherever it is."""
    saved = time.time()  # the checkpoint's time
    earlier = [dict(r, time=time.strftime(plots.TIME_FORMAT, time.localtime(saved - 3600))) for r in metric_records(5)]
    latest = [dict(r, time=time.strftime(plots.TIME_FORMAT, time.localtime(saved))) for r in metric_records(4)]
    lines = [json.dumps(r) for r in earlier + latest]
    path = write_metrics(tmp_path, [*lines[:5], lines[5][:30], *lines[5:]])
    assert plots.trim_metrics(path, epochs_done, saved) == (1, 4 - len(kept_latest))
    with open(path) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3, 4, 5, *kept_latest]
    before = os.stat(path)
    assert plots.trim_metrics(path, epochs_done, saved) == (0, 0)  # nothing to remove: the file is not written again
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_ino == before.st_ino
    assert plots.trim_metrics(str(tmp_path / "none.jsonl"), epochs_done, saved) == (0, 0)


def test_the_robust_line_is_announced_only_where_it_is_drawn(tmp_path, monkeypatch):
    titles = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda figure, path: titles.append(figure.axes[2].get_title())
                        or real_save(figure, path))
    plots.save_curves({"run": metric_records(3)}, str(tmp_path / "a.png"), "resnet8_qat: resnet8, QAT W7A8 minmax")
    plots.save_curves({"run": metric_records(3, robust=True)}, str(tmp_path / "b.png"))
    assert titles == ["validation accuracy", "validation accuracy (dashed: robust)"]
