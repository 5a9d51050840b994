"""The training callbacks one by one, without training: the Guard's decisions, saving, progress records.
(Whole runs stopped by signals and crashes are in commands/test_train_crash.py.)"""
import errno
import json
import os
import signal

import mindspore as ms
import mindspore.nn as nn
import pytest

from conftest import FakeRunContext, start_script
from qatcifar import callbacks, checkpoint, files


def started_guard(context, first_step=0, steps_per_epoch=2):
    guard = callbacks.Guard(first_step, steps_per_epoch)
    guard.on_train_begin(context)
    return guard


def test_guard_stops_at_a_loss_that_is_not_finite_and_exits_with_3():
    context = FakeRunContext(step=3, loss=float("nan"))
    guard = started_guard(context, first_step=10, steps_per_epoch=4)
    try:
        guard.on_train_step_end(FakeRunContext(step=2))
        assert not guard.stopping and not context.stop_requested
        guard.on_train_step_end(context)
    finally:
        guard.on_train_end(context)
    assert context.stop_requested and guard.diverged == (13, "the loss is nan")
    stop = guard.outcome("checkpoints/resnet18_qat-3_2.ckpt")
    assert stop.status == 3 and stop.error
    assert stop.message.startswith("training diverged at step 13 (epoch 4): the loss is nan")
    assert "the last checkpoint saved is checkpoints/resnet18_qat-3_2.ckpt; lower -lr" in stop.message
    # Diverged before this run saved anything after resuming: the checkpoint it resumed from is suspect, not good.
    resumed = "checkpoints/resnet18_qat-2_4.ckpt"
    stop = guard.outcome(resumed, resumed)
    assert stop.status == 3 and "3 step(s) after resuming from checkpoints/resnet18_qat-2_4.ckpt" in stop.message
    assert "this run saved nothing; that checkpoint may itself hold the cause" in stop.message
    assert "good" not in stop.message


def test_a_run_that_ends_has_no_outcome():
    assert callbacks.Guard(0, 2).outcome("x.ckpt") is None


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    net = nn.Dense(3, 2)
    context = FakeRunContext(step=2)
    guard = started_guard(context)
    saver = callbacks.Checkpointer(net, str(tmp_path), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                                   keep=5, first_step=0, guard=guard)
    net.weight.set_data(ms.Tensor([[1.0, float("inf"), 0.0], [0.0, 0.0, 0.0]], ms.float32))
    try:
        saver.on_train_step_end(context)
    finally:
        guard.on_train_end(context)
    assert guard.diverged == (2, "the updated weights are not finite") and context.stop_requested
    assert os.listdir(tmp_path) == []


def test_checkpoints_are_named_by_epoch_and_step_and_the_newest_kept(tmp_path):
    guard = callbacks.Guard(0, steps_per_epoch=3)
    saver = callbacks.Checkpointer(nn.Dense(3, 2), str(tmp_path), "resnet18", steps_per_epoch=3, save_steps=2,
                                   keep=2, first_step=0, guard=guard)
    for step in range(1, 7):
        saver.on_train_step_end(FakeRunContext(step=step))
    # steps 2 (epoch 1), 3 (its end), 4 (epoch 2, step 1) and 6: the newest two stay
    assert sorted(os.listdir(tmp_path)) == ["resnet18-2_1.ckpt", "resnet18-2_3.ckpt"]
    assert saver.latest == str(tmp_path / "resnet18-2_3.ckpt")
    records = checkpoint.read(saver.latest)
    assert [int(records[name].asnumpy()) for name in ("epoch_num", "step_num", "steps_per_epoch")] == [2, 6, 3]
    assert oct(os.stat(saver.latest).st_mode & 0o777) == "0o400"  # as MindSpore writes checkpoints


def test_failed_save_keeps_the_previous_checkpoint_and_exits_with_1(tmp_path, monkeypatch, capsys):
    guard = callbacks.Guard(0, steps_per_epoch=2)
    saver = callbacks.Checkpointer(nn.Dense(3, 2), str(tmp_path), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                                   keep=5, first_step=0, guard=guard)
    saver.save(2)
    good = tmp_path / "resnet18_qat-1_2.ckpt"
    before = good.read_bytes()

    def disk_full(net, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ms, "save_checkpoint", disk_full)
    saver.save(4)
    assert guard.save_failure == (str(tmp_path / "resnet18_qat-2_2.ckpt"), "No space left on device")
    assert guard.stopping
    assert sorted(os.listdir(tmp_path)) == ["resnet18_qat-1_2.ckpt"] and good.read_bytes() == before
    assert guard.outcome(saver.latest).report() == 1  # train.py's main exits with it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and f"{good}, is intact" in err


def test_a_signal_stops_training_after_the_next_step_with_an_interrupt_checkpoint(tmp_path, capsys):
    """SIGTERM can arrive while any callback runs, even after the Checkpointer's turn: training goes on to
    the end of the next step, where the Guard (first) stops it and the Checkpointer (next) saves it."""
    context = FakeRunContext(step=3)
    guard = started_guard(context)
    saver = callbacks.Checkpointer(nn.Dense(3, 2), str(tmp_path), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                                   keep=5, first_step=0, guard=guard)
    try:
        guard.on_signal(signal.SIGTERM)
        saver.on_train_step_end(FakeRunContext(step=2))  # the signal came after the Guard's turn in step 2
        assert not context.stop_requested and os.listdir(tmp_path) == ["resnet18_qat-1_2.ckpt"]
        guard.on_train_step_end(context)  # step 3
        saver.on_train_step_end(context)
    finally:
        guard.on_train_end(context)
    assert context.stop_requested
    assert sorted(os.listdir(tmp_path)) == ["resnet18_qat-1_2.ckpt", "resnet18_qat-2_1-interrupt.ckpt"]
    stop = guard.outcome(saver.latest)
    assert stop.status == 143 and not stop.error
    assert stop.message == (f"interrupted by SIGTERM; checkpoint: {tmp_path / 'resnet18_qat-2_1-interrupt.ckpt'}\n"
                            "to continue, run the same command with --resume auto")
    assert "SIGTERM: stopping after this step and saving a checkpoint" in capsys.readouterr().out


def test_an_interrupted_worker_that_does_not_save_names_worker_0s_checkpoint(tmp_path, capsys):
    """In a data-parallel run only worker 0 saves: the others point to its checkpoint, not to 'None'."""
    guard = callbacks.Guard(0, steps_per_epoch=2)
    guard.on_signal(signal.SIGINT)
    assert guard.outcome(callbacks.WORKER_0).report() == 128 + signal.SIGINT  # train.py's main exits with it
    out = capsys.readouterr().out
    assert "interrupted by SIGINT; checkpoint: worker 0's latest" in out and "None" not in out


def test_progress_logs_each_finished_epoch_with_its_validation(tmp_path, capsys):
    class Validated:
        results = {2: {"val_accuracy": 0.5, "val_s": 1.0}}

    optimizer = nn.Adam(nn.Dense(3, 2).trainable_params(), learning_rate=[0.1, 0.2, 0.3, 0.4])
    guard = callbacks.Guard(0, steps_per_epoch=2)
    metrics = tmp_path / "run-metrics.jsonl"
    progress = callbacks.Progress(8, steps_per_epoch=2, epochs=2, first_step=0, every=50,
                                  record=files.RunFiles.of_metrics(str(metrics)), label="run",
                                  optimizer=optimizer, guard=guard, validator=Validated())
    progress.on_train_begin(None)
    for epoch in (1, 2):
        progress.on_train_epoch_begin(None)
        for step in (2 * epoch - 1, 2 * epoch):
            progress.on_train_step_begin(None)
            progress.on_train_step_end(FakeRunContext(step, epoch, loss=float(step)))
        progress.on_train_epoch_end(FakeRunContext(2 * epoch, epoch))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["loss"]) for r in records] == [(1, 2, 1.5), (2, 4, 3.5)]
    assert [r["lr"] for r in records] == pytest.approx([0.2, 0.4])
    assert "val_accuracy" not in records[0] and records[1]["val_accuracy"] == 0.5 and records[1]["val_s"] == 1.0
    assert records[0]["images_per_s"] > 0  # step 2 (step 1 compiles the graph and is not timed)
    out = capsys.readouterr().out
    assert "first step done" in out and "epoch 2/2 step 2/2 (4/4) loss 4.0000 lr 0.4" in out
    assert "epoch 2/2 done in" in out and "mean loss 3.5000" in out


def test_progress_logs_an_epoch_of_one_step(tmp_path):
    """The run's first step compiles the graph and is not timed, but its epoch is logged all the same."""
    optimizer = nn.Adam(nn.Dense(3, 2).trainable_params(), learning_rate=0.01)
    metrics = tmp_path / "run-metrics.jsonl"
    progress = callbacks.Progress(8, steps_per_epoch=1, epochs=1, first_step=0, every=50,
                                  record=files.RunFiles.of_metrics(str(metrics)), label="run",
                                  optimizer=optimizer, guard=callbacks.Guard(0, 1))
    progress.on_train_begin(None)
    progress.on_train_epoch_begin(None)
    progress.on_train_step_begin(None)
    progress.on_train_step_end(FakeRunContext(1, 1, loss=2.0))
    progress.on_train_epoch_end(FakeRunContext(1, 1))
    [record] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert (record["epoch"], record["step"], record["loss"], record["images_per_s"]) == (1, 1, 2.0, None)


def test_an_interrupted_epoch_is_not_logged(tmp_path):
    optimizer = nn.Adam(nn.Dense(3, 2).trainable_params(), learning_rate=0.01)
    metrics = tmp_path / "run-metrics.jsonl"
    guard = callbacks.Guard(0, 2)
    progress = callbacks.Progress(8, steps_per_epoch=2, epochs=1, first_step=0, every=50,
                                  record=files.RunFiles.of_metrics(str(metrics)), label="run",
                                  optimizer=optimizer, guard=guard)
    progress.on_train_begin(None)
    progress.on_train_epoch_begin(None)
    for step in (1, 2):
        context = FakeRunContext(step, 1)
        if step == 2:
            guard.on_signal(signal.SIGTERM)  # caught during the epoch's last step
        progress.on_train_step_begin(None)
        guard.on_train_step_end(context)
        progress.on_train_step_end(context)
    assert context.stop_requested
    progress.on_train_epoch_end(FakeRunContext(2, 1))
    assert not metrics.exists()


def test_a_vanished_save_folder_stops_training_with_1(tmp_path, capsys):
    """Checkpoint and metrics.jsonl alike: a save folder removed during the run is a failed save, not a traceback."""
    folder = tmp_path / "run"
    folder.mkdir()
    guard = callbacks.Guard(0, steps_per_epoch=2)
    saver = callbacks.Checkpointer(nn.Dense(3, 2), str(folder), "resnet18_qat", steps_per_epoch=2, save_steps=0,
                                   keep=5, first_step=0, guard=guard)
    folder.rmdir()
    saver.save(2)
    assert guard.save_failure == (str(folder / "resnet18_qat-1_2.ckpt"), "No such file or directory")
    assert guard.outcome(saver.latest).report() == 1  # train.py's main exits with it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not save") and "none (train again" in err


def one_epoch_of_progress(metrics, guard):
    optimizer = nn.Adam(nn.Dense(3, 2).trainable_params(), learning_rate=0.001)
    progress = callbacks.Progress(8, steps_per_epoch=1, epochs=1, first_step=0, every=50,
                                  record=files.RunFiles.of_metrics(str(metrics)), label="run",
                                  optimizer=optimizer, guard=guard)
    progress.on_train_begin(None)
    progress.on_train_epoch_begin(None)
    progress.on_train_step_begin(None)
    progress.on_train_step_end(FakeRunContext(1, 1, loss=2.0))
    progress.on_train_epoch_end(FakeRunContext(1, 1))


def test_a_full_disk_while_logging_metrics_stops_training_with_1_and_keeps_the_log_whole(tmp_path, monkeypatch):
    metrics = tmp_path / "run-metrics.jsonl"
    metrics.write_text('{"epoch": 1}\n')  # an earlier run's record
    real_open = open

    def disk_full(path, mode="r", *args, **kwargs):
        if "w" in mode and ".partial-" in str(path):
            f = real_open(path, mode, *args, **kwargs)
            f.write(b'{"epoch": ')
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)
    guard = callbacks.Guard(0, 1)
    monkeypatch.setattr("builtins.open", disk_full)
    one_epoch_of_progress(metrics, guard)
    monkeypatch.undo()
    assert guard.save_failure == (str(metrics), "No space left on device")
    assert metrics.read_text() == '{"epoch": 1}\n' and os.listdir(tmp_path) == ["run-metrics.jsonl"]


def test_metrics_record_the_learning_rate_as_given(tmp_path):
    metrics = tmp_path / "run-metrics.jsonl"
    one_epoch_of_progress(metrics, callbacks.Guard(0, 1))
    assert '"lr": 0.001,' in metrics.read_text()  # not 0.0010000000474974513, float32's value as a double


def test_one_run_per_save_folder_and_the_lock_dies_with_its_process(tmp_path, capsys):
    """A second holder is refused, naming the first's process id; kill -9 of the holder leaves no stale lock."""
    holder = start_script("-c", "import sys, time; from qatcifar import files; "
                          "files.lock_save_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                          str(tmp_path))
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(Exception) as error:
            files.lock_save_dir(str(tmp_path))
        assert str(error.value) == (f"save directory {tmp_path} is in use by another train.py run (process "
                                    f"{holder.pid}); wait for it to end, or give another -dir")
    finally:
        holder.kill()
        holder.wait()
    files.lock_save_dir(str(tmp_path))  # the OS released it
    files.release_locks()
    assert os.listdir(tmp_path) == []  # the lock is on the folder itself: no file


def test_an_unreadable_best_checkpoint_is_replaced_not_read(tmp_path, capsys):
    """A garbage file, a broken link or a FIFO (whose read would block) where best.ckpt is: a warning, no best."""
    best = tmp_path / "best.ckpt"
    assert callbacks.previous_best(str(best)) is None and capsys.readouterr().out == ""
    for make in (lambda: best.write_bytes(b"garbage"), lambda: os.symlink("gone", best), lambda: os.mkfifo(best)):
        make()
        assert callbacks.previous_best(str(best)) is None
        assert "unreadable or has no val_accuracy; this run's best model will replace it" in capsys.readouterr().out
        os.remove(best)
    checkpoint.save(nn.Dense(3, 2), str(best), {"epoch_num": 1, "val_accuracy": 0.75})
    assert callbacks.previous_best(str(best)) == 0.75


def test_a_save_folder_that_cannot_be_locked_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    files.lock_save_dir(str(tmp_path))
    assert f"warning: cannot lock save directory {tmp_path} (No locks available)" in capsys.readouterr().out
