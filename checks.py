"""Argument checks every script uses: argparse types that check a range, and checks of devices and paths.

A bad value is refused by argparse (usage, then ``error: argument --flag: ...``, exit code 2) before any file is
written: the flag, the value and what is allowed are in that one line.
"""
import argparse
import os
import tempfile
from pathlib import Path

# The files a run keeps in its log folder (utils.RunLogger, utils.RunLock): no output may take these names.
RUN_LOG_NAMES = ("metrics.csv", ".lock")
RUN_LOG_PREFIX = "events.out.tfevents"


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


def check_writable_folder(parser, flag, folder):
    """The folder exists and is writable, or can be made: its nearest existing ancestor is a writable folder."""
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
