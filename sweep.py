"""The ablation study as one command: for every combination of the grid's settings and every seed, pretrain, then
fine-tune from that checkpoint and train a linear probe on it (unless --no_linear_probe); with --scratch also
fine-tune from scratch. --labels_per_class N [N ...] fine-tunes and probes (both arms) on N labelled images per
class. --time_budget MINUTES [...] gives each arm that many minutes (each process timed from its start): MAE
pretrains for --pretrain_share of them and fine-tunes for the rest, from scratch trains for all of them. A command
gets only the settings the sweep varies or you gave (the rest: the scripts' defaults, or --preset's).

    python sweep.py --name depth --preset small --decoder_depth 1 2 4 --seeds 0 1 --scratch
    python sweep.py --name labels --preset small --labels_per_class 10 100 --scratch --no_linear_probe --dry_run
    python summarize.py logs/cifar10/sweep_depth                    # then: tables and figures

Runs go to <log_dir>/<dataset>/sweep_<name>/<run>/, checkpoints to its checkpoints/. The same command again
continues: finished runs are skipped, interrupted ones resumed; a failed run stops only the runs that need its
checkpoint (exit code 1). The folder holds one study: study.json keeps what makes its results, and a restart
with other settings is refused (exit code 2). Ctrl-C lets the current run save. The free-form options come last
and win: --pretrain_args="--warmup_epoch 40" (with "=").
"""
import json
import shlex
import subprocess
import sys
from functools import partial
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import data
import summarize
import utils
from model import MASK_STRATEGIES

HERE = Path(__file__).resolve().parent
# Set by the sweep itself: given again in the free-form options, they would break its bookkeeping.
OWN_OPTIONS = ("--run_name", "--log_dir", "--dataset", "--model_path", "--output_model_path", "--resume", "--seed",
               "--pretrained_model_path", "--total_epoch", "--time_budget", "--decoder_depth", "--mask_strategy",
               "--mask_ratio", "--linear_probe", "--labels_per_class", "--preset")
MODEL_SIZE = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")
# Where and how the study runs, not what it finds: free to change on a restart (all else is its identity).
HOW_TO_RUN = ("name", "log_dir", "device", "max_device_batch_size", "launcher", "dry_run", "folder")
SWEEP_LOCK = ".sweep.lock"  # held while a sweep runs (git-ignored, like every .*.lock)
say = partial(print, flush=True)  # flushed, so that it lands in order with the runs' own output


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--name", default="ablation", type=utils.run_name_text, help="<log_dir>/<dataset>/sweep_NAME")
    # The grid (left out: the scripts' or the preset's value).
    for name, kind in (("decoder_depth", utils.POSITIVE_INT), ("mask_ratio", utils.OPEN_UNIT),
                       ("pretrain_epochs", utils.EPOCHS), ("time_budget", utils.BUDGET_MINUTES),
                       ("labels_per_class", utils.POSITIVE_INT), ("seeds", utils.SEED)):
        p.add_argument(f"--{name}", type=kind, nargs="+", default=[0] if name == "seeds" else None)
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, nargs="+")
    p.add_argument("--pretrain_share", type=utils.OPEN_UNIT, default=0.5, help="with --time_budget")
    p.add_argument("--finetune_epochs", type=utils.EPOCHS)
    p.add_argument("--linear_probe_epochs", type=utils.EPOCHS, help="default: --finetune_epochs")
    p.add_argument("--no_linear_probe", action="store_true")
    p.add_argument("--scratch", action="store_true", help="also fine-tune from scratch once per seed")
    p.add_argument("--scratch_only", action="store_true", help="only the from-scratch runs")
    # Passed to every run that takes them (--finetune_batch_size: every classifier run).
    p.add_argument("--preset", help="the scripts' named model size and schedule, e.g. small")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--device")
    p.add_argument("--log_dir", default="logs", type=utils.path_text)
    for name in ("pretrain_batch_size", "finetune_batch_size", "max_device_batch_size", *MODEL_SIZE, "decoder_heads"):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT)
    for name, runs in (("pretrain", "pretraining"), ("finetune", "fine-tuning and scratch"), ("probe", "the probe")):
        p.add_argument(f"--{name}_args", type=shlex.split, default="", help=f"free-form options for {runs}")
    p.add_argument("--launcher", type=shlex.split, default="", help='runs each script, e.g. "torchrun '
                   '--nproc_per_node 4" (default: this Python)')
    p.add_argument("--dry_run", action="store_true", help="print what would run, with the commands; run nothing")
    a = p.parse_args(argv)
    for option in ("pretrain_args", "finetune_args", "probe_args"):
        # argparse also takes a unique prefix of an option ("--total" for --total_epoch): prefixes are refused too.
        if taken := sorted({own for word in getattr(a, option) if word.startswith("--") for own in OWN_OPTIONS
                            if own.startswith(word.split("=")[0])}):
            p.error(f"argument --{option}: may not set {', '.join(taken)}: the sweep sets those itself")
    if "/" in a.name:
        p.error("argument --name: a folder name, without '/'")
    if a.time_budget and (a.pretrain_epochs or a.finetune_epochs or a.linear_probe_epochs):
        p.error("argument --time_budget: sets every run's length; leave out the epochs")
    if a.no_linear_probe and (a.linear_probe_epochs or a.probe_args):
        p.error("argument --no_linear_probe: turns off the probe that --linear_probe_epochs, --probe_args set up")
    if a.data_dir and not all((Path(a.data_dir) / split).is_dir() for split in ("train", "test")):
        p.error(f"argument --data_dir: {a.data_dir} has no train/ and test/ folders")
    a.folder = Path(a.log_dir) / a.dataset / f"sweep_{a.name}"
    utils.check_writable_folder(p, "--log_dir", a.log_dir)
    utils.check_writable_folder(p, "--name", a.folder / "checkpoints")
    return a


def flags(**options):
    """``--key value`` for each option given (None: left to the script or the preset)."""
    return [word for key, value in options.items() if value is not None for word in (f"--{key}", str(value))]


def named(*parts):
    return "_".join(str(part) for part in parts if part)


def plan(a):
    """Every run, seeds outermost (after the first seed's pass every setting has a result): its name (its folder's
    too), command (without --resume), checkpoint (what --resume auto continues from), log_dir, settings (what
    summarize.py tells runs apart by), total_epochs (None where the script or its budget decides), the run it needs."""
    runs, size, once = [], {k: getattr(a, k) for k in MODEL_SIZE}, dict.fromkeys  # once: each value once, in order
    shared = dict(dataset=a.dataset, preset=a.preset, model_size=size)

    def add(script, name, settings, options, extra, epochs, minutes, needs=None):
        # The scripts log to <log_dir>/<dataset>/<run_name>/: a run name under the sweep's folder keeps it there. A
        # classifier writes its best epoch to its output path, its latest (what it resumes from) beside it.
        out, pretraining = a.folder / "checkpoints" / f"{name}.pt", script == "mae_pretrain.py"
        words = [str(HERE / script), *flags(seed=settings["seed"], preset=a.preset, total_epoch=epochs, time_budget=(
            minutes and f"{minutes:g}"), **{"model_path" if pretraining else "output_model_path": out}), *options,
            *flags(run_name=f"{a.folder.name}/{name}", log_dir=a.log_dir, dataset=a.dataset, data_dir=a.data_dir,
                   device=a.device, max_device_batch_size=a.max_device_batch_size), *extra]  # free-form ones last
        runs.append(SimpleNamespace(name=name, command=[*(a.launcher or [sys.executable]), *words], needs=needs,
                                    checkpoint=out if pretraining else out.with_name(f"{name}_last.pt"),
                                    log_dir=a.folder / name, settings=settings, total_epochs=epochs))
        return runs[-1]

    def classifier(stage, seed, labels, minutes, pretrained=None, tag=()):
        probe = stage == "linear_probe"
        epochs, extra = (a.linear_probe_epochs or a.finetune_epochs, a.probe_args) if probe else \
            (a.finetune_epochs, a.finetune_args)
        settings = {**(pretrained.settings if pretrained else {**shared, "seed": seed, "time_budget": minutes}),
                    "stage": stage, "labels_per_class": labels, "finetune_batch_size": a.finetune_batch_size,
                    "linear_probe_epochs" if probe else "finetune_epochs": epochs,
                    "probe_args" if probe else "finetune_args": extra}
        options = flags(batch_size=a.finetune_batch_size, labels_per_class=labels, pretrained_model_path=pretrained
                        and pretrained.checkpoint, **({} if pretrained else size)) + ["--linear_probe"] * probe
        add("train_classifier.py", named({"finetune": "ft", "linear_probe": "lp"}.get(stage, stage), *tag, (
            not pretrained and minutes and f"tb{minutes:g}"), labels and f"lpc{labels}", f"s{seed}"), settings,
            options, extra, epochs, minutes and minutes * ((1 - a.pretrain_share) if pretrained else 1), pretrained)

    pretrainings = [] if a.scratch_only else list(product(*(once(v or [None]) for v in (
        a.pretrain_epochs, a.decoder_depth, a.mask_strategy, a.mask_ratio))))  # [None]: the setting left out
    for seed in once(a.seeds):
        for minutes in once(a.time_budget or [None]):
            for epochs, depth, strategy, ratio in pretrainings:
                tag = (depth and f"dd{depth}", strategy, ratio and f"mr{ratio:g}",
                       epochs and f"ep{epochs}" or minutes and f"tb{minutes:g}")
                settings = dict(**shared, seed=seed, stage="pretrain", decoder_depth=depth, mask_strategy=strategy,
                                mask_ratio=ratio, pretrain_epochs=epochs, time_budget=minutes,
                                pretrain_share=minutes and a.pretrain_share, pretrain_batch_size=a.pretrain_batch_size,
                                decoder_heads=a.decoder_heads, pretrain_args=a.pretrain_args)
                options = flags(decoder_depth=depth, mask_strategy=strategy, mask_ratio=ratio,
                                batch_size=a.pretrain_batch_size, **size, decoder_heads=a.decoder_heads)
                mae = add("mae_pretrain.py", named("mae", *tag, f"s{seed}"), settings, options, a.pretrain_args,
                          epochs, minutes and minutes * a.pretrain_share)
                for labels in once(a.labels_per_class or [None]):
                    for stage in ("finetune",) if a.no_linear_probe else ("finetune", "linear_probe"):
                        classifier(stage, seed, labels, minutes, mae, tag)
            for labels in once(a.labels_per_class or [None]) if a.scratch or a.scratch_only else []:
                classifier("scratch", seed, labels, minutes)
    return runs


def study(a):
    """What makes the study's results, as study.json holds it: every setting but where and how it runs (the data
    folder by its full path)."""
    settings = {k: v for k, v in vars(a).items() if k not in HOW_TO_RUN}
    return json.loads(json.dumps({**settings, "data_dir": a.data_dir and str(Path(a.data_dir).resolve())}))


def check_study(a):
    """A sweep folder holds one study: another one there is refused, in one line that says what differs."""
    path, now = a.folder / "study.json", study(a)
    if path.is_file():
        then = json.loads(path.read_text())
        if changed := [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then | now)
                       if then.get(k) != now.get(k)]:
            raise utils.UserError(f"{a.folder} holds another study ({'; '.join(changed)}); give this one another "
                                   f"--name, or run the same settings again")
    elif a.folder.is_dir() and any(p.name != SWEEP_LOCK for p in a.folder.iterdir()):
        raise utils.UserError(f"{a.folder} holds runs but no study.json (an earlier sweep.py's?), so its study is "
                               f"unknown; give this one another --name")


def run_state(run):
    """(state, detail): "skipped" (finished: its checkpoint is there and its metrics.csv has the epochs that end
    it, see summarize.length), "resuming", "new", or "FAILED" (needs the user)."""
    done, total = len(summarize.read_rows(run.log_dir)), summarize.length(run.log_dir) or run.total_epochs
    if run.checkpoint.is_file():
        return ("skipped", f"finished: {done}/{total} epochs") if total and done >= total else \
            ("resuming", f"{done}/{total or '?'} epochs done")
    if done:
        return "FAILED", (f"{run.log_dir} has {done} epochs logged but no checkpoint {run.checkpoint} to continue "
                          f"from; delete that folder to run it again")
    return "new", ""


def write_settings(run, command, total_epochs=None):
    """The run's record (settings.json), for summarize.py: written as it starts, and when it exits 0 with the
    epochs it logged (--patience or a budget may end it before, or without, a length the sweep set)."""
    utils.write_text(run.log_dir / "settings.json", json.dumps(
        {"run": run.name, "settings": run.settings, "total_epochs": total_epochs or run.total_epochs,
         "checkpoint": str(run.checkpoint), "command": shlex.join(command)}, indent=1) + "\n")


def execute(command):
    """The exit code of ``command``. On Ctrl-C, wait for it (it got the signal too) to save, then stop the sweep."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        say("\nsweep: waiting for the current run to save its checkpoint (Ctrl-C again to quit now)")
        child.wait()
        raise


def train(run, command):
    """Runs it: None once it finished, else why not."""
    write_settings(run, command)
    if code := execute(command):
        return f"exit code {code}"
    if not run.checkpoint.is_file():
        return f"it ended without its checkpoint {run.checkpoint}"
    write_settings(run, command, len(summarize.read_rows(run.log_dir)))
    return None


def main(argv=None):
    a = parse_args(argv)
    runs, finished, failures, before = plan(a), set(), [], 0
    check_study(a)
    say(f"sweep {a.folder}: {len(runs)} runs")
    if not a.dry_run and not a.data_dir and any(run_state(r)[0] in ("new", "resuming") for r in runs):
        data.load_dataset(a.dataset)  # download it once now: without a network, stop here, not in every run
    lock = None if a.dry_run else utils.RunLock(a.folder, SWEEP_LOCK, f"{a.folder} is being run by another "
                                                "sweep.py with this --name; wait for it to end, or stop it").acquire()
    try:
        if lock:
            utils.write_text(a.folder / "study.json", json.dumps(study(a), indent=1) + "\n")
        for number, job in enumerate(runs, 1):
            (state, detail), prefix = run_state(job), f"[{number}/{len(runs)}] {job.name}:"
            if state in ("new", "resuming") and job.needs and job.needs.name not in finished:
                state, detail = "not run", f"{job.needs.name} did not finish"
            command = job.command + ["--resume", "auto"] * (state == "resuming")
            say(f"{prefix} {state}" + f" ({detail})" * bool(detail) + (
                f"\n    {shlex.join(command)}" if a.dry_run and state in ("new", "resuming") else ""))
            before += state == "skipped"
            if state in ("FAILED", "not run"):
                failures.append((job.name, detail if state == "FAILED" else f"not run: {detail}"))
            elif state == "skipped" or a.dry_run or not (why := train(job, command)):  # dry: as if it would finish
                finished.add(job.name)
            else:
                failures.append((job.name, why))
                say(f"{prefix} FAILED ({why}; its output is above)")
    except KeyboardInterrupt:
        say("\nsweep interrupted; run the same command again to continue where it stopped")
        return 130
    finally:
        if lock:
            lock.release()
    if not a.dry_run:
        say(f"\nsweep {a.folder}: {len(runs) - len(failures)} of {len(runs)} runs finished ({before} of them already "
            "before this call)", *(f"  failed: {name}: {why}" for name, why in failures),
            *["Fix the cause and run the same command again to continue."] * bool(failures),
            f"tables and figures: python summarize.py {a.folder}", sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    utils.run_cli(main)
