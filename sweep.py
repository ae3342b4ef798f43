"""The ablation study as one command: for every combination of settings, pretrain, then fine-tune from that
checkpoint and train a linear probe on it; optionally also fine-tune from scratch once per seed.

    python sweep.py --name depth --decoder_depth 1 2 4 8 --seeds 0 1 --pretrain_epochs 200 --finetune_epochs 50
    python sweep.py --name masking --mask_strategy random block grid --mask_ratio 0.5 0.75 0.9 --scratch
    python sweep.py ... --dry_run                        # print the plan and every command; run nothing
    python summarize.py logs/cifar10/sweep_depth         # then: tables and figures

Everything a sweep writes lives in one folder, <log_dir>/<dataset>/sweep_<name>/:

    mae_dd8_block_mr0.75_ep200_s1/   pretraining: metrics.csv, TensorBoard events, settings.json
    ft_dd8_block_mr0.75_ep200_s1/    fine-tuning from that checkpoint
    lp_dd8_block_mr0.75_ep200_s1/    linear probe on the frozen encoder
    scratch_s1/                      fine-tuning from scratch (--scratch)
    checkpoints/<run>.pt             (the classifier runs also write <run>_last.pt, which they resume from)

settings.json records what the run was started with; summarize.py groups runs by it.

Run the same command again to continue a sweep: a run whose metrics.csv has all its epochs (or that --patience
ended) and whose checkpoint exists is skipped, an interrupted one continues with --resume auto, one that never
started begins. Each run is a subprocess, so one that crashes is reported at the end (exit code 1) without stopping
the others; the runs that need its checkpoint are skipped. Ctrl-C lets the current run finish its epoch and save,
then stops the sweep.

Warm-up lengths scale with the schedule, as in the reference (pretraining 200 of 2000 epochs, fine-tuning 5 of 100),
so that a shortened schedule keeps its shape; --pretrain_args="--warmup_epoch 40" (any option of the script) wins,
because the free-form options come last on the command line. (Write --pretrain_args="..." with "=": argparse
takes a lone "--option" after a space for an option of its own.)
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch

from model import MASK_STRATEGIES

HERE = Path(__file__).resolve().parent
PRETRAIN_WARMUP, FINETUNE_WARMUP = 0.1, 0.05  # the reference's warm-up fractions: 200 / 2000 and 5 / 100 epochs
# Options the sweep sets itself: given again in the free-form options, they would break its bookkeeping.
SWEEP_OPTIONS = {"--run_name", "--log_dir", "--dataset", "--model_path", "--output_model_path", "--resume",
                 "--pretrained_model_path", "--seed", "--total_epoch", "--decoder_depth", "--mask_strategy",
                 "--mask_ratio", "--linear_probe"}
MODEL_SIZE = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="ablation", help="the sweep's folder is <log_dir>/<dataset>/sweep_<name>")
    grid = p.add_argument_group("the grid: one run chain for every combination")
    grid.add_argument("--decoder_depth", type=int, nargs="+", default=[4])
    grid.add_argument("--mask_strategy", choices=MASK_STRATEGIES, nargs="+", default=["random"])
    grid.add_argument("--mask_ratio", type=float, nargs="+", default=[0.75])
    grid.add_argument("--pretrain_epochs", type=int, nargs="+", default=[2000])
    grid.add_argument("--seeds", type=int, nargs="+", default=[0])
    stages = p.add_argument_group("what follows each pretraining")
    stages.add_argument("--finetune_epochs", type=int, default=100)
    stages.add_argument("--linear_probe_epochs", type=int, default=None, help="default: --finetune_epochs")
    stages.add_argument("--no_linear_probe", action="store_true", help="skip the linear-probe stage")
    stages.add_argument("--scratch", action="store_true", help="also fine-tune from scratch once per seed")
    common = p.add_argument_group("passed on to every run (left out: the scripts' defaults)")
    common.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    common.add_argument("--data_dir", default=None, help="image folder with train/<class>/ and test/<class>/")
    common.add_argument("--device", default=None, help="cuda, cpu or auto")
    common.add_argument("--log_dir", default="logs")
    common.add_argument("--pretrain_batch_size", type=int, default=None)
    common.add_argument("--finetune_batch_size", type=int, default=None, help="also for scratch and the probe")
    common.add_argument("--max_device_batch_size", type=int, default=None, help="micro-batch of every run")
    for name in (*MODEL_SIZE, "decoder_heads"):
        common.add_argument(f"--{name}", type=int, default=None, help="model size (e.g. a tiny model for tests)")
    common.add_argument("--pretrain_args", default="", help='more options for mae_pretrain.py, e.g. "--augment '
                                                            'crop_flip --norm_pix_loss"')
    common.add_argument("--finetune_args", default="", help="more options for train_classifier.py when "
                                                            "fine-tuning (pretrained and scratch)")
    common.add_argument("--probe_args", default="", help="more options for train_classifier.py --linear_probe")
    p.add_argument("--launcher", default="", help='runs each script under this command, e.g. "torchrun '
                                                  '--nproc_per_node 4" (default: this Python)')
    p.add_argument("--dry_run", action="store_true", help="print what would run, with the commands; run nothing")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("pretrain_args", "finetune_args", "probe_args"):
        words = shlex.split(getattr(args, option))
        # argparse also takes a unique prefix of an option ("--total" for --total_epoch): check prefixes too.
        taken = sorted({managed for word in words if word.startswith("--") for managed in SWEEP_OPTIONS
                        if managed.startswith(word.split("=")[0])})
        if taken:
            parser.error(f"--{option} may not set {', '.join(taken)}: the sweep sets those itself")
        setattr(args, option, words)
    for grid in ("decoder_depth", "mask_strategy", "mask_ratio", "pretrain_epochs", "seeds"):
        setattr(args, grid, list(dict.fromkeys(getattr(args, grid))))  # a value given twice runs once
    return args


def classifier_has_linear_probe():
    """Whether train_classifier.py offers --linear_probe (the probe stage is planned only if it does)."""
    import train_classifier

    return any("--linear_probe" in action.option_strings for action in train_classifier.build_parser()._actions)


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class Run:
    name: str              # e.g. mae_dd8_block_mr0.75_ep200_s1; also its log folder's name
    script: str            # mae_pretrain.py or train_classifier.py
    options: list          # the script's options, without --resume
    total_epochs: int
    checkpoint: Path       # what --resume auto continues from
    log_dir: Path          # where the script writes metrics.csv (<log_dir>/<dataset>/<run_name>/)
    settings: dict         # what makes the experiment; recorded in settings.json, compared on every restart
    needs: "Run" = None    # the pretraining run whose checkpoint this run starts from
    launcher: tuple = ()   # e.g. ("torchrun", "--nproc_per_node", "4"); empty: this Python

    def command(self, resume=False):
        return [*(self.launcher or [sys.executable]), str(HERE / self.script), *self.options,
                *(["--resume", "auto"] if resume else [])]


def optional(flag, value):
    return [] if value is None else [flag, str(value)]


def warmup(epochs, fraction):
    return round(epochs * fraction)


class Planner:
    """Builds the runs of a sweep: names, checkpoint paths, settings and the scripts' command lines."""

    def __init__(self, args, with_probe):
        self.args = args
        self.with_probe = with_probe
        self.folder = Path(args.log_dir) / args.dataset / f"sweep_{args.name}"
        self.model_size = {name: getattr(args, name) for name in MODEL_SIZE if getattr(args, name) is not None}
        self.launcher = tuple(shlex.split(args.launcher))

    def shared_options(self, name):
        a = self.args
        # The scripts write to <log_dir>/<dataset>/<run_name>/: a run name that starts with the sweep's folder
        # puts every run of the sweep under that one folder.
        return ["--run_name", f"{self.folder.name}/{name}", "--log_dir", a.log_dir, "--dataset", a.dataset,
                *optional("--data_dir", a.data_dir), *optional("--device", a.device),
                *optional("--max_device_batch_size", a.max_device_batch_size)]

    def model_options(self):
        return [word for k, v in self.model_size.items() for word in (f"--{k}", str(v))]

    def pretrain(self, depth, strategy, ratio, epochs, seed):
        a = self.args
        name = f"mae_dd{depth}_{strategy}_mr{ratio:g}_ep{epochs}_s{seed}"
        checkpoint = self.folder / "checkpoints" / f"{name}.pt"
        options = ["--seed", str(seed), "--decoder_depth", str(depth), "--mask_strategy", strategy,
                   "--mask_ratio", str(ratio), "--total_epoch", str(epochs),
                   "--warmup_epoch", str(warmup(epochs, PRETRAIN_WARMUP)), "--model_path", str(checkpoint),
                   *optional("--batch_size", a.pretrain_batch_size), *self.model_options(),
                   *optional("--decoder_heads", a.decoder_heads), *self.shared_options(name), *a.pretrain_args]
        settings = {"stage": "pretrain", "seed": seed, "dataset": a.dataset, "decoder_depth": depth,
                    "mask_strategy": strategy, "mask_ratio": ratio, "pretrain_epochs": epochs,
                    "pretrain_batch_size": a.pretrain_batch_size, "model_size": self.model_size,
                    "decoder_heads": a.decoder_heads, "pretrain_args": a.pretrain_args}
        return Run(name, "mae_pretrain.py", options, epochs, checkpoint, self.folder / name, settings,
                   launcher=self.launcher)

    def classifier(self, stage, seed, pretrained=None):
        """A train_classifier.py run: "finetune" or "linear_probe" from ``pretrained``, or "scratch"."""
        a = self.args
        prefix, epochs, extra = {"finetune": ("ft", a.finetune_epochs, a.finetune_args),
                                 "linear_probe": ("lp", a.linear_probe_epochs or a.finetune_epochs, a.probe_args),
                                 "scratch": ("scratch", a.finetune_epochs, a.finetune_args)}[stage]
        name = f"{prefix}_{pretrained.name.removeprefix('mae_')}" if pretrained else f"{prefix}_s{seed}"
        best = self.folder / "checkpoints" / f"{name}.pt"
        last = best.with_name(f"{name}_last.pt")  # train_classifier.py keeps its resumable state beside the best
        options = ["--seed", str(seed), "--total_epoch", str(epochs),
                   "--warmup_epoch", str(warmup(epochs, FINETUNE_WARMUP)), "--output_model_path", str(best),
                   *optional("--batch_size", a.finetune_batch_size)]
        if pretrained:
            options += ["--pretrained_model_path", str(pretrained.checkpoint)]
            settings = dict(pretrained.settings)  # a fine-tuned result depends on its pretraining too
        else:  # a pretrained encoder brings its own size; from scratch it has to be given
            options += self.model_options()
            settings = {"seed": seed, "dataset": a.dataset, "model_size": self.model_size}
        if stage == "linear_probe":
            options.append("--linear_probe")
        options += [*self.shared_options(name), *extra]
        epochs_key, args_key = ("linear_probe_epochs", "probe_args") if stage == "linear_probe" else (
            "finetune_epochs", "finetune_args")
        settings.update({"stage": stage, epochs_key: epochs, "finetune_batch_size": a.finetune_batch_size,
                         args_key: extra})
        return Run(name, "train_classifier.py", options, epochs, last, self.folder / name, settings, pretrained,
                   self.launcher)

    def plan(self):
        """Seeds outermost: after the first seed's pass every setting has a result to look at."""
        a = self.args
        runs = []
        for seed in a.seeds:
            for epochs, depth, strategy, ratio in product(a.pretrain_epochs, a.decoder_depth, a.mask_strategy,
                                                          a.mask_ratio):
                pretrain = self.pretrain(depth, strategy, ratio, epochs, seed)
                runs += [pretrain, self.classifier("finetune", seed, pretrain)]
                if self.with_probe:
                    runs.append(self.classifier("linear_probe", seed, pretrain))
            if a.scratch:
                runs.append(self.classifier("scratch", seed))
        return runs


# ------------------------------------------------------------------------------------------------ run state


def logged_epochs(run):
    """Rows in the run's metrics.csv, or None when it has none (the run never started)."""
    path = run.log_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        return max(sum(1 for line in f if line.strip()) - 1, 0)  # minus the header


def stopped_early(checkpoint):
    """Whether train_classifier.py ended this run before its last epoch (--patience): finished all the same."""
    try:
        return bool(torch.load(checkpoint, map_location="cpu", weights_only=True).get("stopped_early"))
    except Exception:  # unreadable: the resumed run will say what is wrong with it
        return False


def recorded_settings(run):
    path = run.log_dir / "settings.json"
    return json.loads(path.read_text())["settings"] if path.is_file() else None


def settings_conflict(run):
    """Why the run's folder cannot be reused for these settings, or None."""
    recorded, wanted = recorded_settings(run), run.settings
    if recorded is None or recorded == wanted:
        return None
    changed = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
    differences = ", ".join(f"{k}: {recorded.get(k)!r} then, {wanted.get(k)!r} now" for k in changed)
    return f"{run.log_dir} was run with other settings ({differences}); use another --name"


def run_state(run):
    """(action, detail): "skipped", "resuming", "new", "restarting", or "broken" (needs the user)."""
    epochs, has_checkpoint = logged_epochs(run), run.checkpoint.is_file()
    if has_checkpoint and epochs is not None and epochs >= run.total_epochs:
        return "skipped", f"finished: {epochs}/{run.total_epochs} epochs"
    if has_checkpoint and epochs and stopped_early(run.checkpoint):
        return "skipped", f"finished: stopped early (--patience) after {epochs}/{run.total_epochs} epochs"
    if has_checkpoint:
        return "resuming", f"{epochs or 0}/{run.total_epochs} epochs done"
    if epochs is None:
        return "new", ""
    if epochs == 0:  # it stopped during its first epoch: nothing to continue, nothing to lose
        return "restarting", "it stopped before its first checkpoint"
    return "broken", (f"{run.log_dir} has {epochs} epochs logged but no checkpoint {run.checkpoint} to continue "
                      f"from; delete that folder to run it again")


def write_settings(run, command):
    run.log_dir.mkdir(parents=True, exist_ok=True)
    record = {"run": run.name, "settings": run.settings, "total_epochs": run.total_epochs,
              "checkpoint": str(run.checkpoint), "command": shlex.join(command)}
    (run.log_dir / "settings.json").write_text(json.dumps(record, indent=1) + "\n")


def execute(command):
    """Run ``command`` as a child process; its exit code. On Ctrl-C, wait for the child (which got the same
    signal) to finish its epoch and save its checkpoint, then stop the sweep."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        print("\nsweep: waiting for the current run to save its checkpoint (Ctrl-C again to quit now)", flush=True)
        child.wait()
        raise


# ---------------------------------------------------------------------------------------------------- the loop


def say(message):
    print(message, flush=True)  # flushed, so it lands in order with the children's output


def run_sweep(runs, dry_run=False):
    """Run (or, dry, describe) every run in order; returns the failures as (run name, reason)."""
    finished, failures, skipped = set(), [], 0
    for number, run in enumerate(runs, 1):
        prefix = f"[{number}/{len(runs)}] {run.name}:"
        conflict = settings_conflict(run)
        action, detail = ("broken", conflict) if conflict else run_state(run)
        if action == "skipped":
            finished.add(run.name)
            skipped += 1
            say(f"{prefix} skipped ({detail})")
            if not dry_run and recorded_settings(run) is None:
                write_settings(run, run.command())
            continue
        if action == "broken":
            failures.append((run.name, detail))
            say(f"{prefix} FAILED: {detail}")
            continue
        if run.needs and run.needs.name not in finished:
            failures.append((run.name, f"not run: {run.needs.name} did not finish"))
            say(f"{prefix} not run ({run.needs.name} did not finish)")
            continue
        command = run.command(resume=action == "resuming")
        say(f"{prefix} {action}" + (f" ({detail})" if detail else ""))
        if dry_run:
            say("    " + shlex.join(command))
            finished.add(run.name)  # assume it would finish, so that the runs after it are shown too
            continue
        if action == "restarting":
            shutil.rmtree(run.log_dir)
        write_settings(run, command)
        start = time.perf_counter()
        code = execute(command)
        epochs = logged_epochs(run) or 0
        if code == 0 and run_state(run)[0] == "skipped":
            finished.add(run.name)
            say(f"{prefix} finished in {time.perf_counter() - start:.1f} s")
        else:
            reason = f"exit code {code}" if code else (f"stopped by a signal after {epochs} of "
                                                       f"{run.total_epochs} epochs")
            failures.append((run.name, reason))
            say(f"{prefix} FAILED ({reason}; its output is above)")
    return failures, skipped


def report(folder, runs, failures, skipped):
    done = len(runs) - len(failures)
    say(f"\nsweep {folder}: {done} of {len(runs)} runs finished ({skipped} of them already before this call)")
    for name, reason in failures:
        say(f"  failed: {name}: {reason}")
    if failures:
        say("Fix the cause and run the same command again: finished runs are skipped, interrupted ones resumed.")
    say(f"tables and figures: python summarize.py {folder}")


def main(argv=None):
    args = parse_args(argv)
    with_probe = not args.no_linear_probe and classifier_has_linear_probe()
    planner = Planner(args, with_probe)
    runs = planner.plan()
    say(f"sweep {planner.folder}: {len(runs)} runs" + ("" if with_probe or args.no_linear_probe else
                                                       " (train_classifier.py has no --linear_probe: no probes)"))
    try:
        failures, skipped = run_sweep(runs, args.dry_run)
    except KeyboardInterrupt:
        say("\nsweep interrupted; run the same command again to continue where it stopped")
        return 130
    if not args.dry_run:
        report(planner.folder, runs, failures, skipped)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
