"""The GPU campaign: the measurements the README and docs/results.md still lack, as a list of units. A unit is one
shell command (a few script runs) that ends within about 10 minutes on one GPU; its results become rows of a CSV
under results/, and a unit with a row there is done. Runs and checkpoints go to campaign_runs/ (git-ignored).

    python campaign.py --dry_run           # the next unit and its command; runs nothing
    python campaign.py --data_dir DATA     # run the next unit, add its rows, rebuild results/REPORT.md
    python campaign.py --only bench        # the next unit of one step (--unit NAME: that unit)
"""
import csv
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import checkpoint
import utils

ROOT = Path(__file__).resolve().parent  # the scripts run here; every path in a command is relative to it
WORK = "campaign_runs"
PRE, CLS = "mae_pretrain.py", "train_classifier.py"
ENCODER = "results/tta_mae.pt"  # the time-to-accuracy encoder in bf16: it travels to the next unit's machine
WEIGHTS_LIMIT = 16 * 2 ** 20  # a released checkpoint (bf16) must stay under this
META = ["gpu", "torch", "commit", "date", "key", "command", "wall_s"]
ARMS = ["arm", "budget_minutes", "pretrain_share", "seed", "test_acc", "best_val_acc", "pretrain_epochs",
        "finetune_epochs", "wall_minutes", "machine", "weights"]
# Each step's CSV under results/ and its columns after META. The README's glance reads every CSV under
# results/budget/: the few-label rows answer another question, so they live beside it.
STEPS = {"budget": ("budget/campaign.csv", ARMS), "few_labels": ("few_labels.csv", ARMS + ["labels_per_class"]),
         "epochs": ("epochs.csv", ["epochs", "seconds_per_epoch", "images_per_s", "first_epoch_s", "compile_s"]),
         "tta": ("tta.csv", ["epochs", "train_s", "final_loss", "val_acc", "best_val_acc", "encoder_mb"]),
         "bench": ("bench.csv", ["workload", "batch", "precision", "compile", "augment", "images_per_s", "tflops",
                                 "percent_of_peak", "peak_memory_gib", "gflop_per_image", "status"]),
         "ablation": ("ablation.csv", ["decoder_depth", "mask_strategy", "seed", "pretrain_epochs", "finetune_epochs",
                                       "pretrain_loss", "knn_acc", "probe_acc", "val_acc", "pretrain_s", "finetune_s"])}


@dataclass
class Unit:
    name: str  # the key of its rows
    step: str  # which CSV its rows go to (STEPS), and how they are read from its runs (COLLECT)
    commands: list  # each a script and its flags, run in order; the first failure ends the unit
    minutes: float  # the whole command on one H100 or H200, start-up and compilation included
    info: dict = field(default_factory=dict)  # its columns known before it runs

    @property
    def runs(self):
        return [words[words.index("--run_name") + 1] for words in self.commands if "--run_name" in words]

    def argv(self, words, data_dir):  # the training runs read the images; the benchmark's are synthetic
        return [*words, *(["--data_dir", data_dir] if data_dir and "--run_name" in words else [])]

    def shell(self, data_dir=None):
        return " && ".join(shlex.join(["python", *self.argv(words, data_dir)]) for words in self.commands)


def saved(name, mae=True):
    """A run's checkpoint; a classifier's latest epoch is <name>_last.pt (<name>.pt is its best)."""
    return f"{WORK}/checkpoints/{name}{'' if mae else '_last'}.pt"


def train(script, name, flags):
    """A training run under WORK. --resume auto with --overwrite: it continues from its checkpoint if it has one,
    else starts over (a run stopped before its first checkpoint)."""
    return [script, *shlex.split(flags), "--run_name", name, "--log_dir", f"{WORK}/logs",
            "--model_path" if script == PRE else "--output_model_path", saved(name), "--resume", "auto", "--overwrite"]


def arms(key, minutes, flags=""):
    """Equal compute, seed 0: MAE pretrains for half the minutes and fine-tunes (strong recipe) for the rest; from
    scratch fine-tunes for all of them. --time_budget counts from each process's start. Returns (MAE, scratch)."""
    tune = f"--recipe strong --seed 0 {flags} --time_budget"
    return ([train(PRE, f"{key}_mae", f"--seed 0 --time_budget {minutes / 2:g}"),
             train(CLS, f"{key}_ft", f"{tune} {minutes / 2:g} --pretrained_model_path {saved(key + '_mae')}")],
            [train(CLS, f"{key}_scratch", f"{tune} {minutes:g}")])


def units():
    """The campaign in the order a short GPU session needs it. Model sizes: the design card's ViT-T/2 defaults."""
    out = [Unit("budget_3.5min", "budget", sum(arms("budget_3.5min", 3.5), []), 7.5, {"budget_minutes": 3.5})]
    for n in (50, 500):  # the same pair, fine-tuned on n labelled images per class (pretraining sees them all)
        key = f"labels{n}_3.5min"
        out.append(Unit(key, "few_labels", sum(arms(key, 3.5, f"--labels_per_class {n}"), []), 7.5,
                        {"budget_minutes": 3.5, "labels_per_class": n}))
    mae, scratch = arms("budget_7min", 7)  # an arm a unit: both would not fit one command
    out += [Unit("budget_7min_mae", "budget", mae, 7.5, {"budget_minutes": 7}),
            Unit("budget_7min_scratch", "budget", scratch, 7.5, {"budget_minutes": 7})]
    # Real epoch times of the design card's commands, the defaults first.
    for key, flags in {"pretrain_dd4": "", "finetune": "", "pretrain_dd2": "--decoder_depth 2",
                       "pretrain_dd8": "--decoder_depth 8", "pretrain_block": "--mask_strategy block",
                       "pretrain_grid": "--mask_strategy grid", "pretrain_blockwise": "--mask_strategy blockwise",
                       "finetune_strong": "--recipe strong"}.items():
        out.append(Unit(key, "epochs", [train(PRE if "pre" in key else CLS, f"speed_{key}",
                                              f"{flags} --total_epoch 3 --warmup_epoch 1")], 1.5))
    # Time to accuracy: pretraining that fills a unit, then fine-tuning from its encoder, and the same from scratch.
    tune = "--recipe strong --total_epoch 40 --warmup_epoch 2"
    out += [Unit("tta_pretrain", "tta", [train(PRE, "tta_mae", "--decoder_depth 2 --time_budget 8")], 8.5),
            Unit("tta_finetune", "tta", [train(CLS, "tta_ft", f"{tune} --pretrained_model_path {ENCODER}")], 4),
            Unit("tta_scratch", "tta", [train(CLS, "tta_scratch", tune)], 4)]
    # Where the time goes: benchmark.py, each workload_batch_precision_compile-mode (_aug: with the augmentations).
    for key, minutes in [("pretrain_b512_fp32_none", 1), ("pretrain_b512_auto_default", 2.5),
                         ("pretrain_b2048_fp32_none", 1), ("pretrain_b2048_auto_default", 3),
                         ("pretrain_b2048_auto_max-autotune-no-cudagraphs", 6), ("finetune_b256_fp32_none", 1),
                         ("finetune_b256_auto_default_aug", 5), ("finetune_b256_auto_max-autotune-no-cudagraphs", 6)]:
        workload, batch, precision, mode = key.split("_")[:4]
        augments = "none crop_flip randaug" if key.endswith("_aug") else "none"
        out.append(Unit(key, "bench", [["benchmark.py", *shlex.split(
            f"--workloads {workload} --batch_sizes {batch[1:]} --precisions {precision} --compile_modes {mode} "
            f"--augments {augments} --no_baseline --output {WORK}/bench/{key}.csv")]], minutes))
    # The paper's two ablations, 2 seeds, on one schedule that fits a unit at decoder depth 8.
    for seed in (0, 1):
        for depth, strategy in [(2, "random"), (4, "random"), (8, "random"), (4, "block"), (4, "grid")]:
            key = f"dd{depth}_{strategy}_s{seed}"
            pretrain = train(PRE, f"abl_{key}", f"--decoder_depth {depth} --mask_strategy {strategy} --seed {seed} "
                             "--total_epoch 80 --warmup_epoch 8 --knn_every 80 --probe_epochs 10")
            tune = train(CLS, f"abl_{key}_ft", f"--recipe strong --seed {seed} --total_epoch 20 --warmup_epoch 1 "
                         f"--pretrained_model_path {saved('abl_' + key)}")
            out.append(Unit(key, "ablation", [pretrain, tune], 8, dict(
                decoder_depth=depth, mask_strategy=strategy, seed=seed, pretrain_epochs=80, finetune_epochs=20)))
    return out


UNITS = units()

# ------------------------------------------------------------------------------------ results of a unit's runs


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary(name):
    """A run's metrics.csv: the median epoch after the first (which includes the compilation), the last results."""
    rows = read_csv(ROOT / WORK / "logs" / "cifar10" / name / "metrics.csv")
    values = lambda column, rows=rows[1:] or rows: [float(r[column]) for r in rows if r.get(column)]
    return dict(epochs=len(rows), seconds_per_epoch=statistics.median(values("seconds")),
                images_per_s=statistics.median(values("images_per_s") or [0]), first_epoch_s=rows[0]["seconds"],
                compile_s=rows[0].get("compile_seconds"), train_s=sum(values("seconds", rows)),
                final_loss=rows[-1].get("loss"), val_acc=rows[-1].get("val_acc"),
                best_val_acc=max(values("val_acc", rows), default=None), knn_acc=rows[-1].get("knn_acc"),
                probe_acc=rows[-1].get("probe_acc"))


def collect_arms(unit):
    """A row per arm from its runs' budget.json and metrics.csv. The full-label MAE arm's pretrained MAE and
    fine-tuned classifier are released as results/weights/{mae,cls}_<gpu>_<N>min.pt."""
    rows, slug = [], "".join(c if c.isalnum() else "-" for c in machine().lower())
    for arm, names in (("mae", [n for n in unit.runs if n.endswith(("_mae", "_ft"))]),
                       ("scratch", [n for n in unit.runs if n.endswith("_scratch")])):
        if not names:  # a unit of one arm
            continue
        records = [json.loads((ROOT / WORK / "logs" / "cifar10" / n / "budget.json").read_text()) for n in names]
        tuned = summary(names[-1])
        weights = [f"weights/{kind}_{slug}_{unit.info['budget_minutes']:g}min.pt" for kind in ("mae", "cls")
                   if arm == "mae" and unit.step == "budget"]
        for name, file, mae in zip(names, weights, (True, False)):
            export(saved(name, mae), f"results/{file}")
        rows.append(dict(unit.info, arm=arm, pretrain_share=0.5 if arm == "mae" else 0.0, seed=0,
                         test_acc=f"{100 * float(tuned['val_acc']):.2f}", weights=" ".join(weights),
                         best_val_acc=f"{100 * tuned['best_val_acc']:.2f}",
                         pretrain_epochs=records[0]["total_epoch"] if arm == "mae" else 0,
                         finetune_epochs=records[-1]["total_epoch"], machine=records[-1]["machine"],
                         wall_minutes=round(sum(sum(r["wall_seconds"]) for r in records) / 60, 2)))
    return rows


def export(checkpoint_file, target):
    """A run's checkpoint as released weights (checkpoint.export_weights: bf16, refused over the limit); MiB."""
    state = torch.load(ROOT / checkpoint_file, map_location="cpu", weights_only=True)
    return round(checkpoint.export_weights(state, ROOT / target, WEIGHTS_LIMIT) / 2 ** 20, 2)


def collect_tta(unit):
    row = summary(unit.runs[0])
    if unit.name == "tta_pretrain":
        row["encoder_mb"] = export(saved(unit.runs[0]), ENCODER)
    return [row]


def collect_ablation(unit):
    pretrain, tuned = map(summary, unit.runs)
    return [dict(unit.info, pretrain_loss=pretrain["final_loss"], knn_acc=pretrain["knn_acc"],
                 probe_acc=pretrain["probe_acc"], val_acc=tuned["val_acc"], pretrain_s=pretrain["train_s"],
                 finetune_s=tuned["train_s"])]


COLLECT = {"budget": collect_arms, "few_labels": collect_arms, "epochs": lambda unit: [summary(unit.runs[0])],
           "tta": collect_tta, "bench": lambda unit: read_csv(ROOT / WORK / "bench" / f"{unit.name}.csv"),
           "ablation": collect_ablation}

# ------------------------------------------------------------------------------------------------ the driver


def machine():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def rows_of(step):
    path = ROOT / "results" / STEPS[step][0]
    return read_csv(path) if path.is_file() else []


def done(unit):
    return any(row["key"] == unit.name for row in rows_of(unit.step))


def execute(argv):
    """One script in its own process, in a session of its own: Ctrl-C or SIGTERM reaches it once, passed on from
    here, and it saves before it exits (a second signal would make it quit at once)."""
    child = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: child.send_signal(signum))
    return child.wait()


def run(unit, data_dir):
    """Run the unit's scripts (each continues or skips what it has done), then append its rows to its CSV."""
    start = time.monotonic()
    for words in unit.commands:
        if code := execute([sys.executable, *unit.argv(words, data_dir)]):
            print(f"{unit.name}: {words[0]} ended with exit code {code}; run the same command again to continue it")
            return code
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:  # no git on this machine: the rows still count
        commit = "unknown"
    meta = dict(gpu=machine(), torch=torch.__version__, commit=commit, key=unit.name,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command=unit.shell(data_dir and "DATA"), wall_s=round(time.monotonic() - start, 1))
    name, columns = STEPS[unit.step]
    utils.write_csv(ROOT / "results" / name, META + columns,
                     rows_of(unit.step) + [{**row, **meta} for row in COLLECT[unit.step](unit)])
    return 0


def table(path):
    """A CSV as a Markdown table, without its commands. The one place here that writes a table: at merge, a call
    of report.py's table writer."""
    rows = read_csv(path) if path.is_file() else []
    heads = [h for h in (rows[0] if rows else []) if h != "command"]
    short = lambda v: str(round(float(v), 3)) if v.replace(".", "", 1).isdigit() and "." in v else v
    return ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
            *("| " + " | ".join(short(row[h]) for h in heads) + " |" for row in rows)] if rows else ["(no rows yet)"]


def write_report():
    out = ["# GPU measurement campaign", "", "Rebuilt by `python campaign.py` after each unit from the CSV files "
           "beside it, which also hold each row's command.", ""]
    for step, (name, _) in STEPS.items():
        out += [f"## {step} ({name})", "", *table(ROOT / "results" / name), ""]
    todo = [unit.name for unit in UNITS if not done(unit)]
    out += ["## Still to run", "", ", ".join(todo) or "Nothing: every unit has its rows."]
    utils.write_text(ROOT / "results" / "REPORT.md", "\n".join(out) + "\n")


def main(argv=None):
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--dry_run", action="store_true", help="print the next unit and its command; run nothing")
    p.add_argument("--only", choices=list(STEPS), help="the next unit of this step")
    p.add_argument("--unit", choices=[unit.name for unit in UNITS], metavar="NAME", help="this unit, if not done")
    p.add_argument("--data_dir", type=utils.path_text, default=None,
                   help="image folder with train/ and test/ (left out: torchvision's CIFAR-10)")
    args = p.parse_args(argv)
    data_dir = args.data_dir and str(Path(args.data_dir).resolve())  # the scripts run in ROOT
    todo = [u for u in UNITS if args.only in (None, u.step) and args.unit in (None, u.name) and not done(u)]
    if not todo:
        print("nothing to run: every unit asked for has its rows")
        return 0
    unit = todo[0]
    print(f"{unit.name} (about {unit.minutes:g} min; rows to results/{STEPS[unit.step][0]}; {len(todo) - 1} more "
          f"after it):\n{unit.shell(data_dir)}", flush=True)
    if args.dry_run:
        return 0
    code = run(unit, data_dir)
    write_report()
    return code


if __name__ == "__main__":
    utils.run_cli(main)
