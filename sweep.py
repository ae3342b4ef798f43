"""The ablation study as one command: for every combination of settings, pretrain, then fine-tune from that
checkpoint and train a linear probe on it (unless --no_linear_probe); with --scratch also fine-tune from scratch.

    python sweep.py --name depth --decoder_depth 1 2 4 8 --seeds 0 1 --pretrain_epochs 200 --finetune_epochs 50
    python sweep.py --name masking --mask_strategy random block grid --mask_ratio 0.5 0.75 0.9 --scratch --dry_run
    python summarize.py logs/cifar10/sweep_depth         # then: tables and figures

Everything lives in <log_dir>/<dataset>/sweep_<name>/: one folder per run (mae_dd8_block_mr0.75_ep200_s1,
ft_dd8_block_mr0.75_ep200_s1, lp_..., scratch_s1) with metrics.csv and settings.json (what the run was started
with; summarize.py groups by it), and checkpoints/<run>.pt (classifier runs resume from <run>_last.pt).
Run the same command again to continue: a run with all its epochs logged (or ended by --patience) and a checkpoint
is skipped, an interrupted one continues with --resume auto. Each run is a subprocess: one that fails is reported
at the end (exit code 1) and only the runs that need its checkpoint are skipped. Ctrl-C lets the current run save.
Warm-up scales with the schedule (10 % of pretraining, 5 % of fine-tuning, as in the reference); the free-form
options come last and win: --pretrain_args="--warmup_epoch 40" (with "=", or argparse takes it for its own).
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from functools import partial
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import torch

from model import MASK_STRATEGIES

HERE = Path(__file__).resolve().parent
# Options the sweep sets itself: given again in the free-form options, they would break its bookkeeping.
OWN_OPTIONS = ("--run_name", "--log_dir", "--dataset", "--model_path", "--output_model_path", "--resume", "--seed",
               "--pretrained_model_path", "--total_epoch", "--decoder_depth", "--mask_strategy", "--mask_ratio",
               "--linear_probe")
MODEL_SIZE = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")
say = partial(print, flush=True)  # flushed, so that it lands in order with the runs' own output


def typed(kind, ok, allowed):
    """An argparse type: ``kind(text)`` if ``ok`` accepts it, else argparse's error saying what is ``allowed``."""
    def parse(text):
        try:
            if ok(value := kind(text)):
                return value
        except (ValueError, RuntimeError):  # RuntimeError: torch.device's
            pass
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {allowed}")
    return parse


def no_file_on(path):
    return not any(p.exists() and not p.is_dir() for p in (Path(path), *Path(path).parents))


def build_parser():
    positive = typed(int, lambda v: v >= 1, "an integer >= 1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="ablation", help="the sweep's folder is <log_dir>/<dataset>/sweep_<name>",
                   type=typed(str, lambda t: t.strip(".") and "/" not in t, "a folder name without '/'"))
    grid = p.add_argument_group("the grid: one run chain for every combination")
    grid.add_argument("--decoder_depth", type=positive, nargs="+", default=[4])
    grid.add_argument("--mask_strategy", choices=MASK_STRATEGIES, nargs="+", default=["random"])
    grid.add_argument("--mask_ratio", type=typed(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
                      nargs="+", default=[0.75])
    grid.add_argument("--pretrain_epochs", type=positive, nargs="+", default=[2000])
    grid.add_argument("--seeds", type=typed(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), nargs="+",
                      default=[0])
    stages = p.add_argument_group("what follows each pretraining")
    stages.add_argument("--finetune_epochs", type=positive, default=100)
    stages.add_argument("--linear_probe_epochs", type=positive, default=None, help="default: --finetune_epochs")
    stages.add_argument("--no_linear_probe", action="store_true", help="skip the linear-probe stage")
    stages.add_argument("--scratch", action="store_true", help="also fine-tune from scratch once per seed")
    common = p.add_argument_group("passed on to every run (left out: the scripts' defaults)")
    common.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    common.add_argument("--data_dir", default=None, help="image folder with train/<class>/ and test/<class>/",
                        type=typed(str, lambda t: (Path(t) / "train").is_dir() and (Path(t) / "test").is_dir(),
                                   "a folder holding train/ and test/"))
    common.add_argument("--device", default=None, help="cuda, cpu or auto", type=typed(
        str, lambda t: t == "auto" or torch.device(t).type != "cuda" or torch.cuda.is_available(),
        "cpu, auto, or cuda[:N] where a GPU is visible"))
    common.add_argument("--log_dir", default="logs", type=typed(str, no_file_on, "a folder, not a file"))
    common.add_argument("--pretrain_batch_size", type=positive, default=None)
    common.add_argument("--finetune_batch_size", type=positive, default=None, help="also for scratch and the probe")
    common.add_argument("--max_device_batch_size", type=positive, default=None, help="micro-batch of every run")
    for name in (*MODEL_SIZE, "decoder_heads"):
        common.add_argument(f"--{name}", type=positive, default=None, help="model size (e.g. a tiny model for tests)")
    common.add_argument("--pretrain_args", default="", help='options for mae_pretrain.py, e.g. "--norm_pix_loss"')
    common.add_argument("--finetune_args", default="", help="options for train_classifier.py (fine-tune, scratch)")
    common.add_argument("--probe_args", default="", help="more options for train_classifier.py --linear_probe")
    p.add_argument("--launcher", default="", help='runs each script under this command, e.g. "torchrun '
                                                  '--nproc_per_node 4" (default: this Python)')
    p.add_argument("--dry_run", action="store_true", help="print what would run, with the commands; run nothing")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("pretrain_args", "finetune_args", "probe_args", "launcher"):
        try:
            words = shlex.split(getattr(args, option))
        except ValueError as error:  # an unclosed quote
            parser.error(f"argument --{option}: {error}")
        # argparse also takes a unique prefix of an option ("--total" for --total_epoch): check prefixes too.
        taken = sorted({own for word in words if word.startswith("--") for own in OWN_OPTIONS
                        if own.startswith(word.split("=")[0])})
        if taken and option != "launcher":
            parser.error(f"argument --{option}: may not set {', '.join(taken)}: the sweep sets those itself")
        setattr(args, option, words)
    if args.launcher and not shutil.which(args.launcher[0]):
        parser.error(f"argument --launcher: no command {args.launcher[0]!r} on the PATH")
    for grid in ("decoder_depth", "mask_strategy", "mask_ratio", "pretrain_epochs", "seeds"):
        setattr(args, grid, list(dict.fromkeys(getattr(args, grid))))  # a value given twice runs once
    args.folder = Path(args.log_dir) / args.dataset / f"sweep_{args.name}"
    if not no_file_on(args.folder / "checkpoints"):
        parser.error(f"argument --name: a file stands where {args.folder}/checkpoints/ would go")
    return args


def flags(**options):
    """``--key value`` for each option that is not None."""
    return [word for key, value in options.items() if value is not None for word in (f"--{key}", str(value))]


def plan(args):
    """Every run, seeds outermost (after the first seed's pass every setting has a result to look at). A run has a
    name (also its folder's), its command (without --resume), total_epochs, the checkpoint that --resume auto
    continues from, its log_dir, the settings that make it (kept in settings.json, compared on every restart) and
    the pretraining run it needs."""
    a, folder, runs = args, args.folder, []
    size = {k: getattr(a, k) for k in MODEL_SIZE if getattr(a, k) is not None}

    def add(name, script, seed, epochs, warmup, options, extra, settings, checkpoint, needs=None):
        # The scripts log to <log_dir>/<dataset>/<run_name>/: a run name under the sweep's folder keeps it there.
        command = [*(a.launcher or [sys.executable]), str(HERE / script), *flags(
            seed=seed, total_epoch=epochs, warmup_epoch=round(epochs * warmup)), *options, *flags(
            run_name=f"{folder.name}/{name}", log_dir=a.log_dir, dataset=a.dataset, data_dir=a.data_dir,
            device=a.device, max_device_batch_size=a.max_device_batch_size), *extra]  # the free-form options last
        runs.append(SimpleNamespace(name=name, command=command, total_epochs=epochs, checkpoint=checkpoint,
                                    log_dir=folder / name, settings=settings, needs=needs))
        return runs[-1]

    def classifier(stage, seed, pretrained=None):
        """A train_classifier.py run: "finetune" or "linear_probe" from ``pretrained``, or "scratch"."""
        probe = stage == "linear_probe"
        prefix, epochs, extra = ("lp", a.linear_probe_epochs or a.finetune_epochs, a.probe_args) if probe else (
            "ft" if pretrained else "scratch", a.finetune_epochs, a.finetune_args)
        name = f"{prefix}_{pretrained.name.removeprefix('mae_')}" if pretrained else f"{prefix}_s{seed}"
        best = folder / "checkpoints" / f"{name}.pt"
        options = [*flags(output_model_path=best, batch_size=a.finetune_batch_size, **(
            {"pretrained_model_path": pretrained.checkpoint} if pretrained else size)), *["--linear_probe"] * probe]
        # A fine-tuned result depends on its pretraining's settings too.
        settings = dict(pretrained.settings) if pretrained else dict(seed=seed, dataset=a.dataset, model_size=size)
        settings.update({"stage": stage, "linear_probe_epochs" if probe else "finetune_epochs": epochs,
                         "finetune_batch_size": a.finetune_batch_size,
                         "probe_args" if probe else "finetune_args": extra})
        add(name, "train_classifier.py", seed, epochs, 0.05, options, extra, settings,
            best.with_name(f"{name}_last.pt"), pretrained)

    for seed in a.seeds:
        for epochs, depth, strategy, ratio in product(a.pretrain_epochs, a.decoder_depth, a.mask_strategy,
                                                      a.mask_ratio):
            name = f"mae_dd{depth}_{strategy}_mr{ratio:g}_ep{epochs}_s{seed}"
            checkpoint = folder / "checkpoints" / f"{name}.pt"
            settings = {"stage": "pretrain", "seed": seed, "dataset": a.dataset, "decoder_depth": depth,
                        "mask_strategy": strategy, "mask_ratio": ratio, "pretrain_epochs": epochs,
                        "pretrain_batch_size": a.pretrain_batch_size, "model_size": size,
                        "decoder_heads": a.decoder_heads, "pretrain_args": a.pretrain_args}
            options = flags(decoder_depth=depth, mask_strategy=strategy, mask_ratio=ratio, model_path=checkpoint,
                            batch_size=a.pretrain_batch_size, **size, decoder_heads=a.decoder_heads)
            mae = add(name, "mae_pretrain.py", seed, epochs, 0.1, options, a.pretrain_args, settings, checkpoint)
            for stage in ("finetune",) if a.no_linear_probe else ("finetune", "linear_probe"):
                classifier(stage, seed, mae)
        if a.scratch:
            classifier("scratch", seed)
    return runs


def logged_epochs(run):
    """Rows in the run's metrics.csv, or None when it has none (the run never started)."""
    path = run.log_dir / "metrics.csv"
    return max(len([line for line in path.read_text().splitlines() if line.strip()]) - 1, 0) if path.is_file() \
        else None


def recorded_settings(run):
    path = run.log_dir / "settings.json"
    return json.loads(path.read_text())["settings"] if path.is_file() else None


def stopped_early(checkpoint):
    """Whether train_classifier.py ended this run before its last epoch (--patience): finished all the same."""
    try:
        return bool(torch.load(checkpoint, map_location="cpu", weights_only=True).get("stopped_early"))
    except Exception:  # unreadable: the resumed run will say what is wrong with it
        return False


def run_state(run):
    """(action, detail): "skipped", "resuming", "new", "restarting", or "broken" (needs the user)."""
    then, now = recorded_settings(run), run.settings
    if then is not None and then != now:
        changed = ", ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then | now)
                            if then.get(k) != now.get(k))
        return "broken", f"{run.log_dir} was run with other settings ({changed}); use another --name"
    epochs, has_checkpoint = logged_epochs(run), run.checkpoint.is_file()
    if has_checkpoint and epochs is not None and epochs >= run.total_epochs:
        return "skipped", f"finished: {epochs}/{run.total_epochs} epochs"
    if has_checkpoint and epochs and stopped_early(run.checkpoint):
        return "skipped", f"finished: stopped early (--patience) after {epochs}/{run.total_epochs} epochs"
    if has_checkpoint:
        return "resuming", f"{epochs or 0}/{run.total_epochs} epochs done"
    if not epochs:  # never started, or stopped in its first epoch: nothing to continue, nothing to lose
        return ("new", "") if epochs is None else ("restarting", "it stopped before its first checkpoint")
    return "broken", (f"{run.log_dir} has {epochs} epochs logged but no checkpoint {run.checkpoint} to continue "
                      f"from; delete that folder to run it again")


def write_settings(run, command):
    run.log_dir.mkdir(parents=True, exist_ok=True)
    record = {"run": run.name, "settings": run.settings, "total_epochs": run.total_epochs,
              "checkpoint": str(run.checkpoint), "command": shlex.join(command)}
    (run.log_dir / "settings.json").write_text(json.dumps(record, indent=1) + "\n")


def execute(command):
    """The exit code of ``command``. On Ctrl-C, wait for it (it got the signal too) to save, then stop the sweep."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        say("\nsweep: waiting for the current run to save its checkpoint (Ctrl-C again to quit now)")
        child.wait()
        raise


def run_sweep(runs, dry_run=False):
    """Run (or, dry, describe) every run in order; returns the failures as (run name, reason), and the skipped."""
    finished, failures, skipped = set(), [], 0
    for number, run in enumerate(runs, 1):
        prefix, (action, detail) = f"[{number}/{len(runs)}] {run.name}:", run_state(run)
        if action == "skipped":
            finished.add(run.name)
            skipped += 1
            say(f"{prefix} skipped ({detail})")
            if not dry_run and recorded_settings(run) is None:
                write_settings(run, run.command)
        elif action == "broken":
            failures.append((run.name, detail))
            say(f"{prefix} FAILED: {detail}")
        elif run.needs and run.needs.name not in finished:
            failures.append((run.name, f"not run: {run.needs.name} did not finish"))
            say(f"{prefix} not run ({run.needs.name} did not finish)")
        else:
            command = run.command + ["--resume", "auto"] * (action == "resuming")
            say(f"{prefix} {action}" + (f" ({detail})" if detail else ""))
            if dry_run:
                say("    " + shlex.join(command))
                finished.add(run.name)  # assume it would finish, so that the runs after it are shown too
                continue
            if action == "restarting":
                shutil.rmtree(run.log_dir)
            write_settings(run, command)
            start, code = time.perf_counter(), execute(command)
            if code == 0 and run_state(run)[0] == "skipped":
                finished.add(run.name)
                say(f"{prefix} finished in {time.perf_counter() - start:.1f} s")
            else:
                failures.append((run.name, f"exit code {code}" if code else
                                 f"stopped by a signal after {logged_epochs(run) or 0} of {run.total_epochs} epochs"))
                say(f"{prefix} FAILED ({failures[-1][1]}; its output is above)")
    return failures, skipped


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    say(f"sweep {args.folder}: {len(runs)} runs")
    try:
        failures, skipped = run_sweep(runs, args.dry_run)
    except KeyboardInterrupt:
        say("\nsweep interrupted; run the same command again to continue where it stopped")
        return 130
    if not args.dry_run:
        say(f"\nsweep {args.folder}: {len(runs) - len(failures)} of {len(runs)} runs finished ({skipped} of them "
            f"already before this call)")
        for name, reason in failures:
            say(f"  failed: {name}: {reason}")
        if failures:
            say("Fix the cause and run the same command again: finished runs are skipped, interrupted ones resumed.")
        say(f"tables and figures: python summarize.py {args.folder}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
