"""The ablation study as one command: for every combination of the grid's settings and every seed, pretrain, then
fine-tune from that checkpoint and train a linear probe on it (unless --no_linear_probe); with --scratch also
fine-tune from scratch (--scratch_only: that alone). --labels_per_class N [N ...] fine-tunes and probes both arms on
N labelled images per class. --time_budget MINUTES [...] gives each arm that many minutes: MAE pretrains for
--pretrain_share of them and fine-tunes for the rest. A command gets only the settings the sweep varies or you gave.

    python sweep.py --name depth --preset small --decoder_depth 1 2 4 --seeds 0 1 --scratch
    python sweep.py --name labels --preset small --labels_per_class 10 100 --scratch --no_linear_probe --dry_run
    python summarize.py logs/cifar10/sweep_depth                    # then: tables and figures

Runs go to <log_dir>/<dataset>/sweep_<name>/. The same command again continues: finished runs are skipped,
interrupted ones resumed (started again if killed before their first save); a failed run stops only the runs that
need its checkpoint (exit code 1). The folder holds one study: study.json keeps what makes its results; a restart
with other settings is refused (exit code 2). Free-form options come last and win: --pretrain_args="--warmup_epoch 4"
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
OWN_OPTIONS = ("--run_name --log_dir --dataset --model_path --output_model_path --resume --seed --preset --total_epoch "
               "--pretrained_model_path --time_budget --decoder_depth --mask_strategy --mask_ratio --linear_probe "
               "--labels_per_class").split()
GRID = ("pretrain_epochs", "decoder_depth", "mask_strategy", "mask_ratio")  # the pretraining's, in its run names
MODEL_SIZE = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")
# Where and how the study runs, not what it finds: free to change on a restart (all else is its identity).
HOW_TO_RUN = ("name", "log_dir", "device", "max_device_batch_size", "dry_run", "folder")
SWEEP_LOCK = ".sweep.lock"  # held while a sweep runs (git-ignored, like every .*.lock)
say = partial(print, flush=True)  # flushed, so that it lands in order with the runs' own output
# What makes the study's results: every setting but where and how it runs; the data by its full path.
study = lambda a: json.loads(json.dumps({**{k: v for k, v in vars(a).items() if k not in HOW_TO_RUN},
                                         "data_dir": a.data_dir and str(Path(a.data_dir).resolve())}))
# --key value for each option given (None: left to the script or the preset)
flags = lambda **options: [w for k, v in options.items() if v is not None for w in (f"--{k}", str(v))]


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--name", default="ablation", type=utils.run_name_text, help="<log_dir>/<dataset>/sweep_NAME")
    for name, kind in (("decoder_depth", utils.POSITIVE_INT), ("mask_ratio", utils.OPEN_UNIT),
                       ("pretrain_epochs", utils.EPOCHS), ("time_budget", utils.BUDGET_MINUTES),
                       ("labels_per_class", utils.POSITIVE_INT), ("seeds", utils.SEED)):  # the grid
        p.add_argument(f"--{name}", type=kind, nargs="+", default=[0] if name == "seeds" else None)
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, nargs="+")
    p.add_argument("--pretrain_share", type=utils.OPEN_UNIT, default=0.5, help="with --time_budget")
    p.add_argument("--finetune_epochs", type=utils.EPOCHS, help="also the linear probe's")
    for name in ("no_linear_probe", "scratch", "scratch_only", "dry_run"):
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--preset", help="the scripts' named model size and schedule, e.g. small")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--device")
    p.add_argument("--log_dir", default="logs", type=utils.path_text)
    for name in ("pretrain_batch_size", "finetune_batch_size", "max_device_batch_size", *MODEL_SIZE, "decoder_heads"):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT)
    for name in ("pretrain_args", "finetune_args"):  # finetune_args: from scratch too, not the probe
        p.add_argument(f"--{name}", type=shlex.split, default="")
    a = p.parse_args(argv)
    for option in ("pretrain_args", "finetune_args"):  # argparse would take a prefix ("--total"): refused too
        if taken := sorted({own for word in getattr(a, option) if word.startswith("--") for own in OWN_OPTIONS
                            if own.startswith(word.split("=")[0])}):
            p.error(f"argument --{option}: may not set {', '.join(taken)}: the sweep sets those itself")
    if "/" in a.name:
        p.error("argument --name: a folder name, without '/'")
    if a.time_budget and (a.pretrain_epochs or a.finetune_epochs):
        p.error("argument --time_budget: sets every run's length; leave out the epochs")
    if a.data_dir and not all((Path(a.data_dir) / split).is_dir() for split in ("train", "test")):  # else study.json
        p.error(f"argument --data_dir: {a.data_dir} has no train/ and test/ folders")  # would keep the typo
    a.folder = Path(a.log_dir) / a.dataset / f"sweep_{a.name}"
    utils.check_writable_folder(p, "--log_dir", a.log_dir)
    utils.check_writable_folder(p, "--name", a.folder / "checkpoints")
    return a


def plan(a):  # every run, seeds outermost: after the first seed's pass every setting has a result
    runs, size, once = [], {k: getattr(a, k) for k in MODEL_SIZE}, dict.fromkeys  # once: each value once, in order
    shared = dict(dataset=a.dataset, preset=a.preset, model_size=size)

    def add(script, tag, settings, options, extra, *, epochs, minutes, needs=None):
        # A run name under the sweep's folder keeps its logs there. A classifier writes its best epoch to its output
        # path, its latest (what it resumes from) beside it.
        name = "_".join(str(part) for part in tag if part)
        out, pretraining = a.folder / "checkpoints" / f"{name}.pt", script == "mae_pretrain.py"
        words = [str(HERE / script), *flags(seed=settings["seed"], preset=a.preset, total_epoch=epochs, time_budget=(
            minutes and f"{minutes:g}"), **{"model_path" if pretraining else "output_model_path": out}), *options,
            *flags(run_name=f"{a.folder.name}/{name}", log_dir=a.log_dir, dataset=a.dataset, data_dir=a.data_dir,
                   device=a.device, max_device_batch_size=a.max_device_batch_size), *extra]  # free-form ones last
        runs.append(SimpleNamespace(name=name, command=[sys.executable, *words], needs=needs,
                                    checkpoint=out if pretraining else out.with_name(f"{name}_last.pt"),
                                    log_dir=a.folder / name, settings=settings, total_epochs=epochs))
        return runs[-1]

    def classifier(stage, seed, labels, minutes, pretrained=None, tag=()):
        probe, extra = stage == "linear_probe", [] if stage == "linear_probe" else a.finetune_args
        settings = {**(pretrained.settings if pretrained else {**shared, "seed": seed, "time_budget": minutes}),
                    "stage": stage, "labels_per_class": labels, "finetune_batch_size": a.finetune_batch_size,
                    "finetune_epochs": a.finetune_epochs, **({} if probe else {"finetune_args": extra})}
        options = flags(batch_size=a.finetune_batch_size, labels_per_class=labels, pretrained_model_path=pretrained
                        and pretrained.checkpoint, **({} if pretrained else size)) + ["--linear_probe"] * probe
        add("train_classifier.py", ({"finetune": "ft", "linear_probe": "lp"}.get(stage, stage), *tag, (
            not pretrained and minutes and f"tb{minutes:g}"), labels and f"lpc{labels}", f"s{seed}"), settings,
            options, extra, epochs=a.finetune_epochs, needs=pretrained,
            minutes=minutes and minutes * ((1 - a.pretrain_share) if pretrained else 1))

    grids = [] if a.scratch_only else list(product(*(once(getattr(a, k) or [None]) for k in GRID)))
    for seed in once(a.seeds):
        for minutes in once(a.time_budget or [None]):
            for epochs, depth, strategy, ratio in grids:  # None: the setting left out
                tag = (depth and f"dd{depth}", strategy, ratio and f"mr{ratio:g}",
                       epochs and f"ep{epochs}" or minutes and f"tb{minutes:g}")
                settings = dict(**shared, seed=seed, stage="pretrain", decoder_depth=depth, mask_strategy=strategy,
                                mask_ratio=ratio, pretrain_epochs=epochs, time_budget=minutes,
                                pretrain_share=minutes and a.pretrain_share, pretrain_batch_size=a.pretrain_batch_size,
                                decoder_heads=a.decoder_heads, pretrain_args=a.pretrain_args)
                options = flags(decoder_depth=depth, mask_strategy=strategy, mask_ratio=ratio,
                                batch_size=a.pretrain_batch_size, **size, decoder_heads=a.decoder_heads)
                mae = add("mae_pretrain.py", ("mae", *tag, f"s{seed}"), settings, options, a.pretrain_args,
                          epochs=epochs, minutes=minutes and minutes * a.pretrain_share)
                for labels in once(a.labels_per_class or [None]):
                    for stage in ("finetune",) if a.no_linear_probe else ("finetune", "linear_probe"):
                        classifier(stage, seed, labels, minutes, mae, tag)
            for labels in once(a.labels_per_class or [None]) if a.scratch or a.scratch_only else []:
                classifier("scratch", seed, labels, minutes)
    return runs


def check_study(a):  # a sweep folder holds one study: another one there is refused, in one line that says what differs
    then, now = summarize.read_json(a.folder / "study.json"), study(a)
    if changed := [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then | now)
                   if then and then.get(k) != now.get(k)]:
        raise utils.UserError(f"{a.folder} holds another study ({'; '.join(changed)}); give this one another "
                              f"--name, or run the same settings again")
    if not then and a.folder.is_dir() and any(p.name != SWEEP_LOCK for p in a.folder.iterdir()):
        raise utils.UserError(f"{a.folder} holds runs but no study.json (an earlier sweep.py's?), so its study is "
                              f"unknown; give this one another --name")


def run_state(run):  # (state, detail): "skipped" (checkpoint and all its epochs there), "resuming", "new", "restarting"
    done, total = utils.logged_rows(run.log_dir / "metrics.csv"), summarize.length(run.log_dir) or run.total_epochs
    if run.checkpoint.is_file():
        return ("skipped", f"finished: {done}/{total} epochs") if total and done >= total else \
            ("resuming", f"{done}/{total or '?'} epochs done")
    if done:  # killed before its first save (or its checkpoint deleted): nothing can continue it, so it starts again
        return "restarting", f"{done} epochs logged but no checkpoint {run.checkpoint} to continue from"
    return "new", ""


def write_settings(run, command, total_epochs=None):
    """The run's record for summarize.py: at its start, and at exit 0 with the epochs it logged (a budget's length)."""
    utils.write_text(run.log_dir / "settings.json", json.dumps(
        {"run": run.name, "settings": run.settings, "total_epochs": total_epochs or run.total_epochs,
         "checkpoint": str(run.checkpoint), "command": shlex.join(command)}, indent=1) + "\n")


def execute(command):  # its exit code; on Ctrl-C, wait for it (it got the signal too) to save, then stop the sweep
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        say("\nsweep: waiting for the current run to save its checkpoint (Ctrl-C again to quit now)")
        child.wait()
        raise


def train(run, command):  # None once it finished, else why not
    write_settings(run, command)
    if code := execute(command):
        return f"exit code {code}"
    if not run.checkpoint.is_file():
        return f"it ended without its checkpoint {run.checkpoint}"
    write_settings(run, command, utils.logged_rows(run.log_dir / "metrics.csv"))


def main(argv=None):
    a = parse_args(argv)
    runs, failures, before = plan(a), {}, 0  # failures: {run: why}; every other run so far finished
    check_study(a)
    say(f"sweep {a.folder}: {len(runs)} runs")
    if not a.dry_run and not a.data_dir and any(run_state(r)[0] != "skipped" for r in runs):
        data.load_dataset(a.dataset)  # download it once now: without a network, stop here, not in every run
    lock = utils.RunLock(a.folder, SWEEP_LOCK, f"{a.folder} is being run by another sweep.py with this --name; wait "
                         "for it to end, or stop it")
    try:
        if not a.dry_run:  # a dry run writes nothing
            lock.acquire()
            utils.write_text(a.folder / "study.json", json.dumps(study(a), indent=1) + "\n")
        for number, job in enumerate(runs, 1):
            (state, detail), prefix = run_state(job), f"[{number}/{len(runs)}] {job.name}:"
            if state != "skipped" and job.needs and job.needs.name in failures:
                state, detail = "not run", f"{job.needs.name} did not finish"
            command = job.command + {"resuming": ["--resume", "auto"], "restarting": ["--overwrite"]}.get(state, [])
            say(f"{prefix} {state}" + f" ({detail})" * bool(detail) + (
                f"\n    {shlex.join(command)}" if a.dry_run and state not in ("skipped", "not run") else ""))
            before += state == "skipped"
            if state == "not run":
                failures[job.name] = f"not run: {detail}"
            elif state != "skipped" and not a.dry_run and (why := train(job, command)):  # dry: as if it would finish
                failures[job.name] = why
                say(f"{prefix} FAILED ({why}; its output is above)")
    except KeyboardInterrupt:
        say("\nsweep interrupted; run the same command again to continue where it stopped")
        return 130
    finally:
        lock.release()
    if not a.dry_run:
        say(f"\nsweep {a.folder}: {len(runs) - len(failures)} of {len(runs)} runs finished ({before} of them already "
            "before this call)", *(f"  failed: {name}: {why}" for name, why in failures.items()),
            *["Fix the cause and run the same command again to continue."] * bool(failures),
            f"tables and figures: python summarize.py {a.folder}", sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    utils.run_cli(main)
