"""The training engine both scripts share: a micro-batch's step, an epoch, an evaluation, the learning rate."""
import io
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from devices import all_reduce_sum, autocast, maybe_compile
from model import mae_loss
from utils import UserError


def make_pretrain_step(model, device, precision, patch_size, norm_pix_loss=False, compile=False):
    """One micro-batch: the masked forward under autocast and the loss on the masked patches -> (loss,)."""
    def step(images, _labels):
        with autocast(device, precision):
            predicted, mask = model(images)
        return (mae_loss(predicted, images, mask, patch_size, norm_pix_loss),)

    return maybe_compile(step, device, compile)


def make_classifier_step(model, device, precision, criterion, prepare=None, compile=False):
    """One micro-batch -> (loss, number correct). ``prepare`` (mixup, erasing) runs eagerly before the compiled
    forward: timm's Mixup draws its mixing weight on the host, which a compiled graph would bake in."""
    def forward_loss(images, targets, labels):
        with autocast(device, precision):
            logits = model(images)
        return criterion(logits.float(), targets), (logits.argmax(-1) == labels).sum()

    forward_loss = maybe_compile(forward_loss, device, compile)
    return lambda images, labels: forward_loss(*(prepare(images, labels) if prepare else (images, labels)), labels)


@dataclass
class EpochPosition:
    """Where a stopped epoch stands, so that the resumed epoch continues the same data order and logs the same loss."""
    optimizer_steps: int
    micro_batches: int  # per process
    images_seen: int  # per process
    sums: list  # [loss, *extras], over all processes
    rng: dict = None  # the random streams after the last finished step: a dropped micro-batch drew from them
    ranks_rng: list = None  # under torchrun: every process's (rank order)

    def to_dict(self):
        return {k: v for k, v in asdict(self).items() if k not in ("rng", "ranks_rng")}


@dataclass
class EpochResult:
    loss: float = None
    extras: list = None
    images_seen: int = 0
    stopped_at: EpochPosition = None  # a stop request ended the epoch: resume from here
    budget_spent: bool = False  # a time budget ended the epoch (and the run) early
    ranks_rng: list = None  # under torchrun: every process's random streams at the epoch's end (rank order)


def train_epoch(step, batches, optimizer, accum_steps, model, *, progress=None, after_step=None, scaler=None,
                start=None, stop=None, before_step=None, rng_state=None):
    """One pass over ``batches``; ``step(images, labels)`` -> (loss, *extra sums) of a micro-batch; ``accum_steps``
    micro-batches make an optimizer step. Sums stay on the device, synced once. ``before_step()`` (a budget's lr)
    returning False ends the epoch. On ``stop()`` the unfinished accumulation is dropped: ``stopped_at`` is the
    position after the last step, with its random streams (``rng_state()``), which ``start`` continues from."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)  # disabled (all but fp16): passes the loss through
    done = start.micro_batches if start else 0
    sums = None  # [loss, *extras] on the device, up to the last finished optimizer step
    if start and start.micro_batches and (not dist.is_initialized() or dist.get_rank() == 0):  # rank 0 has the sums
        sums = [torch.tensor(v) for v in start.sums]
    micro, images_seen = done, start.images_seen if start else 0
    step_sums, step_images = None, 0
    usable = len(batches) // accum_steps * accum_steps  # an incomplete optimizer step at the end is skipped
    keep_rng = rng_state is not None and stop is not None and accum_steps > 1  # else a stop is always at a step
    budget_spent, rng = False, rng_state() if keep_rng else None
    for i, (images, labels) in enumerate(batches.starting_at(done) if done else batches, start=done):
        if i >= usable:
            break
        if i % accum_steps == 0 and before_step is not None and not before_step():
            budget_spent = True
            break
        sync = (i + 1) % accum_steps == 0
        with nullcontext() if sync else getattr(model, "no_sync", nullcontext)():  # DDP: no all-reduce until the step
            loss, *extras = step(images, labels)
            scaler.scale(loss / accum_steps).backward()
        values = [loss.detach().float(), *(e.detach().float() for e in extras)]
        step_sums = values if step_sums is None else [a + b for a, b in zip(step_sums, values)]
        step_images += len(labels)
        if sync:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            sums = step_sums if sums is None else [a + b for a, b in zip(sums, step_sums)]
            micro, images_seen, step_sums, step_images = i + 1, images_seen + step_images, None, 0
            rng = rng_state() if keep_rng else None
        if progress is not None:
            progress.update(1)
        if stop is not None and i + 1 < usable and stop():
            optimizer.zero_grad(set_to_none=True)  # the unfinished step is done again on resume
            totals = all_reduce_sum(torch.stack(sums or [torch.zeros(())]).float()).tolist()
            return EpochResult(stopped_at=EpochPosition(micro // accum_steps, micro, images_seen, totals, rng,
                                                        gathered(rng.copy if rng else rng_state)))
    if sums is None:
        if budget_spent:
            return EpochResult(budget_spent=True, ranks_rng=gathered(rng_state))
        raise UserError(f"an epoch has fewer images than one optimizer step needs ({accum_steps} micro-batches)")
    totals = all_reduce_sum(torch.stack(sums).detach()).tolist()  # the one sync
    world = dist.get_world_size() if dist.is_initialized() else 1
    mean_loss = totals[0] / (micro * world)
    if not math.isfinite(mean_loss):
        raise UserError(f"the training loss became {mean_loss}; stopping. The last checkpoint (from before "
                        f"this epoch) is kept; try a lower --base_learning_rate")
    return EpochResult(mean_loss, totals[1:], images_seen * world, budget_spent=budget_spent,
                       ranks_rng=gathered(rng_state))


def gathered(get_state):
    """Every process's ``get_state()`` in rank order under torchrun (else None): each resumes its own random streams."""
    if get_state is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    states, buffer = [None] * dist.get_world_size(), io.BytesIO()
    torch.save(get_state(), buffer)  # as bytes: all_gather_object's own pickling of tensors fails on CPU tensors
    dist.all_gather_object(states, buffer.getvalue())
    return [torch.load(io.BytesIO(state), weights_only=True) for state in states]


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


def warmup_cosine(warmup, total):
    """The reference's schedule, of the epoch (or a budget's share): a linear warm-up, then a half cosine to zero."""
    return lambda t: min((t + 1) / (warmup + 1e-8), 0.5 * (math.cos(t / total * math.pi) + 1))


class EpochSchedule:
    """Each parameter group's peak lr times the warm-up / cosine factor of the epoch: computed, not restored, so a run
    resumed with a longer schedule or another lr trains on as an uninterrupted run with those settings would."""

    def __init__(self, optimizer, warmup_epoch, total_epoch):
        self.optimizer, self.factor = optimizer, warmup_cosine(warmup_epoch, total_epoch)
        self.peaks = [group["lr"] for group in optimizer.param_groups]

    def set_factor(self, factor):
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak * factor
        return max(group["lr"] for group in self.optimizer.param_groups)  # the one logged

    def set_epoch(self, epoch):
        return self.set_factor(self.factor(epoch - 1))

    before_step = None  # a per-epoch schedule sets nothing per step (BudgetSchedule does)
    record = lambda self: None  # nothing to save beside the arguments (BudgetSchedule saves its shares)


class BudgetSchedule(EpochSchedule):
    """``--time_budget M``: the share of the budget spent sets each step's lr (warm-up, then a cosine to zero at the
    end; Li et al., "Budgeted Training", ICLR 2020) until the budget, less what the end needs, is spent. The shares
    are recorded: a run given them (``replay``) trains the same steps. A resumed run adds ``spent_before``."""

    EXIT_SECONDS = 1.5  # tearing down an interpreter with torch loaded: 1.0-1.4 s measured on 2-core CPUs

    def __init__(self, optimizer, minutes, warmup_share, clock_start, shares=(), spent_before=0.0, replay=None):
        super().__init__(optimizer, 0, 1)
        self.factor = lambda share: min(max(share, 1e-3) / warmup_share if warmup_share else 1.0,
                                        0.5 * (math.cos(share * math.pi) + 1))
        self.seconds, self.clock_start, self.spent_before = minutes * 60, clock_start, spent_before
        self.shares, self.replay = list(shares), replay
        self.end_seconds = 0.05 * self.seconds  # what an epoch's end costs, until one is measured
        self.window, self.measured = None, False  # (start time, share then) of this process's training

    def spent(self):
        return self.spent_before + time.monotonic() - self.clock_start

    def before_step(self):
        share = self.agreed_share()
        if share is None and not self.shares:
            need = math.ceil((self.spent() + self.end_seconds) / 3) / 10  # twice the set-up and the end, in minutes
            raise UserError(f"--time_budget {self.seconds / 60:g} min was spent by the set-up ({self.spent():.0f} s: "
                            f"imports, data, compilation) and what the end needs before one step trained; give at "
                            f"least {need:g} minutes")
        if share is not None:
            self.shares.append(share)
            self.set_factor(self.factor(share))
        return share is not None

    def agreed_share(self):
        """The next step's share (None: spent); rank 0's for all under torchrun, where a process alone would hang."""
        shared = [self.next_share()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def next_share(self):
        if self.replay is not None:
            return self.replay[len(self.shares)] if len(self.shares) < len(self.replay) else None
        now = time.monotonic()
        if self.window is None:
            self.window = (now, self.shares[-1] if self.shares else 0.0)
        began, share_then = self.window
        reserve = self.end_seconds + max(0.02 * self.seconds, self.EXIT_SECONDS)
        end = self.clock_start + self.seconds - self.spent_before - reserve  # on this process's clock
        if end <= began:
            return None
        share = share_then + (1 - share_then) * (now - began) / max(end - began, 1e-9)
        return None if share >= 1 else max(share, self.shares[-1] if self.shares else 0.0)

    def measured_end(self, seconds):  # what an epoch's end took: the run keeps the most for its own end
        self.end_seconds, self.measured = max(seconds, self.end_seconds if self.measured else 0.0), True

    def set_epoch(self, epoch):
        return self.set_factor(self.factor(self.shares[-1] if self.shares else 0.0))

    def record(self):
        return {"shares": self.shares, "spent_seconds": round(self.spent(), 2)}
