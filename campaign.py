"""The GPU campaign: the measurements the README and docs/results.md still lack, as a list of units. A unit is one
shell command (a few script runs) that ends within about 10 minutes on one GPU; its results become rows of a CSV
under results/, and a unit with a row there is done. Runs and checkpoints go to campaign_runs/ (git-ignored).

    python campaign.py --dry_run           # the next unit and its command; runs nothing
    python campaign.py --data_dir DATA     # run the next unit, add its rows, rebuild results/REPORT.md
    python campaign.py --only bench        # the next unit of one step (--only NAME: that unit)
"""
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch

import checkpoint
import utils

ROOT = Path(__file__).resolve().parent  # the scripts run here; every path in a command is relative to it
WORK = "campaign_runs"
PRE, CLS = "mae_pretrain.py", "train_classifier.py"
ENCODER = "results/tta_mae.pt"  # the time-to-accuracy encoder in bf16: it travels to the next unit's machine
META = "gpu torch commit date key command wall_s".split()  # every row's first columns; the rest are its step's
# Each step's CSV under results/. The README's glance reads every CSV under results/budget/: the few-label rows
# answer another question, so they live beside it.
STEPS = {"budget": "budget/campaign.csv", **{s: f"{s}.csv" for s in "few_labels epochs tta bench ablation".split()}}
saved = lambda name, mae=True: f"{WORK}/checkpoints/{name}{'' if mae else '_last'}.pt"  # a classifier's latest
machine = lambda: torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
rows_of = lambda step: utils.read_rows(ROOT / "results" / STEPS[step])
done = lambda: {row["key"] for step in STEPS for row in rows_of(step)}  # the units with rows
runs = lambda unit: [words[words.index("--run_name") + 1] for words in unit.commands if "--run_name" in words]
# A script's words as run: the training runs read the images, the benchmark's are synthetic.
argv = lambda words, data_dir: [*words, *(["--data_dir", data_dir] if data_dir and "--run_name" in words else [])]
shell = lambda unit, data_dir=None: " && ".join(shlex.join(["python", *argv(w, data_dir)]) for w in unit.commands)
# name: its rows' key; step: their CSV (STEPS); minutes: the whole command on one H100 or H200, start-up included;
# commands: each a script and its flags, run in order until one fails; info: columns known before it runs (not changed)
Unit = namedtuple("Unit", "name step minutes commands info", defaults=[{}])


def train(script, name, flags):  # --resume auto --overwrite: continues from its checkpoint, else starts over
    return [script, *shlex.split(flags), "--run_name", name, "--log_dir", f"{WORK}/logs",
            "--model_path" if script == PRE else "--output_model_path", saved(name), "--resume", "auto", "--overwrite"]


def arms(key, minutes, flags=""):  # (MAE, scratch) at equal compute, seed 0: MAE pretrains for half the minutes
    tune = f"--recipe strong --seed 0 {flags} --time_budget"
    return ([train(PRE, f"{key}_mae", f"--seed 0 --time_budget {minutes / 2:g}"),
             train(CLS, f"{key}_ft", f"{tune} {minutes / 2:g} --pretrained_model_path {saved(key + '_mae')}")],
            [train(CLS, f"{key}_scratch", f"{tune} {minutes:g}")])


def units():  # the campaign in the order a short GPU session needs it; model sizes: the design card's ViT-T/2 defaults
    out = [Unit("budget_3.5min", "budget", 7.5, sum(arms("budget_3.5min", 3.5), []), {"budget_minutes": 3.5})]
    for n in (50, 500):  # the same pair, fine-tuned on n labelled images per class (pretraining sees them all)
        out.append(Unit(f"labels{n}_3.5min", "few_labels", 7.5, sum(arms(f"labels{n}_3.5min", 3.5,
                        f"--labels_per_class {n}"), []), {"budget_minutes": 3.5, "labels_per_class": n}))
    for arm, commands in zip(("mae", "scratch"), arms("budget_7min", 7)):  # an arm a unit: a pair would not fit
        out.append(Unit(f"budget_7min_{arm}", "budget", 7.5, commands, {"budget_minutes": 7}))
    # Real epoch times of the design card's commands, the defaults first.
    for key, flags in {"pretrain_dd4": "", "finetune": "", "pretrain_dd2": "--decoder_depth 2",
                       "pretrain_dd8": "--decoder_depth 8", "pretrain_block": "--mask_strategy block",
                       "pretrain_grid": "--mask_strategy grid", "pretrain_blockwise": "--mask_strategy blockwise",
                       "finetune_strong": "--recipe strong"}.items():
        out.append(Unit(key, "epochs", 1.5, [train(PRE if "pre" in key else CLS, f"speed_{key}",
                                                   f"{flags} --total_epoch 3 --warmup_epoch 1")]))
    # Time to accuracy: pretraining that fills a unit, then fine-tuning from its encoder, and the same from scratch.
    tune = "--recipe strong --total_epoch 40 --warmup_epoch 2"
    out += [Unit("tta_pretrain", "tta", 8.5, [train(PRE, "tta_mae", "--decoder_depth 2 --time_budget 8")]),
            Unit("tta_finetune", "tta", 4, [train(CLS, "tta_ft", f"{tune} --pretrained_model_path {ENCODER}")]),
            Unit("tta_scratch", "tta", 4, [train(CLS, "tta_scratch", tune)])]
    # Where the time goes: benchmark.py, each workload_batch_precision_compile (_aug: with the augmentations).
    for key, minutes in [("pretrain_b512_fp32_none", 1), ("pretrain_b512_auto_default", 2.5),
                         ("pretrain_b2048_fp32_none", 1), ("pretrain_b2048_auto_default", 3),
                         ("finetune_b256_fp32_none", 1), ("finetune_b256_auto_default_aug", 5)]:
        workload, batch, precision, mode = key.split("_")[:4]
        augments = "none crop_flip randaug" if key.endswith("_aug") else "none"
        out.append(Unit(key, "bench", minutes, [["benchmark.py", *shlex.split(
            f"--workloads {workload} --batch_sizes {batch[1:]} --precisions {precision} --compile_modes {mode} "
            f"--augments {augments} --no_baseline --output {WORK}/bench/{key}.csv")]]))
    # The paper's two ablations, 2 seeds, on one schedule that fits a unit at decoder depth 8.
    for seed in (0, 1):
        for depth, strategy in [(2, "random"), (4, "random"), (8, "random"), (4, "block"), (4, "grid")]:
            key = f"dd{depth}_{strategy}_s{seed}"
            pretrain = train(PRE, f"abl_{key}", f"--decoder_depth {depth} --mask_strategy {strategy} --seed {seed} "
                             "--total_epoch 80 --warmup_epoch 8 --knn_every 80 --probe_epochs 10")
            tune = train(CLS, f"abl_{key}_ft", f"--recipe strong --seed {seed} --total_epoch 20 --warmup_epoch 1 "
                         f"--pretrained_model_path {saved('abl_' + key)}")
            out.append(Unit(key, "ablation", 8, [pretrain, tune], dict(decoder_depth=depth, mask_strategy=strategy,
                                                                       seed=seed)))
    return out


UNITS = units()


def summary(name):  # a run's last epoch, budget.json (if budgeted) and median epoch after the first (compiling)
    folder = ROOT / WORK / "logs" / "cifar10" / name
    rows, budget = utils.read_csv(folder / "metrics.csv"), folder / "budget.json"
    median = lambda column: statistics.median([float(r[column]) for r in rows[1:] or rows if r[column]] or [0])
    return {**rows[-1], **(json.loads(budget.read_text()) if budget.is_file() else {}), "run": name,
            "epochs": len(rows), "seconds_per_epoch": median("seconds"), "images_per_s": median("images_per_s"),
            "compile_s": rows[0]["compile_seconds"]}


def export(checkpoint_file, target):  # a checkpoint as released weights (bf16, refused at 16 MiB or more); their MiB
    state = torch.load(ROOT / checkpoint_file, map_location="cpu", weights_only=True)
    return round(checkpoint.export_weights(state, ROOT / target, 16 * 2 ** 20) / 2 ** 20, 2)


def collect(unit):  # its rows: the benchmark's CSV; a budget pair's a row per arm (as budget.csv), else a row per run
    if unit.step == "bench":
        return utils.read_csv(ROOT / WORK / "bench" / f"{unit.name}.csv")
    if unit.step not in ("budget", "few_labels"):
        rows = [dict(unit.info, **summary(name)) for name in runs(unit)]
        if unit.name == "tta_pretrain":  # its encoder travels with results/ to the fine-tuning unit
            rows[0]["encoder_mb"] = export(saved(rows[0]["run"]), ENCODER)
        return rows
    by_arm = {arm: [summary(n) for n in runs(unit) if n.endswith("_scratch") == (arm == "scratch")]
              for arm in ("mae", "scratch")}  # a unit may hold one arm
    if unit.step == "budget" and by_arm["mae"]:  # the full-label pair's pretrained MAE and fine-tuned classifier
        tag = "".join(c if c.isalnum() else "-" for c in machine().lower()) + f"_{unit.info['budget_minutes']:g}min"
        for trained, kind in zip(by_arm["mae"], ("mae", "cls")):  # results/weights/<kind>_<gpu>_<N>min.pt
            export(saved(trained["run"], kind == "mae"), f"results/weights/{kind}_{tag}.pt")
    return [dict(unit.info, arm=arm, pretrain_share=0.5 * (arm == "mae"), seed=0, machine=r[-1]["machine"],
                 test_acc=f"{100 * float(r[-1]['val_acc']):.2f}", finetune_epochs=r[-1]["epochs"],
                 pretrain_epochs=r[0]["epochs"] * (arm == "mae"),
                 wall_minutes=round(sum(sum(x["wall_seconds"]) for x in r) / 60, 2)) for arm, r in by_arm.items() if r]


def execute(argv):  # one script in its own session: Ctrl-C or SIGTERM reaches it once, from here, to save and exit
    child = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: child.send_signal(signum))
    return child.wait()


def run(unit, data_dir):  # the unit's scripts (each continues or skips what it did), then its rows appended to its CSV
    start = time.monotonic()
    for words in unit.commands:
        if code := execute([sys.executable, *argv(words, data_dir)]):
            print(f"{unit.name}: {words[0]} ended with exit code {code}; run the same command again to continue it")
            return code
    commit = subprocess.run("git rev-parse --short HEAD || echo unknown", shell=True, cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # no git or no repository on the GPU machine: unknown
    meta = dict(gpu=machine(), torch=torch.__version__, commit=commit, key=unit.name,
                date=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), command=shell(unit, data_dir and "DATA"),
                wall_s=round(time.monotonic() - start, 1))
    rows = rows_of(unit.step) + [{**row, **meta} for row in collect(unit)]
    heads = list(dict.fromkeys([*META, *(k for row in rows for k in row)]))
    utils.write_csv(ROOT / "results" / STEPS[unit.step], heads, rows)
    return 0


def write_report():  # each CSV whole but its commands, and the units still to run
    out, finished = ["# GPU measurement campaign", "", "Rebuilt by `python campaign.py` after each unit from the CSV "
                     "files beside it, which also hold each row's command.", ""], done()
    for step, name in STEPS.items():
        heads = [h for h in (rows_of(step) or [{}])[0] if h != "command"]
        out += [f"## {step} ({name})", "", utils.markdown(heads, [[row[h] for h in heads] for row in rows_of(step)])]
    todo = ", ".join(u.name for u in UNITS if u.name not in finished) or "Nothing: every unit has its rows."
    utils.write_text(ROOT / "results" / "REPORT.md", "\n".join([*out, "## Still to run", "", todo]) + "\n")


def main(args=None):
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--dry_run", action="store_true", help="print the next unit and its command; run nothing")
    p.add_argument("--only", choices=[*STEPS, *(u.name for u in UNITS)], metavar="STEP_OR_UNIT",
                   help=f"the next unit of this step ({', '.join(STEPS)}), or this unit if not done")
    p.add_argument("--data_dir", type=utils.path_text, help="image folder with train/ and test/ (default: CIFAR-10)")
    args = p.parse_args(args)
    data_dir, finished = args.data_dir and str(Path(args.data_dir).resolve()), done()  # the scripts run in ROOT
    todo = [u for u in UNITS if args.only in (None, u.step, u.name) and u.name not in finished]
    if not todo:
        print("nothing to run: every unit asked for has its rows")
        return 0
    print(f"{todo[0].name} (about {todo[0].minutes:g} min; rows to results/{STEPS[todo[0].step]}; {len(todo) - 1} "
          f"more after it):\n{shell(todo[0], data_dir)}", flush=True)
    if args.dry_run:
        return 0
    code = run(todo[0], data_dir)
    write_report()
    return code


if __name__ == "__main__":
    utils.run_cli(main)
