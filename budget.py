"""Training to a time budget: time the run's cost first, fix its number of epochs, correct it only when needed.

``--time_budget M`` runs a short timed trial before training (the first steps hold the compilation; then a few
steady optimizer steps, one evaluation and the monitors the run logs), undoes every effect of it on the model,
the optimizer and the random streams, and plans as many epochs as end within M minutes of the process's start
(of the call, for a script's main called from Python), with a warm-up that is the same share of the run as the
defaults'. The run is then the run ``--total_epoch N`` would be: the plan is printed, saved in the checkpoint's
arguments and in ``budget.json`` beside the metrics, and kept when the run resumes. Planning by the clock at
every epoch would make runs irreproducible (see Li, Yumer, Ramanan, "Budgeted Training", ICLR 2020, for schedules
that decay to zero at the budget's end, as the cosine here does), so the plan changes only as below.

The trial's few steps on cached batches can misjudge the step time by a fifth, and a shared machine's speed drifts
(by a quarter over seconds on a 2-core virtual machine), so the run checks its course at the end of every epoch's
training with the step time measured over all its steps so far (fed by the real loader, on the machine as busy as
it is now). After epoch 1 it always takes the corrected plan: epoch 1's learning rate does not depend on the
run's length (the warm-up, kept, sets it), so that plan is still what ``--total_epoch N`` reproduces exactly.
Later it plans again only when the run would end past the budget or leave more than the reserve of it unused;
such a correction is printed and listed in ``budget.json``, and the epochs before it keep the earlier length's
cosine (``--earlier_lengths EPOCH:LENGTH``, saved with the run): ``budget.json``'s ``reproduce`` flags train the
same run without a budget, to the bit.
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import engine
import utils
from utils import UserError, synchronize

_IMPORTED_AT = time.monotonic()
SAFETY = 0.02  # of the budget, kept back for what the trial cannot see (noise between epochs) ...
EXIT_SECONDS = 2.5  # ... and at least this for the exit: tearing down an interpreter with torch loaded takes ~2 s
EPOCH_MARGIN = 1.03  # an epoch costs a little more than its measured parts: the loop, the bar, the loader's order
LONG_RUN_SECONDS = 24 * 3600  # a planned run longer than this is said out loud once
SHORTEST_PART = 0.1  # of an epoch: the least a partial last epoch trains, or its evaluation outweighs it


def process_start():
    """``time.monotonic()`` at the start of this process (Linux: from /proc, so Python's and torch's imports
    count against the budget too); elsewhere, when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_CLOCK_START = None  # when this run's budget began counting (start_clock)


def start_clock(from_process_start):
    """Where a budget counts from: the process's start for a script run from the command line (Python's and
    torch's imports count), the call for a main([...]) called inside a longer-lived Python (a notebook's kernel,
    a test), whose age is not the run's."""
    global _CLOCK_START
    _CLOCK_START = process_start() if from_process_start else time.monotonic()


def seconds_since_start():
    return time.monotonic() - (process_start() if _CLOCK_START is None else _CLOCK_START)


@dataclass
class Costs:
    """What the trial measured, in seconds."""
    step: float  # one optimizer step (all its micro-batches), compiled and warm
    steps_per_epoch: int
    evaluation: float = 0.0  # what every epoch evaluates (the classifier's test pass, an EMA's)
    bookkeeping: float = 0.0  # what every epoch logs (a metrics row, its TensorBoard scalars) and copies to save
    periodic: tuple = ()  # (seconds, every N epochs) for the monitors (k-NN, reconstruction images)
    final: float = 0.0  # the end: the last epoch's monitors and the final save

    @property
    def epoch(self):
        return self.part_of_epoch(self.steps_per_epoch)

    def part_of_epoch(self, steps):
        """An epoch that ends after ``steps`` optimizer steps: its steps, its evaluation and its logging."""
        return EPOCH_MARGIN * (self.step * steps + self.evaluation + self.bookkeeping
                               + sum(seconds / every for seconds, every in self.periodic))


@dataclass
class Plan:
    budget_minutes: float
    total_epoch: int
    warmup_epoch: int
    epoch_seconds: float
    evaluation_seconds: float
    setup_seconds: float  # from the start of the process to the plan: imports, data, compilation, the trial
    final_seconds: float
    step_seconds: float = 0.0
    last_epoch_steps: int = 0  # the last epoch ends after this many optimizer steps (0: a whole epoch)
    steps_per_epoch: int = 0
    trial_step_seconds: float = 0.0  # once the run has corrected the plan: the step time the trial measured
    measured_steps: int = 0  # the steps the corrected plan's step time was measured over
    corrections: tuple = ()  # (after epoch, total_epoch, last_epoch_steps) of each correction

    @property
    def epochs(self):
        """The epochs trained, a partial last one counted by its share of the steps."""
        if not self.last_epoch_steps:
            return float(self.total_epoch)
        return self.total_epoch - 1 + self.last_epoch_steps / self.steps_per_epoch

    def describe(self):
        length = f"{self.total_epoch} epochs" if not self.last_epoch_steps else (
            f"{self.epochs:.2f} epochs ({self.total_epoch - 1} + {self.last_epoch_steps} of {self.steps_per_epoch} "
            f"steps)")
        if self.corrections:
            return (f"budget {self.budget_minutes:g} min, planned again after epoch {self.corrections[-1][0]} -> "
                    f"{length} ({self.step_seconds:.3f} s a step measured over {self.measured_steps} steps, the "
                    f"trial's {self.trial_step_seconds:.3f}; {self.epoch_seconds:.1f} s/epoch)")
        return (f"budget {self.budget_minutes:g} min -> {length}, warm-up {self.warmup_epoch} "
                f"({self.epoch_seconds:.1f} s/epoch incl. {self.evaluation_seconds:.1f} s evaluation, after "
                f"{self.setup_seconds:.0f} s of set-up and trial; {self.step_seconds:.3f} s a step; measured)")

    def length(self):
        """(total_epoch, warmup_epoch, last_epoch_steps): what --total_epoch, --warmup_epoch and
        --last_epoch_steps reproduce the run with."""
        return self.total_epoch, self.warmup_epoch, self.last_epoch_steps


def plan_epochs(budget_minutes, elapsed, costs, warmup_share, typed_warmup=None):
    """The number of epochs whose cost, after ``elapsed`` seconds already spent, ends within the budget; the time
    whole epochs leave over goes to a partial last epoch (if it fits at least SHORTEST_PART of one), so a run on a
    slow machine, whose epochs take minutes, uses its whole budget.

    ``warmup_share`` is the defaults' warm-up / total (e.g. 200 / 2000); a typed warm-up is kept if it fits.
    """
    available = seconds_left(budget_minutes, elapsed) - costs.final
    epochs, last_steps = fit_epochs(available, costs)
    if epochs < 1:
        raise UserError(f"--time_budget {budget_minutes:g} minutes is too short: the set-up and trial took "
                        f"{elapsed:.0f} s, one epoch takes {costs.epoch:.1f} s ({costs.steps_per_epoch} steps of "
                        f"{costs.step:.3f} s, {costs.evaluation:.1f} s evaluation) and the end {costs.final:.1f} s "
                        f"(measured); give a larger budget or a smaller model or data set")
    if typed_warmup is not None and typed_warmup > epochs:
        raise UserError(f"--warmup_epoch {typed_warmup} is longer than the {epochs} epochs that "
                        f"--time_budget {budget_minutes:g} allows; leave it out (the warm-up is then "
                        f"{warmup_share:.0%} of the run) or give a smaller one")
    warmup = typed_warmup if typed_warmup is not None else round(epochs * warmup_share)  # as sweep.py rounds
    return Plan(budget_minutes, epochs + bool(last_steps), warmup, costs.epoch, costs.evaluation, elapsed,
                costs.final, costs.step, last_steps, costs.steps_per_epoch)


def on_course(plan, costs, elapsed, epochs_done, step_seconds, measured_steps):
    """The plan checked at the end of an epoch's training, ``elapsed`` seconds after the process started, with the
    step time measured over this process's ``measured_steps`` steps so far: the same plan while it still ends
    within the budget (by no more than half the reserve past the planned end) and uses it (by no more than the
    reserve short of it), else the epochs after this one fitted again to what is left. The warm-up is kept (it
    set the learning rates already trained); the epochs still to come pay this one's evaluation and logging first.
    The first check (after epoch 1) always applies its plan: whatever the trial misjudged, that plan is exact."""
    if epochs_done >= plan.total_epoch or step_seconds <= 0:
        return plan
    measured = replace(costs, step=step_seconds)
    left = seconds_left(plan.budget_minutes, elapsed) - costs.final - measured.part_of_epoch(0)
    whole = plan.total_epoch - epochs_done - bool(plan.last_epoch_steps)
    needed = whole * measured.epoch + (measured.part_of_epoch(plan.last_epoch_steps) if plan.last_epoch_steps else 0)
    slack = reserve_seconds(plan.budget_minutes)
    if epochs_done > 1 and left - slack <= needed <= left + slack / 2:
        return plan
    more, last_steps = fit_epochs(left, measured)
    return replace(plan, total_epoch=epochs_done + more + bool(last_steps), last_epoch_steps=last_steps,
                   epoch_seconds=measured.epoch, step_seconds=step_seconds,
                   trial_step_seconds=plan.trial_step_seconds or plan.step_seconds,
                   corrections=(*plan.corrections, (epochs_done, epochs_done + more + bool(last_steps), last_steps)),
                   measured_steps=measured_steps)


def reserve_seconds(budget_minutes):
    """What a plan keeps back of the budget: for noise between epochs, and at least enough for the exit."""
    return max(SAFETY * budget_minutes * 60, EXIT_SECONDS)


def seconds_left(budget_minutes, elapsed):
    """What the budget leaves for training after ``elapsed`` seconds, the reserve for noise and the exit kept."""
    return budget_minutes * 60 - reserve_seconds(budget_minutes) - elapsed


def fit_epochs(seconds, costs):
    """(whole epochs, steps of a partial last one) that fit in ``seconds``."""
    epochs = max(math.floor(seconds / costs.epoch), 0) if costs.epoch > 0 else 0
    return epochs, partial_epoch_steps(seconds - epochs * costs.epoch, costs)


def partial_epoch_steps(seconds, costs):
    """The optimizer steps a partial epoch can train in ``seconds`` (its evaluation and logging paid), or 0 when
    that is less than SHORTEST_PART of an epoch or the trial saw no step time."""
    if costs.step <= 0:
        return 0
    steps = min(math.floor((seconds - costs.part_of_epoch(0)) / (EPOCH_MARGIN * costs.step)), costs.steps_per_epoch - 1)
    return steps if steps >= max(1, SHORTEST_PART * costs.steps_per_epoch) else 0


def agree(plan):
    """Under torchrun every process trains the epochs rank 0 planned (their clocks measure alike, not equal)."""
    if not dist.is_initialized():
        return plan
    numbers = torch.tensor([plan.total_epoch, plan.warmup_epoch, plan.last_epoch_steps], dtype=torch.float64,
                           device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(numbers, 0)
    total, warmup, last = (int(n) for n in numbers)
    if (total, warmup, last) == plan.length():
        return plan
    return replace(plan, total_epoch=total, warmup_epoch=warmup, last_epoch_steps=last)


# ------------------------------------------------------------------------------------------------ the trial


class Trial:
    """Runs ``measure()`` and then puts back everything it touched: the modules' weights and buffers, the
    optimizer's state, a gradient scaler's, and every random stream (torch, CUDA, numpy, Python)."""

    def __init__(self, modules, optimizer, scaler=None):
        self.modules, self.optimizer, self.scaler = [m for m in modules if m is not None], optimizer, scaler

    def __enter__(self):
        self.rng = checkpoint.rng_state()
        self.weights = [copy.deepcopy(m.state_dict()) for m in self.modules]
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.scaler_state = copy.deepcopy(self.scaler.state_dict()) if self.scaler else None
        return self

    def __exit__(self, *exc):
        for module, weights in zip(self.modules, self.weights):
            module.load_state_dict(weights)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.load_state_dict(self.scaler_state)
        checkpoint.set_rng_state(self.rng)


def step_seconds(step, loader, optimizer, accum_steps, model, device, budget_minutes, scaler=None, after_step=None,
                 warm_steps=2, most_steps=30):
    """Seconds per optimizer step, steady: engine.train_epoch over the first batches of epoch 1 (repeated as
    needed), ``after_step`` (an EMA's update) included. The first ``warm_steps`` (compilation, allocator warm-up)
    are not counted; then up to ``most_steps`` are timed, but no more than 2 % of the budget's worth once three
    are in, so a slow model's trial stays short and a fast one's is long enough not to be noise."""
    marks = []

    def mark():
        if after_step is not None:
            after_step()
        synchronize(device)
        marks.append(time.perf_counter())

    def enough():
        steady = len(marks) - warm_steps
        if dist.is_initialized():  # every process must stop at the same step: by count only, never by its clock
            return steady >= min(most_steps, 10)
        return steady >= most_steps or (steady >= 3 and marks[-1] - marks[warm_steps - 1] > budget_minutes * 1.2)

    batches = trial_batches(loader, accum_steps)
    engine.train_epoch(step, batches * (most_steps + warm_steps), optimizer, accum_steps, model, after_step=mark,
                       scaler=scaler, stop=enough)
    steady = marks[warm_steps - 1:]
    if len(steady) < 2:
        raise UserError("the time-budget trial needs at least 3 optimizer steps in an epoch; use a smaller "
                        "--batch_size or more data")
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def timed(fn, device):
    """Seconds ``fn()`` takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def trial_batches(loader, accum_steps, steps=6):
    """The first micro-batches of epoch 1, enough for ``steps`` optimizer steps (fewer if the epoch is short)."""
    count = min(steps, len(loader) // accum_steps) * accum_steps
    batches = []
    for images, labels in loader:
        if len(batches) == count:
            break
        batches.append((images, labels))
    return batches


def time_bookkeeping(fields, copy=None, rows=3):
    """Seconds an epoch spends logging a metrics row (CSV and TensorBoard, in a scratch folder) and, with
    ``copy``, taking the host copy a checkpoint save starts with; the first row (the writer's start) not counted."""
    import tempfile

    from utils import RunLogger

    with tempfile.TemporaryDirectory() as folder:
        logger = RunLogger(folder, fields)
        logger.log(0, **dict.fromkeys(fields, 0.5))
        start = time.perf_counter()
        for epoch in range(1, rows):
            logger.log(epoch, **dict.fromkeys(fields, 0.5))
            if copy is not None:
                copy()
        seconds = (time.perf_counter() - start) / (rows - 1)
        logger.close()
    return seconds


def write_record(log_dir, record):
    """``budget.json`` beside the metrics: the plan, and (at the end) the wall time it took."""
    utils.write_text(Path(log_dir) / "budget.json", json.dumps(record, indent=1) + "\n", "budget record")


def read_record(log_dir):
    try:
        return json.loads((Path(log_dir) / "budget.json").read_text())
    except (OSError, ValueError):
        return {}


def record_of(plan, device, earlier_lengths=()):
    """budget.json's content: the plan, the flags that train the same run without a budget, the machine, the date."""
    flags = f"--total_epoch {plan.total_epoch} --warmup_epoch {plan.warmup_epoch} --last_epoch_steps " \
            f"{plan.last_epoch_steps}"
    if earlier_lengths:
        flags += " --earlier_lengths " + " ".join(f"{epoch}:{length}" for epoch, length in earlier_lengths)
    return {"time_budget_minutes": plan.budget_minutes, **{k: v for k, v in asdict(plan).items()
                                                             if k != "budget_minutes"},
            "reproduce": flags, "machine": machine_description(device),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def machine_description(device):
    """What the plan was measured on, for the tables that cite it: the GPU, or the CPU, its cores and whether it
    has native bf16 (which decides the CPU's fast path)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
        name += ", " + ("AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
                        else "AVX2" if "avx2" in flags else "no AVX2")
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' * (threads > 1)}, torch {torch.__version__}"


def long_run_warning_steps(steps_left, step_seconds):
    """One line when the run would take more than a day at the measured speed (a CPU running the GPU
    defaults, say); None otherwise."""
    seconds = steps_left * step_seconds
    if seconds <= LONG_RUN_SECONDS:
        return None
    return (f"note: at the measured {step_seconds:.2f} s per optimizer step, the {steps_left} steps left take "
            f"{seconds / 86400:.1f} days on this machine; on a CPU try --preset small, or --time_budget MINUTES "
            f"to train as much as fits in a given time")


class LongRunCheck:
    """An after-step hook for a process's first epoch: at the second optimizer step (the first holds the
    compilation) it estimates the run's length once and prints ``long_run_warning``; then it only calls ``then``."""

    def __init__(self, steps_left, device, then=None):
        self.steps_left, self.device, self.then, self.marks = steps_left, device, then, []

    def __call__(self):
        if self.then is not None:
            self.then()
        if len(self.marks) >= 2:
            return
        synchronize(self.device)
        self.marks.append(time.perf_counter())
        if len(self.marks) == 2:
            warning = long_run_warning_steps(self.steps_left, self.marks[1] - self.marks[0])
            if warning:
                print(f"\n{warning}", flush=True)
