"""How a training run starts, the same for both scripts: the flags they share and the presets, parsing, then seed,
device, data, the run folder, resume's settings and the learning rate's schedule."""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import random_seed

import checkpoint as ckpt
import devices
import engine
import utils
from data import AUGMENTATIONS, GpuLoader, load_dataset, peek
from model import ModelConfig

# The CPU-scale model and schedules, for a laptop or any CPU (results/ says what they reach): its sizes are shared
# by both scripts; each script has its own schedule. Tuned for short runs, which underfit (results/*/tuning.csv):
# batch 64 and a flip alone beat batch 128 with crop and flip; 64 wide beat 96 (1.55x the steps) in 10 minutes.
PRESETS = {"small": {
    "model": dict(patch_size=4, emb_dim=64, encoder_depth=4, encoder_heads=2),
    "mae_pretrain": dict(decoder_depth=2, decoder_heads=2, decoder_emb_dim=64, batch_size=256,
                         base_learning_rate=1.5e-3, total_epoch=4, warmup_epoch=2, knn_every=4, probe_epochs=10),
    "train_classifier": dict(batch_size=64, base_learning_rate=2e-3, total_epoch=2, warmup_epoch=0, augment="flip"),
}}
SIZE_FLAGS = ("patch_size", "emb_dim", "encoder_depth", "encoder_heads")
DECODER_FLAGS = ("decoder_depth", "decoder_heads", "decoder_emb_dim")
MIN_BUDGET_MINUTES = 0.2  # below this, the set-up alone (imports, data, compilation) spends it
WEIGHT_DECAY = 0.05  # AdamW's, as in the reference and the paper, pretraining and fine-tuning alike


def add_arguments(p, script, batch_size, micro_batch, lr, total_epoch, warmup_epoch):
    """The flags both scripts share, with each script's defaults (the reference's)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named model size and schedule (small: for a CPU); options given explicitly still win")
    for name in SIZE_FLAGS + (DECODER_FLAGS if script == "mae_pretrain" else ()):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT, default=None,
                       help=f"default {getattr(ModelConfig, name)} (or the checkpoint's)")
    p.add_argument("--seed", type=utils.SEED, default=42)
    p.add_argument("--batch_size", type=utils.POSITIVE_INT, default=batch_size)
    p.add_argument("--max_device_batch_size", type=utils.POSITIVE_INT, default=micro_batch,
                   help="the micro-batch: gradients of a larger batch accumulate")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    p.add_argument("--base_learning_rate", type=utils.POSITIVE_FLOAT, default=lr, help="lr = base * batch / 256")
    p.add_argument("--total_epoch", type=utils.EPOCHS, default=total_epoch)
    p.add_argument("--warmup_epoch", type=utils.ranged(int, 0, 10 ** 6), default=warmup_epoch)
    p.add_argument("--time_budget", type=lambda text: text if text.endswith(".json") else utils.BUDGET_MINUTES(text),
                   metavar="MINUTES|BUDGET_JSON",
                   help="instead of --total_epoch: train until this many minutes from the start have passed, the "
                        "learning rate following the share spent; or a run's budget.json: train its steps again")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--precision", choices=devices.PRECISIONS, default="auto",
                   help="auto: bf16 where native, fp16 with loss scaling on GPUs without bf16, else fp32")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--log_dir", type=utils.path_text, default="logs")
    p.add_argument("--run_name", type=utils.run_name_text, default=None, help="default: built from the settings")
    p.add_argument("--resume", type=utils.path_text, default=None, help="a checkpoint, or auto for this run's own")
    p.add_argument("--overwrite", action="store_true", help="let a new run replace an existing run and checkpoint")


def parse(parser, argv, script, **tables):
    """Parse twice: a preset or recipe replaces the defaults, what the user typed still wins -> (args with ``typed``:
    the flags on the command line, a typed preset's values counted; the flags as typed)."""
    devices.CLOCK_START = devices.PROCESS_START if argv is None else time.monotonic()  # a main() called in Python
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    literal = options_typed(parser, argv)
    typed, on_command_line = parser.parse_known_args(argv)[0], set(literal)
    tables = {"preset": {n: {**p["model"], **p[script]} for n, p in PRESETS.items()}, **tables}
    for option, table in tables.items():
        chosen = table.get(getattr(typed, option), {})
        parser.set_defaults(**chosen)
        if option in on_command_line:  # a typed preset's values count as typed (they change a resumed run), but
            on_command_line |= set(chosen) - {"total_epoch"}  # not its length: that would end a resumed budget
    args = parser.parse_args(argv)
    args.typed = sorted(on_command_line)
    if isinstance(args.time_budget, str):
        try:
            record = json.loads(Path(args.time_budget).read_text())
            float(record["time_budget_minutes"]) + sum(record["shares"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"argument --time_budget: {args.time_budget} is not a budget.json a run wrote "
                         f"({type(error).__name__}: {utils.first_line(error)})")
    if args.time_budget and "total_epoch" in literal:
        parser.error(f"argument --time_budget: cannot be combined with --total_epoch {args.total_epoch}; give one")
    if isinstance(args.time_budget, float) and args.time_budget < MIN_BUDGET_MINUTES:
        parser.error(f"argument --time_budget: {args.time_budget:g} minutes is too short (the imports, data and "
                     f"compilation alone take that); give at least {MIN_BUDGET_MINUTES:g}")
    if args.warmup_epoch > args.total_epoch and not args.time_budget:
        if any(word.split("=")[0].startswith("--warm") for word in argv):
            parser.error(f"argument --warmup_epoch: {args.warmup_epoch} is longer than --total_epoch "
                         f"{args.total_epoch}; the learning rate would never reach its peak")
        default_total = parser.get_default("total_epoch")  # a default warm-up: the same share of the shorter run
        fitted = args.warmup_epoch * args.total_epoch // default_total
        print(f"--warmup_epoch {args.warmup_epoch} (the default for {default_total} epochs) is cut to {fitted} "
              f"for --total_epoch {args.total_epoch}")
        args.warmup_epoch = fitted
    if args.base_learning_rate * args.batch_size / 256 * WEIGHT_DECAY >= 1:  # AdamW scales weights by 1 - lr * wd
        parser.error(f"argument --base_learning_rate: the learning rate (base * --batch_size / 256) must stay "
                     f"below {1 / WEIGHT_DECAY:g}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        parser.error(f"argument --resume: {args.resume} is not a checkpoint file; pass a file or 'auto'")
    devices.check_device(parser, args.device)
    return args, typed


def options_typed(parser, argv):
    """The destinations of the options on the command line (not those left at a default or preset value)."""
    saved = [(action, action.default) for action in parser._actions]
    for action, _ in saved:
        action.default = argparse.SUPPRESS  # an option left out then sets no attribute at all
    try:
        return set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in saved:
            action.default = default


def name_run(prefix, args, parser, abbreviations):
    """``prefix`` plus the settings that differ from their defaults (``mae_dd8_block``)."""
    defaults = {**ModelConfig().to_dict(), **{a.dest: a.default for a in parser._actions if a.default is not None}}
    parts = [prefix]
    for name, short in abbreviations.items():
        value = getattr(args, name)
        part = str(short if isinstance(value, bool) else value if isinstance(value, str) and not short
                   else "replay" if name == "time_budget" and isinstance(value, str) else f"{short}{value}")
        if value is not None and value != defaults.get(name) and part not in prefix.split("_"):
            parts.append(part)  # a part the prefix has (the encoder's name) is not said twice
    return "_".join(parts)


def sizes(settings, fields=SIZE_FLAGS + DECODER_FLAGS + ("mask_ratio", "mask_strategy")):
    """The model flags given (sizes, masking; typed, from a preset or from a resumed run), as a dict."""
    return {name: getattr(settings, name) for name in fields if getattr(settings, name, None) is not None}


def check_model(build, config, decoder=False):
    """Shapes that cannot make a model, refused naming the flags; the model is built on the meta device (free)."""
    problems = []
    if config.image_size % config.patch_size:
        problems.append(f"--patch_size {config.patch_size} does not divide the {config.image_size} px images")
    if config.emb_dim % config.encoder_heads:
        problems.append(f"--emb_dim {config.emb_dim} is not divisible by --encoder_heads {config.encoder_heads}")
    width = config.decoder_emb_dim or config.emb_dim
    if decoder and width % config.decoder_heads:
        problems.append(f"the decoder width {width} is not divisible by --decoder_heads {config.decoder_heads}")
    if 12 * config.emb_dim ** 2 * config.encoder_depth > 2 ** 33:  # 16 bytes a parameter: beyond any machine
        problems.append(f"--emb_dim {config.emb_dim} and --encoder_depth {config.encoder_depth} make a model "
                        f"whose training needs more memory than a machine has")
    if problems:
        raise utils.UserError("; ".join(problems))
    with torch.device("meta"):
        build(config)  # what is left (a mask ratio the strategy cannot make) fails here, before any file


@dataclass
class Run:
    """What the code decided for this run, beside ``args`` (what the user asked for)."""
    env: devices.Dist
    precision: str
    log_dir: Path
    resume_path: str
    train_set: object
    test_set: object
    settings: argparse.Namespace  # args, with a resumed run's own values for the flags left out
    image_size: int
    checkpoint_paths: list = ()
    loader: GpuLoader = None
    accum_steps: int = None


def start_run(args, checkpoint_paths, kind, fixed=()):
    """Seed, device, data, the run folder and (when resuming) the checkpoint and its settings -> (Run, resumed).
    ``checkpoint_paths``: what the run writes, the first what ``--resume auto`` continues from."""
    env = devices.setup_device(args.device)
    random_seed(args.seed, env.rank)  # torch, numpy, random: each process draws its own masks and augmentations
    resume_path = args.resume if args.resume != "auto" else (
        checkpoint_paths[0] if Path(checkpoint_paths[0]).is_file() else None)
    log_dir = Path(args.log_dir) / args.dataset / args.run_name
    if env.is_main and not resume_path:
        refuse_to_replace(log_dir, checkpoint_paths, args.overwrite, args.resume == "auto")
    resumed = ckpt.load_checkpoint(resume_path, kind=kind, option="--resume") if resume_path else None
    settings = ckpt.resume_settings(resumed, args, (*fixed, "dataset", "data_dir", "seed"), resume_path, log_dir) \
        if resumed else argparse.Namespace(**vars(args))
    train_set, test_set = load_dataset(args.dataset, args.data_dir)
    if resumed:
        ckpt.check_classes(resumed, train_set.classes, resume_path)
    precision = devices.resolve_precision(args.precision, env.device)
    if env.is_main:
        print(devices.describe_speed_path(env.device, precision, not args.no_compile, args.precision))
    return Run(env, precision, log_dir, resume_path, train_set, test_set, settings=settings,
               image_size=train_set.images.shape[-1], checkpoint_paths=list(checkpoint_paths)), resumed


def peek_data(args):
    """(image size, number of classes) without loading the data: the checks a run makes before it loads."""
    image_size, classes, train_images = peek(args.dataset, args.data_dir)
    devices.split_batch(args.batch_size, args.max_device_batch_size, 1)  # refuse a bad split before the data loads
    if args.batch_size > train_images:
        raise utils.UserError(f"--batch_size {args.batch_size} is larger than the {train_images} training images: "
                              f"not one optimizer step would run")
    return image_size, classes


def make_loader(run, settings):
    """The training loader: each process's share of the batch, in micro-batches whose gradients accumulate."""
    micro, run.accum_steps = devices.split_batch(settings.batch_size, settings.max_device_batch_size,
                                               run.env.world_size)
    run.loader = GpuLoader(run.train_set, micro, run.env.device, augment=AUGMENTATIONS[settings.augment],
                           seed=settings.seed, rank=run.env.rank, world_size=run.env.world_size)
    return run.loader


def refuse_to_replace(log_dir, checkpoint_paths, overwrite, resume_auto=False):
    """A new run must not mix into a folder that holds another run's epochs, nor replace its checkpoints."""
    logged = utils.logged_rows(log_dir / "metrics.csv")
    if logged and not overwrite:
        raise utils.UserError(
            f"--resume auto: {log_dir} has {logged} epochs logged but there is no checkpoint at {checkpoint_paths[0]} "
            f"to continue them from; add --overwrite to start the run again, or give --run_name NAME for a new one"
            if resume_auto else f"{log_dir} already holds a run: pass --resume auto to continue it, --run_name NAME "
                                f"for a new one, or --overwrite to start it again")
    taken = [str(p) for p in checkpoint_paths if Path(p).exists()]
    if taken and not overwrite:
        raise utils.UserError(f"{taken[0]} already exists (another run's checkpoint?): pass --resume auto to "
                              f"continue that run, another output path, or --overwrite to replace it")
    if resume_auto:
        print(f"--resume auto: no checkpoint at {checkpoint_paths[0]} yet; starting a new run")


def schedule_for(run, settings, optimizer, resumed):
    """The learning rate: per epoch, or driven by a time budget (a resumed run's continued), or a budget.json's."""
    if not settings.time_budget:
        return engine.EpochSchedule(optimizer, settings.warmup_epoch, settings.total_epoch)
    record = (resumed or {}).get("budget") or {}
    replay = json.loads(Path(settings.time_budget).read_text()) if isinstance(settings.time_budget, str) else None
    minutes = replay["time_budget_minutes"] if replay else settings.time_budget
    return engine.BudgetSchedule(optimizer, minutes, settings.warmup_epoch / settings.total_epoch, devices.CLOCK_START,
                                 shares=record.get("shares", ()), spent_before=record.get("spent_seconds", 0.0),
                                 replay=replay and replay["shares"])
