"""Tables and figures of ablation studies, each setting's results as mean ± std over its seeds. Needs only numpy and
matplotlib (no torch), so it runs wherever the logs are copied to.

    python summarize.py logs/cifar10/sweep_depth                                  # writes into that folder
    python summarize.py logs/cifar10/sweep_depth logs/cifar10/sweep_mask --output_dir results/ablations

Reads every run folder below the given folders with a settings.json (written by sweep.py) and a metrics.csv with
all its epochs; unfinished runs are left out and named. A setting (a table row) is a fine-tuning or from-scratch
run's settings, joined by the pretraining and linear-probe runs with the same pretraining settings and seed.
Writes runs.csv (one row per run: settings and results), results.md (also printed): a table of all settings, then
one per setting that differs (rows differing only in it side by side) with n seeds, the fine-tuning test accuracy
at the last and the best epoch, the linear probe's, the k-NN and probe accuracy logged by pretraining, its last
loss, and the time per seed, as mean ± sample std ('-' for one seed; "(n=k)" where fewer seeds have it); and PNGs:
each curve against epoch per differing setting (mean, ±std band), fine-tuning vs from scratch, and every setting's
accuracies (each seed a dot, mean ± std error bars).
"""
import argparse
import csv
import json
from itertools import groupby
from pathlib import Path

import numpy as np

WORDS = {"decoder_depth": "decoder depth", "mask_strategy": "mask strategy", "mask_ratio": "mask ratio",
         "pretrain_epochs": "pretraining epochs", "finetune_epochs": "fine-tuning epochs"}  # known ablations first
# Table columns: header, the stages whose runs give it, the run's result, scale, digits.
COLUMNS = [("final acc (%)", ("finetune", "scratch"), "val_acc", 100, 2),
           ("best acc (%)", ("finetune", "scratch"), "best_val_acc", 100, 2),
           ("linear probe (%)", ("linear_probe",), "val_acc", 100, 2),
           ("k-NN (%)", ("pretrain",), "knn_acc", 100, 2),
           ("pretraining probe (%)", ("pretrain",), "probe_acc", 100, 2),
           ("pretrain loss", ("pretrain",), "loss", 1, 4)]
CURVES = {"pretrain_loss": (("pretrain",), "loss", 1, "pretraining loss (MSE on masked patches)"),
          "knn_acc": (("pretrain",), "knn_acc", 100, "k-NN test accuracy during pretraining (%)"),
          "finetune_acc": (("finetune", "scratch"), "val_acc", 100, "fine-tuning test accuracy (%)")}


def read_run(settings_path):
    """(the run, or None if unfinished, and then why) from its settings.json and metrics.csv."""
    record, metrics = json.loads(settings_path.read_text()), settings_path.with_name("metrics.csv")
    rows = list(csv.DictReader(metrics.read_text().splitlines())) if metrics.is_file() else []
    if len(rows) < record["total_epochs"]:
        return None, f"{settings_path.parent} ({len(rows)}/{record['total_epochs']} epochs)"
    curves = {k: np.array([float(row[k]) if row[k] else np.nan for row in rows]) for k in rows[0] if k != "epoch"}
    last = {k: c[np.isfinite(c)][-1] for k, c in curves.items() if np.isfinite(c).any()}  # the last logged value
    results = {k: last.get(k) for k in ("loss", "val_acc", "knn_acc", "probe_acc")}
    results.update(best_val_acc=np.nanmax(curves["val_acc"]) if "val_acc" in last else None,
                   seconds=np.nansum(curves.get("seconds", 0)))
    s = record["settings"]
    return dict(run=settings_path.parent.name, sweep=settings_path.parent.parent.name, stage=s["stage"],
                seed=s["seed"], key={k: v for k, v in s.items() if k not in ("stage", "seed")}, epochs=len(rows),
                curves=curves, results=results), None


def show(value):
    """A setting as text: None (the script's default) 'default', a list its words, a dict k=v."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "default"
    return ("default" if value is None else str(value)) if not isinstance(value, list) else " ".join(value) or "none"


def group(runs):
    """The settings (table rows) as {"key", "scratch", "runs"}: one per fine-tuning or scratch run's settings;
    a pretraining or probe run joins each pretrained one that agrees on the settings both have, else makes one."""
    rows = {}
    for run in sorted(runs, key=lambda r: ("finetune", "scratch", "pretrain", "linear_probe").index(r["stage"])):
        joins = [row for row in rows.values() if not row["scratch"] and run["stage"] in ("pretrain", "linear_probe")
                 and all(row["key"].get(k, v) == v for k, v in run["key"].items())]
        for row in joins or [rows.setdefault(json.dumps(run["key"], sort_keys=True),
                                             dict(key=run["key"], scratch=run["stage"] == "scratch", runs=[]))]:
            row["runs"].append(run)
    return list(rows.values())


def word(key):
    return WORDS.get(key, key.replace("_", " "))


def label(row, axes):
    return "from scratch" if row["scratch"] else ", ".join(f"{word(a)} {show(row['key'].get(a))}" for a in axes) \
        or "MAE pretraining"


def order(row, axes):
    """Sort key: from scratch last; numbers by value, words alphabetically."""
    return row["scratch"], [(v is None, v if isinstance(v, (int, float)) else 0, show(v))
                            for v in (row["key"].get(a) for a in axes)]


def values(row, stages, result, scale=1):
    return [r["results"][result] * scale for r in row["runs"] if r["stage"] in stages and r["results"][result]
            is not None]


def mean_std(numbers, digits, n):
    if not numbers:
        return ""
    std = f"{np.std(numbers, ddof=1):.{digits}f}" if len(numbers) > 1 else "-"
    return f"{np.mean(numbers):.{digits}f} ± {std}" + ("" if len(numbers) == n else f" (n={len(numbers)})")


def table(rows, heads, cells, columns):
    """Markdown: ``heads`` (``cells(row)`` fills them), n seeds, the ``columns`` as mean ± std, time per seed."""
    lines = [[*heads, "n", *(c[0] for c in columns), "time / seed"]]
    for row in rows:
        seeds = sorted({r["seed"] for r in row["runs"]})
        seconds = np.mean([sum(r["results"]["seconds"] for r in row["runs"] if r["seed"] == s) for s in seeds])
        time = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
            f"{seconds / 3600:.2f} h"
        lines.append([*cells(row), str(len(seeds)), *(mean_std(values(row, *c[1:4]), c[4], len(seeds))
                                                      for c in columns), time])
    return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], ["---"] * len(lines[0]), *lines[1:]])


def comparisons(rows, axis, varying):
    """The pretrained rows that differ only in ``axis``, grouped by the other differing settings; a group of one
    compares nothing and is left out (but with ``axis`` None, all rows are one group)."""
    others = [a for a in varying if a != axis]
    chosen = sorted((r for r in rows if not r["scratch"]), key=lambda r: order(r, [*others, axis]))
    groups = [(key, list(g)) for key, g in groupby(chosen, key=lambda r: label(r, others) if others else "")]
    return [(key, g) for key, g in groups if len(g) > 1 or axis is None]


def new_figure(width, panels=1):
    from matplotlib.figure import Figure  # late, and without pyplot: the tables need no plotting

    figure = Figure(figsize=(min(20, max(7, width)), 4.5), layout="tight")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def curve_figure(groups, curve, axes, title, path):
    """A CURVES metric against epoch, the mean over seeds with a ±std band: a line per row (labelled by its
    ``axes``), a panel per group. Returns ``path``, or None when no run logged the metric."""
    stages, column, scale, ylabel = CURVES[curve]

    def curves(row):  # each seed's, where it logged the metric
        return [r["curves"][column] * scale for r in row["runs"] if r["stage"] in stages and
                np.isfinite(r["curves"].get(column, np.nan)).any()]

    panels = [(key, [(row, curves(row)) for row in group if curves(row)]) for key, group in groups]
    panels = [(key, lines) for key, lines in panels if lines]
    if not panels:
        return None
    figure, grid = new_figure(5.5 * len(panels), len(panels))
    for ax, (key, lines) in zip(grid, panels):
        for row, seeds in lines:
            stacked = np.stack([c[:min(map(len, seeds))] for c in seeds])
            mean, epochs = stacked.mean(0), np.arange(1, stacked.shape[1] + 1)
            seen = np.isfinite(mean)  # k-NN accuracy is logged every few epochs only
            line, = ax.plot(epochs[seen], mean[seen], marker=None if seen.all() else "o",
                            label=f"{label(row, axes)} (n={len(seeds)})")
            if len(seeds) > 1:
                std = stacked.std(0, ddof=1)[seen]
                ax.fill_between(epochs[seen], mean[seen] - std, mean[seen] + std, color=line.get_color(), alpha=0.2)
        ax.set(title=key, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    figure.suptitle(f"{title} (mean ± std over seeds)")
    figure.savefig(path, dpi=120)
    return path


def spread_figure(rows, varying, columns, path):
    """Every setting's accuracies: each seed's value a dot, the mean with ±std error bars."""
    figure, (ax,) = new_figure(0.5 * len(rows) * len(columns) + 3)
    for i, (header, stages, result, scale, _) in enumerate(columns):
        x = np.arange(len(rows)) + (i - (len(columns) - 1) / 2) * 0.8 / len(columns)
        points = [values(row, stages, result, scale) for row in rows]
        for xi, p in zip(x, points):
            ax.scatter([xi] * len(p), p, s=12, color=f"C{i}", alpha=0.5)
        ax.errorbar(x, [np.mean(p) if p else np.nan for p in points], fmt="o", capsize=4, color=f"C{i}",
                    yerr=[np.std(p, ddof=1) if len(p) > 1 else 0 for p in points], label=header.replace(" (%)", ""))
    ax.set_xticks(range(len(rows)), [label(row, varying) for row in rows], rotation=20, ha="right")
    ax.set(ylabel="test accuracy (%)", title="Accuracy per setting: each seed (dots), mean ± std (bars)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    figure.savefig(path, dpi=120)
    return path


def summarize(rows, output_dir):
    """The markdown report; writes the figures into ``output_dir`` and links them from the report."""
    keys = dict.fromkeys([*WORDS, *sorted({k for row in rows for k in row["key"]})])
    varying = [k for k in keys if len({show(r["key"][k]) for r in rows if not r["scratch"] and k in r["key"]}) > 1]
    rows = sorted(rows, key=lambda r: order(r, [*varying, *keys]))
    columns = [c for c in COLUMNS if any(values(row, *c[1:3]) for row in rows)]
    fixed = ", ".join(f"{word(k)} {show(v)}" for k, v in next((r["key"] for r in rows if not r["scratch"]), {})
                      .items() if k not in varying and v not in (None, [], {}))
    scratch = any(r["scratch"] for r in rows)
    parts = ["# Ablation results", "", "Test accuracy of the final and the best epoch (picked on the test set, so "
             "it flatters: compare final); mean ± sample std over n seeds." + (f" Fixed: {fixed}." if fixed else ""),
             "", "## All settings" + (" vs from scratch" if scratch else ""), "",
             table(rows, ["setting"], lambda r: [label(r, varying)], columns), ""]
    figures = []

    def add(path, title):
        if path:
            figures.append(path)
            parts.extend([f"![{title}]({path.name})", ""])

    for axis in varying or [None]:
        groups, axes = comparisons(rows, axis, varying), [*(a for a in varying if a != axis), axis]
        if axis:  # the other differing settings first, so that rows differing only in ``axis`` sit together
            compared = table([r for _, g in groups for r in g], [word(a) for a in axes],
                             lambda r: [show(r["key"].get(a)) for a in axes], columns)
            parts += [f"## {word(axis).capitalize()}", "", compared, ""]
        for curve, (*_, ylabel) in CURVES.items():
            title = ylabel.split(" (")[0] + (f" by {word(axis)}" if axis else "")
            add(curve_figure(groups, curve, [axis] if axis else [], title[0].upper() + title[1:],
                             output_dir / (f"{curve}_{axis}.png" if axis else f"{curve}.png")), title)
    if scratch:
        parts += ["## Pretrained vs from scratch", ""]
        add(curve_figure([("", rows)], "finetune_acc", varying, "Fine-tuning: pretrained with MAE vs from scratch",
                         output_dir / "finetune_acc_vs_scratch.png"), "fine-tuning vs from scratch")
    if accuracy := [c for c in columns if c[3] == 100]:
        parts += ["## Accuracy per setting", ""]
        add(spread_figure(rows, varying, accuracy, output_dir / "accuracy_per_setting.png"), "accuracy per setting")
    return "\n".join(parts), figures


def folder(must_exist):
    """An argparse type: a folder that exists, or a path where one can be made (no file on the way)."""
    def check(text):
        path = Path(text)
        if (must_exist and not path.is_dir()) or any(p.exists() and not p.is_dir() for p in (path, *path.parents)):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected " +
                                             ("an existing folder" if must_exist else "a folder, not a file"))
        return path
    return check


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=folder(True), help="sweep folders, or any folders above them")
    parser.add_argument("--output_dir", type=folder(False), help="for results.md, runs.csv and the figures "
                                                                 "(default: the first folder)")
    args = parser.parse_args(argv)
    found = {p.resolve(): read_run(p) for f in args.folders for p in sorted(f.rglob("settings.json"))}  # each once
    runs, unfinished = [r for r, _ in found.values() if r], [why for _, why in found.values() if why]
    if not runs:
        parser.error(f"no finished runs with a settings.json (written by sweep.py) under "
                     f"{', '.join(map(str, args.folders))}")
    output_dir = args.output_dir or args.folders[0]
    output_dir.mkdir(parents=True, exist_ok=True)
    report, figures = summarize(group(runs), output_dir)
    report += "\nLeft out, not finished: " + "; ".join(unfinished) + "\n" if unfinished else ""
    (output_dir / "results.md").write_text(report + "\n")
    keys = sorted({k for run in runs for k in run["key"]})
    with open(output_dir / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["run", "sweep", "stage", "seed", *keys, "epochs", *runs[0]["results"]])
        writer.writeheader()
        writer.writerows({**{k: run[k] for k in ("run", "sweep", "stage", "seed", "epochs")},
                          **{k: show(run["key"][k]) for k in keys if k in run["key"]},
                          **{k: "" if v is None else f"{v:.6g}" for k, v in run["results"].items()}}
                         for run in sorted(runs, key=lambda r: (r["sweep"], r["run"])))
    print(report)
    print(f"wrote {output_dir / 'results.md'}, {output_dir / 'runs.csv'} and {len(figures)} figures")


if __name__ == "__main__":
    main()
