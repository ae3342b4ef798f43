"""The ablation study as one command: for every combination of settings, pretrain, then fine-tune from that
checkpoint and train a linear probe on it (unless --no_linear_probe); with --scratch also fine-tune from scratch.

    python sweep.py --name depth --decoder_depth 1 2 4 8 --seeds 0 1 --pretrain_epochs 200 --finetune_epochs 50
    python sweep.py --name masking --mask_strategy random block grid --mask_ratio 0.5 0.75 0.9 --scratch --dry_run
    python summarize.py logs/cifar10/sweep_depth         # then: tables and figures

A run writes <log_dir>/<dataset>/sweep_<name>/<run>/ (metrics.csv, settings.json) and checkpoints/<run>.pt. Run
the same command again to continue: finished runs are skipped, interrupted ones resumed; a failed run stops only
the runs that need its checkpoint (exit code 1). Before any run starts, each script checks its own options
(--check_args), so a bad --finetune_args fails at once, not after the pretraining. Ctrl-C lets the current run
save. Warm-up is 10 % of pretraining, 5 % of fine-tuning; the free-form options come last and win:
--pretrain_args="--warmup_epoch 40" (with "=").
"""
import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from functools import partial
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import torch

import data
import utils
from model import MASK_STRATEGIES

HERE = Path(__file__).resolve().parent
# Options the sweep sets itself: given again in the free-form options, they would break its bookkeeping.
OWN_OPTIONS = ("--run_name", "--log_dir", "--dataset", "--model_path", "--output_model_path", "--resume", "--seed",
               "--pretrained_model_path", "--total_epoch", "--time_budget", "--decoder_depth", "--mask_strategy",
               "--mask_ratio", "--linear_probe")
MODEL_SIZE = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")
SWEEP_LOCK = ".sweep.lock"  # in the sweep's folder, held while a sweep runs (git-ignored, like every .*.lock)
say = partial(print, flush=True)  # flushed, so that it lands in order with the runs' own output


def typed(kind, ok, allowed):
    """An argparse type: ``kind(text)`` if ``ok`` accepts it, else argparse's error saying what is ``allowed``."""
    def parse(text):
        with suppress(ValueError, RuntimeError):  # RuntimeError: torch.device's
            if ok(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {allowed}")
    return parse


def no_file_on(path):
    return not any(p.exists() and not p.is_dir() for p in (Path(path), *Path(path).parents))


def parse_args(argv=None):
    positive = typed(int, lambda v: v >= 1, "an integer >= 1")
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--name", default="ablation", help="the sweep's folder is <log_dir>/<dataset>/sweep_<name>",
                   type=typed(str, lambda t: t.strip(".") and "/" not in t, "a folder name without '/'"))
    grid = p.add_argument_group("the grid: one run chain for every combination")
    grid.add_argument("--decoder_depth", type=positive, nargs="+", default=[4])
    grid.add_argument("--mask_strategy", choices=MASK_STRATEGIES, nargs="+", default=["random"])
    grid.add_argument("--mask_ratio", type=typed(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
                      nargs="+", default=[0.75])
    grid.add_argument("--pretrain_epochs", type=positive, nargs="+", default=[2000])
    grid.add_argument("--time_budget", type=typed(float, lambda v: 0 < v <= 7 * 24 * 60, "minutes in (0, 10080]"),
                      nargs="+", metavar="MINUTES", help="instead of epochs: each MAE setting gets --pretrain_share of "
                      "it for pretraining and the rest for fine-tuning; --scratch fine-tunes for all of it (equal "
                      "compute, each process timed from its start)")
    grid.add_argument("--pretrain_share", type=typed(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
                      default=0.5, help="with --time_budget (default 0.5)")
    grid.add_argument("--seeds", type=typed(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), nargs="+",
                      default=[0])
    stages = p.add_argument_group("what follows each pretraining")
    stages.add_argument("--finetune_epochs", type=positive, default=100)
    stages.add_argument("--linear_probe_epochs", type=positive, help="default: --finetune_epochs")
    stages.add_argument("--no_linear_probe", action="store_true")
    stages.add_argument("--scratch", action="store_true", help="also fine-tune from scratch once per seed")
    stages.add_argument("--scratch_only", action="store_true",
                        help="only the from-scratch runs (e.g. a second sweep beside the MAE one, each on a core)")
    common = p.add_argument_group("passed on to every run (left out: the scripts' defaults; --finetune_batch_size "
                                  "also for scratch and the probe)")
    common.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    common.add_argument("--data_dir", help="image folder with train/<class>/ and test/<class>/", type=typed(
        str, lambda t: (Path(t) / "train").is_dir() and (Path(t) / "test").is_dir(), "a folder with train/, test/"))
    common.add_argument("--device", help="cuda, cpu or auto", type=typed(
        str, lambda t: t == "auto" or torch.device(t).type != "cuda" or torch.cuda.is_available(),
        "cpu, auto, or cuda[:N] where a GPU is visible"))
    common.add_argument("--log_dir", default="logs", type=utils.path_text)
    for name in ("pretrain_batch_size", "finetune_batch_size", "max_device_batch_size", *MODEL_SIZE, "decoder_heads"):
        common.add_argument(f"--{name}", type=positive)
    # Free-form options for mae_pretrain.py and train_classifier.py, split into words (the default "" too).
    common.add_argument("--pretrain_args", type=shlex.split, default="", help='for pretraining, e.g. "--norm_pix_loss"')
    common.add_argument("--finetune_args", type=shlex.split, default="", help="for fine-tuning and scratch")
    common.add_argument("--probe_args", type=shlex.split, default="", help="for the linear probe")
    p.add_argument("--launcher", default="", help='runs each script, e.g. "torchrun --nproc_per_node 4" (default: '
                   'this Python)', type=typed(shlex.split, lambda w: not w or shutil.which(w[0]), "a command in PATH"))
    p.add_argument("--dry_run", action="store_true", help="print what would run, with the commands; run nothing")
    args = p.parse_args(argv)
    for option in ("pretrain_args", "finetune_args", "probe_args"):
        # argparse also takes a unique prefix of an option ("--total" for --total_epoch): prefixes are refused too.
        if taken := sorted({own for word in getattr(args, option) if word.startswith("--") for own in OWN_OPTIONS
                            if own.startswith(word.split("=")[0])}):
            p.error(f"argument --{option}: may not set {', '.join(taken)}: the sweep sets those itself")
    if args.time_budget:
        epochs_typed = [f for f in ("--pretrain_epochs", "--finetune_epochs", "--linear_probe_epochs")
                        if any(w.split("=")[0] == f for w in (sys.argv[1:] if argv is None else argv))]
        if epochs_typed:
            p.error(f"argument {epochs_typed[0]}: --time_budget plans every run's epochs; give one or the other")
        args.pretrain_epochs = [None]
    if args.no_linear_probe and (args.linear_probe_epochs or args.probe_args):
        flag = "--linear_probe_epochs" if args.linear_probe_epochs else "--probe_args"
        p.error(f"argument {flag}: sets up a linear probe that --no_linear_probe turns off; leave one out")
    args.folder = Path(args.log_dir) / args.dataset / f"sweep_{args.name}"
    utils.check_writable_folder(p, "--log_dir", args.log_dir)
    utils.check_name_lengths(p, "--name", args.folder / "checkpoints")
    if not no_file_on(args.folder / "checkpoints"):
        p.error(f"argument --name: a file stands where {args.folder}/checkpoints/ would go")
    return args


def flags(**options):
    """``--key value`` for each option that is not None."""
    return [word for key, value in options.items() if value is not None for word in (f"--{key}", str(value))]


def plan(a):
    """Every run, seeds outermost (after the first seed's pass every setting has a result). A run has a name (its
    folder's too), its command (without --resume), total_epochs, the checkpoint --resume auto continues from, its
    log_dir, the settings that make it (in settings.json, compared on every restart) and the run it needs."""
    runs, size = [], {k: getattr(a, k) for k in MODEL_SIZE if getattr(a, k) is not None}

    def add(name, script, seed, epochs, warmup, options, extra, settings, checkpoint, needs=None, minutes=None):
        # The scripts log to <log_dir>/<dataset>/<run_name>/: a run name under the sweep's folder keeps it there.
        # With a budget, the script plans its epochs (its warm-up is then its defaults' share, as here).
        length = dict(time_budget=f"{minutes:g}") if minutes else dict(total_epoch=epochs,
                                                                       warmup_epoch=round(epochs * warmup))
        script_args = [str(HERE / script), *flags(seed=seed, **length), *options, *flags(
            run_name=f"{a.folder.name}/{name}", log_dir=a.log_dir, dataset=a.dataset, data_dir=a.data_dir,
            device=a.device, max_device_batch_size=a.max_device_batch_size), *extra]  # the free-form options last
        runs.append(SimpleNamespace(name=name, command=[*(a.launcher or [sys.executable]), *script_args],
                                    script_args=script_args, total_epochs=None if minutes else epochs,
                                    checkpoint=checkpoint,
                                    log_dir=a.folder / name, settings=settings, needs=needs))
        return runs[-1]

    def classifier(stage, seed, pretrained=None, minutes_per_arm=None):
        # "finetune" or "linear_probe" from ``pretrained``, or "scratch" (given all of ``minutes_per_arm``)
        probe = stage == "linear_probe"
        prefix, epochs, extra = ("lp", a.linear_probe_epochs or a.finetune_epochs, a.probe_args) if probe else (
            "ft" if pretrained else "scratch", a.finetune_epochs, a.finetune_args)
        minutes = minutes_per_arm and minutes_per_arm * ((1 - a.pretrain_share) if pretrained else 1)
        name = f"{prefix}_{pretrained.name.removeprefix('mae_')}" if pretrained else \
            f"{prefix}{f'_tb{minutes_per_arm:g}' if minutes_per_arm else ''}_s{seed}"
        best = a.folder / "checkpoints" / f"{name}.pt"
        options = [*flags(output_model_path=best, batch_size=a.finetune_batch_size, **(
            {"pretrained_model_path": pretrained.checkpoint} if pretrained else size)), *["--linear_probe"] * probe]
        # A fine-tuned result depends on its pretraining's settings too.
        settings = {**(pretrained.settings if pretrained else dict(seed=seed, dataset=a.dataset, model_size=size)),
                    "stage": stage,
                    "linear_probe_epochs" if probe else "finetune_epochs": None if minutes_per_arm else epochs,
                    "finetune_batch_size": a.finetune_batch_size, "probe_args" if probe else "finetune_args": extra,
                    **({"time_budget": minutes_per_arm} if minutes_per_arm else {})}
        add(name, "train_classifier.py", seed, epochs, 0.05, options, extra, settings,
            best.with_name(f"{name}_last.pt"), pretrained, minutes)

    for seed in dict.fromkeys(a.seeds):  # a value given twice runs once
        for minutes_per_arm in dict.fromkeys(a.time_budget or [None]):
            for epochs, depth, strategy, ratio in [] if a.scratch_only else product(*map(dict.fromkeys, (
                    a.pretrain_epochs, a.decoder_depth, a.mask_strategy, a.mask_ratio))):
                length = f"tb{minutes_per_arm:g}" if minutes_per_arm else f"ep{epochs}"
                name = f"mae_dd{depth}_{strategy}_mr{ratio:g}_{length}_s{seed}"
                checkpoint = a.folder / "checkpoints" / f"{name}.pt"
                settings = {"stage": "pretrain", "seed": seed, "dataset": a.dataset, "decoder_depth": depth,
                            "mask_strategy": strategy, "mask_ratio": ratio, "pretrain_epochs": epochs,
                            "pretrain_batch_size": a.pretrain_batch_size, "model_size": size,
                            "decoder_heads": a.decoder_heads, "pretrain_args": a.pretrain_args,
                            **({"time_budget": minutes_per_arm, "pretrain_share": a.pretrain_share}
                               if minutes_per_arm else {})}
                options = flags(decoder_depth=depth, mask_strategy=strategy, mask_ratio=ratio, model_path=checkpoint,
                                batch_size=a.pretrain_batch_size, **size, decoder_heads=a.decoder_heads)
                mae = add(name, "mae_pretrain.py", seed, epochs, 0.1, options, a.pretrain_args, settings, checkpoint,
                          minutes=minutes_per_arm and minutes_per_arm * a.pretrain_share)
                for stage in ("finetune",) if a.no_linear_probe else ("finetune", "linear_probe"):
                    classifier(stage, seed, mae, minutes_per_arm)
            if a.scratch or a.scratch_only:
                classifier("scratch", seed, minutes_per_arm=minutes_per_arm)
    return runs


def check_commands(runs):
    """Run each script's own ``--check_args`` on the commands still to run, before the first starts: a bad
    free-form option or a shape the grid cannot make fails now, not hours in. One check per pretraining setting
    and per classifier stage; classifier options are checked as from scratch (the encoder may not exist yet; a
    bad one fails its own run later, as any run's failure does). Returns [(run name, error line)]."""
    checked, problems = set(), []
    for run in runs:
        words = run.script_args
        if "--pretrained_model_path" in words:
            at = words.index("--pretrained_model_path")
            words = [w for i, w in enumerate(words) if i not in (at, at + 1) and w != "--linear_probe"]
        setting = {k: v for k, v in run.settings.items() if k != "seed"} if run.settings["stage"] == "pretrain" \
            else run.settings["stage"]
        form = (words[0], json.dumps(setting, sort_keys=True))
        if form in checked:
            continue
        checked.add(form)
        code, output = check_command([*words, "--check_args"])
        if code:
            problems.append((run.name, (output.strip().splitlines() or [f"exit code {code}"])[-1]))
    return problems


def fetch_dataset(name):
    """Without --data_dir every run loads torchvision's copy: download it once now (nothing when it is there
    already), so that a machine without network stops here, not in every run. Returns the error, or None."""
    try:
        data.load_dataset(name)
    except data.DataError as error:
        return str(error)
    return None


def check_command(script_args):
    """(exit code, error output) of a script's --check_args, in a Python of its own (no launcher needed)."""
    result = subprocess.run([sys.executable, *script_args], capture_output=True, text=True)
    return result.returncode, result.stderr or result.stdout


def run_state(run):
    """(state, detail): "skipped", "resuming", "new", "restarting", or "FAILED" (needs the user)."""
    recorded, metrics, now = run.log_dir / "settings.json", run.log_dir / "metrics.csv", run.settings
    then = json.loads(recorded.read_text())["settings"] if recorded.is_file() else now
    if then != now:
        changed = ", ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then | now)
                            if then.get(k) != now.get(k))
        return "FAILED", f"{run.log_dir} was run with other settings ({changed}); use another --name"
    # Epochs logged, None when it never started.
    epochs = len(list(csv.DictReader(metrics.read_text().splitlines()))) if metrics.is_file() else None
    total = planned_epochs(run)
    if run.checkpoint.is_file():
        if epochs is not None and total is not None and epochs >= total:
            return "skipped", f"finished: {epochs}/{total} epochs"
        with suppress(Exception):  # --patience ended it early: finished all the same (unreadable: resume says why)
            if epochs and torch.load(run.checkpoint, map_location="cpu", weights_only=True).get("stopped_early"):
                return "skipped", f"finished: stopped early (--patience) after {epochs}/{run.total_epochs} epochs"
        return "resuming", f"{epochs or 0}/{total or 'planned'} epochs done"
    if not epochs:  # never started, or stopped in its first epoch: nothing to continue, nothing to lose
        return ("new", "") if epochs is None else ("restarting", "it stopped before its first checkpoint")
    return "FAILED", (f"{run.log_dir} has {epochs} epochs logged but no checkpoint {run.checkpoint} to continue "
                      f"from; delete that folder to run it again")


def planned_epochs(run):
    """The run's epochs: fixed by the sweep, or (with --time_budget) as the run planned them, once it has."""
    if run.total_epochs is not None:
        return run.total_epochs
    return (json.loads((run.log_dir / "budget.json").read_text()) if (run.log_dir / "budget.json").is_file() else {}).get("total_epoch")


def write_settings(run, command):
    utils.write_text(run.log_dir / "settings.json", json.dumps(
        {"run": run.name, "settings": run.settings, "total_epochs": planned_epochs(run),
         "checkpoint": str(run.checkpoint), "command": shlex.join(command)}, indent=1) + "\n")


def refuse(why, *details):
    """Why the sweep started nothing, on stderr (where a script's refusal goes too), then the details."""
    print(f"sweep: nothing was started; {why}", *details, sep="\n", file=sys.stderr, flush=True)


def execute(command):
    """The exit code of ``command``. On Ctrl-C, wait for it (it got the signal too) to save, then stop the sweep."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        say("\nsweep: waiting for the current run to save its checkpoint (Ctrl-C again to quit now)")
        child.wait()
        raise


def main(argv=None):
    args = parse_args(argv)
    runs, finished, failures, skipped = plan(args), set(), [], 0
    say(f"sweep {args.folder}: {len(runs)} runs")
    pending = [run for run in runs if run_state(run)[0] in ("new", "restarting", "resuming")]
    if problems := check_commands(pending):
        refuse("these commands would fail:", *(f"  {name}: {line}" for name, line in problems))
        return 2
    if pending and not args.dry_run and not args.data_dir and (problem := fetch_dataset(args.dataset)):
        refuse(problem)
        return 2
    lock = None
    if pending and not args.dry_run:  # a second copy of this sweep would start the runs this one has not reached
        try:
            lock = utils.RunLock(args.folder, SWEEP_LOCK, f"{args.folder} is being run by another sweep.py with "
                                 f"this --name; wait for it to end, or stop it first").acquire()
        except utils.UserError as error:
            refuse(error)
            return 2
    try:
        for number, run in enumerate(runs, 1):
            prefix, (state, detail) = f"[{number}/{len(runs)}] {run.name}:", run_state(run)
            if state not in ("skipped", "FAILED") and run.needs and run.needs.name not in finished:
                state, detail = "not run", f"{run.needs.name} did not finish"
            command = run.command + ["--resume", "auto"] * (state == "resuming")
            say(f"{prefix} {state}" + (f" ({detail})" if detail else "") + (
                f"\n    {shlex.join(command)}" if args.dry_run and state in ("new", "restarting", "resuming") else ""))
            if state == "skipped":
                finished.add(run.name)
                skipped += 1
                if not args.dry_run and not (run.log_dir / "settings.json").is_file():
                    write_settings(run, command)
            elif state in ("FAILED", "not run"):
                failures.append((run.name, detail if state == "FAILED" else f"not run: {detail}"))
            elif args.dry_run:
                finished.add(run.name)  # assume it would finish, so that the runs after it are shown too
            else:
                if state == "restarting":
                    shutil.rmtree(run.log_dir)
                write_settings(run, command)
                start, code = time.perf_counter(), execute(command)
                state, detail = run_state(run)
                if code == 0 and state == "skipped":
                    finished.add(run.name)
                    write_settings(run, command)  # now with the epochs a budgeted run planned
                    say(f"{prefix} finished in {time.perf_counter() - start:.1f} s")
                else:
                    failures.append((run.name, f"exit code {code}" if code else f"ended unfinished ({detail})"))
                    say(f"{prefix} FAILED ({failures[-1][1]}; its output is above)")
    except KeyboardInterrupt:
        say("\nsweep interrupted; run the same command again to continue where it stopped")
        return 130
    finally:
        if lock:
            lock.release()
    if not args.dry_run:
        say(f"\nsweep {args.folder}: {len(runs) - len(failures)} of {len(runs)} runs finished ({skipped} of them "
            "already before this call)", *(f"  failed: {name}: {why}" for name, why in failures), sep="\n")
        say("Fix the cause and run the same command again to continue.\n" * bool(failures) +
            f"tables and figures: python summarize.py {args.folder}")
    return 1 if failures else 0


if __name__ == "__main__":
    utils.run_cli(main)
