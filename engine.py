"""The training engine both scripts share: precision, compilation, a step, an epoch, evaluation, the schedule."""
import logging
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from model import mae_loss
from utils import UserError, all_reduce_sum, synchronize

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ precision and compile


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: assume not, fp32 is always correct
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested, device):
    """``--precision auto``: bf16 where the device has it natively, fp16 on older GPUs, else fp32 (MPS, most CPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        # Autocast on MPS depends on the versions: it came late in torch 2.x, bf16 there needs macOS 14 or later,
        # and fp16 needs the loss scaler too. fp32 runs on every Mac and torch 2.x; --precision fp16 asks for more.
        return "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device, precision):
    """Mixed precision for the forward pass; ``fp32`` is plain fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def why_eager(device):
    """Why torch.compile is not used on ``device``, or None where it is: it needs Triton on a GPU (bundled with
    CUDA torch) and a C++ compiler on the CPU; on MPS it is experimental in torch 2.x, so the step runs eagerly."""
    if device.type == "mps":
        return "torch.compile on MPS is experimental in torch 2.x"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler found"
    return None


def compiler_available(device):
    return why_eager(device) is None


def largest_fitting_micro_batch(trial, per_process_batch, device, cpu_cap=256):
    """``--max_device_batch_size auto``: the largest power of two that divides the batch and fits in memory.

    ``trial(size)`` runs one forward and backward at that micro-batch size; on a GPU each size is tried from the
    largest down until one runs without running out of memory. The CPU has no such limit worth a trial, and
    Apple's MPS (memory shared with the CPU) runs out differently: there ``cpu_cap`` (cache-friendly, and fast on
    few cores) or the batch, whichever is smaller.
    """
    sizes = [1 << k for k in range(per_process_batch.bit_length() - 1, -1, -1) if per_process_batch % (1 << k) == 0]
    if device.type != "cuda":
        return next(size for size in sizes if size <= cpu_cap)
    for size in sizes:
        try:
            trial(size)
            return size
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except block, so the failed step's tensors are freed
    raise UserError("not even a micro-batch of 1 image fits in GPU memory")


def maybe_compile(fn, device, enabled=True, mode="default"):
    """``fn`` under torch.compile when ``enabled`` and this device compiles (see why_eager), else ``fn`` itself."""
    if not enabled or not compiler_available(device):
        return fn
    if device.type != "cuda":
        quiet_cuda_home_warning()
    return torch.compile(fn, mode=None if mode == "default" else mode)


def quiet_cuda_home_warning():
    """A CUDA build of torch compiling for the CPU, on a machine with CUDA's tools but no GPU, logs "No CUDA runtime
    is found, using CUDA_HOME=..." (torch.utils.cpp_extension): true, harmless for a CPU run, and nothing for its
    user to act on. That one message is dropped; the logger's others still print."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if no_cuda_runtime_note not in logger.filters:
        logger.addFilter(no_cuda_runtime_note)


def no_cuda_runtime_note(record):
    return not str(record.msg).startswith("No CUDA runtime is found")


def describe_speed_path(device, precision, compiled, requested_precision=None):
    """One line for the log: what the step will run as (and that ``--precision auto`` chose the precision)."""
    compile_note = "torch.compile" if compiled and compiler_available(device) else (
        f"eager ({why_eager(device)})" if compiled else "eager")
    chosen = " (chosen by --precision auto)" if requested_precision == "auto" else ""
    return f"device {device}, precision {precision}{chosen}, {compile_note}, {torch.get_num_threads()} CPU threads"


# ------------------------------------------------------------------------------------------------- steps


def make_pretrain_step(model, device, precision, patch_size, norm_pix_loss=False):
    """One micro-batch: the masked forward under autocast and the loss on the masked patches -> (loss,)."""
    def step(images, _labels):
        with autocast(device, precision):
            predicted, mask = model(images)
        return (mae_loss(predicted, images, mask, patch_size, norm_pix_loss),)

    return step


def make_classifier_step(model, device, precision, criterion, prepare=None, compile=False, compile_mode="default"):
    """One micro-batch -> (loss, number correct). ``prepare`` (mixup, erasing) runs eagerly before the compiled
    forward: timm's Mixup draws its mixing weight on the host, which a compiled graph would bake in."""
    def forward_loss(images, targets, labels):
        with autocast(device, precision):
            logits = model(images)
        return criterion(logits.float(), targets), (logits.argmax(-1) == labels).sum()

    forward_loss = maybe_compile(forward_loss, device, compile, compile_mode)

    def step(images, labels):
        return forward_loss(*(prepare(images, labels) if prepare else (images, labels)), labels)

    return step


# ------------------------------------------------------------------------------------------ epoch, evaluation


class NonFiniteLoss(UserError):
    pass


@dataclass
class EpochPosition:
    """Where a stopped epoch stands: the optimizer steps it finished and the sums of its micro-batches so far
    (summed over all processes), so that a resumed epoch continues the same data order and logs the same loss."""
    optimizer_steps: int
    micro_batches: int  # per process
    images_seen: int  # per process
    sums: list  # [loss, *extras], over all processes

    def to_dict(self):
        return asdict(self)


@dataclass
class EpochResult:
    loss: float = None
    extras: list = None
    images_seen: int = 0
    stopped_at: EpochPosition = None  # set when a stop request ended the epoch early

    def __iter__(self):  # (loss, extras, images_seen), as callers unpack a finished epoch
        return iter((self.loss, self.extras, self.images_seen))


def train_epoch(step, batches, optimizer, accum_steps, model, progress=None, after_step=None, scaler=None,
                start=None, stop=None, max_steps=None):
    """One pass over ``batches``; ``step(images, labels)`` returns (loss, *extra sums) for one micro-batch.

    Gradients of ``accum_steps`` micro-batches are averaged before each optimizer step, so a large batch split
    across micro-batches gives the same update as the whole batch. Sums stay on the device: no sync per step.
    ``after_step()``, if given, runs after every optimizer step (e.g. to update an EMA of the weights);
    ``scaler`` is the fp16 gradient scaler. ``stop()`` is asked after every optimizer step but the last: when it
    says so the epoch ends there, and the result's ``stopped_at`` says where; ``start`` (such a position)
    continues that epoch. ``max_steps`` ends the epoch after that many optimizer steps (a partial last epoch, as
    a time budget plans it), as if the data ended there. Returns an EpochResult: the per-micro-batch mean loss,
    the extra sums, and the number of images seen by all processes.
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    begin = start.micro_batches if start else 0
    loss_sum, extra_sums, micro_batches, images_seen = 0.0, None, begin, start.images_seen if start else 0
    if start and is_main_process():  # the other processes' share of the sums is in rank 0's saved totals
        loss_sum, *extra_sums = (torch.tensor(v) for v in start.sums)
        extra_sums = extra_sums or None
    usable = len(batches) // accum_steps * accum_steps  # an incomplete optimizer step at the end is skipped
    if max_steps is not None:
        usable = min(usable, max_steps * accum_steps)
    for i, (images, labels) in enumerate(batches.starting_at(begin) if begin else batches, start=begin):
        if i >= usable:
            break
        sync = (i + 1) % accum_steps == 0
        with nullcontext() if sync or not ddp else model.no_sync():
            loss, *extras = step(images, labels)
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
        if sync:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
        loss_sum = loss_sum + loss.detach().float()
        extras = [e.detach().float() for e in extras]
        extra_sums = extras if extra_sums is None else [a + b for a, b in zip(extra_sums, extras)]
        micro_batches += 1
        images_seen += len(labels)
        if progress is not None:
            progress.update(1)
        if sync and stop is not None and i + 1 < usable and stop():
            sums = all_reduce_sum(torch.stack([loss_sum, *(extra_sums or [])]).detach().float()).tolist()
            return EpochResult(stopped_at=EpochPosition((i + 1) // accum_steps, micro_batches, images_seen, sums))
    if micro_batches == 0:
        raise UserError(f"an epoch has fewer images than one optimizer step needs ({accum_steps} micro-batches)")
    totals = all_reduce_sum(torch.stack([loss_sum, *(extra_sums or [])]).detach()).tolist()  # the one sync
    world = dist.get_world_size() if dist.is_initialized() else 1
    mean_loss = totals[0] / (micro_batches * world)
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"the training loss became {mean_loss}; stopping. The last checkpoint (from before "
                            f"this epoch) is kept; try a lower --base_learning_rate")
    return EpochResult(mean_loss, totals[1:], images_seen * world)


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def evaluate(model, loader, device, precision, forward=None):
    """Mean loss and accuracy over the whole split, summed on the device and synced once."""
    model.eval()
    forward = forward if forward is not None else model
    totals = torch.zeros(3, device=device)
    for images, labels in loader:
        with autocast(device, precision):
            logits = forward(images)
        totals += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"),
                               (logits.argmax(-1) == labels).sum().float(), (labels >= 0).sum().float()])
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return loss_sum / count, correct / count


# ----------------------------------------------------------------------------------- schedule, timing, stop


def warmup_cosine(warmup_epoch, total_epoch):
    """The reference's per-epoch schedule: linear warm-up, then a half cosine to zero."""
    return lambda epoch: min((epoch + 1) / (warmup_epoch + 1e-8), 0.5 * (math.cos(epoch / total_epoch * math.pi) + 1))


class EpochSchedule:
    """The learning rate of every epoch: each parameter group's peak lr (as the optimizer was built from this
    command's flags) times the warm-up / cosine factor of this command's --warmup_epoch and --total_epoch.

    It is computed, not restored: a run resumed with a longer schedule or another learning rate trains each
    remaining epoch with exactly the lr an uninterrupted run with the new settings would have used.
    """

    def __init__(self, optimizer, warmup_epoch, total_epoch, earlier_lengths=()):
        self.optimizer = optimizer
        self.peaks = [group["lr"] for group in optimizer.param_groups]
        self.set_length(warmup_epoch, total_epoch, earlier_lengths)

    def set_length(self, warmup_epoch, total_epoch, earlier_lengths=()):
        """The run's length, the peaks kept: ``total_epoch``, except that the epochs up to E of each (E, N) in
        ``earlier_lengths`` follow an N-epoch run's schedule (a budgeted run that corrected its plan)."""
        self.warmup_epoch, self.lengths = warmup_epoch, [*map(tuple, earlier_lengths), (math.inf, total_epoch)]

    def set_epoch(self, epoch):
        """Set the lr of epoch ``epoch`` (1 = the first); returns the largest group's lr, the one logged."""
        length = next(n for last, n in self.lengths if epoch <= last)
        factor = warmup_cosine(self.warmup_epoch, length)(epoch - 1)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak * factor
        return max(group["lr"] for group in self.optimizer.param_groups)


def progress_bar(total_steps, initial, enabled):
    return tqdm(total=total_steps, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                smoothing=0.05)


class EpochTimer:
    """Wall time of a block, synchronising the device first so GPU work is counted where it happened.

    ``after_step(then)`` wraps an epoch's after-step hook so that the first optimizer step's time is recorded
    too (one extra sync): in a process's first epoch that step holds the compilation, which
    ``steady_rate`` leaves out of the images per second.
    """

    def __init__(self, device):
        self.device = device
        self.first_step_seconds = None

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def after_step(self, then=None):
        def hook():
            if self.first_step_seconds is None:
                self._sync()
                self.first_step_seconds = time.perf_counter() - self.start
            if then is not None:
                then()

        return hook

    def steady_rate(self, images_seen, images_per_step):
        """Images per second without the first optimizer step (compilation, warm-up), when it was timed."""
        if self.first_step_seconds is None or images_seen <= images_per_step:
            return images_seen / self.seconds
        return (images_seen - images_per_step) / max(self.seconds - self.first_step_seconds, 1e-9)

    def _sync(self):
        synchronize(self.device)


class StopFlag:
    """SIGINT / SIGTERM ask the run to stop at the next optimizer step, save and exit; a second signal quits at
    once.

    ``poll()`` runs after every optimizer step. One process reads its own flag (no sync); under torchrun the
    processes agree every ``agree_every`` steps with one tiny all-reduce, so they all stop at the same step
    and none waits on a collective the others never reach. ``exit_code`` is what the script then exits with
    (130 for SIGINT, 143 for SIGTERM, as shells report them), so that ``pretrain && finetune`` does not go on
    with a half-trained encoder.
    """

    def __init__(self, device=None, agree_every=10):
        self.requested = False
        self.exit_code = 0
        self.device, self.agree_every, self.steps = device, agree_every, 0

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def poll(self):
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        self.steps += 1
        if self.steps % self.agree_every:
            return False
        flag = torch.tensor([float(self.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:  # another process was signalled: exit as it will
            self.requested, self.exit_code = True, 143
        return bool(flag.item())

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next optimizer step, saving, then exiting "
              f"(send it again to quit now)", file=sys.stderr)
