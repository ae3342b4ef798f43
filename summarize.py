"""Tables and figures of an ablation study: each setting's results as mean ± std over its seeds.

    python summarize.py logs/cifar10/sweep_depth                      # results.md and figures in that folder
    python summarize.py logs/cifar10 --output_dir results/depth       # every sweep under logs/cifar10

It reads every run folder below the given folders that holds a settings.json (written by sweep.py: the run's
stage, seed and settings) and a metrics.csv with all its epochs; unfinished runs are left out and listed. A
setting's seeds are the pretraining -> fine-tuning (-> linear probe) chains that share every other setting.

Tables (markdown, printed and written to results.md): every setting against fine-tuning from scratch, then one
table per ablated setting (decoder depth, mask strategy, mask ratio, pretraining or fine-tuning epochs: those
with more than one value), with the final and the best test accuracy of fine-tuning (val_acc), the linear probe's
final accuracy, the final pretraining loss, and the wall time per seed (the metrics.csv "seconds" of all of a
seed's runs). Mean ± sample std over seeds; n seeds; std "-" for a single seed.

Figures (PNG): pretraining loss and fine-tuning test accuracy against epoch per ablated setting, the mean over
seeds with a ±std band, one panel per combination of the other ablated settings; fine-tuning from each setting
against from scratch.
"""
import argparse
import csv
import json
import statistics
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import utils  # noqa: E402

# The settings an ablation varies, with the words used in tables and figures.
AXES = {"decoder_depth": "decoder depth", "mask_strategy": "mask strategy", "mask_ratio": "mask ratio",
        "pretrain_epochs": "pretraining epochs", "finetune_epochs": "fine-tuning epochs"}
PRETRAIN_AXES = tuple(AXES)[:4]  # what a pretraining run, and so its fine-tuning and probe, depends on
SCRATCH = "from scratch"


@dataclass
class RunRecord:
    settings: dict  # from its settings.json: stage, seed and the sweep's settings
    rows: list      # metrics.csv as dicts of floats (None where empty)


@dataclass
class Setting:
    """One point of the grid (or fine-tuning from scratch) and its runs, by seed and stage."""
    key: tuple  # the AXES values; None for the pretraining ones when from scratch
    seeds: dict = field(default_factory=dict)  # seed -> {"pretrain" | "finetune" | "linear_probe": rows}

    @property
    def is_scratch(self):
        return self.key[0] is None

    def value(self, axis):
        return self.key[list(AXES).index(axis)]

    def stage_rows(self, stage):
        """{seed: rows} of the seeds that have a finished run of ``stage``."""
        return {seed: runs[stage] for seed, runs in sorted(self.seeds.items()) if stage in runs}


# -------------------------------------------------------------------------------------------- reading runs


def read_metrics(path):
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def find_runs(folders):
    """(finished runs, unfinished run folders) below ``folders``."""
    finished, unfinished = [], []
    for folder in folders:
        for settings_path in sorted(Path(folder).rglob("settings.json")):
            record = json.loads(settings_path.read_text())
            metrics = settings_path.with_name("metrics.csv")
            rows = read_metrics(metrics) if metrics.is_file() else []
            if len(rows) >= record["total_epochs"]:
                finished.append(RunRecord(record["settings"], rows))
            else:
                unfinished.append(f"{settings_path.parent} ({len(rows)}/{record['total_epochs']} epochs)")
    return finished, unfinished


def group_settings(runs):
    """Settings keyed by their AXES values, each holding its seeds' runs.

    A fine-tuning run (or a scratch one) makes a setting; its pretraining and probe runs join every setting with
    the same pretraining settings and seed. A pretraining run with no fine-tuning yet makes a setting of its own.
    """
    settings = {}
    by_stage = {stage: [r for r in runs if r.settings["stage"] == stage]
                for stage in ("pretrain", "finetune", "linear_probe", "scratch")}
    for run in by_stage["finetune"] + by_stage["scratch"]:
        s = run.settings
        key = tuple(s.get(axis) for axis in AXES)
        settings.setdefault(key, Setting(key)).seeds.setdefault(s["seed"], {})["finetune"] = run.rows
    for stage in ("pretrain", "linear_probe"):
        for run in by_stage[stage]:
            pretrain_key = tuple(run.settings[axis] for axis in PRETRAIN_AXES)
            matching = [k for k in settings if k[:len(PRETRAIN_AXES)] == pretrain_key] or [(*pretrain_key, None)]
            for key in matching:
                settings.setdefault(key, Setting(key)).seeds.setdefault(run.settings["seed"], {})[stage] = run.rows
    return sorted(settings.values(), key=lambda setting: sort_key(setting.key))


def sort_key(values):
    """Scratch last; numbers by value, words alphabetically."""
    return tuple((v is None, v if isinstance(v, (int, float)) else 0, str(v)) for v in values)


# ------------------------------------------------------------------------------------------------- numbers


def per_seed(setting):
    """{column: [value of each seed that has it]} for one setting."""
    values = {"final": [], "best": [], "probe": [], "loss": [], "seconds": []}
    for seed, runs in sorted(setting.seeds.items()):
        if "finetune" in runs:
            accuracy = [row["val_acc"] for row in runs["finetune"]]
            values["final"].append(accuracy[-1])
            values["best"].append(max(accuracy))
        if "linear_probe" in runs:
            values["probe"].append(runs["linear_probe"][-1]["val_acc"])
        if "pretrain" in runs:
            values["loss"].append(runs["pretrain"][-1]["loss"])
        values["seconds"].append(sum(row["seconds"] or 0 for rows in runs.values() for row in rows))
    return values


def mean_std(values):
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values, scale=1.0, digits=2, n=None):
    """``mean ± std``; '-' for the std of one value; the count when it differs from the setting's n."""
    if not values:
        return ""
    mean, std = mean_std([v * scale for v in values])
    text = f"{mean:.{digits}f} ± " + ("-" if std is None else f"{std:.{digits}f}")
    return text if n is None or len(values) == n else f"{text} (n={len(values)})"


def format_seconds(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


# -------------------------------------------------------------------------------------------------- tables


def varying_axes(settings):
    """The AXES with more than one value among the pretrained settings: the ablations."""
    pretrained = [s for s in settings if not s.is_scratch]
    return [axis for axis in AXES if len({s.value(axis) for s in pretrained}) > 1]


def fixed_axes_text(settings, varying):
    pretrained = [s for s in settings if not s.is_scratch]
    fixed = [f"{AXES[axis]} {pretrained[0].value(axis)}" for axis in AXES
             if axis not in varying and pretrained and pretrained[0].value(axis) is not None]
    return ", ".join(fixed)


def result_cells(setting, with_probe):
    values = per_seed(setting)
    n = len(values["final"]) or len(values["seconds"])
    cells = [str(n), format_mean_std(values["final"], 100, n=n), format_mean_std(values["best"], 100, n=n)]
    if with_probe:
        cells.append(format_mean_std(values["probe"], 100, n=n))
    cells += [format_mean_std(values["loss"], digits=4, n=n), format_seconds(statistics.mean(values["seconds"]))]
    return cells


def result_header(with_probe):
    return ["n", "final acc (%)", "best acc (%)", *(["linear probe (%)"] if with_probe else []),
            "pretrain loss", "time / seed"]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def setting_label(setting, axes):
    if setting.is_scratch:
        return SCRATCH
    return ", ".join(f"{AXES[axis]} {setting.value(axis)}" for axis in axes) or "MAE pretraining"


def all_settings_table(settings, varying, with_probe):
    rows = [[setting_label(s, varying), *result_cells(s, with_probe)] for s in settings]
    return markdown_table(["setting", *result_header(with_probe)], rows)


def comparisons(settings, axis, varying, stage=None):
    """The pretrained settings that differ only in ``axis``, grouped by the other ablated settings.

    Returns (the other ablated axes, [(their values, settings sorted by ``axis``)]). A group of one setting
    compares nothing (e.g. the default point of a one-at-a-time study, seen from the other ablation): left out.
    """
    others = [a for a in varying if a != axis]
    chosen = sorted((s for s in settings if not s.is_scratch and (stage is None or s.stage_rows(stage))),
                    key=lambda s: sort_key([s.value(a) for a in (*others, axis)]))
    groups = [(key, list(group)) for key, group in groupby(chosen, key=lambda s: [s.value(a) for a in others])]
    return others, [(key, group) for key, group in groups if len(group) > 1 or axis not in varying]


def ablation_table(settings, axis, varying, with_probe):
    """One row per setting, the other ablated settings first, so that rows differing only in ``axis`` sit
    together (a controlled comparison, never an average over other settings)."""
    others, groups = comparisons(settings, axis, varying)
    rows = [[*(str(s.value(a)) for a in (*others, axis)), *result_cells(s, with_probe)]
            for _, group in groups for s in group]
    return markdown_table([*(AXES[a] for a in (*others, axis)), *result_header(with_probe)], rows)


# ------------------------------------------------------------------------------------------------- figures


def plot_mean_std(ax, curves, label):
    """The mean over seeds of per-epoch curves, with a ±std band where there are several seeds."""
    length = min(len(c) for c in curves)  # finished runs of one setting all have the same length
    epochs = range(1, length + 1)
    columns = [[c[i] for c in curves] for i in range(length)]
    means = [statistics.mean(column) for column in columns]
    line, = ax.plot(epochs, means, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        stds = [statistics.stdev(column) for column in columns]
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def curves(setting, stage, column, scale=1.0):
    return [[row[column] * scale for row in rows] for rows in setting.stage_rows(stage).values()]


METRICS = {  # figure name: (stage, metrics.csv column, scale, y label)
    "pretrain_loss": ("pretrain", "loss", 1.0, "pretraining loss (MSE on masked patches)"),
    "finetune_acc": ("finetune", "val_acc", 100.0, "fine-tuning test accuracy (%)"),
}


def ablation_figure(settings, axis, varying, metric, path):
    """Curves by ``axis``: one panel per combination of the other ablated settings; returns False if empty."""
    stage, column, scale, ylabel = METRICS[metric]
    others, panels = comparisons(settings, axis, varying, stage)
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 4.5), squeeze=False)
    for ax, (key, group) in zip(axes[0], panels):
        for setting in group:
            plot_mean_std(ax, curves(setting, stage, column, scale), f"{AXES[axis]} {setting.value(axis)}")
        if others:
            ax.set_title(", ".join(f"{AXES[a]} {v}" for a, v in zip(others, key)), fontsize="medium")
        label_axes(ax, ylabel)
    figure.suptitle(f"{ylabel.split(' (')[0].capitalize()} by {AXES[axis]} (mean ± std over seeds)")
    save(figure, path)
    return True


def label_axes(ax, ylabel):
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.legend()


def scratch_figure(settings, varying, path):
    """Fine-tuning accuracy from every pretrained setting and from scratch, in one panel."""
    stage, column, scale, ylabel = METRICS["finetune_acc"]
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for setting in settings:
        if setting.stage_rows(stage):
            plot_mean_std(ax, curves(setting, stage, column, scale), setting_label(setting, varying))
    ax.set_title("Fine-tuning: pretrained with MAE vs from scratch (mean ± std over seeds)")
    label_axes(ax, ylabel)
    save(figure, path)


def save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- main


def summarize(settings, output_dir):
    """The markdown report; writes the figures into ``output_dir`` and links them from the report."""
    output_dir.mkdir(parents=True, exist_ok=True)
    varying = varying_axes(settings)
    with_probe = any(s.stage_rows("linear_probe") for s in settings)
    has_scratch = any(s.is_scratch for s in settings)
    fixed = fixed_axes_text(settings, varying)
    parts = ["# Ablation results", "",
             "Test accuracy of fine-tuning (final epoch, and best epoch, which is picked on the test set and so "
             "flatters: compare final), mean ± sample std over seeds (n seeds; '-' for one seed)."
             + (f" Fixed: {fixed}." if fixed else ""), "",
             "## All settings" + (" vs from scratch" if has_scratch else ""), "",
             all_settings_table(settings, varying, with_probe), ""]
    figures = []
    for axis in varying:
        parts += [f"## {AXES[axis].capitalize()}", "", ablation_table(settings, axis, varying, with_probe), ""]
        for metric in METRICS:
            path = output_dir / f"{metric}_{axis}.png"
            if ablation_figure(settings, axis, varying, metric, path):
                figures.append(path)
                parts += [f"![{metric} by {AXES[axis]}]({path.name})", ""]
    if not varying:  # a single setting over seeds: its curves still deserve a look
        for metric in METRICS:
            path = output_dir / f"{metric}.png"
            if ablation_figure(settings, "decoder_depth", [], metric, path):
                figures.append(path)
                parts += [f"![{metric}]({path.name})", ""]
    if has_scratch:
        path = output_dir / "finetune_acc_vs_scratch.png"
        scratch_figure(settings, varying, path)
        figures.append(path)
        parts += ["## Pretrained vs from scratch", "", f"![fine-tuning vs from scratch]({path.name})", ""]
    return "\n".join(parts), figures


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="a sweep folder (logs/<dataset>/sweep_<name>) or any folder above")
    p.add_argument("--output_dir", default=None, help="for results.md and the figures (default: the first folder)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs, unfinished = find_runs(args.folders)
    if not runs:
        raise utils.UserError(f"no finished runs with a settings.json (written by sweep.py) under "
                              f"{', '.join(args.folders)}")
    output_dir = Path(args.output_dir or args.folders[0])
    report, figures = summarize(group_settings(runs), output_dir)
    if unfinished:
        report += "\nLeft out, not finished: " + "; ".join(unfinished) + "\n"
    (output_dir / "results.md").write_text(report + "\n")
    print(report)
    print(f"wrote {output_dir / 'results.md'} and {len(figures)} figures")


if __name__ == "__main__":
    utils.run_cli(main)
