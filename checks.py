"""What every script shares without importing torch: one-line errors, a parser whose refusals are short, writes
that leave a whole file or none, and argparse types and checks of ranges, devices and paths.

A bad value is refused by argparse (one usage line, then ``error: argument --flag: ...``, exit code 2) before any
file is written: the flag, the value and what is allowed are in that one line.
"""
import argparse
import contextlib
import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

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
MAX_EPOCHS = 10 ** 6  # beyond any real schedule: a typo, not a plan
EPOCHS = ranged(int, 1, MAX_EPOCHS)
BUDGET_MINUTES = ranged(float, 0, 7 * 24 * 60, low_open=True)  # a week: beyond it, a typo (seconds?), not a plan


def epoch_length(text):
    """``EPOCH:LENGTH`` (--earlier_lengths): epochs up to EPOCH followed the schedule of a LENGTH-epoch run."""
    epoch, _, length = text.partition(":")
    try:
        epoch, length = EPOCHS(epoch), EPOCHS(length)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error} (give EPOCH:LENGTH, e.g. 2:7)") from None
    if length <= epoch:
        raise argparse.ArgumentTypeError(f"{text!r}: a run of {length} epochs ended at epoch {epoch}, it had no "
                                         f"length left to change")
    return [epoch, length]


def path_text(text):
    """An argparse ``type`` for a path: an empty string would quietly mean the current folder or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def thread_count(text):
    """``--threads``: at least 1 and at most the CPUs this process may use (more only slows every step)."""
    count = POSITIVE_INT(text)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if count > available:
        raise argparse.ArgumentTypeError(f"{count} is more than the {available} CPU(s) this machine gives the run")
    return count


def run_name(text):
    """``--run_name``: a folder (or folder/subfolder) below the log folder, never the log folder itself or outside."""
    parts = text.replace("\\", "/").split("/")
    if text.startswith(("/", "~")) or any(part.strip() in ("", ".", "..") for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name below --log_dir (no empty, '.' or '..' "
                                         f"parts, not absolute)")
    return text


# Bytes a name keeps free for the files written beside it: ".<name>.tmp<pid><suffix>" (checks.atomic_write) and
# ".<name>.lock" (utils.RunLock).
NAME_SLACK = 16


def check_name_lengths(parser, flag, path):
    """Every part of ``path`` fits the file system's limit on a name (255 bytes on most), less NAME_SLACK, and the
    whole its limit on a path: else the first write would fail, late, with "File name too long"."""
    path = Path(os.path.abspath(path))
    existing = next(p for p in (path, *path.parents) if os.path.isdir(p))  # isdir: False, never an error
    name_max, path_max = (limit(existing, name, default) for name, default in (("PC_NAME_MAX", 255),
                                                                               ("PC_PATH_MAX", 4096)))
    for part in path.parts:
        if len(os.fsencode(part)) > name_max - NAME_SLACK:
            parser.error(f"argument {flag}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long; names "
                         f"here may have at most {name_max - NAME_SLACK} (the file system's {name_max}, less room "
                         f"for the temporary and lock files beside it)")
    if len(os.fsencode(str(path))) > path_max - NAME_SLACK:
        parser.error(f"argument {flag}: {str(path)[:40]}... is {len(os.fsencode(str(path)))} bytes long; paths "
                     f"here may have at most {path_max - NAME_SLACK}")


def limit(folder, name, default):
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):  # not reported by this system or file system
        return default


def check_writable_folder(parser, flag, folder):
    """The folder exists and is writable, or can be made: its nearest existing ancestor is a writable folder."""
    check_name_lengths(parser, flag, folder)
    path = Path(folder)
    if path.exists() and not path.is_dir():
        parser.error(f"argument {flag}: {folder} is a file, not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        parser.error(f"argument {flag}: {folder} cannot be made: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"argument {flag}: {folder} is not writable ({probe} is read-only)")
    try:  # permissions do not tell everything (root, /proc, some mounts): make an unnamed file there and drop it
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        parser.error(f"argument {flag}: {folder} is not writable (no file can be made in {probe}: "
                     f"{error.strerror or error})")


def check_output_file(parser, flag, path):
    """A file the run will write: not a folder, and its folder writable."""
    check_name_lengths(parser, flag, path)
    if Path(path).is_dir():
        parser.error(f"argument {flag}: {path} is a folder; give a file name")
    check_writable_folder(parser, flag, Path(path).parent if str(Path(path).parent) else ".")


def check_outputs(parser, outputs, inputs=None, data_dir=None):
    """The files a command writes (``{flag: path}``): each a writable file, none of them an input, none inside the
    data folder, none named like a run folder's own logs, and no two the same file."""
    seen = {}
    for flag, path in outputs.items():
        check_output_file(parser, flag, path)
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
    import torch  # here, not at the top: summarize.py uses these checks and needs no torch

    try:
        device = torch.device(requested)
    except RuntimeError:
        parser.error(f"argument --device: {requested!r} is not a device; use auto, cpu, mps, cuda or cuda:N")
    if device.type == "mps":
        from utils import mps_available

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
