"""What the scripts and tools share: one-line errors, argparse types, atomic writes, run locks, TensorBoard and CSV
logging (torch only where TensorBoard is written)."""
import argparse
import contextlib
import csv
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

try:
    import fcntl  # advisory file locks, released by the OS when a process dies
except ImportError:  # Windows: runs are not locked
    fcntl = None

# The files a run keeps in its log folder (RunLogger, RunLock): no output may take these names.
RUN_LOG_NAMES = ("metrics.csv", ".lock")
RUN_LOG_PREFIX = "events.out.tfevents"


class UserError(ValueError):
    """Bad input from the user: reported as one line on stderr and a non-zero exit, never a traceback."""


class WriteError(UserError):
    """A file could not be written (a full disk, a file-size limit, a read-only folder): one line names it and why."""


WRITE_ADVICE = {True: "fix that, then continue with --resume auto (a run with no checkpoint yet: start it again with "
                      "--overwrite)", False: "fix that and run the command again"}  # by resumable


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def run_cli(main, argv=None, resumable=False):
    """Exit with the code ``main`` returns (130 / 143 after a graceful stop); an error a user can fix: one line, 2."""
    try:
        code = main(argv)
    except (ValueError, OSError, KeyboardInterrupt) as error:  # ours (UserError, DataError), the model's; the OS's
        for bar in list(getattr(getattr(sys.modules.get("tqdm"), "tqdm", None), "_instances", ())):
            bar.close()  # the bars an error left open: its line then starts a line of its own
        if isinstance(error, KeyboardInterrupt):
            print("interrupted; the last saved checkpoint is intact (resume with --resume auto)" if resumable else
                  "interrupted; every file written so far is whole", file=sys.stderr)
            sys.exit(130)
        os_error = isinstance(error, OSError) and error.strerror  # then its path and cause
        line = f"{error.filename}: " * bool(error.filename) + error.strerror if os_error else first_line(error)
        print(f"error: {line}" + f"; {WRITE_ADVICE[resumable]}" * isinstance(error, WriteError), file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, refusing in one usage line (not the whole block); the script's docstring is printed as written."""

    def __init__(self, *args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]; see --help\n{self.prog}: error: {message}\n")


def atomic_write(path, write, what=""):
    """Write ``path`` whole or not at all: ``write(tmp)`` writes a hidden file beside it (same suffix, for savers
    that go by it), then one rename. A failure is one WriteError naming ``what``, the path and the cause."""
    path = Path(path)
    existed = os.path.isfile(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's writer reports a failed write so
        raise WriteError(f"could not write {what + ' ' if what else ''}{path} ({write_cause(error, path)}); "
                         f"{'the file there before is unchanged' if existed else 'nothing was left there'}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_cause(error, path):
    """Why a write failed, with the free space where it went (a full disk and a file-size limit read alike)."""
    cause = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    with contextlib.suppress(OSError, StopIteration):
        folder = next(p for p in Path(path).parents if p.is_dir())
        return f"{cause}; {shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free there"
    return cause


def write_text(path, text, what=""):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), what)


def write_csv(path, fields, rows, what=""):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, what)


def markdown(heads, lines):
    lines = [heads, ["---"] * len(heads), *lines] if lines else []
    return "".join(f"| {' | '.join(map(str, line))} |\n" for line in lines) or "(no rows yet)\n"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ranged(kind, low, high=math.inf, low_open=False, high_open=False):
    """An argparse ``type`` that also checks a range, so a bad value is refused with the flag's name."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if not low <= value <= high or (low_open and value == low) or (high_open and value == high):
            allowed = f"{'greater than' if low_open else 'at least'} {low}" if high == math.inf else \
                f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {allowed}")
        return value

    return parse


POSITIVE_INT = ranged(int, 1)
NONNEGATIVE_INT = ranged(int, 0)
POSITIVE_FLOAT = ranged(float, 0, low_open=True)
NONNEGATIVE_FLOAT = ranged(float, 0)
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
    probe = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
    try:  # permissions do not tell everything (root, /proc, some mounts; a file in the way: "Not a directory")
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as error:
        parser.error(f"argument {flag}: {folder} is not writable ({probe}: {error.strerror or error})")


def check_outputs(parser, outputs, inputs=None, data_dir=None, overwrite=None):
    """Inputs (``{flag: path}``) must be files; an output may not replace one, the data, a run's logs or another."""
    for flag, path in (inputs or {}).items():  # what it reads: checkpoint files that exist
        if path and not Path(path).is_file():
            parser.error(f"argument {flag}: {path} is not a checkpoint file")
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
        if overwrite is False and target.exists():  # None: the command decides (a run's own refusals)
            parser.error(f"argument {flag}: {path} already exists; pass --overwrite to replace it")
        seen[target] = flag


def check_figure_file(parser, flag, path):
    """An image the command will save: in a format PIL writes."""
    from PIL import Image

    writable = sorted(ext for ext, name in Image.registered_extensions().items() if name in Image.SAVE)
    if Image.registered_extensions().get(Path(path).suffix.lower()) not in Image.SAVE:
        parser.error(f"argument {flag}: {path} does not end in an image format that can be written "
                     f"(e.g. .png, .jpg, .pdf; all: {' '.join(writable)})")


class RunLock:
    """A run folder's lock against a second live copy; the OS releases it when a process dies, even in a crash."""

    def __init__(self, folder, name=".lock", in_use=None):
        self.path, self.file = Path(folder) / name, None
        self.in_use = in_use or f"{folder} is in use by another running copy of this run; wait for it to finish, " \
                                f"or stop it first"

    @classmethod
    def for_file(cls, path):
        """A lock beside an output file (``.<name>.lock``): two live runs never write the same checkpoint."""
        path = Path(path)
        return cls(path.parent, f".{path.name}.lock", f"{path} is being written by another running run; give "
                                                      f"this one another output path, or stop that run first")

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        try:
            if fcntl:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(self.in_use) from None
        return self

    def release(self, remove=False):
        if self.file:
            self.file.close()
            self.file = None
            if remove:
                self.path.unlink(missing_ok=True)


class RunLogger:
    """TensorBoard scalars and ``metrics.csv`` (a row per epoch, rewritten atomically). A run from epoch 1 removes
    the folder's old logs; a resumed one drops what came after its checkpoint. The event file is flushed every epoch,
    so a failed write of its thread is raised here, in the training thread, as the same one-line WriteError."""

    def __init__(self, log_dir, fields, start_epoch=1, enabled=True):
        self.enabled, self.fields, self.log_dir = enabled, ["epoch", *fields], Path(log_dir)
        self.csv_path, self.rows, self.writer, self.start_epoch = self.log_dir / "metrics.csv", [], None, start_epoch
        if not enabled:
            return
        quiet_tensorboard_thread_errors()  # the folder: made by the run's lock, else by the first write
        if start_epoch <= 1:
            for path in [self.csv_path, *self.log_dir.glob(f"{RUN_LOG_PREFIX}.*")]:
                path.unlink(missing_ok=True)
        elif self.csv_path.exists():
            with open(self.csv_path, newline="") as f:  # a torn or hand-edited row (no whole epoch number) goes
                reader = csv.DictReader(f)
                self.rows = [r for r in reader if str(r.get("epoch")).isdigit() and int(r["epoch"]) < start_epoch]
                self.fields = (reader.fieldnames or []) + [f for f in self.fields if f not in (reader.fieldnames or [])]
            write_csv(self.csv_path, self.fields, self.rows)  # now: the CSV agrees with the checkpoint resumed

    def _tensorboard(self, call):
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it

                self.writer = SummaryWriter(self.log_dir, purge_step=self.start_epoch if self.start_epoch > 1 else None)
            return call(self.writer)
        except OSError as error:
            event_writer = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
            name = getattr(event_writer, "_file_name", None) or f"in {self.log_dir}"  # torch's private name
            raise WriteError(f"could not write TensorBoard events {name} "
                             f"({write_cause(error, self.log_dir / 'events')})") from None

    def log(self, epoch, **values):
        if not self.enabled:
            return
        numbers = {k: v for k, v in values.items() if v is not None and not isinstance(v, str)}  # a hash: CSV only
        self._tensorboard(lambda w: [w.add_scalar(tensorboard_tag(k), v, epoch) for k, v in numbers.items()])
        row = {"epoch": epoch, **values}
        write_csv(self.csv_path, self.fields, [*self.rows, row])  # failed: the file still holds the rows before
        self.rows.append(row)
        self._tensorboard(lambda w: w.flush())

    def log_hparams(self, settings, final_metrics, epoch):
        """Settings and final metrics for TensorBoard's HParams view, through this run's own writer (``add_hparams``
        would add a second run to every view); a metric is the scalar ``hparams/<name>`` at ``epoch``."""
        from torch.utils.tensorboard.summary import hparams

        kept = {k: "none" if v is None else v for k, v in settings.items() if isinstance(v, int | float | str | None)}
        metrics = {f"hparams/{name}": float(value) for name, value in final_metrics.items() if value is not None}

        def write(w):
            for summary in hparams(kept, metrics):  # the experiment, and this session's start and end
                w.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                w.add_scalar(tag, value, epoch)
            w.flush()

        if self.enabled:
            self._tensorboard(write)

    def add_image(self, tag, image, epoch):
        if self.enabled:
            self._tensorboard(lambda w: (w.add_image(tag, image, epoch), w.flush()))

    def close(self):
        """Flush (close alone would not raise the writer thread's error), then close, once, even after a failure."""
        if self.writer is None:
            return
        try:
            self._tensorboard(lambda w: w.flush())
        finally:
            with contextlib.suppress(OSError):  # a failed flush was reported above: once
                self.writer.close()
            self.writer = None


def quiet_tensorboard_thread_errors():
    """TensorBoard's writer thread keeps a failed write's error for the next flush (RunLogger reports it as one
    line) and also prints it as a traceback of its own: that print is dropped, every other thread's kept."""
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
    return name.replace("_", "/", 1) if name.startswith(("train_", "val_", "knn_", "probe_")) else name


read_rows = lambda csv_path: read_csv(csv_path) if Path(csv_path).is_file() else []  # [] before a run's first epoch
logged_rows = lambda csv_path: len(read_rows(csv_path))
