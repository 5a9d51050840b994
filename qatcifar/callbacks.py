"""The callbacks of train.py's Model.train, in their order in the callback list:

- `Guard`: the one object that decides when training stops (Ctrl-C, SIGTERM, a loss or weights
  that are not finite, a failed save), and how train.py then exits;
- `Checkpointer`: the training state after every epoch, every --save_steps steps and on an interrupt;
- `Validator`: accuracy on the test split every --eval_every epochs, the run's best network as
  `<prefix>-best.ckpt`;
- `Progress`: progress lines (or a live bar), the per-epoch summary, the run's `<prefix>-metrics.jsonl` and
  `<prefix>-curves.png` (files.RunFiles), and the --summary_dir event files.

Each owns its state. The others report to the Guard what went wrong and ask it whether training
is stopping; Progress reads the Validator's results for metrics.jsonl.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
from mindspore.train import Callback

from qatcifar import attacks, checkpoint, cli, files, inference, interrupts, plots

EXIT_SAVE_FAILED, EXIT_DIVERGED = 1, 3  # and 2 for bad input, 128 + the signal when interrupted
WORKER_0 = "worker 0's latest"  # the checkpoint a data-parallel worker that does not save points to
SUMMARY_SCALARS = ("loss", "lr", "images_per_s", "val_accuracy", "val_robust_accuracy")  # --summary_dir, per epoch


class Stop(Exception):
    """How train.py ends when training stopped early: raised to its main, which reports it and exits `status`."""

    def __init__(self, status, message, error):
        super().__init__(message)
        self.status, self.message = status, message
        self.error = error  # an `error:` line on stderr; else lines on stdout

    def report(self):
        """Say how training ended; return the exit status."""
        print(f"error: {self.message}" if self.error else self.message, file=sys.stderr if self.error else sys.stdout,
              flush=True)
        return self.status


class Guard(Callback):
    """Stops training cleanly: at a non-finite loss, after the current step on Ctrl-C or SIGTERM, and
    when another callback reports weights that are not finite or a failed save.

    Ctrl-C and SIGTERM reach it from train.py's signal thread (`interrupts.defer`) while training
    runs; those sent before it began are handed over then. A second one quits at once, without
    saving (checkpoints on disk stay whole: they are renamed into place only when complete).
    """

    def __init__(self, first_step, steps_per_epoch):
        super().__init__()
        self.first_step, self.steps_per_epoch = first_step, steps_per_epoch
        self.signal = None          # the signal caught, acted on at the next on_train_step_end
        self.interrupted = False    # a signal stops training after this step
        self.diverged = None        # (step, what was not finite)
        self.save_failure = None    # (path, why)
        self.run_context = None

    @property
    def failed(self):
        """The loss or weights are not finite, or a save failed: nothing more may be saved."""
        return self.diverged is not None or self.save_failure is not None

    @property
    def stopping(self):
        return self.interrupted or self.failed

    def report_divergence(self, step, what):
        if self.diverged is None:
            self.diverged = (step, what)
        self._request_stop()

    def report_save_failure(self, path, error):
        self.save_failure = (path, files.why(error))
        self._request_stop()

    def _request_stop(self):
        if self.run_context is not None:
            self.run_context.request_stop()

    def on_train_begin(self, run_context):
        self.run_context = run_context
        interrupts.defer(self.on_signal)

    def on_train_end(self, run_context):
        interrupts.defer(None)

    def on_signal(self, signum):
        name = signal.Signals(signum).name
        if self.signal is not None:
            print(f"\n{name} again: quitting without saving", file=sys.stderr, flush=True)
            interrupts.quit_now(128 + signum)
        self.signal = signum
        print(f"\n{name}: stopping after this step and saving a checkpoint", flush=True)

    def on_train_step_end(self, run_context):
        """First of the callbacks after each step: a signal caught since the last one stops training after
        this step, so that the Checkpointer, next, saves this step as the interrupt checkpoint. (Stopping
        from the signal handler could end training between the Checkpointer and the next step: no save.)"""
        cb = run_context.original_args()
        loss = loss_value(cb.net_outputs)
        if not math.isfinite(loss):
            self.report_divergence(self.first_step + cb.cur_step_num, f"the loss is {loss}")
        if self.signal is not None:
            self.interrupted = True
            run_context.request_stop()

    def outcome(self, last_checkpoint, resumed=None):
        """A Stop when training did not run to the end, else None. `last_checkpoint`: the newest one saved;
        `resumed`: the checkpoint the run resumed from, if any."""
        last = last_checkpoint or "none (train again from the start)"
        if self.save_failure:
            path, why = self.save_failure
            return Stop(EXIT_SAVE_FAILED, f"could not save {path} ({why}); training stopped; the last "
                        f"checkpoint saved, {last}, is intact; free space or fix the save folder, then continue "
                        "with --resume auto", error=True)
        if self.diverged:
            step, what = self.diverged
            epoch, _ = checkpoint.position(step, self.steps_per_epoch)
            if resumed and last_checkpoint == resumed:  # (nothing saved since: the checkpoint may be the cause)
                return Stop(EXIT_DIVERGED, f"training diverged at step {step} (epoch {epoch}), "
                            f"{step - self.first_step} step(s) after resuming from {resumed}: {what}; this run saved "
                            f"nothing; that checkpoint may itself hold the cause: check it with python eval.py -loc "
                            f"{resumed}, and if it evaluates well, lower -lr (or add --warmup_epochs) and resume "
                            "again", error=True)
            return Stop(EXIT_DIVERGED, f"training diverged at step {step} (epoch {epoch}): {what}; it stopped and "
                        f"saved nothing from that state; the last checkpoint saved is {last}; lower -lr (or add "
                        "--warmup_epochs) and continue with --resume auto", error=True)
        if self.signal is not None:
            return Stop(128 + self.signal, f"interrupted by {signal.Signals(self.signal).name}; checkpoint: {last}\n"
                        "to continue, run the same command with --resume auto", error=False)
        return None


class Checkpointer(Callback):
    """The training state as <prefix>-<epoch>_<step of the epoch>.ckpt after every epoch, every `save_steps`
    steps, and (named ...-interrupt.ckpt) when the guard caught a signal; the newest `keep` are kept.

    The training state is everything --resume needs: the network with its QAT observers, the
    optimizer's moments and step count (hence the learning-rate schedule's position), and
    epoch_num, step_num and steps_per_epoch. Before each save it checks that the weights are
    finite; nothing is saved once training diverged or a save failed. Only a `writer` saves;
    the other workers of a data-parallel run check the weights as it does. `latest`: the
    newest checkpoint of the run (at first, the one it resumed from).
    """

    def __init__(self, train_net, savedir, prefix, steps_per_epoch, save_steps, keep, first_step, guard,
                 latest=None, writer=True):
        super().__init__()
        self.train_net, self.savedir, self.prefix = train_net, savedir, prefix
        self.steps_per_epoch, self.save_steps, self.keep = steps_per_epoch, save_steps, keep
        self.first_step, self.guard, self.writer = first_step, guard, writer
        self.latest = latest

    def on_train_step_end(self, run_context):
        if self.guard.failed:
            return
        step = self.first_step + run_context.original_args().cur_step_num
        due = step % self.steps_per_epoch == 0 or (self.save_steps and step % self.save_steps == 0)
        if not (due or self.guard.interrupted):
            return
        if not all(np.isfinite(p.asnumpy()).all() for p in self.train_net.trainable_params()):
            self.guard.report_divergence(step, "the updated weights are not finite")
        elif self.writer:
            self.save(step, interrupt=self.guard.interrupted)

    def save(self, step, interrupt=False):
        path = os.path.join(self.savedir, checkpoint.file_name(self.prefix, step, self.steps_per_epoch, interrupt))
        epoch, _ = checkpoint.position(step, self.steps_per_epoch)
        try:
            checkpoint.save(self.train_net, path,
                            {"epoch_num": epoch, "step_num": step, "steps_per_epoch": self.steps_per_epoch})
        except (OSError, RuntimeError) as e:
            self.guard.report_save_failure(path, e)
            return
        self.latest = path
        for old in checkpoint.series(self.savedir, self.prefix)[:-self.keep]:
            with contextlib.suppress(FileNotFoundError):  # (removed by hand meanwhile)
                os.remove(os.path.join(self.savedir, old))


class Validator(Callback):
    """Accuracy on the test split every `every` epochs and after the last (`epochs`); keeps the run's best network at
    `best_path` (the run's own file: a resumed run compares with the best it saved before, a new run with nothing).
    With an `attack` (attacks.Attack, --val_attack), also the robust accuracy, and the best is the most robust
    network.

    `results` maps each validated epoch to {"val_accuracy", ["val_robust_accuracy",] "val_s"}; `last` is the
    latest accuracy. Every worker of a data-parallel run validates (a worker that waited for another's
    validation in its next all-reduce could time out); only the `writer` prints and saves.
    """

    def __init__(self, net, dataset, every, epochs, best_path, guard, writer=True, attack=None):
        super().__init__()
        self.net, self.dataset, self.every, self.epochs = net, dataset, every, epochs
        self.guard, self.writer, self.attack = guard, writer, attack
        self.path = best_path
        self.key = "val_robust_accuracy" if attack else "val_accuracy"  # what the best checkpoint is the best of
        self.best = previous_best(self.path, self.key) if writer else None
        self.results, self.last = {}, None

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if self.guard.stopping or (epoch % self.every and epoch != self.epochs):
            return  # an interrupted or failed epoch is not validated
        start = time.time()
        self.net.set_train(False)
        if self.attack:
            predictions, robust, labels, _ = attacks.evaluate(self.attack, self.dataset)
        else:
            predictions, labels = inference.predict(self.net, self.dataset)
        self.net.set_train(True)
        result = {"val_accuracy": float((predictions == labels).mean())}
        if self.attack:
            result["val_robust_accuracy"] = float((robust == labels).mean())
        self.last = result["val_accuracy"]
        self.results[epoch] = {**result, "val_s": time.time() - start}
        if self.writer:
            self.report(epoch, result, len(labels))

    def report(self, epoch, result, images):
        score = result[self.key]
        better = self.best is None or score > self.best
        robust = f", robust accuracy {100 * score:.2f}% against {self.attack.describe()}" if self.attack else ""
        print(f"validation accuracy {100 * result['val_accuracy']:.2f}%{robust} on {images} test images"
              + (f" (best so far: {self.path})" if better else f" (best: {100 * self.best:.2f}%)"), flush=True)
        if better:
            try:
                checkpoint.save(self.net, self.path, {"epoch_num": epoch, **result})
                self.best = score
            except (OSError, RuntimeError) as e:
                self.guard.report_save_failure(self.path, e)


def previous_best(path, key="val_accuracy"):
    """The `key` score recorded in the run's best checkpoint saved before it was resumed, or None (no such file, or it
    lacks the score)."""
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):  # (a broken link; a FIFO would block the read)
            raise OSError(f"{path} is not a file")
        params = checkpoint.read(path, choice_func=lambda name: name == key)
        return float(params[key].asnumpy())
    except (*checkpoint.UNREADABLE, KeyError):
        print(f"warning: {path} is unreadable or has no {key}; this run's best model will replace it")
        return None


class Progress(Callback):
    """Progress lines every `every` steps and at each epoch's end, a summary per epoch, and one JSON record
    per epoch appended to the run's metrics file (`record`: files.RunFiles; with the validator's accuracy on
    validated epochs).

    A line: epoch and step (of the epoch and of the run), loss, learning rate, images/s of the
    epoch's training steps (each timed from its start to its end, as MindSpore's TimeMonitor does;
    the run's first step, the graph compilation, left out), time elapsed and the estimated time
    left. Steps count from the start of the run, also when it was resumed at `first_step`.
    `batch_size` is the global batch (all workers'). On an interactive terminal a live bar per
    epoch replaces the lines. After each epoch's record, the run's curves are redrawn (plots.py), titled `label`,
    and with `summary_dir` the figures go to TensorBoard event files too.
    """

    def __init__(self, batch_size, steps_per_epoch, epochs, first_step, every, record, label, optimizer, guard,
                 validator=None, summary_dir=None):
        super().__init__()
        self.batch_size, self.steps_per_epoch, self.epochs = batch_size, steps_per_epoch, epochs
        self.first_step, self.every, self.record_files, self.label = first_step, every, record, label
        self.metrics_path = record.metrics
        self.optimizer, self.guard, self.validator = optimizer, guard, validator
        self.total = epochs * steps_per_epoch
        self.plot_failed = False
        self.live, self.bar = cli.interactive(), None  # a terminal: one live bar per epoch instead of the lines
        self.summary_dir, self.summary = summary_dir, None

    def on_train_begin(self, run_context):
        self.start = time.time()
        self.timed_start, self.timed_steps = None, 0  # measured from the end of the first step
        if self.summary_dir:
            self.summary = self.to_summary(EventLog, self.summary_dir)

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = time.time()
        self.epoch_timed_steps, self.epoch_timed_time = 0, 0.0
        self.losses, self.record = [], None

    def on_train_step_begin(self, run_context):
        self.step_start = time.time()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        self.losses.append(loss_value(cb.net_outputs))
        now = time.time()
        step = self.first_step + cb.cur_step_num
        if self.summary:
            self.to_summary(self.summary.add_scalar, "train/step_loss", self.losses[-1], step)
        epoch, step_in_epoch = checkpoint.position(step, self.steps_per_epoch)
        if self.timed_start is None:
            print(f"first step done in {now - self.start:.1f} s (includes graph compilation)", flush=True)
            self.timed_start = now
        else:
            self.timed_steps += 1
            self.epoch_timed_steps += 1
            self.epoch_timed_time += now - self.step_start
            if not self.live and (step_in_epoch % self.every == 0 or step_in_epoch == self.steps_per_epoch):
                self.print_progress(epoch, step_in_epoch, step, now)
        if self.live:
            self.advance_bar(epoch, step_in_epoch, step, now)
        if step_in_epoch == self.steps_per_epoch and not self.guard.stopping:
            self.close_bar()
            self.record = {"epoch": epoch, "step": step, "loss": sum(self.losses) / len(self.losses),
                           "loss_min": min(self.losses), "loss_max": max(self.losses),
                           "lr": learning_rate(self.optimizer, step), "images_per_s": self.speed(),
                           "epoch_s": now - self.epoch_start, "elapsed_s": now - self.start,
                           "time": time.strftime(plots.TIME_FORMAT)}
            print(f"epoch {epoch}/{self.epochs} done in {self.record['epoch_s']:.1f} s, "
                  f"mean loss {self.record['loss']:.4f}", flush=True)

    def print_progress(self, epoch, step_in_epoch, step, now):
        print(f"epoch {epoch}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} ({step}/{self.total}) "
              f"loss {self.losses[-1]:.4f} lr {learning_rate(self.optimizer, step):.3g} {self.speed() or 0:.1f} "
              f"images/s elapsed {clock(now - self.start)} eta {self.eta(step, now)}", flush=True)

    def eta(self, step, now):
        if not self.timed_steps:
            return "?"
        wall_per_step = (now - self.timed_start) / self.timed_steps  # with validations and saves
        return clock(wall_per_step * (self.total - step))

    def advance_bar(self, epoch, step_in_epoch, step, now):
        """The epoch's live bar: its steps, then the loss, learning rate, images/s and the run's time left."""
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch - 1, desc=f"epoch {epoch}/{self.epochs}",
                            unit="step", file=sys.stdout, dynamic_ncols=True, leave=True)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {self.losses[-1]:.4f} lr {learning_rate(self.optimizer, step):.3g} "
                                 f"{self.speed() or 0:.1f} images/s, run eta {self.eta(step, now)}")

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, run_context):
        self.close_bar()  # an interrupted epoch's bar
        if self.summary:
            self.to_summary(self.summary.close)

    def write_summary(self, record):
        """The epoch's figures as TensorBoard scalars, at the run's step count."""
        for key in SUMMARY_SCALARS:
            if record.get(key) is not None:
                self.summary.add_scalar(f"epoch/{key}", record[key], record["step"])
        self.summary.flush()

    def to_summary(self, write, *args):
        """write(*args), and its result; a failure (a full disk) is a warning, and the event file ends there
        (None): training goes on."""
        try:
            return write(*args)
        except OSError as e:
            print(f"warning: stopped writing TensorBoard events into {self.summary_dir} ({e.strerror}); training "
                  f"goes on, {self.metrics_path} has the figures", flush=True)
            if self.summary:
                with contextlib.suppress(OSError):
                    self.summary.close()
            self.summary = None

    def speed(self):
        """Images/s of this epoch's timed steps, or None."""
        return self.epoch_timed_steps * self.batch_size / self.epoch_timed_time if self.epoch_timed_steps else None

    def on_train_epoch_end(self, run_context):
        if self.record is None:  # an interrupted or failed epoch is not logged
            return
        if self.validator:
            self.record.update(self.validator.results.get(self.record["epoch"], {}))
        try:  # appended: an earlier run's records stay
            files.append_line(self.metrics_path, json.dumps(self.record))
        except OSError as e:
            self.guard.report_save_failure(self.metrics_path, e)
            return
        self.draw_curves()
        if self.summary:
            self.to_summary(self.write_summary, self.record)

    def draw_curves(self):
        """The run's curves beside its metrics; a failure is a warning (once), never the end of training."""
        try:
            plots.update_curves(self.record_files, self.label)
        except Exception as e:  # noqa: BLE001  (any plotting error: the run goes on)
            if not self.plot_failed:
                print(f"warning: could not draw {self.record_files.curves} ({cli.first_line(e)}); training goes on, "
                      f"{self.metrics_path} has the figures", flush=True)
            self.plot_failed = True


class EventLog:
    """TensorBoard scalars in one event file of `folder`, written in the calling thread: tensorboardX's
    SummaryWriter writes from a thread of its own, where a full disk ends in tracebacks and then a queue that
    blocks training. Here an OSError reaches the caller. Flushed at least every FLUSH_S seconds, so that a running
    TensorBoard sees the steps as they come."""
    FLUSH_S = 10

    def __init__(self, folder):
        from tensorboardX.event_file_writer import EventsWriter
        os.makedirs(folder, exist_ok=True)
        self.writer = EventsWriter(os.path.join(folder, "events"))
        self.flushed = time.monotonic()

    def add_scalar(self, tag, value, step):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar
        self.writer.write_event(Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value)))
        if time.monotonic() - self.flushed > self.FLUSH_S:
            self.flush()

    def flush(self):
        self.writer.flush()
        self.flushed = time.monotonic()

    def close(self):
        self.writer.close()


def loss_value(outputs):
    """The loss of a training step's outputs: the loss, or with --amp O2 (loss, overflow, loss scale)."""
    return float((outputs[0] if isinstance(outputs, (tuple, list)) else outputs).asnumpy())


def learning_rate(optimizer, step):
    """The optimizer's learning rate at a step (1-based) of the run (a constant, or one value per step)."""
    rate = optimizer.learning_rate
    rate = getattr(rate, "learning_rate", rate)  # a per-step schedule is a Cell holding the Parameter
    rates = np.asarray(rate.asnumpy()).reshape(-1)
    return float(str(rates[min(step - 1, rates.size - 1)]))  # float32's digits: 0.001, not 0.0010000000474974513


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
