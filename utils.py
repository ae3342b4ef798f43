"""What the scripts share: one-line errors, seeding, devices and torchrun, run names, locks and logging."""
import contextlib
import csv
import math
import os
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# The one-line errors and atomic writes live in checks.py, which summarize.py imports without torch.
from checks import (  # noqa: F401
    RUN_LOG_NAMES,
    RUN_LOG_PREFIX,
    UserError,
    WriteError,
    atomic_write,
    first_line,
    run_cli,
    write_cause,
    write_csv,
    write_text,
)

try:
    import fcntl  # advisory file locks, released by the OS when a process dies
except ImportError:  # Windows: runs are not locked
    fcntl = None


# ------------------------------------------------------------------------------------------------- seeding


def setup_seed(seed, deterministic=False):
    """Seed every generator the code touches; ``deterministic`` also asks for deterministic kernels (slower)."""
    torch.manual_seed(seed)  # also seeds CUDA
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True


# ------------------------------------------------------------------------------------------ devices, torchrun


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def mps_available():
    """Whether Apple's Metal GPU (MPS) can run here (torch built with it, and a Mac that has it)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def auto_device():
    """``--device auto``: a CUDA GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def synchronize(device):
    """Wait for the work queued on ``device`` (the CPU runs in order), so a clock read after it is fair."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def kept_random_state(device):
    """Random draws inside leave the run's CPU and ``device`` generators as they were (a figure, a trial step).

    torch.random.fork_rng forks the CUDA generator; the MPS one is saved and restored here, through the calls
    every torch 2.x has.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
        try:
            yield
        finally:
            if mps_state is not None:
                torch.mps.set_rng_state(mps_state)


def setup_device(requested=None, threads=None):
    """The device, and the process group when launched by torchrun (RANK / WORLD_SIZE in the environment)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(auto_device() if requested in (None, "auto") else requested)
    if device.type == "mps":
        if not mps_available():
            raise UserError("--device mps was asked for but Apple's MPS is not available here; use --device cpu")
        if world_size > 1:  # one Apple GPU per machine, and no collective backend for its tensors
            raise UserError("--device mps runs in one process; start it without torchrun")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def split_batch(batch_size, max_device_batch_size, world_size):
    """(micro-batch size per process, micro-batches per optimizer step) for a global batch."""
    if batch_size % world_size:
        raise UserError(f"--batch_size {batch_size} is not divisible by the {world_size} processes")
    per_process = batch_size // world_size
    micro = min(max_device_batch_size, per_process)
    if per_process % micro:
        raise UserError(f"--batch_size {batch_size} per process ({per_process}) is not divisible by "
                        f"--max_device_batch_size {max_device_batch_size}")
    return micro, per_process // micro


# ------------------------------------------------------------------------------------- run names and locks


def run_name(prefix, args, defaults, abbreviations):
    """``prefix`` plus the settings that differ from their defaults, e.g. ``mae_dd8_block``.

    ``abbreviations`` maps an argument name to its short label; a string-valued setting appears as its value.
    """
    parts = [prefix]
    for name, short in abbreviations.items():
        value = getattr(args, name)
        if value is not None and value != defaults.get(name):
            if isinstance(value, bool):
                parts.append(short)
            elif isinstance(value, str) and not short:
                parts.append(value)
            else:
                parts.append(f"{short}{value}")
    return "_".join(parts)


def parser_defaults(parser):
    """{flag's dest: its default}, what ``run_name`` compares against (argparse keeps them only on its actions)."""
    return {action.dest: action.default for action in parser._actions}


class RunLock:
    """An exclusive lock on a run folder: a second live copy of the same run is refused. The OS releases it when
    the process dies, so a crash never blocks a retry."""

    def __init__(self, folder, name=RUN_LOG_NAMES[1], in_use=None):
        self.path = Path(folder) / name
        self.file = None
        self.in_use = in_use or (f"{folder} is in use by another running copy of this run; wait for it to finish, "
                                 f"or stop it first")

    @classmethod
    def for_file(cls, path):
        """A lock beside an output file (``.<name>.lock``): two live runs never write the same checkpoint."""
        path = Path(path)
        return cls(path.parent, f".{path.name}.lock", f"{path} is being written by another running run; give "
                                                      f"this one another output path, or stop that run first")

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        if fcntl is None:
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(self.in_use) from None
        return self

    def release(self):
        """Before the process ends (its end releases the lock too)."""
        if self.file:
            self.file.close()
            self.file = None


# ------------------------------------------------------------------------------------------------- logging


class RunLogger:
    """TensorBoard scalars and a ``metrics.csv`` (header first, one row per epoch) in one run folder.

    On resume, rows from epochs at or after ``start_epoch`` are dropped and TensorBoard purges the same steps,
    so a resumed run's logs read as if it had never stopped. The CSV is small: it is rewritten whole through a
    temporary file after every epoch (see checks.atomic_write), so a failed write (a full disk) leaves the
    previous complete file, never half a row. Columns it already has are kept, so a resume with other monitors
    loses no rows. The header is written with the first row: a first epoch that fails leaves no CSV that blocks
    the retry. A run that starts at epoch 1 (new, or ``--overwrite``) first removes the folder's old CSV and
    TensorBoard event files, so no curve of an earlier run is drawn under its name.

    TensorBoard's event file is only appended to, by a thread of its own; its writes are flushed after every
    epoch, so that a failed one is raised here, in the training thread, as the same one-line WriteError.
    """

    def __init__(self, log_dir, fields, start_epoch=1, enabled=True):
        self.enabled = enabled
        self.fields = ["epoch", *fields]
        self.log_dir = Path(log_dir)
        self.csv_path = self.log_dir / RUN_LOG_NAMES[0]
        self.rows = []
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it

        quiet_tensorboard_thread_errors()
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WriteError(f"could not make the run folder {self.log_dir} ({error.strerror or error})") from None
        if start_epoch <= 1:
            self._remove_earlier_logs()
        else:
            self._keep_rows_before(start_epoch)
        self.writer = self._tensorboard(lambda: SummaryWriter(str(self.log_dir), purge_step=(
            start_epoch if start_epoch > 1 else None)))

    def _remove_earlier_logs(self):
        for path in [self.csv_path, *self.log_dir.glob(f"{RUN_LOG_PREFIX}.*")]:
            if path.is_file():
                path.unlink()

    def _keep_rows_before(self, start_epoch):
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames or []
            self.rows = [row for row in reader if epoch_of(row) < start_epoch]
        self.fields = old_fields + [f for f in self.fields if f not in old_fields]
        write_csv(self.csv_path, self.fields, self.rows)  # now: the CSV agrees with the checkpoint resumed

    def log(self, epoch, **values):
        if not self.enabled:
            return
        self._tensorboard(lambda: [self.writer.add_scalar(tensorboard_tag(name), value, epoch)
                                   for name, value in values.items() if value is not None])
        self.rows.append({"epoch": epoch, **values})
        try:
            write_csv(self.csv_path, self.fields, self.rows)
        except WriteError:
            self.rows.pop()  # the file still holds the rows before this one
            raise
        self._tensorboard(self.writer.flush)

    def log_hparams(self, settings, final_metrics, epoch):
        """The run's settings and final metrics for TensorBoard's HParams view, written through this run's own
        writer (``SummaryWriter.add_hparams`` would start a timestamped subfolder: a second run in every view).

        Only bool (shown as 0 / 1), int, float and str settings are kept: the view has no other types; None is
        "none". A metric
        is the scalar ``hparams/<name>`` at ``epoch``, so a resumed run's purge replaces it like any curve."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        kept = {name: "none" if value is None else value for name, value in settings.items()
                if value is None or isinstance(value, (bool, int, float, str))}
        metrics = {f"hparams/{name}": float(value) for name, value in final_metrics.items() if value is not None}
        for summary in hparams(kept, metrics):  # the experiment, and this session's start and end
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def add_image(self, tag, image, epoch):
        if self.enabled:
            self._tensorboard(lambda: (self.writer.add_image(tag, image, epoch), self.writer.flush()))

    def close(self):
        """Flush (close alone would not raise the writer thread's error), then close, once, even after a failure."""
        if self.writer is None:
            return
        try:
            self._tensorboard(self.writer.flush)
        except WriteError:
            with contextlib.suppress(OSError):  # the same failure again: reported once
                self.writer.close()
            raise
        else:
            self._tensorboard(self.writer.close)
        finally:
            self.writer = None

    def _tensorboard(self, call):
        """``call()``, with a failed event-file write (raised by the writer thread's error) as one WriteError."""
        try:
            return call()
        except OSError as error:
            raise WriteError(f"could not write TensorBoard events {self._event_file()} "
                             f"({write_cause(error, self.log_dir / 'events')})") from None

    def _event_file(self):
        """The event file being written (a private attribute of torch's writer: the folder if that changes)."""
        event_writer = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
        return getattr(event_writer, "_file_name", None) or f"in {self.log_dir}"


def epoch_of(row):
    """A metrics.csv row's epoch; infinite (never kept on resume) for a row cut short by an older version's failed
    append, or edited by hand."""
    try:
        return int(row.get("epoch") or "")
    except ValueError:
        return math.inf


def quiet_tensorboard_thread_errors():
    """TensorBoard's writer thread keeps its failed write's error for the main thread's next flush, and also lets
    it escape as a traceback of its own ("Exception in thread ..."). RunLogger reports that error as one line
    from the main thread, so the writer thread's own report is dropped; every other thread's is kept."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def excepthook(args):
        if not type(args.thread).__module__.startswith("tensorboard.") or not issubclass(args.exc_type, OSError):
            previous(args)

    excepthook.quiets_tensorboard = True
    threading.excepthook = excepthook


def tensorboard_tag(name):
    """``train_loss`` -> ``train/loss`` so TensorBoard groups the curves."""
    for group in ("train_", "val_", "knn_", "probe_"):
        if name.startswith(group):
            return group[:-1] + "/" + name[len(group):]
    return name


def logged_rows(csv_path):
    """Data rows in a metrics.csv (0 if there is none)."""
    if not Path(csv_path).is_file():
        return 0
    with open(csv_path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))
