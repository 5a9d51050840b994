"""Pictures of runs and evaluations, as PNG files (matplotlib, no display needed).

    >>> plots.save_curves({"run": records}, "curves.png")          # records: a run's metrics lines
    >>> plots.save_confusion(confusion, class_names, "confusion.png", title)

`curves`: the loss per epoch with the spread of its steps (the band from the lowest to the highest
step loss), the learning rate, and the validation accuracy (and the robust accuracy under
--val_attack) with the best epoch marked; several runs on one figure compare them (plot.py).
`confusion`: the confusion matrix as a heat map with the class names, and the accuracy per class
as bars. Files are written atomically: a picture is whole or absent. Only matplotlib's
object-oriented API is used (Figure and its Agg canvas), so nothing global changes on import.
"""
import collections
import json
import os
import time

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qatcifar import files

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # of a metrics record's "time"
LEGEND_COLUMNS, LEGEND_ROW_INCHES = 2, 0.25  # several runs' legend, below the panels


def read_metrics(path):
    """The records of metrics.jsonl that belong to its latest run: the final stretch in which epochs rise (a resumed
    run continues its epochs; a new run into the same folder starts again at 1). Unreadable lines are skipped, and
    so are records without the figures drawn (hand-edited, or not train.py's)."""
    records = []
    for line in files.read_small(path, files.MAX_METRICS_FILE).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if drawable(record):
            records.append(record)
    start = len(records) - 1
    while start > 0 and records[start - 1]["epoch"] < records[start]["epoch"]:
        start -= 1
    return records[max(start, 0):]


def trim_metrics(path, epochs_done, saved):
    """Before a resumed run appends to metrics.jsonl: remove the lines that are not whole JSON records (a line cut
    short stayed for ever, between the records) and the records of epochs after `epochs_done` written since `saved`,
    the time its checkpoint was written (the run's epochs after the checkpoint, which it trains again: each would have
    two records; an earlier run's records are older). Rewritten atomically, only if there is something to remove.
    Returns (lines cut short, records of epochs to train again) removed."""
    if not os.path.isfile(path):
        return 0, 0
    text = files.read_small(path, files.MAX_METRICS_FILE).decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    kept, damaged, later = [], 0, 0
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            damaged += 1
            continue
        if (isinstance(record, dict) and type(record.get("epoch")) is int and record["epoch"] > epochs_done
                and written(record) >= int(saved)):
            later += 1
        else:
            kept.append(line)
    if damaged or later:
        files.write_text(path, "".join(line + "\n" for line in kept))
    return damaged, later


def written(record):
    """When a metrics record was written (its "time", local, to the second), in seconds since the epoch; 0 if it
    does not say."""
    try:
        return time.mktime(time.strptime(record.get("time"), TIME_FORMAT))
    except (TypeError, ValueError, OverflowError):
        return 0


def drawable(record):
    """Whether a metrics record has what save_curves draws: an integer epoch, a numeric loss and learning rate, and
    numeric validation figures and loss range where it has them."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return (isinstance(record, dict) and type(record.get("epoch")) is int
            and number(record.get("loss")) and number(record.get("lr"))
            and all(number(record[key]) for key in ("loss_min", "loss_max", "val_accuracy", "val_robust_accuracy")
                    if key in record))


def save_curves(runs, path, title=None):
    """A figure of loss, learning rate and validation accuracy over epochs for each run ({label: records}). Several
    runs share one legend below the panels, a run a line, with its best epoch."""
    several = len(runs) > 1
    rows = -(-len(runs) // LEGEND_COLUMNS) if several else 0
    figure = Figure(figsize=(15, 4.5 + LEGEND_ROW_INCHES * rows), layout="constrained")
    loss, rate, accuracy = figure.subplots(1, 3)
    handles = []
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"
        epochs = [r["epoch"] for r in records]
        best = plot_accuracy(accuracy, records, color)
        named = f"{label}{f' (best: epoch {best[0]}, {best[1]:.1f}%)' if best and several else ''}"
        handles += loss.plot(epochs, [r["loss"] for r in records], "o-", color=color, label=named, markersize=3)
        if all("loss_min" in r for r in records):
            loss.fill_between(epochs, [r["loss_min"] for r in records], [r["loss_max"] for r in records],
                              color=color, alpha=0.15, linewidth=0)
        rate.plot(epochs, [r["lr"] for r in records], "-", color=color, label=label)
    loss.set(title="training loss (epoch mean; band: its steps' range)", xlabel="epoch", ylabel="loss")
    rate.set(title="learning rate (at the epoch's last step)", xlabel="epoch", ylabel="learning rate")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    robust = any(all("val_robust_accuracy" in r for r in records if "val_accuracy" in r)
                 and any("val_accuracy" in r for r in records) for records in runs.values())
    accuracy.set(title="validation accuracy" + (" (dashed: robust)" if robust else "") + (", star: best" if several
                                                                                         else ""),
                 xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 103))
    epochs = [r["epoch"] for records in runs.values() for r in records]
    if epochs and min(epochs) == max(epochs):  # (one epoch: whole ones on the axis, not 0.945 to 1.05)
        loss.set_xlim(epochs[0] - 1, epochs[0] + 1)
    rate.set_xlim(loss.get_xlim())
    accuracy.set_xlim(loss.get_xlim())  # the same epochs on every panel (and whole ones with a single validation)
    for axes in (loss, rate, accuracy):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not several and axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small", loc="lower right" if axes is accuracy else "best")
    if several:
        figure.legend(handles=handles, loc="outside lower center", ncols=LEGEND_COLUMNS, fontsize="small")
    if title:
        figure.suptitle(title)
    save(figure, path)


def plot_accuracy(axes, records, color):
    """The validation accuracy of one run's records (and the robust accuracy), its best epoch starred; returns
    (that epoch, its accuracy in %), or None where the run never validated."""
    validated = [r for r in records if "val_accuracy" in r]
    if not validated:
        return None
    epochs = [r["epoch"] for r in validated]
    axes.plot(epochs, [100 * r["val_accuracy"] for r in validated], "o-", color=color, label="clean", markersize=4)
    key = "val_accuracy"
    if all("val_robust_accuracy" in r for r in validated):
        key = "val_robust_accuracy"  # the run's best checkpoint is then the most robust epoch
        axes.plot(epochs, [100 * r[key] for r in validated], "s--", color=color, label="robust", markersize=4)
    best = max(validated, key=lambda r: r[key])
    axes.plot([best["epoch"]], [100 * best[key]], "*", color=color, markersize=14, markeredgecolor="black",
              label=f"best: epoch {best['epoch']}, {100 * best[key]:.1f}%")
    return best["epoch"], 100 * best[key]


def save_confusion(confusion, names, path, title):
    """The confusion matrix (rows: true class) as a heat map, and per-class accuracy as bars, in one PNG."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    figure = Figure(figsize=(15, 6.5), layout="constrained")
    heat, bars = figure.subplots(1, 2, width_ratios=[1.2, 1])
    shares = confusion / np.maximum(totals, 1)[:, None]
    image = heat.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(confusion):
        if count:
            heat.text(j, i, str(count), ha="center", va="center", fontsize=8,
                      color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(len(names))
    heat.set_xticks(ticks, names, rotation=45, ha="right")
    heat.set_yticks(ticks, names)
    heat.set(xlabel="predicted class", ylabel="true class", title="confusion matrix (counts; colour: share of row)")
    figure.colorbar(image, ax=heat, shrink=0.8)
    accuracy = 100 * np.diag(confusion) / np.maximum(totals, 1)
    bars.barh(list(ticks), accuracy, color=["C0" if total else "lightgrey" for total in totals])
    bars.set_yticks(ticks, names)
    bars.invert_yaxis()
    bars.set(xlim=(0, 100), xlabel="accuracy (%)", title="accuracy per class")
    for i, (value, total) in enumerate(zip(accuracy, totals, strict=True)):
        text = f"{value:.1f}% of {total}" if total else "no images"
        if value > 30:  # inside the bar, in white
            bars.text(value - 1, i, text, va="center", ha="right", fontsize=8, color="white")
        else:
            bars.text(value + 1, i, text, va="center", fontsize=8)
    figure.suptitle(title)
    save(figure, path)


def save_sensitivity(records, accuracy, path, title):
    """A bar per layer (eval.py --sensitivity's records, the most sensitive first): the accuracy points it loses
    with its weights at fewer bits, labelled with that drop and the accuracy left; its weights counted beside its
    name."""
    figure = Figure(figsize=(9, 1.2 + 0.32 * len(records)), layout="constrained")
    bars = figure.subplots()
    drops = [100 * r["drop"] for r in records]
    bars.barh(range(len(records)), drops, color=["tab:red" if d > 0 else "tab:green" for d in drops])
    bars.set_yticks(range(len(records)), [f"{r['layer']} ({r['weights']:,} weights)" for r in records], fontsize=8)
    bars.invert_yaxis()
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set(xlabel=f"accuracy points lost (of {100 * accuracy:.2f}% as trained; below 0: gained)",
             title="the network with one layer's weights at fewer bits, the rest as trained")
    reach = max(max(drops), 1)
    bars.set_xlim(min(min(drops), 0) - 0.05 * reach, 1.45 * reach)  # (room for the labels)
    for i, r in enumerate(records):
        bars.text(max(drops[i], 0) + 0.02 * reach, i, f"{drops[i]:+.2f} points ({100 * r['accuracy']:.2f}%)",
                  va="center", fontsize=8)
    figure.suptitle(title)
    save(figure, path)


def save(figure, path, overwrite=True):
    FigureCanvasAgg(figure)
    files.write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), mode=0o644,
                                overwrite=overwrite)


def update_curves(record, label):
    """A run's curves (files.RunFiles' `curves`), redrawn from its metrics, titled `label` (run_label); returns the
    picture's path."""
    save_curves({label: read_metrics(record.metrics)}, record.curves, f"{record.prefix}: {label}")
    return record.curves


def run_label(settings):
    """What a run trained, in a few words, from its settings (train.py's args.json): "resnet8, QAT W4A4 lsq",
    "resnet20, float32, adversarial pgd, distilled"."""
    words = [str(settings.get("arch") or "resnet18")]
    if settings.get("qat", True):
        weights, acts = settings.get("weight_bits"), settings.get("act_bits")
        bits = f" W{weights}A{acts}" if weights and acts else ""
        fold = " bn_fold" if settings.get("bn_fold") else ""
        words.append(f"QAT{bits} {settings.get('quantizer') or 'minmax'}{fold}")
        per_layer = settings.get("bits_per_layer") if isinstance(settings.get("bits_per_layer"), dict) else {}
        edges = settings.get("first_last_bits")
        others = collections.Counter(b for b in per_layer.values() if b not in (weights, edges))
        words += [f"{count} layer{'s' if count > 1 else ''} at {b} bits" for b, count in sorted(others.items())]
    else:
        words.append("float32")
    if settings.get("adv_train") not in (None, "none"):
        words.append(f"adversarial {settings['adv_train']}")
    if settings.get("teacher"):
        words.append("distilled")
    return ", ".join(words)


def read_label(record):
    """A run's name (files.RunFiles): its prefix, and run_label of its args.json where that file is readable."""
    settings = record.settings()
    return f"{record.prefix}: {run_label(settings)}" if settings else record.prefix
