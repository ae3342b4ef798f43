"""How a training run starts, the same for both training scripts: the shared options and their checks, then
seed, device, run folder and lock, the data and its loader, and the rules that keep other runs' files safe."""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import budget
import checkpoint as ckpt
import engine
import utils
from data import AUGMENTATIONS, GpuLoader, load_dataset, peek, physical_memory
from engine import COMPILE_MODES, PRECISIONS, describe_speed_path, largest_fitting_micro_batch, resolve_precision
from model import ModelConfig

# Model-size flags (the image size comes from the data): left out, they come from the checkpoint being resumed or
# fine-tuned, else the defaults.
SIZE_FLAGS = tuple(name for name in ModelConfig.ENCODER_FIELDS if name != "image_size")


def add_size_arguments(p, decoder=False):
    """The architecture flags, defaulting to None so that a checkpoint's own sizes are never silently overridden."""
    for name in SIZE_FLAGS + (("decoder_depth", "decoder_heads", "decoder_emb_dim") if decoder else ()):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT, default=None,
                       help=f"default {getattr(ModelConfig, name)} (or the checkpoint's)")


def add_schedule_arguments(p, batch_size, max_device_batch_size, base_learning_rate, total_epoch, warmup_epoch):
    """The reference's optimisation flags, with each script's own defaults."""
    p.add_argument("--seed", type=utils.SEED, default=42)
    p.add_argument("--batch_size", type=utils.POSITIVE_INT, default=batch_size)
    p.add_argument("--max_device_batch_size", type=micro_batch_size, default=max_device_batch_size,
                   help="micro-batch, or auto (the largest that fits); gradients accumulate")
    p.add_argument("--base_learning_rate", type=utils.POSITIVE_FLOAT, default=base_learning_rate,
                   help="lr = base * batch_size / 256")
    p.add_argument("--weight_decay", type=utils.NONNEGATIVE_FLOAT, default=0.05)
    p.add_argument("--total_epoch", type=utils.EPOCHS, default=total_epoch)
    p.add_argument("--time_budget", type=utils.BUDGET_MINUTES, default=None, metavar="MINUTES",
                   help="instead of --total_epoch: time the run's cost first, then train as many epochs as end "
                        "within this many minutes from the start of the process (saved, so the run reproduces "
                        "with --total_epoch and resumes with its plan)")
    p.add_argument("--warmup_epoch", type=utils.ranged(int, 0, utils.MAX_EPOCHS), default=warmup_epoch,
                   help="at most --total_epoch")
    p.add_argument("--last_epoch_steps", type=utils.NONNEGATIVE_INT, default=0, metavar="STEPS",
                   help="end the last epoch after this many optimizer steps (0: a whole epoch); a --time_budget "
                        "run sets it to spend what its whole epochs leave over")
    p.add_argument("--earlier_lengths", type=utils.epoch_length, nargs="*", default=[], metavar="EPOCH:LENGTH",
                   help="epochs up to EPOCH followed the learning rates of a LENGTH-epoch run, the rest those of "
                        "--total_epoch: how a budgeted run that corrected its length is reproduced (budget.json "
                        "gives the flags)")


def parse_with_presets(parser, argv, **presets):
    """Parse twice: a named preset (``preset=PRESETS`` for ``--preset``) replaces the defaults, and what the user
    typed still wins. Returns the final arguments and the first parse (the flags as typed, no preset)."""
    budget.start_clock(from_process_start=argv is None)  # a time budget counts from here, or the process's start
    argv = sys.argv[1:] if argv is None else argv
    literal = options_typed(parser, argv)
    on_command_line = set(literal)
    typed = parser.parse_known_args(argv)[0]
    for option, table in presets.items():
        chosen = table.get(getattr(typed, option), {})
        parser.set_defaults(**chosen)
        if option in on_command_line:  # a typed preset's values count as typed (they change a resumed run)
            on_command_line |= set(chosen)
    args = parser.parse_args(argv)
    args.typed = sorted(on_command_line)
    if getattr(args, "time_budget", None) and {"total_epoch", "last_epoch_steps", "earlier_lengths"} & literal:
        flag = next(f for f in ("total_epoch", "last_epoch_steps", "earlier_lengths") if f in literal)  # a preset's
        parser.error(f"argument --time_budget: {args.time_budget} cannot be combined with --{flag} "
                     f"{getattr(args, flag)}: the budget plans the number of epochs; give one of the two")
    if getattr(args, "time_budget", None):  # its warm-up is planned with its length, as this share
        args.warmup_share = parser.get_default("warmup_epoch") / parser.get_default("total_epoch")
    else:
        fit_warmup(parser, args, argv)
    check_earlier_lengths(parser, args)
    return args, typed


def check_earlier_lengths(parser, args):
    """--earlier_lengths in the order they happened, each ending before the run did."""
    changes = [epoch for epoch, _ in getattr(args, "earlier_lengths", [])]
    if changes != sorted(set(changes)):
        parser.error(f"argument --earlier_lengths: the epochs {changes} must grow, each given once")
    if changes and changes[-1] > args.total_epoch:
        parser.error(f"argument --earlier_lengths: epoch {changes[-1]} is past --total_epoch {args.total_epoch}, "
                     f"where the run ends")


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


def fit_warmup(parser, args, argv):
    """A warm-up longer than the run never lets the learning rate peak: refused if typed; a default or preset
    warm-up is cut to the same share of the shorter run (the reference's 200 of 2000 epochs: 10 %)."""
    if getattr(args, "warmup_epoch", 0) <= getattr(args, "total_epoch", 0):
        return  # fits, or a parser without an epoch schedule (benchmark.py)
    if any(str(word).split("=")[0].startswith("--warm") for word in argv):
        parser.error(f"argument --warmup_epoch: {args.warmup_epoch} is longer than --total_epoch "
                     f"{args.total_epoch}; the learning rate would never reach its peak")
    default_total = parser.get_default("total_epoch")
    fitted = args.warmup_epoch * args.total_epoch // default_total
    print(f"--warmup_epoch {args.warmup_epoch} (the default for {default_total} epochs) is cut to {fitted} for "
          f"--total_epoch {args.total_epoch}")
    args.warmup_epoch = fitted


def add_run_arguments(p):
    """Data, device, precision and bookkeeping options, the same in both training scripts."""
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, default=None,
                   help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the device has it natively, fp16 (with loss scaling) on GPUs without "
                        "bf16, else fp32")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile (GPU, or CPU with a C++ compiler)")
    p.add_argument("--compile_mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--threads", type=utils.thread_count, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels, for exact reruns (slower)")
    p.add_argument("--log_dir", type=utils.path_text, default="logs")
    p.add_argument("--run_name", type=utils.run_name_text, default=None,
                   help="log folder name (default: built from the settings)")
    p.add_argument("--resume", type=utils.path_text, default=None,
                   help="a checkpoint to continue from, or 'auto' for this run's own")
    p.add_argument("--save_every", type=utils.POSITIVE_INT, default=None,
                   help="also save every N epochs (default: by time only)")
    p.add_argument("--save_minutes", type=utils.POSITIVE_FLOAT, default=10.0,
                   help="save when this many minutes have passed since the last save (and always at the end); "
                        "each save is written in the background from a copy")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace an existing checkpoint at its output path")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow loading a pickled whole-module checkpoint (the reference's released weights)")
    p.add_argument("--check_args", action="store_true",
                   help="check the options, paths and model shapes, then exit: nothing is trained or written")


def micro_batch_size(text):
    """``--max_device_batch_size``: a positive integer, or ``auto``."""
    return text if text == "auto" else utils.POSITIVE_INT(text)


def check_run_arguments(parser, args, outputs, inputs=None):
    """Everything that can be checked before a file is written: the device, the log folder, the output files
    (``outputs``, ``{flag: path}``: none may be one of the ``inputs``; see utils.check_outputs)."""
    utils.check_device(parser, args.device)
    utils.check_writable_folder(parser, "--log_dir", args.log_dir)
    utils.check_name_lengths(parser, "--run_name", Path(args.log_dir) / args.dataset / args.run_name)
    utils.check_outputs(parser, outputs, inputs, args.data_dir)
    check_learning_rate(parser, args)
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        parser.error(f"argument --resume: {args.resume} is not a checkpoint file; pass a file or 'auto'")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"argument --data_dir: {args.data_dir} is not a folder (it needs train/<class>/ and "
                     f"test/<class>/ inside)")


FLOAT32_MAX = 3.4028234663852886e38  # fused and compiled optimizers hold the learning rate as a float32


def check_learning_rate(parser, args):
    """A finite but absurd --base_learning_rate or --weight_decay is refused, naming the flag, before any file: the
    learning rate (base * batch size / 256) must fit in a float32, and AdamW multiplies every weight by
    1 - lr * weight_decay at each step, which at lr * weight_decay >= 1 zeroes or flips the weights."""
    lr = args.base_learning_rate * args.batch_size / 256
    if not lr < FLOAT32_MAX:
        parser.error(f"argument --base_learning_rate: {args.base_learning_rate:g} gives a learning rate of {lr:g} "
                     f"(base * --batch_size {args.batch_size} / 256), beyond what a float32 holds")
    if lr * args.weight_decay >= 1:
        parser.error(f"argument --base_learning_rate, --weight_decay: the learning rate {lr:g} (base "
                     f"{args.base_learning_rate:g} * --batch_size {args.batch_size} / 256) times --weight_decay "
                     f"{args.weight_decay:g} is {lr * args.weight_decay:g}; AdamW multiplies every weight by 1 - "
                     f"that at each step, so it must stay below 1")


def checked(args):
    """The end of ``--check_args``: every check passed, nothing was written."""
    print(f"--check_args: the options are valid (run {args.run_name}); nothing was trained or written")
    return 0


def explicit_sizes(args):
    """The size flags the user gave, as a dict."""
    return {name: getattr(args, name) for name in vars(args) if name in ModelConfig.__dataclass_fields__
            and getattr(args, name, None) is not None}


def trial_step(step, model, batch_shape, num_classes, device):
    """One forward and backward at a micro-batch size, for ``--max_device_batch_size auto``; leaves no gradients."""
    def trial(size):
        images = torch.randn(size, *batch_shape, device=device)
        labels = torch.randint(0, num_classes, (size,), device=device)
        step(images, labels)[0].backward()
        model.zero_grad(set_to_none=True)

    return trial


class SaveSchedule:
    """When to checkpoint: every ``--save_every`` epochs if given, when ``--save_minutes`` have passed since the
    last save, at the last epoch, and on a graceful stop."""

    def __init__(self, args):
        self.clock, self.every, self.seconds = time.monotonic, args.save_every, args.save_minutes * 60
        self.last = self.clock()

    def due(self, epoch, last_epoch, stopping=False):
        if (stopping or epoch == last_epoch or (self.every and epoch % self.every == 0)
                or self.clock() - self.last >= self.seconds):
            self.last = self.clock()
            return True
        return False


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and AdamW's two moments


def check_model_size(build, config, decoder=False):
    """Build the model on the meta device (no memory, so a model of any size is cheap to build and count) and
    refuse one whose training would need more than this machine's memory: a finite but absurd size flag would
    otherwise fail in an allocation with a traceback, or get the process killed. A model the config cannot make
    raises build's own ValueError."""
    memory = physical_memory()
    parameters = fewest_parameters(config, decoder)  # first a count that needs no model: 100,000 blocks take minutes
    if not memory or TRAINING_BYTES_PER_PARAMETER * parameters <= memory:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build(config).parameters())
    needed = TRAINING_BYTES_PER_PARAMETER * parameters
    if memory and needed > memory:
        raise utils.UserError(f"the model has {parameters / 1e6:,.0f} M parameters, whose training needs "
                              f"{needed / 2 ** 30:,.0f} GiB (weights, gradients, AdamW state), more than this "
                              f"machine's {memory / 2 ** 30:,.0f} GiB; choose smaller --emb_dim or depths")


def fewest_parameters(config, decoder=False):
    """A lower bound of the parameter count: each transformer block's four width x width projections and its
    4x MLP (12 width^2) and the position embeddings; the rest (norms, biases, heads) is left out."""
    blocks = [(config.emb_dim, config.encoder_depth)]
    blocks += [(config.decoder_emb_dim or config.emb_dim, config.decoder_depth)] if decoder else []
    patches = (config.image_size // config.patch_size) ** 2
    return sum(12 * width ** 2 * depth for width, depth in blocks) + patches * config.emb_dim


def check_shapes(config, decoder=False):
    """Sizes that cannot make a model, refused naming the flags (the data's image size is known by now)."""
    problems = []
    if config.image_size % config.patch_size:
        problems.append(f"--patch_size {config.patch_size} does not divide the {config.image_size} px images")
    if config.emb_dim % config.encoder_heads:
        problems.append(f"--emb_dim {config.emb_dim} is not divisible by --encoder_heads {config.encoder_heads}")
    width = config.decoder_emb_dim or config.emb_dim
    if decoder and width % config.decoder_heads:
        flag = "--decoder_emb_dim" if config.decoder_emb_dim else "--emb_dim"
        problems.append(f"{flag} {width} is not divisible by --decoder_heads {config.decoder_heads}")
    if problems:
        raise utils.UserError("; ".join(problems))


class Bookkeeping:
    """What a training loop keeps beside the model: the locked run folder, logger, progress bar, background
    checkpoint writer, save schedule, graceful stop, and a budgeted run's record of its plan and wall time."""

    def __init__(self, run, args, fields, done, steps_per_epoch, position=None, after_step=None):
        run.lock_folder()  # before the first file this run writes
        self.run, self.args, self.is_main, self.stopping = run, args, run.env.is_main, False
        self.logger = utils.RunLogger(run.log_dir, fields, done + 1, run.env.is_main)
        self.writer, self.saves = ckpt.CheckpointWriter(), SaveSchedule(args)
        self.stop = engine.StopFlag(run.env.device).install()
        self.steps_per_epoch, self.done_steps = steps_per_epoch, done * steps_per_epoch + (
            position.micro_batches if position else 0)
        self.bar = engine.progress_bar(self.total_steps(args), self.done_steps, run.env.is_main)
        self.steps_left = (self.total_steps(args) - self.done_steps) // run.accum_steps
        self.budgeted = bool(getattr(args, "time_budget", None))
        self.measured_seconds, self.measured_steps = 0.0, 0  # this process's training so far, for check_course
        self.final = None  # (epoch, metrics) of the last epoch this process finished
        if self.is_main:
            self._record_plan(done, args)

    def total_steps(self, args):
        """Micro-batches of the whole run (the progress bar's total): a planned partial last epoch is shorter."""
        last = min(args.last_epoch_steps * self.run.accum_steps, self.steps_per_epoch) if args.last_epoch_steps \
            else self.steps_per_epoch
        return max((args.total_epoch - 1) * self.steps_per_epoch + last, self.done_steps)

    def check_course(self, epoch, args, timer, schedule):
        """At the end of each epoch's training, in a run that planned a budget (nothing otherwise): the step time
        measured over this process's steps so far (the first, timed apart, left out) checks the plan
        (budget.on_course); a new plan is applied to the arguments (which the checkpoint saves and the save
        schedule reads), the schedule and the bar, printed, and recorded in budget.json. Every process follows
        rank 0's plan."""
        if self.run.plan is None:
            return
        self.measured_seconds += timer.seconds - (timer.first_step_seconds or 0.0)
        self.measured_steps += self.steps_per_epoch // self.run.accum_steps - (timer.first_step_seconds is not None)
        if self.measured_steps < 2:
            return
        plan = budget.agree(budget.on_course(self.run.plan, self.run.costs, budget.seconds_since_start(), epoch,
                                             self.measured_seconds / self.measured_steps, self.measured_steps))
        if plan.length() == self.run.plan.length():  # on course (rank 0's word, on every process)
            return
        if epoch > 1:  # epoch 1's learning rate is the same whatever the length: no need to keep the old one
            args.earlier_lengths = [*args.earlier_lengths, [epoch, args.total_epoch]]
        apply_plan(self.run, args, plan, self.bar)
        schedule.set_length(args.warmup_epoch, args.total_epoch, args.earlier_lengths)
        self.bar.total = self.total_steps(args)
        self.bar.refresh()
        if self.is_main:
            self._record_plan(epoch, args)

    def _record_plan(self, done, args):
        """budget.json: written by a budgeted run when it plans (with the flags that reproduce it), updated with
        each process's wall time; a new unbudgeted run in the folder removes an older run's."""
        path = self.run.log_dir / "budget.json"
        if self.run.plan is not None:
            budget.write_record(self.run.log_dir, budget.record_of(self.run.plan, self.run.env.device,
                                                                   args.earlier_lengths))
        elif done == 0 and path.is_file():
            path.unlink()

    def first_epoch_hook(self, timer, then=None):
        """The after-step hook of this process's first epoch: times the first step (EpochTimer) and, for a run
        without a budget, says once if the whole run would take more than a day at the measured speed."""
        hook = timer.after_step(then)
        if self.budgeted or not self.is_main:
            return hook
        return budget.LongRunCheck(self.steps_left, self.run.env.device, hook)

    def save_due(self, epoch, ended_early=False):
        """Whether to save after this epoch (rank 0). A stop signal is read once here, so the save and the exit
        agree; one that arrives later is handled at the next epoch's end."""
        self.stopping = self.stop.requested
        return self.saves.due(epoch, self.args.total_epoch, self.stopping or ended_early) and self.is_main

    def save_now(self, path, state):
        """A stop in the middle of an epoch: save where it stands (rank 0), and end the run."""
        self.stopping = True
        if self.is_main:
            self.writer.save(path, state)

    def finish(self, settings=None):
        """Wait for the last write, record the settings and final metrics for TensorBoard's HParams view (when
        this process finished an epoch), close the logs; the exit code: 130 / 143 after a graceful stop, else 0."""
        if self.final and settings is not None:
            self.logger.log_hparams(settings, self.final[1], self.final[0])
        self.writer.wait()
        self.bar.close()
        self.logger.close()
        if self.is_main and self.budgeted:
            self._record_wall_time()
        utils.cleanup_distributed()
        return self.stop.exit_code if self.stopping else 0

    def _record_wall_time(self):
        """This process's wall time, beside the budget it planned for (a resumed run adds its own)."""
        wall = budget.seconds_since_start()
        record = budget.read_record(self.run.log_dir)
        record["wall_seconds"] = [*record.get("wall_seconds", []), round(wall, 2)]
        budget.write_record(self.run.log_dir, record)
        minutes = record.get("time_budget_minutes")
        if minutes:
            print(f"wall time {wall / 60:.2f} min of the {minutes:g} min budget (process start to exit)")


@dataclass
class Run:
    env: utils.Dist
    precision: str
    log_dir: Path
    resume_path: str
    train_set: object
    test_set: object
    checkpoint_paths: list = ()
    loader: GpuLoader = None
    accum_steps: int = None
    locks: list = None
    plan: object = None  # budget.Plan of a --time_budget run, once planned
    costs: object = None  # budget.Costs its trial measured
    test_loader: GpuLoader = None  # the classifier's evaluation batches

    def lock_folder(self):
        """Lock the run folder and the checkpoints it writes (before the first file); held until the process ends,
        so neither a second copy of this run nor another run with the same checkpoint path writes beside it."""
        if self.env.is_main and self.locks is None:
            self.locks = [utils.RunLock(self.log_dir).acquire(),
                          *(utils.RunLock.for_file(path).acquire() for path in self.checkpoint_paths)]


def peek_data(args):
    """(image size, number of classes) of the data set without loading it (see data.peek), for the checks a run
    makes before the data loads; a batch larger than its training set is refused here already."""
    image_size, classes, train_images = peek(args.dataset, args.data_dir)
    check_batch_fits(args.batch_size, train_images)
    return image_size, classes


def check_batch_fits(batch_size, train_images, world_size=1):
    """A batch larger than the training set would train nothing: each epoch drops its last, partial batch."""
    if batch_size // world_size > train_images // world_size:
        raise utils.UserError(f"--batch_size {batch_size} is larger than the {train_images} training images: not "
                              f"one optimizer step would run")


def start_run(args, checkpoint_paths):
    """Seed, device, the data and the run folder (see ``make_loader`` and ``Run.lock_folder`` for the rest).

    ``checkpoint_paths`` are the files this run writes; the first is the one ``--resume auto`` continues from.
    A new run refuses to replace any of them (another run's work) without ``--overwrite``.
    """
    env = utils.setup_device(args.device, args.threads)
    if args.max_device_batch_size != "auto":
        utils.split_batch(args.batch_size, args.max_device_batch_size, env.world_size)  # refuse a bad split now
    utils.setup_seed(args.seed + env.rank, args.deterministic)  # each process draws its own masks and augmentations
    resume_path = ckpt.resolve_resume(args.resume, checkpoint_paths[0])
    log_dir = Path(args.log_dir) / args.dataset / args.run_name
    if env.is_main and not resume_path:
        refuse_to_replace(log_dir, checkpoint_paths, args.overwrite, args.resume == "auto")
        if args.resume == "auto":
            print(f"--resume auto: no checkpoint at {checkpoint_paths[0]} yet; starting a new run")
    train_set, test_set = load_dataset(args.dataset, args.data_dir)
    args.image_size = train_set.images.shape[-1]
    check_batch_fits(args.batch_size, len(train_set.labels), env.world_size)
    precision = resolve_precision(args.precision, env.device)
    if env.is_main:
        print(describe_speed_path(env.device, precision, not args.no_compile, args.precision))
    return Run(env, precision, log_dir, resume_path, train_set, test_set, list(checkpoint_paths))


def make_loader(run, args, augment, trial=None):
    """The training loader, once the micro-batch is known: ``--max_device_batch_size auto`` finds it with
    ``trial(size)`` (one forward and backward, see engine.largest_fitting_micro_batch) and prints it."""
    requested = args.max_device_batch_size
    if requested == "auto":
        per_process = args.batch_size // run.env.world_size
        with utils.kept_random_state(run.env.device):
            requested = largest_fitting_micro_batch(trial, per_process, run.env.device)
        if run.env.is_main:
            print(f"--max_device_batch_size auto: {requested}")
    micro_batch, run.accum_steps = utils.split_batch(args.batch_size, requested, run.env.world_size)
    run.loader = GpuLoader(run.train_set, micro_batch, run.env.device, augment=AUGMENTATIONS[augment],
                           seed=args.seed, rank=run.env.rank, world_size=run.env.world_size)
    return run.loader


def refuse_to_replace(log_dir, checkpoint_paths, overwrite, resume_auto=False):
    """A new run must not mix into a folder that holds another run's epochs, nor replace its checkpoints.

    With ``--resume auto`` and no checkpoint yet, epochs logged there have nothing to continue from (the run
    stopped, or failed to write, before its first checkpoint): only ``--overwrite`` starts it again."""
    logged = utils.logged_rows(log_dir / "metrics.csv")
    if logged and not overwrite and resume_auto:
        raise utils.UserError(f"--resume auto: {log_dir} has {logged} epochs logged but there is no checkpoint at "
                              f"{checkpoint_paths[0]} to continue them from; add --overwrite to start the run "
                              f"again, or give --run_name NAME for a new one")
    if logged and not overwrite:
        raise utils.UserError(f"{log_dir} already holds a run: pass --resume auto to continue it, --run_name NAME "
                              f"for a new one, or --overwrite to start it again")
    taken = [str(p) for p in checkpoint_paths if Path(p).exists()]
    if taken and not overwrite:
        raise utils.UserError(f"{taken[0]} already exists (another run's checkpoint?): pass --resume auto to "
                              f"continue that run, another output path, or --overwrite to replace it")


def settle_resume(run, checkpoint, args, fixed):
    """Before the model is built: the checkpoint must be this run's, with this run's data (``fixed``: the flags
    that may not change); flags left out continue with the run's own values, typed ones are applied (see
    checkpoint.settle_resume_settings)."""
    check_resume_owner(checkpoint, run.log_dir, run.resume_path)
    ckpt.settle_resume_settings(checkpoint, args, (*fixed, "seed"), run.resume_path)


def plan_budget(run, args, costs):
    """--time_budget: fix the run's epochs from the trial's measured ``costs`` (budget.py), print the plan in
    one line and keep it in the arguments, so the checkpoint saves it and --total_epoch N reproduces the run."""
    typed_warmup = args.warmup_epoch if "warmup_epoch" in args.typed else None
    elapsed = budget.seconds_since_start()
    run.costs = costs  # for the checks of its course after each epoch (Bookkeeping.check_course)
    return apply_plan(run, args, budget.agree(budget.plan_epochs(args.time_budget, elapsed, costs, args.warmup_share,
                                                                 typed_warmup)))


def apply_plan(run, args, plan, bar=None):
    """Take the plan every process agreed on (budget.agree), keep it in the arguments (so the checkpoint saves
    it and --total_epoch N reproduces the run); rank 0 prints it (above the progress ``bar`` once there is one)."""
    run.plan = plan
    args.total_epoch, args.warmup_epoch, args.last_epoch_steps = run.plan.length()
    if run.env.is_main:
        if bar is not None:
            bar.write(run.plan.describe())
        else:
            print(run.plan.describe(), flush=True)
    return run.plan


def epochs_to_train(done, args):
    """The epochs after ``done``, up to --total_epoch as it stands at each epoch's start (a budgeted run may
    correct its length at the end of an epoch: Bookkeeping.check_course)."""
    epoch = done + 1
    while epoch <= args.total_epoch:
        yield epoch
        epoch += 1


def steps_cap(args, epoch):
    """The optimizer steps epoch ``epoch`` ends after: --last_epoch_steps for the last one, else None (all)."""
    return (args.last_epoch_steps or None) if epoch == args.total_epoch else None


def finished_already(run, done, total_epoch):
    """A resumed run with no epoch left: say so and write nothing (no empty TensorBoard file per retry)."""
    if done < total_epoch:
        return False
    if run.env.is_main:
        print(f"{run.resume_path} has finished all {done} of --total_epoch {total_epoch} epochs: nothing to do "
              f"(a larger --total_epoch continues it)")
    return True


def check_resume_owner(checkpoint, log_dir, source):
    """A checkpoint records its run folder: resuming it into another run's folder would mix two runs."""
    owner = checkpoint.get("run_dir")
    if owner is not None and Path(owner).resolve() != Path(log_dir).resolve():
        raise utils.UserError(f"{source} belongs to the run in {owner}, not {log_dir}: resume it with that run's "
                              f"--log_dir / --run_name, or give this run another checkpoint path")

