"""Tables and figures of ablation studies: each setting's results as mean ± std over its seeds. Needs numpy and
matplotlib only (no torch), so it runs wherever the logs are copied to.

    python summarize.py logs/cifar10/sweep_depth                                  # writes into that folder
    python summarize.py logs/cifar10/sweep_depth logs/cifar10/sweep_mask --output_dir results/ablations

Reads the run folders below the given folders (settings.json from sweep.py, metrics.csv; unfinished runs are named
and left out). A setting, a table row, is a fine-tuning or from-scratch run's settings, joined by the pretraining
and linear-probe runs of the same pretraining settings and seed. Writes runs.csv (a row per run) and results.md
(also printed): a table of all settings, then one per setting that differs, as mean ± sample std over the seeds
('-' for one seed, "(n=k)" where fewer have it); PNGs: each curve against epoch per differing setting (mean, ±std
band), fine-tuning vs from scratch, and every setting's accuracies (each seed a dot, mean ± std bars).
"""
import csv
import json
from functools import partial
from pathlib import Path
from statistics import mean, stdev

import numpy as np

import utils

WORDS = {"decoder_depth": "decoder depth", "mask_strategy": "mask strategy", "mask_ratio": "mask ratio",
         "pretrain_epochs": "pretraining epochs", "finetune_epochs": "fine-tuning epochs"}  # known ablations first
RESULTS = ("loss", "val_acc", "knn_acc", "probe_acc", "best_val_acc", "seconds", "wall_seconds")  # in runs.csv
TUNED, PRE = ("finetune", "scratch"), ("pretrain",)
# Table columns: header, the stages whose runs give it, the run's result (accuracies shown in %).
COLUMNS = [("final acc (%)", TUNED, "val_acc"), ("best acc (%)", TUNED, "best_val_acc"),
           ("linear probe (%)", ("linear_probe",), "val_acc"), ("k-NN (%)", PRE, "knn_acc"),
           ("pretraining probe (%)", PRE, "probe_acc"), ("pretrain loss", PRE, "loss")]
CURVES = {"pretrain_loss": (PRE, "loss", "pretraining loss (MSE on masked patches)"),
          "knn_acc": (PRE, "knn_acc", "k-NN test accuracy during pretraining (%)"),
          "finetune_acc": (TUNED, "val_acc", "fine-tuning test accuracy (%)")}


def read_run(path):
    """(the run, or None and why it is left out: unfinished or unreadable) from a settings.json and the
    metrics.csv beside it."""
    try:
        return parse_run(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, f"{path.parent} (unreadable: {type(error).__name__}: {error})"


def parse_run(path):
    record, metrics = json.loads(path.read_text()), path.with_name("metrics.csv")
    plan = read_plan(path.parent)
    if record.get("total_epochs") is None and plan:  # a --time_budget run: the epochs it planned
        record["total_epochs"] = plan.get("total_epoch")
    if not isinstance(record.get("total_epochs"), int) or not isinstance(record.get("settings"), dict):
        if isinstance(record.get("settings"), dict) and record["settings"].get("time_budget"):
            return None, f"{path.parent} (not finished: it has not planned its budget yet)"
        raise ValueError("settings.json has no total_epochs and settings")
    rows = list(csv.DictReader(metrics.read_text().splitlines())) if metrics.is_file() else []
    if len(rows) < record["total_epochs"]:
        return None, f"{path.parent} (not finished: {len(rows)}/{record['total_epochs']} epochs)"
    curves = {k: np.array([float(row[k] or "nan") for row in rows]) for k in rows[0] if k != "epoch"}
    curves = {k: c for k, c in curves.items() if np.isfinite(c).any()}  # the columns it logged
    results = {k: c[np.isfinite(c)][-1] for k, c in curves.items() if k in RESULTS}  # the last logged value
    results.update(seconds=np.nansum(curves.get("seconds", 0)), **(
        {"best_val_acc": np.nanmax(curves["val_acc"])} if "val_acc" in curves else {}))
    if plan.get("wall_seconds"):  # a budgeted run: process start to exit, all its processes
        results["wall_seconds"] = sum(plan["wall_seconds"])
    key = dict(record["settings"])  # the settings, less the stage and seed
    return dict(run=path.parent.name, sweep=path.parent.parent.name, stage=key.pop("stage"), seed=key.pop("seed"),
                key=key, epochs=trained_epochs(len(rows), plan), curves=curves, results=results, plan=plan), None


def trained_epochs(rows, plan):
    """The epochs a run trained: its metrics rows, a budget's partial last epoch counted by its share of steps
    (budget.Plan.epochs, from its budget.json: this module does not import torch)."""
    last, per_epoch = plan.get("last_epoch_steps"), plan.get("steps_per_epoch")
    if not last or not per_epoch:
        return rows
    return round(rows - 1 + last / per_epoch, 2)


def read_plan(run_dir):
    """budget.json of a --time_budget run (its plan, machine and wall time), or {}."""
    path = Path(run_dir) / "budget.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def show(value):
    """A setting as text: None (the script's default) 'default', a list its words, a dict k=v."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "default"
    return " ".join(value) or "none" if isinstance(value, list) else "default" if value is None else str(value)


def word(key):
    return WORDS.get(key, key.replace("_", " "))


def label(row, axes):
    return "from scratch" if row["scratch"] else ", ".join(f"{word(a)} {show(row['key'].get(a))}" for a in axes) \
        or "MAE pretraining"


def values(row, stages, name, kind="results"):
    """``name`` of each of ``row``'s runs of these ``stages`` that logged it, accuracies in %: its result, or with
    ``kind="curves"`` its curve."""
    return [r[kind][name] * (1 if name == "loss" else 100) for r in row["runs"] if r["stage"] in stages
            and name in r[kind]]


def table(rows, heads, cells, columns):
    """Markdown: ``heads`` (``cells(row)`` fills them), n seeds, the ``columns`` as mean ± std, time per seed."""
    lines = [[*heads, "n", *(c[0] for c in columns), "time / seed"], ["---"] * (len(heads) + len(columns) + 2)]
    for row in rows:
        seeds = sorted({r["seed"] for r in row["runs"]})
        cells_ = [*cells(row), str(len(seeds))]
        for _, stages, result in columns:
            v, digits = values(row, stages, result), 4 if result == "loss" else 2
            std = f"{stdev(v):.{digits}f}" if len(v) > 1 else "-"
            cells_.append(f"{mean(v):.{digits}f} ± {std}" + (f" (n={len(v)})" if len(v) < len(seeds) else "") if v
                          else "")
        s = mean(sum(r["results"]["seconds"] for r in row["runs"] if r["seed"] == seed) for seed in seeds)
        lines.append([*cells_, f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"])
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)


def curve_figure(groups, curve, axes, title, path):
    """A CURVES metric against epoch, the mean over seeds with a ±std band: a line per row (labelled by its
    ``axes``), a panel per group. Returns the report's link to it, or [] when no run logged the metric."""
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
    utils.atomic_write(path, partial(figure.savefig, dpi=120), "figure")
    return [f"![{title}]({path.name})", ""]


def spread_figure(rows, varying, columns, path):
    """Every setting's accuracies: each seed's value a dot, the mean with ±std error bars."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(min(20, max(7, 0.5 * len(rows) * len(columns) + 3)), 4.5), layout="tight")
    ax = figure.subplots()
    for i, (header, stages, result) in enumerate(columns):
        x = np.arange(len(rows)) + (i - (len(columns) - 1) / 2) * 0.8 / len(columns)
        points = [values(row, stages, result) for row in rows]
        ax.scatter([xi for xi, p in zip(x, points) for _ in p], sum(points, []), s=12, color=f"C{i}", alpha=0.5)
        ax.errorbar(x, [mean(p) if p else np.nan for p in points], fmt="o", capsize=4, color=f"C{i}",
                    yerr=[stdev(p) if len(p) > 1 else 0 for p in points], label=header.replace(" (%)", ""))
    ax.set_xticks(range(len(rows)), [label(row, varying) for row in rows], rotation=20, ha="right")
    ax.set(ylabel="test accuracy (%)", title="Accuracy per setting: each seed (dots), mean ± std (bars)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    utils.atomic_write(path, partial(figure.savefig, dpi=120), "figure")
    return ["## Accuracy per setting", "", f"![accuracy per setting]({path.name})", ""]


def order(row, axes):
    """A sort key: from scratch last; numbers by value, words alphabetically."""
    return row["scratch"], [(v is None, v if isinstance(v, (int, float)) else 0, show(v))
                            for v in (row["key"].get(a) for a in axes)]


def summarize(runs, output_dir):
    """The markdown report; writes the figures into ``output_dir`` and links them from the report."""
    # A row (setting) is a fine-tuning or scratch run's settings; a pretraining or probe run joins each pretrained
    # row that agrees on the settings both have, else makes one.
    rows = {}
    for run in sorted(runs, key=lambda r: ("finetune", "scratch", "pretrain", "linear_probe").index(r["stage"])):
        joins = [row for row in rows.values() if not row["scratch"] and run["stage"] in ("pretrain", "linear_probe")
                 and all(row["key"].get(k, v) == v for k, v in run["key"].items())]
        for row in joins or [rows.setdefault(json.dumps(run["key"], sort_keys=True),
                                             dict(key=run["key"], scratch=run["stage"] == "scratch", runs=[]))]:
            row["runs"].append(run)
    keys = dict.fromkeys([*WORDS, *sorted({k for row in rows.values() for k in row["key"]})])
    varying = [k for k in keys  # the settings that differ between the pretrained rows
               if len({show(r["key"][k]) for r in rows.values() if not r["scratch"] and k in r["key"]}) > 1]
    rows = sorted(rows.values(), key=lambda r: order(r, [*varying, *keys]))
    pretrained = [r for r in rows if not r["scratch"]]
    columns = [c for c in COLUMNS if any(values(row, *c[1:]) for row in rows)]
    fixed = ", ".join(f"{word(k)} {show(v)}" for k, v in (pretrained[0]["key"] if pretrained else {}).items()
                      if k not in varying and v not in (None, [], {}))
    scratch = len(pretrained) < len(rows)
    parts = ["# Ablation results", "", "Test accuracy of the final and the best epoch (picked on the test set, so "
             "it flatters: compare final); mean ± sample std over n seeds." + (f" Fixed: {fixed}." if fixed else ""),
             "", "## All settings" + (" vs from scratch" if scratch else ""), "",
             table(rows, ["setting"], lambda r: [label(r, varying)], columns), ""]
    for axis in varying or [None]:
        # The rows that differ only in ``axis`` side by side, in groups by the other differing settings; a group of
        # one compares nothing (but with no ``axis``, all rows are one group).
        others, groups = [a for a in varying if a != axis], {}
        for row in sorted(pretrained, key=lambda r: order(r, [*others, axis])):
            groups.setdefault(label(row, others) if others else "", []).append(row)
        groups = [(key, group) for key, group in groups.items() if len(group) > 1 or not axis]
        if axis:
            axes = [*others, axis]
            # table() calls the row function at once, while ``axes`` still holds this axis's columns.
            parts += [f"## {word(axis).capitalize()}", "", table([r for _, g in groups for r in g], [
                word(a) for a in axes], lambda r: [show(r["key"].get(a)) for a in axes], columns), ""]  # noqa: B023
        for curve, (*_, ylabel) in CURVES.items():
            title = ylabel.split(" (")[0] + (f" by {word(axis)}" if axis else "")
            parts += curve_figure(groups, curve, [axis] if axis else [], title,
                                  output_dir / (f"{curve}_{axis}.png" if axis else f"{curve}.png"))
    if scratch:
        parts += ["## Pretrained vs from scratch", "", *curve_figure(
            [("", rows)], "finetune_acc", varying, "fine-tuning: pretrained with MAE vs from scratch",
            output_dir / "finetune_acc_vs_scratch.png")]
    if accuracy := [c for c in columns if c[2] != "loss"]:
        parts += spread_figure(rows, varying, accuracy, output_dir / "accuracy_per_setting.png")
    return "\n".join(parts)


BUDGET_FIELDS = ["arm", "budget_minutes", "pretrain_share", "seed", "test_acc", "pretrain_epochs", "finetune_epochs",
                 "wall_minutes", "machine", "date"]


def budget_rows(runs):
    """Equal-compute comparisons (sweep.py --time_budget): one row per arm, budget and seed. The MAE arm's wall
    time is its pretraining's plus its fine-tuning's; from scratch, its one run's."""
    rows = []
    for run in runs:
        if run["stage"] not in TUNED or "time_budget" not in run["key"]:
            continue
        pretraining = [r for r in runs if r["stage"] == "pretrain" and r["seed"] == run["seed"] and all(
            run["key"].get(k) == v for k, v in r["key"].items())] if run["stage"] == "finetune" else []
        parts = [*pretraining[:1], run]
        rows.append({"arm": "mae" if run["stage"] == "finetune" else "scratch",
                     "budget_minutes": run["key"]["time_budget"],
                     "pretrain_share": run["key"].get("pretrain_share", 0.0), "seed": run["seed"],
                     "test_acc": round(100 * run["results"]["val_acc"], 2),
                     "pretrain_epochs": pretraining[0]["epochs"] if pretraining else 0,
                     "finetune_epochs": run["epochs"],
                     "wall_minutes": round(sum(r["results"].get("wall_seconds", float("nan")) for r in parts) / 60, 2),
                     "machine": run["plan"].get("machine", ""), "date": run["plan"].get("date", "")})
    return sorted(rows, key=lambda r: (r["budget_minutes"], r["arm"], r["seed"]))


def budget_section(rows, output_dir):
    """Markdown: accuracy against the time budget, MAE (pretraining + fine-tuning) vs from scratch, and a figure."""
    groups = {}
    for row in rows:
        groups.setdefault((row["budget_minutes"], row["arm"]), []).append(row)
    lines = ["## Accuracy against the time budget (equal compute)", "",
             "| budget (min) | arm | n | final test acc (%) | per seed | epochs (pretrain + fine-tune) | wall (min) |",
             "|---|---|---|---|---|---|---|"]
    for (minutes, arm), group in sorted(groups.items()):
        acc = [r["test_acc"] for r in group]
        spread = f" ± {stdev(acc):.2f}" if len(acc) > 1 else ""
        epochs = ", ".join(f"{r['pretrain_epochs']} + {r['finetune_epochs']}" if arm == "mae" else
                           f"{r['finetune_epochs']}" for r in group)
        walls = ", ".join(f"{r['wall_minutes']:.1f}" for r in group)
        lines.append(f"| {minutes:g} | {'MAE + fine-tuning' if arm == 'mae' else 'from scratch'} | {len(group)} | "
                     f"{mean(acc):.2f}{spread} | {', '.join(f'{a:.2f}' for a in acc)} | {epochs} | {walls} |")
    figure = output_dir / "accuracy_vs_budget.png"
    budget_figure(groups, figure)
    return [*lines, "", "Each arm gets the same minutes, counted from each process's start to its exit: MAE "
            "pretrains for the pretraining share of them and fine-tunes for the rest; from scratch fine-tunes for "
            "all of them. Wall is what the processes took, per seed.", "",
            f"![accuracy against the time budget]({figure.name})", ""]


def budget_figure(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, name in (("mae", "MAE + fine-tuning"), ("scratch", "from scratch")):
        points = sorted((m, [r["test_acc"] for r in g]) for (m, a), g in groups.items() if a == arm)
        if points:
            ax.errorbar([m for m, _ in points], [mean(v) for _, v in points], marker="o", capsize=3, label=name,
                        yerr=[stdev(v) if len(v) > 1 else 0 for _, v in points])
    ax.set_xlabel("minutes per arm")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    utils.atomic_write(path, partial(fig.savefig, dpi=120), "figure")
    plt.close(fig)


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
    output_dir.mkdir(parents=True, exist_ok=True)
    report = summarize(runs, output_dir)
    if budget := budget_rows(runs):
        report += "\n" + "\n".join(budget_section(budget, output_dir))
        utils.write_csv(output_dir / "budget.csv", BUDGET_FIELDS, budget)
    report += "\nLeft out: " + "; ".join(unfinished) + "\n" if unfinished else ""
    utils.write_text(output_dir / "results.md", report + "\n")
    keys = sorted({k for run in runs for k in run["key"]})
    utils.write_csv(output_dir / "runs.csv", ["run", "sweep", "stage", "seed", *keys, "epochs", *RESULTS],
                     [{**{k: run[k] for k in ("run", "sweep", "stage", "seed", "epochs")},
                       **{k: show(run["key"][k]) for k in keys if k in run["key"]},
                       **{k: f"{v:.6g}" for k, v in run["results"].items()}}
                      for run in sorted(runs, key=lambda r: (r["sweep"], r["run"]))])
    print(report)
    print(f"wrote {output_dir / 'results.md'}, {output_dir / 'runs.csv'} and {report.count('![')} figures")


if __name__ == "__main__":
    utils.run_cli(main)
