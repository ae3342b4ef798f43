"""The GPU measurement campaign: the numbers the README and the ablation tables need, measured in parts that each
end within --time_limit minutes (start-up and compilation included), appended to small CSV files in results/.

    python campaign.py --dry_run                  # the plan: the units still to run, packed into parts, with times
    python campaign.py --data_dir DATA            # one part; run the same command again for the next one
    python campaign.py --only bench               # one step: epochs, tta, bench, ablation or report
    python campaign.py --tiny --data_dir DATA --time_limit 0.5    # the whole campaign on the CPU, tiny model

Steps, in the order a short GPU session needs them: budget (the repo's headline: MAE pretraining + fine-tuning
against training from scratch at equal compute, each arm the same minutes with --time_budget; the first unit is the
whole comparison at the smallest budget in one part, then longer budgets one arm a part; the MAE and its fine-tuned
classifier are exported in bf16 to results/weights/), epochs (real epoch times of the design card's commands, from
each run's metrics.csv: the comparison with the reference), tta (pretraining sized to fill a part, then
fine-tuning from its encoder, which travels as a bf16 state dict in results/, and the same fine-tuning from
scratch: the accuracy), bench (benchmark.py: workloads x micro-batch sizes x compile modes, and the fine-tuning
augmentations: where the time goes), ablation (decoder depth 2/4/8, mask strategy random/block/grid, 2 seeds;
each run is pretraining + k-NN and linear probe + fine-tuning within one part), report (results/REPORT.md, rebuilt
after every part). A unit (one benchmark configuration, one run) with a row in its CSV for this GPU is skipped. Every
script runs in its own process and gets SIGTERM before the part ends: it finishes its epoch, saves and exits 143,
and the next part continues it with --resume auto while the work folder (--work_dir, git-ignored) is still there.
"""
import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

STARTED = time.monotonic()  # a part's time counts from here, the import of torch included
import torch  # noqa: E402

import utils  # noqa: E402
from utils import auto_device  # noqa: E402

HERE = Path(__file__).resolve().parent
STEPS = ("budget", "epochs", "tta", "bench", "ablation", "report")
PRETRAIN_SHARE = 0.5  # of an MAE arm's minutes: pretraining; the rest fine-tuning
WEIGHTS_LIMIT = 16 * 2 ** 20  # a released checkpoint (bf16) must stay under this
REFERENCE = {"pretrain": 3760.0, "finetune": 2080.0}  # IcarusWizard/MAE on one H100, images/s (see the README)
ENCODER_LIMIT = 16 * 2 ** 20
SAFETY = 1.1  # a unit starts when 1.1 times its estimated time is left in the part
META = ["gpu", "torch", "commit", "date", "key", "command", "wall_s"]
COLUMNS = {"budget": META + ["arm", "budget_minutes", "pretrain_share", "seed", "test_acc", "best_val_acc",
                              "pretrain_epochs", "finetune_epochs", "wall_minutes", "machine", "weights"],
           "bench": META + ["workload", "batch", "precision", "compile", "augment", "images_per_s", "tflops",
                            "percent_of_peak", "peak_memory_gib", "gflop_per_image", "status"],
           "epochs": META + ["epochs", "seconds_per_epoch", "images_per_s", "first_epoch_s", "compile_s"],
           "tta": META + ["epochs", "train_s", "final_loss", "val_acc", "best_val_acc", "encoder_mb"],
           "ablation": META + ["decoder_depth", "mask_strategy", "seed", "pretrain_epochs", "finetune_epochs",
                               "pretrain_loss", "knn_acc", "probe_acc", "val_acc", "pretrain_s", "finetune_s"]}
# The design card's two default commands first: a short GPU session measures those before the variants.
SPEED_RUNS = {"pretrain_dd4": [], "finetune": [], "pretrain_dd2": ["--decoder_depth", "2"],
              "pretrain_dd8": ["--decoder_depth", "8"],
              **{f"pretrain_{s}": ["--mask_strategy", s] for s in ("block", "grid", "blockwise")},
              "finetune_strong": ["--recipe", "strong"]}
ABLATIONS = [(2, "random"), (4, "random"), (8, "random"), (4, "block"), (4, "grid")]
SEEDS = (0, 1)
DEPTH_COST = {"pretrain_dd2": 3.93 / 5.65, "pretrain_dd8": 9.09 / 5.65}  # GFLOP per image vs depth 4 (README)
# "gpu": the real campaign; "tiny": a CPU-sized model and schedule that runs every step in seconds (the tests).
# guess: seconds until this GPU has measured them: start-up + compile, an epoch at the reference's speed, and a
# benchmark unit per compile mode.
PROFILES = {
    "gpu": dict(model=[], decoder=[], batch=[], speed=[], bench=[], precision="auto", budgets=[3.5, 7],
                compile_modes=["default", "max-autotune-no-cudagraphs"],
                batches={"pretrain": [512, 2048], "finetune": [256]}, speed_epochs=3,
                caps=dict(tta_pretrain=300, tta_finetune=40, abl_pretrain=200, abl_finetune=30), probe_epochs=10,
                guess={"overhead": 120, "pretrain": 13.3, "finetune": 25, "none": 45, "default": 90,
                       "max-autotune-no-cudagraphs": 240}),
    "tiny": dict(model=["--emb_dim", "32", "--encoder_depth", "1", "--encoder_heads", "2"], budgets=[0.1],
                 decoder=["--decoder_heads", "2"], batch=["--batch_size", "16", "--max_device_batch_size", "8"],
                 speed=["--precision", "fp32", "--no_compile", "--threads", "1"],
                 bench=["--steps", "2", "--warmup", "1", "--threads", "1"], precision="fp32", compile_modes=["none"],
                 batches={"pretrain": [8], "finetune": [8]}, speed_epochs=2,
                 caps=dict(tta_pretrain=3, tta_finetune=2, abl_pretrain=2, abl_finetune=1), probe_epochs=2,
                 guess={"overhead": 5, "pretrain": 0.5, "finetune": 0.5, "none": 10})}
say = partial(print, flush=True)


@dataclass
class Run:
    """One script invocation; a training run (``epochs`` > 0, or ``minutes`` of --time_budget) continues from its
    checkpoint when it has one."""
    script: str
    options: list
    name: str = None
    epochs: int = 0
    kind: str = None  # the SPEED_RUNS measurement that predicts its time
    minutes: float = 0.0  # a budgeted run: it plans its epochs itself


@dataclass
class Unit:
    """One measurement: its runs in order, then ``record(unit)`` turns what they wrote into rows of its step's CSV;
    ``key`` names those rows, so a unit with a row for this machine is done."""
    step: str
    key: str
    runs: list
    record: callable  # unit -> the rows it adds to its step's CSV
    needs: Path = None  # a file that an earlier unit writes
    info: dict = field(default_factory=dict)


def parse_args(argv=None):
    def minutes(text):  # a part is one command on a lent machine: a day is far beyond any such limit
        try:
            if 0 < float(text) <= 24 * 60:
                return float(text)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected minutes in (0, 1440]")

    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--time_limit", type=minutes, default=9.0, help="minutes per part, start-up included (9)")
    p.add_argument("--only", choices=STEPS, default=None, help="run this step only")
    p.add_argument("--dry_run", action="store_true", help="print the plan with estimated times; write nothing")
    p.add_argument("--data_dir", default=None, help="image folder with train/ and test/ (empty or left out: "
                   "torchvision's)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default auto; cpu with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and schedule in fp32 eager (tests, CPU)")
    p.add_argument("--results_dir", type=utils.path_text, default=str(HERE / "results"),
                   help="the committed CSVs and REPORT.md")
    p.add_argument("--work_dir", type=utils.path_text, default=str(HERE / "campaign_runs"),
                   help="logs and checkpoints (git-ignored)")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "auto")
    if not (args.device in ("auto", "cpu") or args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"argument --device: {args.device!r} is not usable here: expected auto, cpu, or cuda[:N] with a GPU")
    if args.data_dir and not all((Path(args.data_dir) / split).is_dir() for split in ("train", "test")):
        p.error(f"argument --data_dir: {args.data_dir} has no train/ and test/ folders")
    for flag in ("results_dir", "work_dir"):
        utils.check_writable_folder(p, f"--{flag}", getattr(args, flag))
    for flag in ("data_dir", "results_dir", "work_dir"):  # absolute: the scripts run in the repository folder
        setattr(args, flag, getattr(args, flag) and str(Path(getattr(args, flag)).resolve()))
    return args


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_csv(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt(value, spec=".1f", scale=1.0):
    return "-" if number(value) is None else format(number(value) * scale, spec)


def mean_std(values, scale=1.0):
    values = [v * scale for v in values if v is not None]
    return " ± ".join(format(v, ".2f") for v in ([statistics.mean(values), statistics.stdev(values)]
                                                  if len(values) > 1 else values)) or "-"


def table(head, rows):
    if not rows:
        return ["(no rows yet)", ""]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def execute(command, output, stop_at, kill_at):
    """Run ``command`` in the repository folder, its output appended to ``output``; SIGTERM at ``stop_at`` (it
    saves and exits), SIGKILL at ``kill_at`` (time.monotonic() seconds). Returns its exit code (-N: signal N)."""
    with open(output, "a") as log:
        child = execute.child = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        try:
            for deadline, then in ((stop_at, child.terminate), (kill_at, child.kill), (None, None)):
                try:
                    return child.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    then()
        finally:
            execute.child = None


def machine_name(requested):
    """What this machine's rows are keyed by: the GPU's name, Apple MPS, or CPU (as --device auto resolves)."""
    device = torch.device(auto_device() if requested == "auto" else requested)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "Apple MPS" if device.type == "mps" else "CPU"


class Campaign:
    """What every job of the campaign shares: the profile, this machine, the time limit, the run folders, and the
    step CSVs in the results folder (this machine's rows are read; a CSV is only appended to)."""

    def __init__(self, args):
        self.args, self.p = args, PROFILES["tiny" if args.tiny else "gpu"]
        self.results, self.work = Path(args.results_dir), Path(args.work_dir)
        self.gpu = machine_name(args.device)
        self.slug = "".join(c if c.isalnum() else "-" for c in self.gpu.lower())
        self.limit = args.time_limit * 60
        self.margin = min(30.0, 0.1 * self.limit)  # for the start-up of this script and the report at the end
        self.encoder = self.results / f"tta_mae_{self.slug}.pt"  # what travels from pretraining to fine-tuning
        self.folders = RunFolders(self.work, args.device, args.data_dir)

    def csv(self, step):
        """The step's CSV; the time-budget rows go where the README's glance reads every budget study."""
        return self.results / ("budget/campaign.csv" if step == "budget" else f"{step}.csv")

    def rows(self, step, everywhere=False):
        return [r for r in read_csv(self.csv(step)) if everywhere or r.get("gpu") == self.gpu]

    def done(self, unit):
        return any(r["key"] == unit.key for r in self.rows(unit.step))

    def append(self, step, rows):
        """Add rows: the small CSV is rewritten whole (utils.write_csv), so a failed write leaves it as it was;
        a CSV written by an older version keeps its own columns."""
        path = self.csv(step)
        header = next(csv.reader(path.read_text().splitlines()), None) if path.is_file() else None
        utils.write_csv(path, header or COLUMNS[step], [*read_csv(path), *rows])


class RunFolders:
    """Each run's log folder and checkpoints under --work_dir, and the command that starts or continues it."""

    def __init__(self, work, device, data_dir):
        self.work, self.device, self.data_dir = work, device, data_dir

    def paths(self, run):
        """(the run's log folder, the checkpoint --resume auto continues from, the flags for its checkpoints)."""
        checkpoint = self.work / "checkpoints" / f"{run.name}.pt"
        log_dir = self.work / "logs" / "cifar10" / run.name
        if run.script == "mae_pretrain.py":
            return log_dir, checkpoint, ["--model_path", str(checkpoint)]
        return log_dir, checkpoint.with_name(f"{run.name}_last.pt"), ["--output_model_path", str(checkpoint)]

    def metrics(self, run):
        return read_csv(self.paths(run)[0] / "metrics.csv")

    def budget_record(self, run):
        """A budgeted run's budget.json (its plan and wall times), or {} before it has planned."""
        record = self.paths(run)[0] / "budget.json"
        return json.loads(record.read_text()) if record.is_file() else {}

    def planned(self, run):
        """The epochs a run trains: fixed, or those a budgeted run planned (None until it has)."""
        return self.budget_record(run).get("total_epoch") if run.minutes else run.epochs

    def finished(self, run):
        total = self.planned(run)
        return bool(total) and self.paths(run)[1].is_file() and len(self.metrics(run)) >= total

    def wall_seconds(self, run):
        """Process start to exit, every process of a budgeted run together."""
        walls = self.budget_record(run).get("wall_seconds")
        return sum(walls) if walls else None

    def command(self, run, bookkeeping=True):
        words = [sys.executable, run.script, *run.options, "--device", self.device]
        if run.epochs or run.minutes:
            resume = self.paths(run)[1].is_file()
            words += [*(["--data_dir", self.data_dir] if self.data_dir else []), *self.paths(run)[2],
                      "--run_name", run.name, "--log_dir", str(self.work / "logs"),
                      *(["--resume", "auto"] if resume else ["--overwrite"]) * bookkeeping]
        return words

    def display(self, run):
        """The command as a reader types it: python, DATA, paths inside the repository relative to it."""
        shown = {sys.executable: "python", self.data_dir: "DATA"}
        return shlex.join(shown.get(w, os.path.relpath(w, HERE) if w.startswith(str(HERE) + os.sep) else w)
                          for w in self.command(run, bookkeeping=False))


# ----------------------------------------------------------------------------------------- time estimates


class Estimates:
    """How long a run or a unit takes on this machine: from its own rows where it has them, else a guess."""

    def __init__(self, campaign):
        self.c = campaign

    def speed(self, kind):
        """(start-up + compile seconds, seconds per epoch) of a run like ``kind``: step 2's measurement of it on
        this GPU, else that of its workload's default command scaled by decoder cost, else a guess from the
        reference's speed. (The guesses are several times too slow on an H200: without the second source a
        part would stop after one variant.)"""
        workload = kind.split("_")[0]
        for key, scale in ((kind, 1.0), ("pretrain_dd4" if workload == "pretrain" else workload,
                                         DEPTH_COST.get(kind, 1.0))):
            row = next((r for r in reversed(self.c.rows("epochs")) if r["key"] == key), None)
            if row and number(row["seconds_per_epoch"]):
                per_epoch = 1.2 * number(row["seconds_per_epoch"])  # + evaluation, logging and the checkpoint
                return max(number(row["wall_s"]) - int(row["epochs"]) * per_epoch, 0), per_epoch * scale
        guess = self.c.p["guess"]
        return guess["overhead"], guess[workload] * DEPTH_COST.get(kind, 1.0)

    def seconds(self, unit):
        """Seconds until ``unit`` has its rows: what is left of its runs, or a benchmark's compilations."""
        if unit.step == "bench":  # compilation dominates; each augmentation compiles again
            seen = [number(r["wall_s"]) for r in self.c.rows("bench")
                    if r["key"].endswith("_aug") == unit.info["aug"] and r["key"].split("_")[3] == unit.info["compile"]]
            return statistics.median(seen) if seen else self.c.p["guess"][unit.info["compile"]] * (
                3 if unit.info["aug"] else 1)
        folders = self.c.folders
        return sum(run.minutes * 60 + 5 if run.minutes else  # a budgeted run ends within its minutes (+ its exit)
                   self.speed(run.kind)[0] + (run.epochs - len(folders.metrics(run))) * self.speed(run.kind)[1]
                   for run in unit.runs if not folders.finished(run))

    def fit(self, kind, budget, cap):
        """Epochs of a run like ``kind`` that end within ``budget`` seconds, also when a part starts with it."""
        overhead, per_epoch = self.speed(kind)
        return max(1, min(cap, int((budget - overhead - self.c.margin) / per_epoch) - 1))


# ------------------------------------------------------------------------------------------------ the plan


class Planner:
    """Each step's units: the runs that measure them, sized to fit a part; planned when needed, from the rows
    the earlier units left."""

    def __init__(self, campaign, estimates):
        self.c, self.p, self.estimates = campaign, campaign.p, estimates

    def plan(self, step):
        return getattr(self, f"plan_{step}", lambda: [])()

    def missing(self):
        return [unit for step in STEPS for unit in self.plan(step) if not self.c.done(unit)]

    def train(self, name, script, epochs, kind, *options):
        warmup = max(1, round(epochs * (0.1 if script == "mae_pretrain.py" else 0.05)))
        return Run(script, [*options, *self.p["batch"], *self.p["speed"], "--total_epoch", str(epochs),
                            "--warmup_epoch", str(warmup)], name, epochs, kind)

    def budgeted(self, name, script, minutes, *options):
        return Run(script, [*options, *self.p["batch"], *self.p["speed"], "--time_budget", f"{minutes:g}"], name,
                   minutes=minutes)

    def plan_budget(self):
        """MAE (pretraining, then the strong recipe from its checkpoint) against the strong recipe from scratch,
        each arm the same minutes, seed 0. An arm of the smallest budget shares a part with the other; longer
        budgets run an arm a part."""
        units, limit = [], self.c.limit - 2 * self.c.margin
        for minutes in self.p["budgets"]:
            tag = f"{minutes:g}min"
            pretrain = self.budgeted(f"budget_mae_{tag}", "mae_pretrain.py", minutes * PRETRAIN_SHARE,
                                     *self.p["model"], *self.p["decoder"])
            finetune = self.budgeted(f"budget_ft_{tag}", "train_classifier.py", minutes * (1 - PRETRAIN_SHARE),
                                     "--recipe", "strong", "--pretrained_model_path",
                                     str(self.c.folders.paths(pretrain)[1]))
            scratch = self.budgeted(f"budget_scratch_{tag}", "train_classifier.py", minutes, "--recipe", "strong",
                                    *self.p["model"])
            record, info = partial(record_budget, self.c), dict(minutes=minutes)
            if SAFETY * (2 * minutes * 60 + 15) <= limit or minutes == self.p["budgets"][0]:
                units.append(Unit("budget", f"budget_{tag}", [pretrain, finetune, scratch], record, info=info))
            else:
                units += [Unit("budget", f"budget_{tag}_mae", [pretrain, finetune], record, info=info),
                          Unit("budget", f"budget_{tag}_scratch", [scratch], record, info=info)]
        return units

    def plan_bench(self):
        p, units = self.p, {}
        for workload, batches in p["batches"].items():
            for batch in batches:
                # Every compile mode at the largest batch; the first (default) elsewhere: a GPU session is 30 min.
                modes = p["compile_modes"] if batch == max(batches) else p["compile_modes"][:1]
                for precision, mode in [("fp32", "none")] + [(p["precision"], m) for m in modes]:
                    aug = workload == "finetune" and mode == p["compile_modes"][0]
                    key = f"{workload}_b{batch}_{precision}_{mode}" + "_aug" * aug
                    options = [*p["model"], *p["decoder"], *p["bench"], "--workloads", workload, "--batch_sizes",
                               str(batch), "--precisions", precision, "--compile_modes", mode, "--augments",
                               *(["none", "crop_flip", "randaug"] if aug else ["none"]), "--no_baseline",
                               "--output", str(self.c.work / "bench" / f"{key}.csv")]
                    units[key] = Unit("bench", key, [Run("benchmark.py", options)], partial(record_bench, self.c),
                                      info=dict(workload=workload, batch=batch, precision=precision, compile=mode,
                                                aug=aug))
        return list(units.values())  # the baseline is the chosen path on a CPU without a compiler: once

    def plan_epochs(self):
        mae = [*self.p["model"], *self.p["decoder"]]
        return [Unit("epochs", key, [self.train(f"speed_{key}", "mae_pretrain.py" if key.startswith("pretrain") else
                                                "train_classifier.py", self.p["speed_epochs"], key,
                                                *(mae if key.startswith("pretrain") else self.p["model"]), *extra)],
                     partial(record_epochs, self.c)) for key, extra in SPEED_RUNS.items()]

    def plan_tta(self):
        done, caps, budget = {r["key"]: r for r in self.c.rows("tta")}, self.p["caps"], self.c.limit - 2 * self.c.margin
        pe = int(done["tta_pretrain"]["epochs"]) if "tta_pretrain" in done else \
            self.estimates.fit("pretrain_dd2", budget, caps["tta_pretrain"])
        fe = next((int(done[k]["epochs"]) for k in ("tta_finetune", "tta_scratch") if k in done), None) or \
            self.estimates.fit("finetune_strong", budget, caps["tta_finetune"])
        pretrain = self.train(f"tta_mae_dd2_ep{pe}", "mae_pretrain.py", pe, "pretrain_dd2", *self.p["model"],
                              *self.p["decoder"], "--decoder_depth", "2")
        finetune = self.train(f"tta_ft_ep{fe}_{self.c.slug}", "train_classifier.py", fe, "finetune_strong",
                              "--recipe", "strong", "--pretrained_model_path", str(self.c.encoder))
        scratch = self.train(f"tta_scratch_ep{fe}", "train_classifier.py", fe, "finetune_strong", "--recipe",
                             "strong", *self.p["model"])
        record = partial(record_tta, self.c)
        return [Unit("tta", "tta_pretrain", [pretrain], record),
                Unit("tta", "tta_finetune", [finetune], record, needs=self.c.encoder),
                Unit("tta", "tta_scratch", [scratch], record)]

    def plan_ablation(self):
        """Every setting and seed: pretraining with k-NN and probe, then fine-tuning, all on one schedule."""
        pe, fe = self.ablation_schedule()
        units = []
        for seed in SEEDS:
            for depth, strategy in ABLATIONS:
                key = f"dd{depth}_{strategy}_s{seed}"
                kind = f"pretrain_dd{depth}" if strategy == "random" else f"pretrain_{strategy}"
                pretrain = self.train(f"abl_{key}_ep{pe}", "mae_pretrain.py", pe, kind, *self.p["model"],
                                      *self.p["decoder"], "--decoder_depth", str(depth), "--mask_strategy", strategy,
                                      "--seed", str(seed), "--knn_every", str(pe), "--probe_epochs",
                                      str(self.p["probe_epochs"]))
                finetune = self.train(f"abl_{key}_ep{pe}_ft{fe}", "train_classifier.py", fe, "finetune_strong",
                                      "--recipe", "strong", "--seed", str(seed), "--pretrained_model_path",
                                      str(self.c.folders.paths(pretrain)[1]))
                units.append(Unit("ablation", key, [pretrain, finetune], partial(record_ablation, self.c),
                                  info=dict(decoder_depth=depth, mask_strategy=strategy, seed=seed,
                                            pretrain_epochs=pe, finetune_epochs=fe)))
        return units

    def ablation_schedule(self):
        """(pretraining, fine-tuning epochs): the first row's, else the slowest setting (decoder depth 8) with its
        fine-tuning fitted into one part."""
        old, caps, limit, margin = self.c.rows("ablation"), self.p["caps"], self.c.limit, self.c.margin
        if old:
            return int(old[0]["pretrain_epochs"]), int(old[0]["finetune_epochs"])
        pe = self.estimates.fit("pretrain_dd8", 0.6 * (limit - 2 * margin), caps["abl_pretrain"])
        overhead, per_epoch = self.estimates.speed("pretrain_dd8")
        return pe, self.estimates.fit("finetune_strong", limit - 3 * margin - overhead - pe * per_epoch,
                                     caps["abl_finetune"])


# ------------------------------------------------------------------------------------------ recording rows


def summary(folders, run):
    """What metrics.csv says of a run: the median epoch after the first (which includes the compilation)."""
    rows = folders.metrics(run)
    median = lambda column: statistics.median(number(r[column]) for r in rows[1:] or rows)
    return dict(epochs=len(rows), seconds_per_epoch=median("seconds"), images_per_s=median("images_per_s"),
                first_epoch_s=rows[0]["seconds"], compile_s=rows[0].get("compile_seconds"),
                train_s=sum(number(r["seconds"]) for r in rows),
                final_loss=rows[-1].get("loss"), val_acc=rows[-1].get("val_acc"),
                best_val_acc=max((number(r.get("val_acc")) for r in rows), default=None, key=lambda v: v or 0),
                knn_acc=rows[-1].get("knn_acc"), probe_acc=rows[-1].get("probe_acc"))


def record_budget(campaign, unit):
    """A row per arm: its final test accuracy, epochs and wall time; the MAE arm's pretrained MAE and fine-tuned
    classifier are exported to results/weights/ (bf16)."""
    folders, rows = campaign.folders, []
    by_name = {run.name.split("_")[1]: run for run in unit.runs}  # mae, ft, scratch
    for arm, runs in (("mae", [by_name.get("mae"), by_name.get("ft")]), ("scratch", [None, by_name.get("scratch")])):
        if runs[1] is None:
            continue
        tuned = summary(folders, runs[1])
        walls = [folders.wall_seconds(run) for run in runs if run]
        weights = export_weights(campaign, runs, unit.info["minutes"]) if arm == "mae" else ""
        rows.append(dict(arm=arm, budget_minutes=unit.info["minutes"], pretrain_share=PRETRAIN_SHARE * (arm == "mae"),
                         seed=0, test_acc=fmt(tuned["val_acc"], ".2f", 100),
                         best_val_acc=fmt(tuned["best_val_acc"], ".2f", 100),
                         pretrain_epochs=len(folders.metrics(runs[0])) if runs[0] else 0,
                         finetune_epochs=tuned["epochs"], machine=campaign.gpu, weights=weights,
                         wall_minutes=round(sum(walls) / 60, 2) if None not in walls else ""))
    return rows


def export_weights(campaign, runs, minutes):
    """The MAE arm's two checkpoints as released weights: results/weights/{mae,cls}_<machine>_<N>min.pt."""
    import checkpoint  # here: the other steps need no model code

    names = []
    for run, kind in zip(runs, ("mae", "cls")):
        target = campaign.results / "weights" / f"{kind}_{campaign.slug}_{minutes:g}min.pt"
        state = torch.load(campaign.folders.paths(run)[1], map_location="cpu", weights_only=True)
        checkpoint.export_weights(state, target, WEIGHTS_LIMIT)
        names.append(str(target.relative_to(campaign.results)))
    return " ".join(names)


def record_bench(campaign, unit):
    return read_csv(campaign.work / "bench" / f"{unit.key}.csv")


def record_epochs(campaign, unit):
    return [summary(campaign.folders, unit.runs[0])]


def record_tta(campaign, unit):
    row = summary(campaign.folders, unit.runs[0])
    if unit.key == "tta_pretrain":
        row["encoder_mb"] = export_encoder(campaign.folders.paths(unit.runs[0])[1], campaign.encoder)
    return [row]


def record_ablation(campaign, unit):
    pretrain, finetune = (summary(campaign.folders, run) for run in unit.runs)
    return [dict(unit.info, pretrain_loss=pretrain["final_loss"], knn_acc=pretrain["knn_acc"],
                 probe_acc=pretrain["probe_acc"], val_acc=finetune["val_acc"], pretrain_s=pretrain["train_s"],
                 finetune_s=finetune["train_s"])]


def export_encoder(source, target):
    """The pretrained weights in bf16 (the encoder alone if with the decoder they pass 16 MB), for
    train_classifier.py --pretrained_model_path on another machine; returns the file's size in MB."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    from checkpoint import bf16, torch_save  # here: the other steps need no model code

    weights = bf16(state["model"])

    def write(tmp):
        for keep in ("", "encoder."):
            torch_save({"kind": "mae", "model": {k: v for k, v in weights.items() if k.startswith(keep)},
                        "config": state["config"], "epoch": state["epoch"]}, tmp)
            if tmp.stat().st_size < ENCODER_LIMIT:
                break

    utils.atomic_write(target, write, "encoder")
    return round(target.stat().st_size / 2 ** 20, 2)


# ----------------------------------------------------------------------------------------------- a part


class Part:
    """One part: the units still to run, in order, until the next would not fit before ``end``
    (time.monotonic() seconds) or a stop signal comes; each unit's rows are appended when its runs end."""

    def __init__(self, campaign, planner, end):
        self.c, self.planner, self.end = campaign, planner, end
        self.commit, self.stopping = git_commit(), 0

    def run(self, steps):
        """Units in order until one would not fit (the first always runs); returns (failures, stopped early)."""
        ran, failures = False, 0
        for step in steps:
            for unit in self.planner.plan(step):  # planned step by step: later steps are sized from earlier rows
                if self.c.done(unit):
                    continue
                if unit.needs and not unit.needs.is_file():
                    say(f"{step} {unit.key}: waits for {unit.needs.name}")
                    continue
                estimate, left = self.planner.estimates.seconds(unit), self.end - self.c.margin - time.monotonic()
                if self.stopping or ran and SAFETY * estimate > left:
                    say(f"{step} {unit.key}: ~{estimate:.0f} s does not fit in the {left:.0f} s left")
                    return failures, True
                first, ran, start = not ran, True, time.monotonic()
                say(f"{step} {unit.key}: running (~{estimate:.0f} s)")
                code = self.run_unit(unit)
                if code in (130, 143, -signal.SIGTERM, -signal.SIGKILL) or self.stopping:
                    if step == "bench" and first and not self.stopping:  # a whole part was not enough: recorded
                        self.c.append(step, [dict(unit.info, **self.meta(unit, start), augment="none",
                                                  status="timeout")])
                    say(f"{step} {unit.key}: stopped at the end of the part; the next part continues it")
                    return failures, True
                failures += bool(code)
                self.tell_end(unit, code, start)
        return failures, False

    def run_unit(self, unit):
        """Run what is left of the unit, then append its rows; returns 0, or the first non-zero exit code."""
        folders, start, output = self.c.folders, time.monotonic(), self.output(unit)
        output.parent.mkdir(parents=True, exist_ok=True)
        for run in unit.runs:
            if folders.finished(run):
                continue
            if run.epochs and not folders.paths(run)[1].is_file():  # new, or stopped before its first checkpoint
                shutil.rmtree(folders.paths(run)[0], ignore_errors=True)
            # The last epoch ends (a budgeted run plans its own end: it needs no grace).
            grace = 5 if run.minutes else self.c.margin + (self.planner.estimates.speed(run.kind)[1] if run.kind else 0)
            code = execute(folders.command(run), output, self.end - grace, self.end)
            if code:
                return code
        rows = unit.record(unit)
        self.c.append(unit.step, [{**row, **self.meta(unit, start)} for row in rows])
        return 0 if rows else 1

    def output(self, unit):
        return self.c.work / "output" / f"{unit.step}_{unit.key}.txt"

    def meta(self, unit, start):
        return dict(gpu=self.c.gpu, torch=torch.__version__, commit=self.commit, key=unit.key,
                    date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    command=" && ".join(map(self.c.folders.display, unit.runs)),
                    wall_s=round(time.monotonic() - start, 1))

    def tell_end(self, unit, code, start):
        """Done, or failed with the end of its output."""
        if not code:
            say(f"{unit.step} {unit.key}: done in {time.monotonic() - start:.0f} s")
            return
        output = self.output(unit)
        tail = output.read_text().splitlines()[-15:] if output.is_file() else []
        say(f"{unit.step} {unit.key}: FAILED (exit code {code}); its output ends with\n" + "\n".join(tail))

    def stop(self, signum, frame):
        """SIGTERM / SIGINT: the running script saves (SIGINT from a terminal reaches it by itself), then we stop."""
        self.stopping = self.stopping or 128 + signum
        child = getattr(execute, "child", None)
        if signum == signal.SIGTERM and child is not None:
            child.terminate()


def dry_run(campaign, planner, steps):
    """The plan packed into parts as Part.run would go through it, if every estimate held."""
    parts, load = [[]], 0.0
    for step in steps:
        for unit in planner.plan(step):
            if campaign.done(unit):
                say(f"{step} {unit.key}: done")
                continue
            estimate = planner.estimates.seconds(unit)
            if parts[-1] and load + SAFETY * estimate > campaign.limit - 2 * campaign.margin:
                parts.append([])
                load = 0.0
            parts[-1].append(unit)
            load += estimate
    parts = [part for part in parts if part]
    for i, part in enumerate(parts, 1):
        say(f"part {i}: ~{sum(map(planner.estimates.seconds, part)) / 60:.1f} min")
        for unit in part:
            say(f"  {unit.step} {unit.key} (~{planner.estimates.seconds(unit):.0f} s): "
                + " && ".join(map(campaign.folders.display, unit.runs)))
    say(f"{sum(map(len, parts))} units still to run on {campaign.gpu}: about {len(parts)} parts of "
        f"{campaign.args.time_limit:g} min")


# ---------------------------------------------------------------------------------------------- the report


class Citations:
    """Each row's run as a numbered note: the machine, torch, commit, date, wall time and command."""

    def __init__(self):
        self.notes = {}

    def __call__(self, row):
        note = (f"{row['gpu']}, torch {row['torch']}, commit {row['commit']}, {row['date']}, {row['wall_s']} s: "
                f"`{row['command']}`")
        return f"[{self.notes.setdefault(note, len(self.notes) + 1)}]"

    def lines(self):
        return [f"[{i}] {note}" for note, i in self.notes.items()]


def vs_reference(row, name):
    """The row's images per second over the reference's for its workload."""
    return fmt(row["images_per_s"], ".2f", 1 / REFERENCE[name.split("_")[0]])


def write_report(campaign, missing):
    """results/REPORT.md: every table from the step CSVs (every machine's rows), then what this one still lacks."""
    cite = Citations()
    out = ["# GPU measurement campaign", "", "Rebuilt by `python campaign.py` after every part from the CSV files "
           "beside it. Every number is a row there; its command, machine, torch, commit and date are listed "
           "under Runs. The reference (IcarusWizard/MAE, its code unchanged) does 3,760 img/s pretraining and "
           "2,080 img/s fine-tuning (batch 128) on one H100.", ""]
    out += budget_section(campaign.rows("budget", everywhere=True), cite)
    out += bench_section(campaign.rows("bench", everywhere=True), cite)
    out += epochs_section(campaign.rows("epochs", everywhere=True), cite)
    out += tta_section(campaign.rows("tta", everywhere=True), cite)
    out += ablation_sections(campaign.rows("ablation", everywhere=True), cite)
    steps = dict.fromkeys(unit.step for unit in missing)
    out += [f"## Still to be measured on {campaign.gpu}", ""]
    out += [f"- {step}: " + ", ".join(u.key for u in missing if u.step == step) for step in steps] or [
        "Nothing: every unit has its row."]
    out += ["", "## Runs", "", *cite.lines()]
    utils.write_text(campaign.results / "REPORT.md", "\n".join(out) + "\n")


def budget_section(budget, cite):
    return ["## MAE against training from scratch at equal compute", "", "Each arm gets the same minutes of "
            "--time_budget, counted from each process's start (start-up, data, compilation included): MAE "
            "pretrains for half of them and fine-tunes for the rest (the strong recipe); from scratch fine-tunes "
            "for all of them. Seed 0, final epoch's test accuracy; the MAE arm's weights are under weights/.", "",
            *table(["machine", "minutes per arm", "arm", "test acc %", "epochs (pretrain + fine-tune)", "wall min",
                    "weights", "run"],
                   [[r["gpu"], r["budget_minutes"], r["arm"], r["test_acc"],
                     f"{r['pretrain_epochs']} + {r['finetune_epochs']}", r["wall_minutes"], r["weights"] or "-",
                     cite(r)] for r in budget])]


def bench_section(bench, cite):
    base = {(r["gpu"], r["workload"], r["batch"]): number(r["images_per_s"]) for r in bench
            if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")}
    return ["## Training-step throughput (benchmark.py, synthetic data on the device)", "", *table(
        ["machine", "workload", "batch", "precision", "compile", "augment", "img/s", "vs fp32 eager",
         "vs reference", "TFLOP/s", "% of peak", "memory GiB", "run"],
        [[r["gpu"], r["workload"], r["batch"], r["precision"], r["compile"], r["augment"],
          fmt(r["images_per_s"]) if r["status"] == "ok" else r["status"],
          fmt(r["images_per_s"], ".2f", 1 / base[(r["gpu"], r["workload"], r["batch"])])
          if base.get((r["gpu"], r["workload"], r["batch"])) else "-", vs_reference(r, r["workload"]),
          fmt(r["tflops"], ".3g"), fmt(r["percent_of_peak"]), fmt(r["peak_memory_gib"], ".2f"), cite(r)]
         for r in bench])]


def epochs_section(epochs, cite):
    return ["## Epoch times on CIFAR-10 (the design card's commands)", "", "From each run's metrics.csv: the "
            "median epoch after the first, which includes the compilation; data loading, masking and "
            "augmentation included. Full schedule: 2000 pretraining or 100 fine-tuning epochs at that speed.", "",
            *table(["machine", "run", "epochs", "s/epoch", "img/s", "vs reference", "first epoch s", "compile s",
                    "full schedule h", "run"],
                   [[r["gpu"], r["key"], r["epochs"], fmt(r["seconds_per_epoch"], ".2f"), fmt(r["images_per_s"]),
                     vs_reference(r, r["key"]), fmt(r["first_epoch_s"]), fmt(r.get("compile_s")),
                     fmt(r["seconds_per_epoch"], ".2f", (2000 if r["key"].startswith("pretrain") else 100) / 3600),
                     cite(r)] for r in epochs])]


def tta_section(tta, cite):
    return ["## Time to accuracy", "", "Pretraining (decoder depth 2) sized to fill one part, then the strong "
            "recipe from its encoder, and the same fine-tuning from scratch. Training s: the epochs' own time; "
            "wall s: the processes of the part that ended it, start-up and compilation included.", "",
            *table(["machine", "run", "epochs", "training s", "wall s", "final loss", "test acc %", "best %", "run"],
                   [[r["gpu"], r["key"], r["epochs"], fmt(r["train_s"]), fmt(r["wall_s"]),
                     fmt(r["final_loss"], ".4f"), fmt(r["val_acc"], ".2f", 100), fmt(r["best_val_acc"], ".2f", 100),
                     cite(r)] for r in tta])]


def ablation_sections(ablation, cite):
    """One table per axis, the other axis at its default; each row a machine, setting and schedule over seeds."""
    out = []
    for title, axis, keep in (("decoder depth", "decoder_depth", ("mask_strategy", "random")),
                              ("mask strategy", "mask_strategy", ("decoder_depth", "4"))):
        groups = {}
        for r in ablation:
            if r[keep[0]] == keep[1]:
                groups.setdefault((r["gpu"], r[axis], r["pretrain_epochs"], r["finetune_epochs"]), []).append(r)
        stat = lambda rs, column, scale=100: mean_std([number(r[column]) for r in rs], scale)
        out += [f"## Ablation: {title} (mean ± std over seeds; final epoch)", ""]
        out += table(["machine", title, "seeds", "fine-tune acc %", "linear probe acc %", "k-NN acc %",
                      "pretrain loss", "epochs (pretrain + fine-tune)", "runs"],
                     [[*key[:2], len(rs), stat(rs, "val_acc"), stat(rs, "probe_acc"), stat(rs, "knn_acc"),
                       stat(rs, "pretrain_loss", 1), f"{key[2]} + {key[3]}", " ".join(map(cite, rs))]
                      for key, rs in groups.items()])
    return out


def main(argv=None, start=None):
    start = start or time.monotonic()
    args = parse_args(argv)
    campaign = Campaign(args)
    planner = Planner(campaign, Estimates(campaign))
    steps = [args.only] if args.only else list(STEPS)
    if args.dry_run:
        dry_run(campaign, planner, steps)
        return 0
    part = Part(campaign, planner, start + campaign.limit - campaign.margin)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, part.stop)
    failures, more = part.run(steps)
    missing = planner.missing()
    write_report(campaign, missing)
    say(f"{campaign.results / 'REPORT.md'} rebuilt; {len(missing)} units still to be measured on {campaign.gpu}" +
        ("; run the same command again for the next part" if more else ""))
    return part.stopping or (1 if failures else 0)


if __name__ == "__main__":
    utils.run_cli(partial(main, start=STARTED))
