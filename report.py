"""The pages that are mostly tables, built from the committed CSVs under results/ so that they cannot drift from
them: docs/results.md (every accuracy table), docs/speed.md (GPU and CPU speed), the results-at-a-glance figure
docs/glance.png and the results-at-a-glance block of README.md (between its two `glance` markers). Needs no torch.

    python report.py              # rebuild them after a CSV under results/ changed
    python report.py --check      # rebuild nothing; exit 1 naming each page that differs from what the CSVs give

The glance table and figure show accuracy against training minutes, MAE against from scratch, per machine. They
come from the time-budget study when a CSV under results/budget/ exists (a row per run with at least arm (mae or
scratch), budget_minutes, seed, machine and the test accuracy as test_acc, val_acc or accuracy, a fraction or a
percentage), else from the CPU study (results/cpu_study/runs.csv) and the GPU epoch times (results/epochs.csv).
Every number in a table is a CSV value, or a mean, a spread or a sum of CSV values; the prose around the tables
(commands, machines, caveats, the paper's numbers) is written here. summarize.py builds a study's tables from its
run folders; this file builds the pages from what is committed.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
GLANCE_START = "<!-- glance: built by `python report.py` from results/; edit report.py, not this block -->"
GLANCE_END = "<!-- /glance -->"
PAGES = ("docs/results.md", "docs/speed.md")
FIGURE = "docs/glance.png"
HEADER = ("Built by `python report.py` from the CSV files under [results/]({results}) (edit report.py, not this "
          "page). Every number in a table is a value of the CSV named above it, or a mean ± sample standard "
          "deviation over seeds, a sum or a ratio of such values.")
# The CPU study: what its rows do not say (runs.csv holds the settings and results of each run).
CPU_STUDY = dict(
    machine="2 cores of an AMD EPYC (Zen 1: AVX2, no native bf16), 24 GiB, CPU only", torch="2.14.1",
    date="2026-11-25 and -26", shared_seeds={"0"},  # seed 0 ran beside development on the same two cores
    data="the CIFAR-10 images as JPEG files (`--data_dir`), all 50,000 / 10,000; JPEG costs a little accuracy",
    command="""\
    python sweep.py --name main --decoder_depth 2 --seeds 0 1 --scratch --no_linear_probe --data_dir DATA --device cpu \\
      --patch_size 4 --emb_dim 96 --encoder_depth 4 --encoder_heads 3 --decoder_heads 2 --pretrain_epochs 4 \\
      --finetune_epochs 2 --pretrain_batch_size 256 --finetune_batch_size 128 \\
      --pretrain_args="--decoder_emb_dim 64 --base_learning_rate 1.5e-3 --warmup_epoch 2 --knn_every 4 --probe_epochs 10" \\
      --finetune_args="--augment crop_flip"
    python summarize.py logs/cifar10/sweep_main logs/cifar10/sweep_depth logs/cifar10/sweep_masking --output_dir results/cpu_study""")
def tuned_study_commands(sweep, output, comment):
    """The tuned 30-minute CPU study's commands, its sweeps named ``sweep``_mae and ``sweep``_scratch."""
    return f"""\
    # {comment}
    python sweep.py --name {sweep}_mae --time_budget 30 --seeds 0 1 --decoder_depth 2 --no_linear_probe \\
      --data_dir DATA --device cpu --patch_size 4 --emb_dim 96 --encoder_depth 4 --encoder_heads 3 --decoder_heads 2 \\
      --pretrain_batch_size 256 --finetune_batch_size 64 \\
      --pretrain_args="--decoder_emb_dim 64 --base_learning_rate 1.5e-3 --threads 1 --no_compile" \\
      --finetune_args="--base_learning_rate 2e-3 --augment flip --threads 1 --no_compile" &
    python sweep.py --name {sweep}_scratch --time_budget 30 --seeds 0 1 --scratch_only --data_dir DATA --device cpu \\
      --patch_size 4 --emb_dim 96 --encoder_depth 4 --encoder_heads 3 --finetune_batch_size 64 \\
      --finetune_args="--base_learning_rate 2e-3 --augment flip --threads 1 --no_compile"
    python summarize.py logs/cifar10/sweep_{sweep}_mae logs/cifar10/sweep_{sweep}_scratch \\
      --output_dir results/{output}"""


# The commands of the time-budget studies under results/ (summarize.py writes their budget.csv).
BUDGET_COMMANDS = {"cpu_budget30": """\
    # the two sweeps side by side, each run one thread (--threads 1) on its own core of the 2-core machine
    python sweep.py --name budget30_mae --time_budget 30 --seeds 0 1 --decoder_depth 2 --no_linear_probe \\
      --data_dir DATA --device cpu --patch_size 4 --emb_dim 96 --encoder_depth 4 --encoder_heads 3 --decoder_heads 2 \\
      --pretrain_batch_size 256 --finetune_batch_size 128 \\
      --pretrain_args="--decoder_emb_dim 64 --base_learning_rate 1.5e-3 --threads 1 --no_compile" \\
      --finetune_args="--augment crop_flip --threads 1 --no_compile" &
    python sweep.py --name budget30_scratch --time_budget 30 --seeds 0 1 --scratch_only --data_dir DATA --device cpu \\
      --patch_size 4 --emb_dim 96 --encoder_depth 4 --encoder_heads 3 --finetune_batch_size 128 \\
      --finetune_args="--augment crop_flip --threads 1 --no_compile"
    python summarize.py logs/cifar10/sweep_budget30_mae logs/cifar10/sweep_budget30_scratch --output_dir results/cpu_budget30""",
                   "cpu_budget30_tuned": tuned_study_commands(
                       "budget30t", "cpu_budget30_tuned", "the same, with the tuned fine-tuning (batch 64, base lr "
                       "2e-3, a flip alone: results/cpu_budget30/tuning.csv)"),
                   "cpu_budget30_course": tuned_study_commands(
                       "budget30c", "cpu_budget30_course", "the tuned study again, its runs now checking their course "
                       "after every epoch (so each arm spends its minutes)")}
# Studies that a later one repeats with better settings: docs/results.md keeps them, the glance shows the later one.
SUPERSEDED = {"cpu_budget30": "cpu_budget30_tuned", "cpu_budget30_tuned": "cpu_budget30_course"}
REFERENCE = {"pretrain": 3760, "finetune": 2080}  # img/s of IcarusWizard/MAE on one H100, as campaign.py has them
ACCURACY_COLUMNS = ("test_acc", "val_acc", "accuracy", "test_accuracy")
BUDGET_COLUMNS = ("arm", "budget_minutes", "seed", "machine")
TUNING_MEASURES = (("test_acc", "test acc. (%)"), ("seconds_per_step", "s / step"))  # tuning.csv's
ARMS = {"mae": "MAE: pretraining + fine-tuning", "scratch": "from scratch"}


class ReportError(Exception):
    """A CSV under results/ that a page cannot be built from: one line naming the file."""


# ------------------------------------------------------------------------------------------------ small parts

def read_csv(path):
    """The rows of a CSV as dicts; [] when there is no such file."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def mean_std(values, digits=2, unit=""):
    """'mean ± sample std' as summarize.py writes it ('mean' alone for one value, '–' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{unit}"


def table(head, rows):
    if not rows:
        return ["(no rows yet)", ""]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def page_text(lines):
    """The lines as one page: prose longer than 120 characters wrapped (tables, code, figures, headings kept)."""
    wrap = lambda line: line if len(line) <= 120 or line.startswith(("|", "    ", "![", "#")) else textwrap.fill(
        line, 118, break_long_words=False, break_on_hyphens=False)
    return "\n".join(map(wrap, lines)).rstrip() + "\n"


def link(target, page):
    """A markdown link from ``page`` (a path inside the repository) to ``target`` (another one), shown as the
    target's path from the repository root."""
    return f"[{target}]({Path(os.path.relpath(target, Path(page).parent)).as_posix()})"


def percent(value):
    """A stored accuracy as a percentage: fractions (what the scripts log) are scaled, percentages kept."""
    return None if value is None else value * 100 if value <= 1 else value


def short_command(command):
    """The part of a campaign command a reader types: the campaign's own bookkeeping flags cut off."""
    return command.split(" --total_epoch")[0]


# ----------------------------------------------------------------------------------------------- the CPU study

def cpu_study(results):
    """The CPU study's runs.csv as {setting: {"runs": [rows], ...}}: a setting is (stage kind, decoder depth, mask
    strategy), its fine-tuning (or scratch) and pretraining rows joined by seed."""
    rows = read_csv(results / "cpu_study" / "runs.csv")
    settings = {}
    for row in rows:
        scratch = row["stage"] == "scratch"
        key = ("scratch",) if scratch else ("mae", row["decoder_depth"], row["mask_strategy"])
        seeds = settings.setdefault(key, {})
        seeds.setdefault(row["seed"], {})[row["stage"]] = row
    return settings


def study_cells(seeds):
    """Fine-tuned accuracy, k-NN, probe, per-seed accuracies and pretraining loss of a setting's seeds."""
    tuned = [next(r for s, r in runs.items() if s in ("finetune", "scratch")) for _, runs in sorted(seeds.items())]
    pre = [runs["pretrain"] for _, runs in sorted(seeds.items()) if "pretrain" in runs]
    acc = [percent(number(r["val_acc"])) for r in tuned]
    return dict(n=len(tuned), acc=mean_std(acc, unit=" %"), per_seed=", ".join(f"{a:.2f}" for a in acc),
                knn=mean_std([percent(number(r["knn_acc"])) for r in pre], unit=" %") if pre else "–",
                probe=mean_std([percent(number(r["probe_acc"])) for r in pre], unit=" %") if pre else "–",
                loss=f"{statistics.mean(number(r['loss']) for r in pre):.4f}" if pre else "–",
                accs=acc, seeds=sorted(seeds), tuned=tuned, pre=pre)


def run_minutes(seeds):
    """Each seed's training minutes: the epochs' seconds of its pretraining and fine-tuning (or scratch) run."""
    return {seed: sum(number(r["seconds"]) for r in runs.values() if r["stage"] != "linear_probe") / 60
            for seed, runs in sorted(seeds.items())}


def within(values):
    """'within X points': the range of ``values`` rounded up to a tenth."""
    return f"{math.ceil(round((max(values) - min(values)) * 10, 6)) / 10:.1f}"


def sweep_time(rows, sweep):
    """The summed epoch seconds of a sweep's runs, as 'N runs add up to H h M min'."""
    mine = [r for r in rows if r["sweep"] == sweep]
    minutes = round(sum(number(r["seconds"]) for r in mine) / 60)
    return f"{len(mine)} runs add up to {minutes // 60} h {minutes % 60} min"


def seconds(study, key, stage, seed="1"):
    return f"{number(study[key][seed][stage]['seconds']):.0f} s"


# ---------------------------------------------------------------------------------------------- at a glance

def budget_rows(results, latest=False):
    """Every row of the CSVs under results/budget/ (the GPU campaign's) and of each results/*/budget.csv (a
    study summarized by summarize.py), each with its file; with ``latest``, not those of a study that a later one
    (present) supersedes. Raises ReportError for a file that lacks a column the glance needs."""
    rows = []
    for path in sorted({*(results / "budget").glob("*.csv"), *results.glob("*/budget.csv")}):
        later = SUPERSEDED.get(path.parent.name)
        if latest and later and (results / later / "budget.csv").is_file():
            continue
        found = read_csv(path)
        columns = set(found[0]) if found else set()
        accuracy = next((c for c in ACCURACY_COLUMNS if c in columns), None)
        missing = [c for c in BUDGET_COLUMNS if c not in columns] + ([] if accuracy else ["test_acc"])
        if found and missing:
            raise ReportError(f"{path}: no column {', '.join(missing)} (the glance needs {', '.join(BUDGET_COLUMNS)}"
                              f" and one of {', '.join(ACCURACY_COLUMNS)})")
        rows += [dict(row, _file="results/" + path.relative_to(results).as_posix(), _acc=percent(number(row[accuracy])))
                 for row in found]
    return rows


def glance(results):
    """The glance: (table rows, figure points, caption lines, notes), each number from a CSV. A figure point is
    (machine, arm, minutes, accuracy %, how: "budget", or for a fixed-epoch run "idle" or "shared" machine)."""
    if budget := budget_rows(results, latest=True):
        groups = {}
        for row in budget:
            groups.setdefault((row["machine"], row["arm"], number(row["budget_minutes"])), []).append(row)
        rows, points = [], []
        for (machine, arm, minutes), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
            accs = [r["_acc"] for r in runs]
            rows.append([machine, ARMS.get(arm, arm), "equal-minute budget", f"{minutes:g}",
                         f"{mean_std(accs, unit=' %')} ({len(runs)} seed{'s' * (len(runs) > 1)})",
                         ", ".join(dict.fromkeys(r["_file"] for r in runs))])
            points += [(machine, arm, minutes, r["_acc"], "budget") for r in runs]
        dates = sorted({r["date"][:10] for r in budget if r.get("date")})
        commands = list(dict.fromkeys(r["command"] for r in budget if r.get("command")))
        caption = ["time-budget study: " + ", ".join(sorted({r["machine"] for r in budget})) +
                   (f"; {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else ""),
                   *commands[:2]]
        notes = ["Each arm trained for the same budget of minutes (MAE: pretraining and fine-tuning together); "
                 "mean ± sample std over seeds."]
        return rows, points, caption, notes
    study, rows, points = cpu_study(results), [], []
    source = "results/cpu_study/runs.csv"
    machine = "2-core CPU, `--preset small`"
    for key, arm in ((("mae", "2", "random"), "mae"), (("scratch",), "scratch")):
        if key not in study:
            continue
        seeds, cells = study[key], study_cells(study[key])
        minutes = run_minutes(seeds)
        tuned = cells["tuned"][0]
        epochs = f"{tuned['pretrain_epochs']} + {tuned['finetune_epochs']} epochs" if arm == "mae" else \
            f"{tuned['finetune_epochs']} epochs"
        rows.append([machine, ARMS[arm], epochs,
                     ", ".join(f"{m:.1f}" for m in minutes.values()) + f" (seeds {', '.join(minutes)})",
                     f"{cells['acc']} ({cells['n']} seeds)", source])
        points += [("2-core CPU", arm, minutes[s], a, "shared" if s in CPU_STUDY["shared_seeds"] else "idle")
                   for s, a in zip(cells["seeds"], cells["accs"])]
    epochs = {r["key"]: r for r in read_csv(results / "epochs.csv")}
    if "pretrain_dd4" in epochs and "finetune" in epochs:
        pre, fine = (number(epochs[k]["seconds_per_epoch"]) for k in ("pretrain_dd4", "finetune"))
        gpu = f"one {epochs['pretrain_dd4']['gpu']}, the defaults"
        rows += [[gpu, ARMS["mae"], "2000 + 100 epochs", f"{(2000 * pre + 100 * fine) / 60:.1f} (from epoch times)",
                  "not measured yet", "results/epochs.csv"],
                 [gpu, ARMS["scratch"], "100 epochs", f"{100 * fine / 60:.1f} (from epoch times)",
                  "not measured yet", "results/epochs.csv"]]
    mae, scratch = (study.get(k) for k in (("mae", "2", "random"), ("scratch",)))
    notes = []
    if mae and scratch:
        m, s = run_minutes(mae), run_minutes(scratch)
        notes.append(
            f"**Not an equal-compute comparison**: the MAE arm trained {mae_epochs(mae)} pretraining epochs and then "
            f"the same {scratch_epochs(scratch)} fine-tuning epochs that the from-scratch arm had alone "
            f"(on the idle seed 1: {m['1']:.1f} against {s['1']:.1f} minutes; seed 0 shared the two cores with "
            "development, so its minutes are longer; minutes are the training epochs' own seconds). "
            "The time-budget study, which gives both arms the same minutes, replaces these rows when its CSV lands in results/budget/.")
    notes.append("GPU accuracy is not measured yet; its minutes are projected: the measured seconds per epoch times "
                 "the default schedule's epochs (2000 pretraining, 100 fine-tuning).")
    caption = [f"CPU study: {CPU_STUDY['machine']}, torch {CPU_STUDY['torch']}, {CPU_STUDY['date']}",
               "python sweep.py --name main ... --preset small flags (the whole command: docs/results.md)",
               "GPU: accuracy not measured yet (speed: docs/speed.md)"]
    return rows, points, caption, notes


def mae_epochs(seeds):
    return next(iter(seeds.values()))["finetune"]["pretrain_epochs"]


def scratch_epochs(seeds):
    return next(iter(seeds.values()))["scratch"]["finetune_epochs"]


def glance_lines(results, page):
    """The glance table, its figure and notes as markdown for ``page`` (links are relative to it)."""
    rows, _, _, notes = glance(results)
    head = ["machine", "arm", "training", "minutes per run", "test accuracy", "CSV"]
    rows = [[*row[:-1], ", ".join(link(f, page) for f in row[-1].split(", "))] for row in rows]
    figure = Path(os.path.relpath(FIGURE, Path(page).parent)).as_posix()
    return [*table(head, rows), f"![test accuracy against training minutes]({figure})", "",
            *(line for note in notes for line in (note, ""))][:-1]


def glance_figure(results, path):
    """Accuracy against training minutes, a colour per arm and a marker per machine: each run a dot (a hollow one
    ran on a shared machine, so its minutes are too long); for a budget study, each budget's mean joined by a line.
    The machine, date and command that made the data are printed under the plot."""
    from matplotlib.figure import Figure  # late: the pages need no plotting

    _, points, caption, _ = glance(results)
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = figure.subplots()
    machines = list(dict.fromkeys(p[0] for p in points))
    for arm, colour in (("mae", "C0"), ("scratch", "C1")):
        for i, machine in enumerate(machines):
            mine, marker = [p for p in points if p[0] == machine and p[1] == arm], "os^Dv"[i % 5]
            for how, face in (("budget", colour), ("idle", colour), ("shared", "none")):
                dots = [p for p in mine if p[4] == how]
                if dots:
                    ax.scatter([p[2] for p in dots], [p[3] for p in dots], marker=marker, s=40, facecolors=face,
                               edgecolors=colour, label=f"{ARMS.get(arm, arm)}, {machine}" +
                               (", shared machine (minutes too long)" if how == "shared" else ""))
            budgets = {}
            for p in mine:
                if p[4] == "budget":
                    budgets.setdefault(p[2], []).append(p[3])
            if budgets:
                xs = sorted(budgets)
                ax.plot(xs, [statistics.mean(budgets[x]) for x in xs], color=colour, marker=marker, ms=8)
    ax.set(xlabel="training minutes per run", ylabel="test accuracy (%)",
           title="CIFAR-10 test accuracy against training minutes" + (
               " (lines: mean per budget)" if any(p[4] == "budget" for p in points) else ""))
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: never over a point
    figure.text(0.01, 0.005, "\n".join(caption), fontsize=7, va="bottom", family="monospace")
    figure.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
    write_whole(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png", metadata={"Software": None}))


# ------------------------------------------------------------------------------------------------ the pages

def budget_section(results, page):
    """Every time-budget study, a row per machine, budget and arm: accuracy over seeds, each seed's, its epochs
    and its wall minutes, with the CSV it comes from."""
    budget = budget_rows(results)
    if not budget:
        return []
    groups = {}
    for row in budget:
        groups.setdefault((row["_file"], row["machine"], number(row["budget_minutes"]), row["arm"]), []).append(row)
    rows = []
    for (_, machine, minutes, arm), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: str(r["seed"]))
        epochs = ", ".join(f"{r.get('pretrain_epochs', '0')} + {r.get('finetune_epochs', '-')}" if arm == "mae"
                           else str(r.get("finetune_epochs", "-")) for r in runs)
        rows.append([machine, f"{minutes:g}", ARMS.get(arm, arm), str(len(runs)),
                     mean_std([r["_acc"] for r in runs], unit=" %"), ", ".join(f"{r['_acc']:.2f}" for r in runs),
                     epochs, ", ".join(str(r.get("wall_minutes", "-")) for r in runs),
                     ", ".join(link(f, page) for f in dict.fromkeys(r["_file"] for r in runs))])
    return ["## At equal compute (time budget)", "",
            "Each arm gets the same minutes, counted from each process's start to its exit (`--time_budget`; "
            "how a run plans its epochs: [usage.md](usage.md#training-to-a-time-budget)). The MAE arm pretrains "
            "for its pretraining share of them and fine-tunes for the rest; from scratch fine-tunes for all of them. "
            "Epochs: pretraining + fine-tuning per seed; wall: minutes the arm's processes took, per seed (a partial last "
            "epoch spends what whole epochs leave over; `cpu_budget30` predates it and planned whole epochs only; "
            "before `cpu_budget30_course` a trial that misjudged the step time left minutes unused or overran a "
            "little, since then a run checks its course after every epoch).", "",
            *table(["machine", "minutes per arm", "arm", "n", "final test acc.", "per seed", "epochs",
                    "wall (min)", "CSV"], rows), "",
            *[line for name, command in BUDGET_COMMANDS.items() if (results / name / "budget.csv").is_file()
              for line in (f"The commands of `results/{name}` (DATA is the image folder):", "", command, "")],
            *tuning_section(results, page)]


def tuning_section(results, page):
    """What was tried for each study and why its settings are what they are (results/*/tuning.csv): a row per
    choice, with its measurement (the accuracy it reached, the seconds a step took, or both)."""
    out = []
    for path in sorted(results.glob("*/tuning.csv")):
        rows = read_csv(path)
        measured = [(c, head) for c, head in TUNING_MEASURES if any(r.get(c) for r in rows)]
        source = "results/" + path.relative_to(results).as_posix()
        out += [f"What was tried for the study in `{path.parent.name}`, and why its settings are what they are "
                f"(source: {link(source, page)}, with each row's command):", "",
                *table(["choice", "tried", *(head for _, head in measured), "condition", "decision", "machine, date"],
                       [[r["choice"], r["tried"], *(r.get(c) or "-" for c, _ in measured), r["condition"],
                         r["decision"], f"{r['machine']}, {r['date']}"] for r in rows]), ""]
    return out


def results_page(results):
    page = "docs/results.md"
    study = cpu_study(results)
    out = ["# Results", "", HEADER.format(results="../results/"), "", "## At a glance", "",
           *glance_lines(results, page), "", *budget_section(results, page),
           "## At CPU scale (measured)", "",
           f"Machine: {CPU_STUDY['machine']}, torch {CPU_STUDY['torch']}; {CPU_STUDY['date']}. "
           f"Data: {CPU_STUDY['data']}. Source: {link('results/cpu_study/runs.csv', page)} (one row per run; "
           f"its tables and curves, by summarize.py: {link('results/cpu_study/results.md', page)}).", "",
           "The `--preset small` sizes: ViT with 4×4 patches, width 96, 4 blocks × 3 heads, decoder 2 blocks of "
           "width 64; pretraining 4 epochs at batch 256, then fine-tuning 2 epochs at batch 128 with crop and flip "
           "(the preset's fine-tuning before it was tuned: it is now batch 64, a flip alone); from scratch: the same "
           "fine-tuning on a random encoder. The linear probe is the one run at the end of pretraining "
           "(`--probe_epochs 10`). The commands (every flag spelled out; DATA is the image folder):", "",
           CPU_STUDY["command"], ""]
    mae, scratch = study.get(("mae", "2", "random")), study.get(("scratch",))
    out += ["### MAE pretraining vs training from scratch", ""]
    rows = []
    for seeds, name in ((mae, "MAE pretraining + fine-tuning"), (scratch, "from scratch")):
        if seeds:
            c = study_cells(seeds)
            rows.append([name, c["n"], c["acc"], c["knn"], c["probe"], c["per_seed"],
                         ", ".join(f"{m:.1f}" for m in run_minutes(seeds).values())])
    out += table(["run", "n", "fine-tuned test acc.", "k-NN (k = 20)", "linear probe", "per seed (0, 1)",
                  "training minutes (seed 0, 1)"], rows)
    if mae and scratch:
        a, b = study_cells(mae), study_cells(scratch)
        gains = [x - y for x, y in zip(a["accs"], b["accs"])]
        spread = max(statistics.stdev(a["accs"]), statistics.stdev(b["accs"]))
        out += [f"Pretraining helps by {statistics.mean(a['accs']) - statistics.mean(b['accs']):.1f} points, and by "
                + " and ".join(f"{g:.1f}" for g in gains) + f" points seed for seed; the larger seed spread is "
                f"{spread:.2f} points. **This is not an equal-compute comparison**: the MAE arm had "
                f"{mae_epochs(mae)} pretraining epochs before the same {scratch_epochs(scratch)} fine-tuning epochs "
                "that the scratch arm had alone. On an idle machine one pair takes about 20 minutes (seed 1); seed 0 "
                "shared the two cores with development, which is why its minutes are longer. Training minutes are "
                "the training epochs' own seconds (the `seconds` column, pretraining plus fine-tuning), without loading "
                "the data set, evaluation and the k-NN / probe pass.", ""]
    depth = sorted((k for k in study if k[0] == "mae" and k[2] == "random"), key=lambda k: int(k[1]))
    runs = read_csv(results / "cpu_study" / "runs.csv")
    depth_means = [statistics.mean(study_cells(study[k])["accs"]) for k in depth]
    depth_sds = [statistics.stdev(study_cells(study[k])["accs"]) for k in depth]
    out += ["### Decoder depth", "", f"Source: {link('results/cpu_study/runs.csv', page)}; the same preset and "
            "seeds; mask strategy random. Command: the main one above, then "
            "`python sweep.py --name depth --decoder_depth 1 4 --seeds 0 1 --no_linear_probe --data_dir DATA "
            "--device cpu ...` with the same size and schedule flags.", ""]
    out += table(["decoder depth", "n", "fine-tuned test acc.", "k-NN (k = 20)", "linear probe", "per seed (0, 1)",
                  "pretraining loss"],
                 [[k[1] + (" (the preset)" if k[1] == "2" else ""), c["n"], c["acc"], c["knn"], c["probe"],
                   c["per_seed"], c["loss"]] for k in depth for c in [study_cells(study[k])]])
    out += ["![accuracy per setting, each seed a dot](cpu_study_accuracy_per_setting.png)", "",
            "Compared with the seed paper (decoder depth 2 / 4 / 8 → 79.6 / 79.8 / 81.0 %, deeper is a little "
            f"better): **at this scale the trend does not show.** The depths are within {within(depth_means)} points "
            f"of each other, less than the seed-to-seed spread ({min(depth_sds):.1f} to {max(depth_sds):.1f} "
            "points), and seed for seed their order changes (seed 0: 1 > 2 > 4; seed 1: 2 > 1 > 4). Every depth "
            "beats training from scratch on both seeds. Four pretraining epochs on a 4-block encoder are far from "
            "the regime where the paper's decoder matters: the reconstruction loss is the same to 2 % at every "
            "depth.", "",
            f"Wall time (the epochs' `seconds`): the depth sweep's {sweep_time(runs, 'sweep_depth')} (part of it "
            "shared the two cores with development, or paused for measurements). On the idle machine (seed 1), "
            f"pretraining took {seconds(study, depth[0], 'pretrain')} at depth {depth[0][1]} and "
            f"{seconds(study, depth[-1], 'pretrain')} at depth {depth[-1][1]} (the decoder sees all 64 patches, the "
            f"encoder only 16, so the decoder sets the cost here), and fine-tuning "
            f"{seconds(study, depth[-1], 'finetune')}.", "",
            "![fine-tuning test accuracy by decoder depth](cpu_study_finetune_acc_decoder_depth.png)", "",
            "![k-NN test accuracy during pretraining by decoder depth](cpu_study_knn_acc_decoder_depth.png)", ""]
    masks = sorted((k for k in study if k[0] == "mae" and k[1] == "2"), key=lambda k: (k[2] != "random", k[2]))
    words = {"random": "random (the paper's default)", "block": "block (one visible square)",
             "grid": "grid (a lattice of visible patches)",
             "blockwise": "blockwise (BEiT's, the MAE paper's \"block\")"}
    out += ["### Mask strategy", "", f"Source: {link('results/cpu_study/runs.csv', page)}; decoder depth 2, mask "
            "ratio 0.75, 2 seeds. Command: the main one with `--name masking --decoder_depth 2 --mask_strategy "
            "block grid blockwise --seeds 0 1`; random is the main sweep's depth-2 run.", ""]
    out += table(["mask strategy", "n", "fine-tuned test acc.", "per seed (0, 1)", "k-NN (k = 20)", "linear probe",
                  "pretraining loss"],
                 [[words.get(k[2], k[2]), c["n"], c["acc"], c["per_seed"], c["knn"], c["probe"], c["loss"]]
                  for k in masks for c in [study_cells(study[k])]])
    cells = {k[2]: study_cells(study[k]) for k in masks}
    if {"random", "block", "grid", "blockwise"} <= set(cells):
        random_, block, rest = cells["random"], cells["block"], [cells[m] for m in ("random", "grid", "blockwise")]
        mean_of = lambda c, name: statistics.mean(percent(number(r[name])) for r in c["pre"])
        out += ["Compared with the seed paper (random / block / grid → 79.8 / 82.8 / 80.2 %, block clearly on top): "
                "**at this scale the order is not the paper's.** One visible square (`block`) is the worst on both "
                "seeds, " + " and ".join(f"{r - b:.1f}" for r, b in zip(random_["accs"], block["accs"])) +
                " points below random, and its encoder is also the weakest under k-NN and the probe: the only "
                "difference here larger than the seed spread. Random, grid and BEiT's blockwise masking are within "
                f"{within([statistics.mean(c['accs']) for c in rest])} points of each other, well inside the "
                f"seed-to-seed spread ({min(statistics.stdev(c['accs']) for c in rest):.1f} to "
                f"{max(statistics.stdev(c['accs']) for c in rest):.1f} points), so nothing ranks them. The blockwise "
                "encoder has the best k-NN and probe accuracy by a hair ("
                f"{mean_of(cells['blockwise'], 'knn_acc') - mean_of(random_, 'knn_acc'):.1f} and "
                f"{mean_of(cells['blockwise'], 'probe_acc') - mean_of(random_, 'probe_acc'):.1f} points over "
                "random, near the spread). That grid is about as good as random agrees with the paper (80.2 vs "
                "79.8); that block-style masking wins does not show after 4 pretraining epochs. Pretraining losses "
                "under different masks do not compare (a hidden square is harder to fill in than a hidden "
                "lattice).", "",
                f"Wall time: on the idle machine (seed 1) grid pretraining took "
                f"{seconds(study, ('mae', '2', 'grid'), 'pretrain')} and fine-tuning "
                f"{seconds(study, ('mae', '2', 'grid'), 'finetune')}, blockwise "
                f"{seconds(study, ('mae', '2', 'blockwise'), 'pretrain')} and "
                f"{seconds(study, ('mae', '2', 'blockwise'), 'finetune')}; the masking sweep's "
                f"{sweep_time(runs, 'sweep_masking')} of epochs, part of it beside development.", ""]
    out += [
            "![fine-tuning test accuracy by mask strategy](cpu_study_finetune_acc_mask_strategy.png)", "",
            "![k-NN test accuracy during pretraining by mask strategy](cpu_study_knn_acc_mask_strategy.png)", "",
            "## On a GPU", "",
            "Accuracy on a GPU is not measured yet; its speed is (see [speed.md](speed.md)). The campaign "
            f"([campaign.md](campaign.md)) measures a time-to-accuracy pair and the paper's two ablation tables; "
            f"their rows land in `results/tta.csv` and `results/ablation.csv`, and {link('results/REPORT.md', page)}"
            " (rebuilt by campaign.py) tables them. For comparison, the reference reports 89.77 % (pretrained) and "
            "74.13 % (from scratch) after its full schedule.", ""]
    return page_text(out)


def speed_page(results):
    page = "docs/speed.md"
    out = ["# Speed", "", HEADER.format(results="../results/"), "", "## On a GPU", ""]
    epochs = read_csv(results / "epochs.csv")
    notes = {"pretrain_dd4": " (decoder depth 4, random)", "finetune": " (the reference's recipe, batch 128)",
             "finetune_strong": " (batch 512)"}
    if epochs:
        out += [f"**Real epochs on CIFAR-10** ({link('results/epochs.csv', page)}; {machines(epochs)}): 50,000 "
                "images; the median epoch after the first, so data loading, masking and augmentation are in and "
                "compilation is not. Full schedule: 2000 pretraining or 100 fine-tuning epochs at that speed. "
                "Measured by `python campaign.py --only epochs --data_dir DATA`; each row's exact command is in the "
                "CSV.", ""]
        rows = sorted(epochs, key=lambda r: not r["key"].startswith("pretrain"))
        out += table(["command", "s/epoch", "img/s", "full schedule", "vs the reference"],
                     [[f"`{short_command(r['command'])}`{notes.get(r['key'], '')}",
                       f"{number(r['seconds_per_epoch']):.2f}", f"{number(r['images_per_s']):,.0f}",
                       schedule(r), f"{number(r['images_per_s']) / REFERENCE[kind(r)]:.1f}×"] for r in rows])
        out += ["The reference on one H100 (torch 2.11, its code unchanged, measured by this project; these two rates "
                "are not in a CSV, campaign.py holds them) pretrains at 3,760 img/s (2000 epochs ≈ 7.4 h) and "
                "fine-tunes at 2,080 img/s at batch 128. The cards differ (the "
                "H200 has the H100's compute with more, faster memory), so the same ratio on an H100 is still to be "
                "measured.", ""]
    bench = read_csv(results / "bench.csv")
    if bench:
        base = {(r["gpu"], r["workload"], r["batch"]): number(r["images_per_s"]) for r in bench
                if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")}
        out += [f"**The training step alone** ({link('results/bench.csv', page)}; {machines(bench)}): "
                "`benchmark.py` on synthetic data on the device, measured by `python campaign.py --only bench`; "
                "each row's exact command is in the CSV.", ""]
        out += table(["workload", "batch", "precision", "compile", "augment", "img/s", "vs fp32 eager", "TFLOP/s",
                      "% of bf16 peak", "memory GiB"],
                     [[r["workload"], r["batch"], r["precision"], r["compile"], r["augment"],
                       f"{number(r['images_per_s']):,.0f}" if r["status"] == "ok" else r["status"],
                       f"{number(r['images_per_s']) / base[key]:.2f}×" if (key := (r["gpu"], r["workload"], r["batch"]))
                       in base and r["status"] == "ok" else "–",
                       f"{number(r['tflops']):.3g}", f"{number(r['percent_of_peak']):.1f}",
                       f"{number(r['peak_memory_gib']):.1f}"] for r in bench])
        out += ["A ViT-Tiny on 256 tokens is too small to keep an H200 busy, hence the low share of the peak; at "
                "batch 512 the real epoch is within a few percent of the bare step, so the loader costs almost "
                "nothing. Still to be measured: `max-autotune`, the fine-tuning step and the augmentations' cost "
                "(see [campaign.md](campaign.md)).", ""]
    cpu = read_csv(results / "cpu_speed.csv")
    out += ["## On a CPU", ""]
    if cpu:
        base = {(r["command"], r["workload"]): number(r["images_per_s"]) for r in cpu
                if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")}
        out += [f"**The training step** ({link('results/cpu_speed.csv', page)}; {machines(cpu, 'machine')}): "
                "synthetic data, `--preset small`; the ratio is against fp32 eager of the same command.", ""]
        out += table(["command", "step", "batch", "precision", "compile", "img/s", "vs fp32 eager"],
                     [[f"`{r['command']}`", r["workload"], r["batch"], r["precision"], r["compile"],
                       f"{number(r['images_per_s']):,.0f}",
                       f"{number(r['images_per_s']) / base[(r['command'], r['workload'])]:.2f}×"
                       if (r["command"], r["workload"]) in base else "–"] for r in cpu])
        out += ["On this processor neither lever pays: bf16 is emulated (ten times slower, which is why "
                "`--precision auto` picks fp32 here), and compiling gains nothing in the steady state while it costs "
                "about a minute per run. The step already runs at about 36 GFLOP/s, half of what a large fp32 matmul "
                "reaches on these two cores (68 GFLOP/s, printed by the benchmark). On CPUs with native bf16 "
                "(AVX512-BF16, AMX) `--precision auto` turns bf16 on. The data path is small beside the step: per "
                "epoch of 50,000 images the loader takes 0.5 s (1.2 s with crop and flip, 4.7 s with RandAugment) "
                "and the masks 0.4 s (blockwise 1.7 s), against 130 s (pretraining) and 225 s (fine-tuning) of "
                "steps: 1 to 2 %. (These prose figures were printed by the benchmark and are not in a CSV.)", ""]
    return page_text(out)


def machines(rows, column="gpu"):
    """The machines, torch versions, commits and dates of some rows, as one phrase."""
    seen = lambda name: ", ".join(dict.fromkeys(r[name] for r in rows if r.get(name)))
    dates = sorted({r["date"][:10] for r in rows})
    return (f"{seen(column)}, torch {seen('torch')}, commit {seen('commit')}, " +
            (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"))


def kind(row):
    return "pretrain" if row["key"].startswith("pretrain") else "finetune"


def schedule(row):
    seconds = number(row["seconds_per_epoch"])
    return f"{seconds * 2000 / 3600:.2f} h" if kind(row) == "pretrain" else f"{seconds * 100 / 60:.1f} min"


# ----------------------------------------------------------------------------------------------- writing

def readme_with_glance(readme, results):
    """README's text with the block between the glance markers rebuilt; ReportError without the markers."""
    if readme.count(GLANCE_START) != 1 or readme.count(GLANCE_END) != 1:
        raise ReportError(f"README.md: needs the lines {GLANCE_START!r} and {GLANCE_END!r} once each")
    head, rest = readme.split(GLANCE_START)
    _, tail = rest.split(GLANCE_END)
    return head + GLANCE_START + "\n" + page_text(glance_lines(results, "README.md")) + GLANCE_END + tail


def pages(results, readme):
    """{path inside the repository: its text} for every markdown page built here."""
    return {"docs/results.md": results_page(results), "docs/speed.md": speed_page(results),
            "README.md": readme_with_glance(readme, results)}


def write_whole(path, write):
    """``write(tmp)`` a file beside ``path``, then rename it into place; on failure no temporary file is left and
    one ReportError names the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"{path}: could not write it ({error.strerror or error})") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="the results folder (results/)")
    parser.add_argument("--root", type=Path, default=HERE,
                        help="the folder whose README.md and docs/ are rebuilt (the repository)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is not current")
    args = parser.parse_args(argv)
    try:
        readme = (args.root / "README.md").read_text()
        built = pages(args.results, readme)
        if args.check:
            stale = [p for p, text in built.items()
                     if not (args.root / p).is_file() or (args.root / p).read_text() != text]
            if stale:
                print(f"not current: {', '.join(stale)} (run python report.py)", file=sys.stderr)
                return 1
            print(f"current: {', '.join(built)}")
            return 0
        for name, text in built.items():
            write_whole(args.root / name, lambda tmp, text=text: tmp.write_text(text))
        glance_figure(args.results, args.root / FIGURE)
    except (ReportError, OSError, KeyError, UnicodeDecodeError) as error:
        message = str(error) if isinstance(error, ReportError) else f"{type(error).__name__}: {error}"
        print(f"report.py: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(built)} and {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
