"""What the scripts share: one-line errors, argparse types, atomic writes, seeding, devices and torchrun,
run names, locks and logging."""
import argparse
import contextlib
import csv
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# The files a run keeps in its log folder (utils.RunLogger, utils.RunLock): no output may take these names.
RUN_LOG_NAMES = ("metrics.csv", ".lock")
RUN_LOG_PREFIX = "events.out.tfevents"


# ------------------------------------------------------------------------------------------ one-line errors


class UserError(ValueError):
    """Bad input from the user: reported as one line on stderr and a non-zero exit, never a traceback."""


class WriteError(UserError):
    """A file could not be written (a full disk, a file-size limit, a read-only folder, a name too long): the
    message names the file and the cause; what the user does next depends on the script (see ``run_cli``)."""


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def run_cli(main, argv=None, resumable=False):
    """Run ``main``; turn the errors a user can fix into one clear line and exit code 2.

    ``main`` may return an exit code: 130 / 143 after a graceful stop on SIGINT / SIGTERM. ``resumable``: the
    script continues a run with ``--resume auto``, which is then the advice after a failed write.
    """
    try:
        code = main(argv)
    except WriteError as error:
        advice = ("fix that, then continue with --resume auto (a run with no checkpoint yet: start it again with "
                  "--overwrite)" if resumable else "fix that and run the command again")
        say_error(f"{first_line(error)}; {advice}")
        sys.exit(2)
    except (ValueError, FileNotFoundError) as error:  # our UserError, DataError and model ValueErrors
        say_error(first_line(error))
        sys.exit(2)
    except OSError as error:  # a full disk, a read-only folder: name the path and the cause
        where = f"{error.filename}: " if error.filename else ""
        say_error(f"{where}{error.strerror or first_line(error)}")
        sys.exit(2)
    except KeyboardInterrupt:
        end_progress_bars()
        print("interrupted; the last saved checkpoint is intact (resume with --resume auto)" if resumable else
              "interrupted; every file written so far is whole", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def say_error(message):
    end_progress_bars()
    print(f"error: {message}", file=sys.stderr)


def end_progress_bars():
    """Close the progress bars an error left open (tqdm's, if it is loaded), so that the error line starts a line
    of its own instead of following the bar's last state."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a refusal of one usage line and the error instead of the whole usage block (about
    30 lines above the one that matters); ``--help`` still prints everything. The script's docstring is its
    description, printed as written."""

    def __init__(self, *args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]; see --help\n{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------------- atomic writes


def atomic_write(path, write, what=""):
    """Write ``path`` whole or not at all: ``write(temporary_path)`` writes a hidden file beside it (same folder,
    same suffix, so savers that go by the suffix pick the format), which then replaces ``path`` in one rename.

    On any failure the temporary file is removed and one WriteError names the path and the cause; a file that
    was there before is left as it was. ``what`` names the kind of file in that message ("checkpoint").
    """
    path = Path(path)
    existed = os.path.isfile(path)  # never an OSError (a name too long): that comes from the write, named
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's writer reports a failed write so
        raise WriteError(f"could not write {what + ' ' if what else ''}{path} ({write_cause(error, path)}); "
                         f"{'the file there before is unchanged' if existed else 'nothing was left there'}") from None
    finally:
        with contextlib.suppress(OSError):  # a temporary file that could not even be made is no error of its own
            tmp.unlink(missing_ok=True)


def write_cause(error, path):
    """Why a write failed, with the free space where it went (a full disk and a file-size limit read alike)."""
    cause = (error.strerror if isinstance(error, OSError) and error.strerror else first_line(error))
    folder = next((p for p in Path(path).parents if p.is_dir()), None)
    with contextlib.suppress(OSError):
        return f"{cause}; {shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free there" if folder else cause
    return cause


def write_text(path, text, what=""):
    """``text`` as the whole content of ``path``, atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), what)


def write_csv(path, fields, rows, what=""):
    """A CSV of ``rows`` (dicts; keys not in ``fields`` are left out) under a header, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, what)


# ---------------------------------------------------------------------------------------- argparse types


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type`` that also checks a range, so a bad value is refused with the flag's name."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):  # nan and inf pass no range
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if high is None:
                allowed = f"{'greater than' if low_open else 'at least'} {low}"
            else:
                allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {allowed}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = ranged(int, 1)
NONNEGATIVE_INT = ranged(int, 0)
POSITIVE_FLOAT = ranged(float, 0, low_open=True)
NONNEGATIVE_FLOAT = ranged(float, 0)
PROBABILITY = ranged(float, 0, 1)
OPEN_UNIT = ranged(float, 0, 1, low_open=True, high_open=True)
SEED = ranged(int, 0, 2 ** 32 - 1)  # numpy's range
EPOCHS = ranged(int, 1, 10 ** 6)  # beyond any real schedule: a typo, not a plan
BUDGET_MINUTES = ranged(float, 0, 7 * 24 * 60, low_open=True)  # a week: beyond it, a typo (seconds?)


def path_text(text):
    """An argparse ``type`` for a path: an empty string would quietly mean the current folder or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def run_name_text(text):
    """``--run_name``: a folder (or folder/subfolder) below the log folder, never the log folder itself or outside."""
    parts = text.replace("\\", "/").split("/")
    if text.startswith(("/", "~")) or any(part.strip() in ("", ".", "..") for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name below --log_dir (no empty, '.' or '..' "
                                         f"parts, not absolute)")
    if any(len(part.encode()) > 200 for part in parts):  # else its folders would be made before the OS refused it
        raise argparse.ArgumentTypeError("a folder name longer than 200 bytes; give a shorter name")
    return text


def check_writable_folder(parser, flag, folder):
    """For tools that write at their end (a sweep, a summary): the folder is, or can be made, and takes a file."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        parser.error(f"argument {flag}: {folder} cannot be made: {probe} is a file")
    try:  # permissions do not tell everything (root, /proc, some mounts): make an unnamed file there
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        parser.error(f"argument {flag}: {folder} is not writable ({probe}: {error.strerror or error})")


def check_outputs(parser, outputs, inputs=None, data_dir=None):
    """The files a command writes (``{flag: path}``): none a folder, none of them an input, none inside the
    data folder, none named like a run folder's own logs, and no two the same file."""
    seen = {}
    for flag, path in outputs.items():
        if Path(path).is_dir():
            parser.error(f"argument {flag}: {path} is a folder; give a file name")
        target = Path(path).resolve()
        for input_flag, input_path in (inputs or {}).items():
            if input_path and target == Path(input_path).resolve():
                parser.error(f"argument {flag}: {path} is the {input_flag} input; writing there would replace it")
        if data_dir and Path(data_dir).resolve() in target.parents:
            parser.error(f"argument {flag}: {path} is inside the data folder {data_dir}; write it somewhere else")
        if target.name in RUN_LOG_NAMES or target.name.startswith(RUN_LOG_PREFIX):
            parser.error(f"argument {flag}: {path} is the name of a run folder's log file; choose another name")
        if target in seen:
            parser.error(f"argument {flag}: {path} is also where {seen[target]} goes; one would replace the other")
        seen[target] = flag


def check_figure_file(parser, flag, path, overwrite):
    """An image the command will save: a format PIL writes, and an existing file replaced only when asked."""
    from PIL import Image

    extension = Path(path).suffix.lower()
    writable = sorted(ext for ext, name in Image.registered_extensions().items() if name in Image.SAVE)
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        parser.error(f"argument {flag}: {path} does not end in an image format that can be written "
                     f"(e.g. .png, .jpg, .pdf; all: {' '.join(writable)})")
    if Path(path).exists() and not overwrite:
        parser.error(f"argument {flag}: {path} already exists; pass --overwrite to replace it")


def check_device(parser, requested):
    """--device: auto, cpu, mps where Apple's GPU is available, or cuda[:N] that exists here."""
    if requested in (None, "auto", "cpu"):
        return
    try:
        device = torch.device(requested)
    except RuntimeError:
        parser.error(f"argument --device: {requested!r} is not a device; use auto, cpu, mps, cuda or cuda:N")
    if device.type == "mps":
        if not mps_available():
            parser.error(f"argument --device: {requested} was asked for but Apple's MPS is not available here; "
                         f"use --device cpu")
        return
    if device.type != "cuda":
        parser.error(f"argument --device: {requested!r} is not supported; use auto, cpu, mps, cuda or cuda:N")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {requested} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"argument --device: {requested} does not exist; this machine has "
                     f"{torch.cuda.device_count()} GPU(s)")


PROCESS_START = time.monotonic()  # the process's real start where the system says (below)
try:  # Linux: Python's and torch's imports count against a time budget too
    with open("/proc/self/stat") as _stat, open("/proc/uptime") as _uptime:
        _age = float(_uptime.read().split()[0]) - int(_stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf(
            "SC_CLK_TCK")
    PROCESS_START -= max(_age, 0.0)
except (OSError, ValueError, IndexError):
    pass
CLOCK_START = PROCESS_START  # where a time budget counts from: the call, for a main() called inside Python


def machine_description(device):
    """What a run ran on, for the tables that cite it: the GPU, or the CPU and its vector units."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = "CPU"
    with contextlib.suppress(OSError, StopIteration):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line for line in info if line.startswith("flags")).split())
        name += ", " + ("AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
                        else "AVX2" if "avx2" in flags else "no AVX2")
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' * (threads > 1)}, torch {torch.__version__}"


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
    temporary file after every epoch (see utils.atomic_write), so a failed write (a full disk) leaves the
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
