"""Tables and figures of ablation studies (sweep.py's run folders): each setting's mean ± sample std over its seeds.

    python summarize.py logs/cifar10/sweep_depth                                  # writes into that folder
    python summarize.py logs/cifar10/sweep_a logs/cifar10/sweep_b --output_dir results/ablations

A setting (a table row) is a fine-tuning or from-scratch run's, joined by the pretraining and probe runs of the same
settings. Writes results.md (also printed), runs.csv (a row per run), budget.csv (a row per budgeted arm and seed)
and figures. A run's value is the last it logged: a blank cell (not measured) gives none; a non-finite one is shown
as such, never averaged, and its run named. Unfinished runs are named and left out.
"""
import json
import math
from pathlib import Path
from statistics import mean, stdev

import numpy as np

import utils

WORDS = {"decoder_depth": "decoder depth", "mask_strategy": "mask strategy", "mask_ratio": "mask ratio",
         "pretrain_epochs": "pretraining epochs", "finetune_epochs": "fine-tuning epochs",
         "time_budget": "time budget (min)", "labels_per_class": "labels per class"}  # known ablations first
RESULTS = ("loss", "val_acc", "knn_acc", "probe_acc", "seconds", "wall_seconds")  # in runs.csv
TUNED, PRE = ("finetune", "scratch"), ("pretrain",)
# Table columns: header, the stages whose runs give it, the run's result (accuracies shown in %). The final epoch's
# accuracy, not the best: picked on the test set, the best would flatter.
COLUMNS = [("final acc (%)", TUNED, "val_acc"), ("linear probe (%)", ("linear_probe",), "val_acc"),
           ("k-NN (%)", PRE, "knn_acc"), ("pretraining probe (%)", PRE, "probe_acc"), ("pretrain loss", PRE, "loss")]
CURVES = {"pretrain_loss": (PRE, "loss", "pretraining loss (MSE on masked patches)"),
          "knn_acc": (PRE, "knn_acc", "k-NN test accuracy during pretraining (%)"),
          "finetune_acc": (TUNED, "val_acc", "fine-tuning test accuracy (%)")}
# Final accuracy against a setting, where fine-tuned runs have it: the section's heading and figure.
AGAINST = {"time_budget": ("Accuracy against the time budget (equal compute)", "accuracy_vs_budget.png"),
           "labels_per_class": ("Accuracy against labels per class", "accuracy_vs_labels.png")}
word = lambda key: WORDS.get(key, key.replace("_", " "))
read_json = lambda path: json.loads(path.read_text()) if path.is_file() else {}
# The epochs that end a run, None while unknown: sweep.py's settings.json has them, or budget.json at the end.
length = lambda run_dir: (read_json(run_dir / "settings.json").get("total_epochs")
                          or read_json(run_dir / "budget.json").get("total_epoch"))


def read_run(path):  # (the run, None) or (None, why it is left out: unfinished, unreadable), from its settings.json
    run_dir = path.parent
    try:
        rows, total = utils.read_rows(run_dir / "metrics.csv"), length(run_dir)
        budget = read_json(run_dir / "budget.json")
        if not total or len(rows) < total:
            return None, f"{run_dir} (not finished: {len(rows)}/{total or '?'} epochs)"
        key = dict(json.loads(path.read_text())["settings"])  # the settings less stage and seed
        measured = {k: [float(row[k]) for row in rows if row[k]] for k in rows[0] if k not in ("epoch", "subset")}
        results = {k: v[-1] for k, v in measured.items() if v and k in RESULTS}  # the last logged, finite or not
        results["seconds"] = sum(measured.get("seconds", []))
        if "wall_seconds" in budget:  # process start to exit, all its processes
            results["wall_seconds"] = sum(budget["wall_seconds"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, f"{run_dir} (unreadable: {type(error).__name__}: {error})"
    return dict(run=run_dir.name, sweep=run_dir.parent.name, stage=key.pop("stage"), seed=key.pop("seed"), key=key,
                epochs=budget.get("epochs", len(rows)), budget=budget, results=results,
                curves={k: np.array([float(row[k] or "nan") for row in rows]) for k, v in measured.items() if v},
                non_finite=" ".join(f"{k}={v}" for k, v in results.items() if not math.isfinite(v))), None


def show(value):  # a setting as text: None (the script's or preset's default) 'default', a list its words, a dict k=v
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "default"
    return " ".join(value) or "none" if isinstance(value, list) else "default" if value is None else str(value)


label = lambda row, axes: ", ".join(["from scratch"] * row["scratch"] + [
    f"{word(a)} {show(row['key'][a])}" for a in axes if a in row["key"]]) or "MAE + fine-tuning"
# ``name`` (its result, or its curve) of each of ``row``'s runs of these ``stages`` that logged it, accuracies in %
values = lambda row, stages, name, kind="results": [r[kind][name] * (1 if name == "loss" else 100) for r in row["runs"]
                                                    if r["stage"] in stages and name in r[kind]]


def spread(v, digits=2):  # 'mean ± sample std' ('-' for one); non-finite shown, never averaged: 'nan in 1 of 2'
    if bad := [x for x in v if not math.isfinite(x)]:
        return f"{'/'.join(sorted({str(x) for x in bad}))} in {len(bad)} of {len(v)}"
    return f"{mean(v):.{digits}f} ± " + (f"{stdev(v):.{digits}f}" if len(v) > 1 else "-")


def table(rows, heads, cells, columns):  # heads (cells(row) fills them), n seeds, columns' mean ± std, time per seed
    lines = []
    for row in rows:
        seeds = sorted({r["seed"] for r in row["runs"]})
        line = [*cells(row), str(len(seeds))]
        for _, stages, result in columns:
            v = values(row, stages, result)
            line.append(spread(v, 4 if result == "loss" else 2) + f" (n={len(v)})" * (len(v) < len(seeds)) if v else "")
        s = mean(sum(r["results"]["seconds"] for r in row["runs"] if r["seed"] == seed) for seed in seeds)
        lines.append([*line, f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"])
    return utils.markdown([*heads, "n", *(c[0] for c in columns), "time / seed"], lines)


def save(figure, path, title):  # the figure, and the report's link to it
    utils.atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120), "figure")
    return [f"![{title}]({path.name})", ""]


def curve_figure(groups, curve, axes, title, path):
    """A CURVES metric against epoch, mean ± std over seeds: a line per row, a panel per group ([]: none logged)."""
    from matplotlib.figure import Figure  # late, and without pyplot: the tables need no plotting

    stages, column, ylabel = CURVES[curve]
    panels = [(key, lines) for key, group in groups
              if (lines := [(row, seeds) for row in group if (seeds := values(row, stages, column, "curves"))])]
    if not panels:
        return []
    figure = Figure(figsize=(min(20, max(7, 5.5 * len(panels))), 4.5), layout="tight")
    for ax, (key, lines) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for row, seeds in lines:
            stacked = np.stack([c[:min(map(len, seeds))] for c in seeds])
            mean_, epochs = stacked.mean(0), np.arange(1, stacked.shape[1] + 1)
            seen = np.isfinite(mean_)  # k-NN accuracy is logged every few epochs only
            line, = ax.plot(epochs[seen], mean_[seen], marker=None if seen.all() else "o",
                            label=f"{label(row, axes)} (n={len(seeds)})")
            if len(seeds) > 1:
                std = stacked.std(0, ddof=1)[seen]
                ax.fill_between(epochs[seen], mean_[seen] - std, mean_[seen] + std, color=line.get_color(), alpha=0.2)
        ax.set(title=key, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    figure.suptitle(f"{title[0].upper()}{title[1:]} (mean ± std over seeds)")
    return save(figure, path, title)


def dots_figure(series, path, title, ticks, xlabel="", log=False):
    """Accuracies (%): each value a dot, at each x the mean ± std, a line per series where x is a number."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(min(20, max(7, 0.5 * len(ticks) * len(series) + 3)), 5), layout="constrained")
    ax = figure.subplots()
    for i, (name, points) in enumerate(series.items()):
        ax.scatter([x for x, v in points for _ in v], [y for _, v in points for y in v], s=12, color=f"C{i}", alpha=0.5)
        ax.errorbar([x for x, _ in points], [np.mean(v) if v else np.nan for _, v in points], capsize=4, marker="o",
                    yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in points], color=f"C{i}", label=name,
                    linestyle="-" if xlabel else "none")
    ax.set_xscale("log" if log else "linear")  # before the ticks, which it would reset
    ax.set_xticks(*zip(*ticks), rotation=0 if xlabel else 20, ha="center" if xlabel else "right", minor=False)
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    figure.legend(fontsize="small", loc="outside lower center")  # never over a point, however long the names
    return save(figure, path, title)


def against(rows, axis, varying, output_dir):  # both arms' final test accuracy against ``axis``: a table and a figure
    others, (title, figure) = [a for a in varying if a != axis], AGAINST[axis]
    rows, series = sorted((r for r in rows if r["key"].get(axis) is not None), key=lambda r: r["key"][axis]), {}
    for row in rows:
        series.setdefault(label(row, others), []).append((row["key"][axis], values(row, TUNED, "val_acc")))
    cells = lambda r: [f"{r['key'][axis]:g}", label(r, others)]
    ticks = [(x, f"{x:g}") for x in dict.fromkeys(r["key"][axis] for r in rows)]
    return [f"## {title}", "", table(rows, [word(axis), "setting"], cells, COLUMNS[:1]), *dots_figure(
        series, output_dir / figure, title.split(" (")[0] + ": mean ± std over seeds", ticks, word(axis),
        log=axis == "labels_per_class")]


def budget_rows(rows):  # budget.csv: a row per arm, budget, seed; MAE's wall time: pretraining's + fine-tuning's
    out = []
    for row in rows:
        for run in (r for r in row["runs"] if r["stage"] in TUNED and r["key"].get("time_budget")):
            pre = [r for r in row["runs"] if r["stage"] == "pretrain" and r["seed"] == run["seed"]][:1]
            out.append(dict(arm="scratch" if row["scratch"] else "mae", budget_minutes=run["key"]["time_budget"],
                            pretrain_share=run["key"].get("pretrain_share") or 0.0, seed=run["seed"],
                            labels_per_class=run["key"].get("labels_per_class") or "",
                            test_acc=round(100 * run["results"].get("val_acc", math.nan), 2),
                            pretrain_epochs=pre[0]["epochs"] if pre else 0, finetune_epochs=run["epochs"],
                            wall_minutes=round(sum(r["results"].get("wall_seconds", math.nan) for r in [*pre, run])
                                               / 60, 2), machine=run["budget"].get("machine", ""),
                            date=run["budget"].get("date", "")))
    return sorted(out, key=lambda r: (r["budget_minutes"], r["labels_per_class"] or 0, r["arm"], r["seed"]))


def summarize(runs, output_dir):  # the markdown report; its figures (and budget.csv) go into ``output_dir``
    # A row (setting) is a fine-tuning or scratch run's settings; a pretraining or probe run joins each pretrained
    # row that agrees on the settings both have, else makes one.
    rows = {}
    for run in sorted(runs, key=lambda r: ("finetune", "scratch", "pretrain", "linear_probe").index(r["stage"])):
        joins = [row for row in rows.values() if not row["scratch"] and run["stage"] in ("pretrain", "linear_probe")
                 and all(row["key"].get(k, v) == v for k, v in run["key"].items())]
        for row in joins or [rows.setdefault(json.dumps(run["key"], sort_keys=True),
                                             dict(key=run["key"], scratch=run["stage"] == "scratch", runs=[]))]:
            row["runs"].append(run)
    # Sorted from scratch last; numbers by value, words alphabetically.
    order = lambda row, axes: (row["scratch"], [(v is None, v if isinstance(v, (int, float)) else 0, show(v))
                                                for v in (row["key"].get(a) for a in axes)])
    keys = dict.fromkeys([*WORDS, *sorted({k for row in rows.values() for k in row["key"]})])
    varying = [k for k in keys if len({show(r["key"][k]) for r in rows.values() if k in r["key"]}) > 1]
    rows = sorted(rows.values(), key=lambda r: order(r, [*varying, *keys]))
    columns = [c for c in COLUMNS if any(values(row, *c[1:]) for row in rows)]
    fixed = ", ".join(f"{word(k)} {show(v)}" for k, v in rows[0]["key"].items()
                      if k not in varying and show(v) not in ("default", "none"))
    scratch = any(r["scratch"] for r in rows)
    parts = ["# Ablation results", "", "Final test accuracy; mean ± sample std over n seeds." +
             (f" Fixed: {fixed}." if fixed else ""), "", "## All settings" + " vs from scratch" * scratch, "",
             table(rows, ["setting"], lambda r: [label(r, varying)], columns)]
    for axis in varying or [None]:
        # The pretrained rows that differ only in ``axis`` side by side, in groups by the other differing settings;
        # a group of one compares nothing (but with no ``axis``, all rows are one group).
        others, groups = [a for a in varying if a != axis], {}
        for row in sorted((r for r in rows if not r["scratch"]), key=lambda r: order(r, [*others, axis])):
            groups.setdefault(label(row, others) if others else "", []).append(row)
        groups = [(key, group) for key, group in groups.items() if len(group) > 1 or not axis]
        if axis and groups and axis not in AGAINST:  # the table (a setting of AGAINST has its own, with both arms)
            axes = [*others, axis]
            parts += [f"## {word(axis).capitalize()}", "", table([r for _, g in groups for r in g], [
                word(a) for a in axes], lambda r: [show(r["key"].get(a)) for a in axes], columns)]  # noqa: B023
        for curve, (*_, ylabel) in CURVES.items():
            title = ylabel.split(" (")[0] + (f" by {word(axis)}" if axis else "")
            parts += curve_figure(groups, curve, [axis] if axis else [], title,
                                  output_dir / (f"{curve}_{axis}.png" if axis else f"{curve}.png"))
    if scratch:
        parts += ["## Pretrained vs from scratch", "", *curve_figure(
            [("", rows)], "finetune_acc", varying, "fine-tuning: pretrained with MAE vs from scratch",
            output_dir / "finetune_acc_vs_scratch.png")]
    if accuracy := [c for c in columns if c[2] != "loss"]:  # each column a series, beside the others
        parts += ["## Accuracy per setting", "", *dots_figure({header.replace(" (%)", ""): [
            (i + (j - (len(accuracy) - 1) / 2) * 0.8 / len(accuracy), values(row, stages, result))
            for i, row in enumerate(rows)] for j, (header, stages, result) in enumerate(accuracy)},
            output_dir / "accuracy_per_setting.png", "Accuracy per setting: each seed (dots), mean ± std (bars)",
            list(enumerate(label(row, varying) for row in rows)))]
    for axis in AGAINST:
        if any(r["key"].get(axis) is not None for r in runs if r["stage"] in TUNED):
            parts += against(rows, axis, varying, output_dir)
    if budget := budget_rows(rows):
        utils.write_csv(output_dir / "budget.csv", list(budget[0]), budget)
    return "\n".join(parts)


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders, or any folders above them")
    parser.add_argument("--output_dir", type=Path, help="for results.md, runs.csv, figures (default: the first folder)")
    args = parser.parse_args(argv)
    if missing := [str(f) for f in args.folders if not f.is_dir()]:
        parser.error(f"argument folders: not a folder: {', '.join(missing)}")
    output_dir = args.output_dir or args.folders[0]
    utils.check_writable_folder(parser, "--output_dir", output_dir)
    found = {p.resolve(): read_run(p) for f in args.folders for p in sorted(f.rglob("settings.json"))}  # each once
    runs, unfinished = [r for r, _ in found.values() if r], [why for _, why in found.values() if why]
    if not runs:
        parser.error(f"no finished runs with a settings.json (from sweep.py) under {', '.join(map(str, args.folders))}")
    report = summarize(runs, output_dir)
    report += "".join(f"\n{head}: " + "; ".join(items) + "\n" for head, items in (
        ("Non-finite results (shown as such, never averaged)", [f"{r['run']} ({r['non_finite']})" for r in runs
                                                               if r["non_finite"]]), ("Left out", unfinished)) if items)
    utils.write_text(output_dir / "results.md", report + "\n")
    keys = sorted({k for run in runs for k in run["key"]})
    utils.write_csv(output_dir / "runs.csv", ["run", "sweep", "stage", "seed", *keys, "epochs", *RESULTS, "non_finite"],
                    [{**{k: run[k] for k in ("run", "sweep", "stage", "seed", "epochs", "non_finite")},
                      **{k: show(run["key"][k]) for k in keys if k in run["key"]},
                      **{k: f"{v:.6g}" for k, v in run["results"].items()}}
                     for run in sorted(runs, key=lambda r: (r["sweep"], r["run"]))])
    print(report)
    print(f"wrote {output_dir / 'results.md'}, {output_dir / 'runs.csv'} and {report.count('![')} figures")


if __name__ == "__main__":
    utils.run_cli(main)
