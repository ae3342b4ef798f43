"""What a training loop keeps beside the model: the locked run folder, logs, saves, the graceful stop, the epoch's
clock and a time budget's record."""
import contextlib
import json
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as ckpt
import devices
import engine
import utils
from data import normalize
from devices import autocast, kept_random_state, synchronize

SAVE_MINUTES = 5  # a run saves at every epoch's end once this long has passed since its last save (and at its end)


class Bookkeeping:  # the module's job, for one run
    def __init__(self, run, fields, done, position, schedule, model):
        settings, self.run, self.schedule = run.settings, run, schedule
        self.is_main, self.stopping, self.final, self.saved = run.env.is_main, False, None, None
        self.locks = [utils.RunLock(run.log_dir).acquire(), *(utils.RunLock.for_file(p).acquire()
                                                               for p in run.checkpoint_paths)] if self.is_main else []
        self.logger = utils.RunLogger(run.log_dir, fields, done + 1, self.is_main)
        self.writer = ckpt.CheckpointWriter()
        self.last_save = time.monotonic()
        self.stop = StopFlag(run.env.device, saving=self.writer.busy).install()
        per_epoch = len(run.loader) // run.accum_steps * run.accum_steps
        self.budgeted = isinstance(schedule, engine.BudgetSchedule)
        if self.is_main and not done and position is None and not self.budgeted:  # the folder is ours (locked) now:
            (run.log_dir / "budget.json").unlink(missing_ok=True)  # an older budgeted run's record, which this replaces
        self.last_epoch = 10 ** 6 if self.budgeted else settings.total_epoch
        done_micro = done * per_epoch + (position.micro_batches if position else 0)
        left = settings.total_epoch * per_epoch - done_micro
        if self.is_main and not self.budgeted and left * settings.batch_size // run.accum_steps > 10 ** 7 and \
                run.env.device.type == "cpu":  # a GPU's schedule on a CPU: say so before the first (compiling) step
            batch = normalize(run.loader.images[:run.loader.batch_size])
            with torch.no_grad(), kept_random_state(batch.device), autocast(batch.device, run.precision):
                start = time.perf_counter()
                model(batch)  # a lower bound: one forward pass of a micro-batch (a training step also goes backward)
            days = (time.perf_counter() - start) * left / 86400
            print(f"{settings.total_epoch} epochs at batch {settings.batch_size} are meant for a GPU: here they would "
                  f"take at least {days:,.1f} days. On a CPU use --preset small, or --time_budget MINUTES")
        self.bar = tqdm(total=None if self.budgeted else settings.total_epoch * per_epoch, initial=done_micro,
                        disable=not self.is_main, unit="step", dynamic_ncols=True, smoothing=0.05)

    def cut_short(self, result):
        """Whether the epoch ended early: a stop signal, or a budget spent before its first step."""
        self.stopping = self.stopping or result.stopped_at is not None
        return result.stopped_at is not None or result.loss is None

    def epoch_end(self, result, epoch):
        """After an epoch's training -> whether it was the last; the end (evaluation, save) is timed from here."""
        self.epoch_ended = time.monotonic()
        return result.budget_spent or self.budgeted and self.schedule.agreed_share() is None or epoch == self.last_epoch

    def save_and_stop(self, last, path, state, epoch, **extra):
        """Save ``state(epoch, **extra)`` when due (rank 0) -> whether the run ends here. A stop signal is read once
        here, so the save and the exit agree; a budget keeps what this epoch's end took for the run's own end."""
        self.stopping = self.stop.requested
        if self.is_main and (self.stopping or last or time.monotonic() - self.last_save >= SAVE_MINUTES * 60):
            self.last_save = time.monotonic()
            self.save(path, state(epoch, **extra))
        if self.budgeted and not (self.stopping or last):
            self.schedule.measured_end(time.monotonic() - self.epoch_ended)
        return self.stopping or last

    def save(self, path, state):
        if self.is_main:
            self.writer.save(path, state)
            self.saved = path

    def finish(self, settings_to_show, message):
        """Wait for the last write, log the HParams, close the logs, say what the run produced, leave no empty run
        folder -> the exit code: 130 / 143 after a graceful stop, else 0."""
        if self.final:
            self.logger.log_hparams(settings_to_show, self.final[1], self.final[0])
        self.writer.wait()
        self.bar.close()
        self.logger.close()
        if self.is_main and self.budgeted:
            self.write_budget_record()
        empty = self.is_main and not self.logger.rows  # a first epoch stopped early logs nothing
        for lock in self.locks:
            lock.release(remove=empty and lock is self.locks[0])
        if empty:
            with contextlib.suppress(OSError):  # not empty after all: a budget record, or another's files
                self.run.log_dir.rmdir()
        if self.is_main and self.stopping and self.saved:
            message = f"stopped; {self.saved} holds where the run stands: the same command with --resume auto " \
                      f"continues it"
        if self.is_main and message:
            print(message)
        devices.cleanup_distributed()
        return self.stop.exit_code if self.stopping else 0

    def write_budget_record(self):
        """budget.json: what a --time_budget run trained, its wall time, and the flags that train it again."""
        path = self.run.log_dir / "budget.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        per_epoch = len(self.run.loader) // self.run.accum_steps
        steps = len(self.schedule.shares)
        # A run killed before it could write its record still counted its time up to its last save (spent_before).
        earlier = [round(self.schedule.spent_before, 2)] if self.schedule.spent_before else []
        wall = [*record.get("wall_seconds", earlier), round(time.monotonic() - devices.CLOCK_START, 2)]
        record.update(time_budget_minutes=self.schedule.seconds / 60, steps=steps, shares=self.schedule.shares,
                      wall_seconds=wall, machine=devices.machine_description(self.run.env.device),
                      date=time.strftime("%Y-%m-%d"), reproduce=f"--time_budget {path} (with this run's other flags)")
        if not self.stopping:
            record.update(total_epoch=-(-steps // per_epoch), epochs=round(steps / per_epoch, 3))
        utils.write_text(path, json.dumps(record) + "\n", "budget record")


class EpochTimer:
    """Wall time of a block, the device synchronised; ``after_step`` times the first step (the compilation) apart."""

    def __init__(self, device):
        self.device, self.first_step_seconds = device, None

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start

    def after_step(self, then=None):
        def hook():
            if self.first_step_seconds is None:
                synchronize(self.device)
                self.first_step_seconds = time.perf_counter() - self.start
            if then is not None:
                then()

        return hook

    def steady_rate(self, images_seen, images_per_step):
        """Images per second without the first optimizer step, when it was timed."""
        if self.first_step_seconds is None or images_seen <= images_per_step:
            return images_seen / self.seconds
        return (images_seen - images_per_step) / max(self.seconds - self.first_step_seconds, 1e-9)


class StopFlag:
    """SIGINT / SIGTERM: stop after this micro-batch, save, exit 130 / 143 (so ``pretrain && finetune`` stops too). A
    second signal quits at once, unless a checkpoint is being written (``saving()``): that write ends whole first.
    Under torchrun the processes agree every ``agree_every`` micro-batches, so they all stop at the same step."""

    def __init__(self, device=None, agree_every=10, saving=lambda: False):
        self.requested, self.exit_code, self.saving = False, 0, saving
        self.device, self.agree_every, self.polls = device, agree_every, 0

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def poll(self):
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        self.polls += 1
        if self.polls % self.agree_every:
            return False
        flag = torch.tensor([float(self.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if (stop := bool(flag.item())) and not self.requested:  # another process was signalled: exit as it will
            self.requested, self.exit_code = True, 143
        return stop

    def _handle(self, signum, frame):
        if self.requested:
            if self.saving():
                print("\na checkpoint is being written; it will end whole, then the run exits", file=sys.stderr)
                return
            raise KeyboardInterrupt
        self.requested, self.exit_code = True, 128 + signum
        print(f"\n{signal.Signals(signum).name}: stopping after this micro-batch, saving, then exiting "
              f"(send it again to quit now)", file=sys.stderr)
