"""Argument checks every script uses: argparse types that check a range, and checks of devices and paths.

A bad value is refused by argparse (usage, then ``error: argument --flag: ...``, exit code 2) before any file is
written: the flag, the value and what is allowed are in that one line.
"""
import argparse
import os
from pathlib import Path

import torch



def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type`` that also checks a range, so a bad value is refused with the flag's name."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
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


def check_output_file(parser, flag, path):
    """A file the run will write: not a folder, and its folder writable."""
    if Path(path).is_dir():
        parser.error(f"argument {flag}: {path} is a folder; give a file name")
    check_writable_folder(parser, flag, Path(path).parent if str(Path(path).parent) else ".")


def check_device(parser, requested):
    """--device: auto, cpu or cuda[:N] that exists here."""
    if requested in (None, "auto", "cpu"):
        return
    try:
        device = torch.device(requested)
    except RuntimeError:
        parser.error(f"argument --device: {requested!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type != "cuda":
        parser.error(f"argument --device: {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {requested} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"argument --device: {requested} does not exist; this machine has "
                     f"{torch.cuda.device_count()} GPU(s)")
