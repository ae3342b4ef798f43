"""Devices, precision, compile and torchrun: where and how a run computes, and on what machine."""
import logging
import os
import shutil
import time
from collections import namedtuple
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist

from utils import UserError

try:  # Linux: the process's real start, so that Python's and torch's imports count against a time budget too
    with open("/proc/self/stat") as _stat:  # field 22: the start in clock ticks since boot
        _started = int(_stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    PROCESS_START = time.monotonic() - max(time.clock_gettime(time.CLOCK_BOOTTIME) - _started, 0.0)
except (OSError, ValueError, IndexError):
    PROCESS_START = time.monotonic()
CLOCK_START = PROCESS_START  # where a time budget counts from: the call, for a main() called inside Python


def machine_description(device):
    """What a run ran on, for the tables that cite it: the GPU, or the CPU and its vector units."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = "CPU"
    with suppress(OSError, StopIteration):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line for line in info if line.startswith("flags")).split())
        name += ", " + ("AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
                        else "AVX2" if "avx2" in flags else "no AVX2")
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' * (threads > 1)}, torch {torch.__version__}"


class Dist(namedtuple("Dist", "rank world_size device")):  # this process's place among torchrun's, and its device
    is_main = property(lambda self: self.rank == 0)


def auto_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def synchronize(device):
    """Wait for the work queued on ``device`` (the CPU runs in order), so a clock read after it is fair."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def kept_random_state(device):
    """Random draws inside leave the run's CPU and ``device`` generators as they were (a figure). fork_rng forks
    the CUDA generator; the MPS one is kept here."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
        try:
            yield
        finally:
            if mps_state is not None:
                torch.mps.set_rng_state(mps_state)


def setup_device(requested=None):
    """The device, and the process group when launched by torchrun (RANK / WORLD_SIZE in the environment)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(auto_device() if requested in (None, "auto") else requested)  # checked at parsing
    if device.type == "mps" and world_size > 1:  # one Apple GPU per machine, and no collective backend for it
        raise UserError("--device mps runs in one process; start it without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's convolutions use TF32 by default
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


def check_device(parser, requested):
    """--device: auto, cpu, mps where Apple's GPU is available, or cuda[:N] that exists here."""
    if requested in (None, "auto", "cpu"):
        return
    device = None
    with suppress(RuntimeError):
        device = torch.device(requested)
    if device is None or device.type not in ("mps", "cuda"):
        parser.error(f"argument --device: {requested!r} is not a device; use auto, cpu, mps, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"argument --device: {requested} was asked for but Apple's MPS is not available here; "
                     f"use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {requested} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"argument --device: {requested} does not exist; this machine has "
                     f"{torch.cuda.device_count()} GPU(s)")


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: elsewhere bf16 is emulated on the CPU and slower than fp32 (not Linux: fp32)."""
    with suppress(OSError):
        return bool({"avx512_bf16", "amx_bf16"} & set(Path("/proc/cpuinfo").read_text().split()))
    return False


def resolve_precision(requested, device):
    """``--precision auto``: bf16 where the device has it natively, fp16 on older GPUs, else fp32 (MPS, most CPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"  # MPS: fp32 on every torch 2.x


def autocast(device, precision):
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def why_eager(device):  # None where torch.compile is used
    if device.type == "mps":
        return "torch.compile on MPS is experimental in torch 2.x"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler found"
    return None


def maybe_compile(fn, device, enabled=True):
    if not enabled or why_eager(device):
        return fn
    if device.type != "cuda":  # a CUDA build compiling for the CPU logs "No CUDA runtime is found": true, harmless
        logging.getLogger("torch.utils.cpp_extension").addFilter(
            lambda record: not str(record.msg).startswith("No CUDA runtime is found"))
    return torch.compile(fn)


def describe_speed_path(device, precision, compiled, requested_precision=None):  # one log line
    compile_note = ("eager" if not compiled else f"eager ({why_eager(device)})" if why_eager(device)
                    else "torch.compile")
    chosen = " (chosen by --precision auto)" if requested_precision == "auto" else ""
    return f"device {device}, precision {precision}{chosen}, {compile_note}, {torch.get_num_threads()} CPU threads"
