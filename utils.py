"""What both training scripts share: seeding, devices and torchrun, run names, logging, checkpoints, the epoch loop."""
import csv
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(ValueError):
    """Bad input from the user: reported as one line on stderr and a non-zero exit, never a traceback."""


def run_cli(main, argv=None):
    """Run ``main``; turn the errors a user can fix into one clear line and exit code 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as error:  # our UserError, DataError and model ValueErrors
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last saved checkpoint is intact (resume with --resume auto)", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------- seeding


def setup_seed(seed):
    """Seed every generator the code touches and ask PyTorch for deterministic kernels where it has them."""
    torch.manual_seed(seed)  # also seeds CUDA
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state():
    """Every random stream a run draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ devices, torchrun


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_device(requested=None):
    """The device, and the process group when launched by torchrun (RANK / WORLD_SIZE in the environment)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
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


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (the CPU path is for tests and small trials)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def maybe_compile(fn, device, enabled=True):
    return torch.compile(fn) if enabled and device.type == "cuda" else fn


# ---------------------------------------------------------------------------------------------- run naming


def add_run_arguments(p):
    """Data, device and bookkeeping options, the same in both training scripts."""
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", default=None, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--log_dir", default="logs")
    p.add_argument("--run_name", default=None, help="log folder name (default: built from the settings)")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' for this run's own")
    p.add_argument("--save_every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile on CUDA")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow loading a pickled whole-module checkpoint (the reference's released weights)")



def run_name(prefix, args, defaults, abbreviations):
    """``prefix`` plus the settings that differ from their defaults, e.g. ``mae_dd8_block``.

    ``abbreviations`` maps an argument name to its short label; a string-valued setting appears as its value.
    """
    parts = [prefix]
    for name, short in abbreviations.items():
        value = getattr(args, name)
        if value != defaults.get(name):
            if isinstance(value, bool):
                parts.append(short)
            elif isinstance(value, str) and not short:
                parts.append(value)
            else:
                parts.append(f"{short}{value}")
    return "_".join(parts)


def parser_defaults(parser):
    return {action.dest: action.default for action in parser._actions}


# ------------------------------------------------------------------------------------------------- logging


class RunLogger:
    """TensorBoard scalars and a ``metrics.csv`` (header first, one row per epoch) in one run folder.

    On resume, rows from epochs at or after ``start_epoch`` are dropped and TensorBoard purges the same steps,
    so a resumed run's logs read as if it had never stopped.
    """

    def __init__(self, log_dir, fields, start_epoch=0, enabled=True):
        self.enabled = enabled
        self.fields = ["epoch", *fields]
        self.log_dir = Path(log_dir)
        self.csv_path = self.log_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._keep_rows_before(start_epoch)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_epoch if start_epoch else None)

    def _keep_rows_before(self, start_epoch):
        rows = []
        if start_epoch and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, epoch, **values):
        if not self.enabled:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(tensorboard_tag(name), value, epoch)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({"epoch": epoch, **values})
        self.writer.flush()

    def add_image(self, tag, image, epoch):
        if self.enabled:
            self.writer.add_image(tag, image, epoch)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def tensorboard_tag(name):
    """``train_loss`` -> ``train/loss`` so TensorBoard groups the curves."""
    for group in ("train_", "val_", "knn_", "probe_"):
        if name.startswith(group):
            return group[:-1] + "/" + name[len(group):]
    return name


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a reader never sees half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk, a lost mount: torch's writer raises RuntimeError
        free = shutil.disk_usage(path.parent).free / 2 ** 20  # torch's own message rarely says "disk full"
        raise UserError(f"could not write checkpoint {path} ({first_line(error)}; {free:.1f} MiB free there); "
                        f"the one before it is intact, so fix the cause and continue with --resume auto") from None
    finally:
        tmp.unlink(missing_ok=True)


KIND_NAMES = {"mae": "an MAE pretraining checkpoint (from mae_pretrain.py)",
              "classifier": "a classifier checkpoint (from train_classifier.py)"}


def load_checkpoint(path, trust_pickle=False, kind=None, option=None):
    """A checkpoint dict with at least ``model`` and ``kind`` ("mae" or "classifier").

    Ours load with ``weights_only=True``. A whole pickled module (the reference's released weights) can run
    code when unpickled, so it is loaded only with ``trust_pickle``. With ``kind``, a checkpoint of the other
    kind is refused, naming the command-line ``option`` that took it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Only a file that names a class ("Unsupported global", older torch: "class") is a pickled module;
        # random bytes also fail the weights-only unpickler, with other messages.
        if not any(f"Unsupported {what}" in str(error) for what in ("global", "class")):
            raise UserError(f"checkpoint {path} is truncated or corrupt (not a PyTorch checkpoint)") from None
        if not trust_pickle:
            raise UserError(f"checkpoint {path} is a pickled Python object (like the reference's released "
                            f"weights), which can run code when loaded; pass --trust_checkpoint if you trust "
                            f"where it came from") from None
        checkpoint = load_pickled_module(path)
    except Exception as error:  # damaged bytes fail inside the unpickler in many ways (EOFError, IndexError, ...)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({first_line(error)})") from None
    if isinstance(checkpoint, dict) and "model" not in checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"model": checkpoint}  # a bare state dict
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path} holds no model weights")
    checkpoint.setdefault("kind", checkpoint_kind(checkpoint["model"]))
    if kind and checkpoint["kind"] != kind:
        raise UserError(f"{path} is a {checkpoint['kind']} checkpoint; {option} needs {KIND_NAMES[kind]}")
    return checkpoint


def load_pickled_module(path):
    import model  # the reference pickles `model.MAE_ViT` / `model.ViT_Classifier`: ours have the same names

    sys.modules.setdefault("model", model)
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"checkpoint {path} could not be unpickled ({first_line(error)})") from None
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    return {"model": state}


def checkpoint_kind(state_dict):
    if any(k.startswith("encoder.") for k in state_dict):
        return "mae"
    if "patchify.weight" in state_dict and ("head.weight" in state_dict or "head.1.weight" in state_dict):
        return "classifier"
    return "unknown"


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_weights(module, state_dict, source, strict=True):
    """``load_state_dict`` with a one-line explanation when the checkpoint is another model's shape."""
    own = module.state_dict()
    for name, value in state_dict.items():
        if name in own and own[name].shape != value.shape:
            raise UserError(f"checkpoint {source} does not fit this model: {name} is {tuple(value.shape)} there "
                            f"but {tuple(own[name].shape)} here (another --emb_dim, --patch_size or --image_size?)")
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        raise UserError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} (another depth or model kind?)")


def resolve_resume(resume, checkpoint_path):
    """``--resume auto`` means the run's own last checkpoint, if there is one yet."""
    if resume == "auto":
        return checkpoint_path if Path(checkpoint_path).is_file() else None
    return resume


# ------------------------------------------------------------------------------- schedule and epoch loop


def warmup_cosine(warmup_epoch, total_epoch):
    """The reference's per-epoch schedule: linear warm-up, then a half cosine to zero."""
    return lambda epoch: min((epoch + 1) / (warmup_epoch + 1e-8), 0.5 * (math.cos(epoch / total_epoch * math.pi) + 1))


class StopFlag:
    """SIGINT / SIGTERM ask the run to finish its epoch, save and exit; a second signal quits at once."""

    def __init__(self):
        self.requested = False

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this epoch, saving, then exiting "
              f"(send it again to quit now)", file=sys.stderr)


class NonFiniteLoss(UserError):
    pass


def train_epoch(step, batches, optimizer, accum_steps, model, progress=None, after_step=None):
    """One pass over ``batches``; ``step(images, labels)`` returns (loss, *extra sums) for one micro-batch.

    Gradients of ``accum_steps`` micro-batches are averaged before each optimizer step, so a large batch split
    across micro-batches gives the same update as the whole batch. Sums stay on the device: no sync per step.
    ``after_step()``, if given, runs after every optimizer step (e.g. to update an EMA of the weights).
    Returns the per-micro-batch mean loss, the extra sums, and the number of images seen by this process.
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss_sum, extra_sums, micro_batches, images_seen = 0.0, None, 0, 0
    usable = len(batches) // accum_steps * accum_steps  # an incomplete optimizer step at the end is skipped
    for i, (images, labels) in enumerate(batches):
        if i >= usable:
            break
        sync = (i + 1) % accum_steps == 0
        with nullcontext() if sync or not ddp else model.no_sync():
            loss, *extras = step(images, labels)
            (loss / accum_steps).backward()
        if sync:
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
    if micro_batches == 0:
        raise UserError(f"an epoch has fewer images than one optimizer step needs ({accum_steps} micro-batches)")
    totals = all_reduce_sum(torch.stack([loss_sum, *(extra_sums or [])]).detach()).tolist()  # the one sync
    world = dist.get_world_size() if dist.is_initialized() else 1
    mean_loss = totals[0] / (micro_batches * world)
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"the training loss became {mean_loss}; stopping. The last checkpoint (from before "
                            f"this epoch) is kept; try a lower --base_learning_rate")
    return mean_loss, totals[1:], images_seen * world


def progress_bar(total_steps, initial, enabled):
    return tqdm(total=total_steps, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                smoothing=0.05)


class EpochTimer:
    """Wall time of a block, synchronising the device first so GPU work is counted where it happened."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------ run bookkeeping


def prepare_run_dir(log_dir, resuming, is_main):
    """A new run refuses to mix its logs into an earlier run's folder; resuming continues that folder.

    ``--resume auto`` before any checkpoint exists (killed during the first epoch) starts the folder afresh.
    """
    log_dir = Path(log_dir)
    if is_main and not resuming and (log_dir / "metrics.csv").exists():
        raise UserError(f"{log_dir} already holds a run: pass --resume auto to continue it, or --run_name NAME "
                        f"for a new one")
    return log_dir


def training_state(kind, model, optimizer, scheduler, epoch, args, **extra):
    """Everything a run needs to continue exactly where it stopped; loadable with ``weights_only=True``."""
    return {"kind": kind, "model": model.state_dict(), "args": vars(args), "epoch": epoch,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}


def restore_training_state(checkpoint, kind, model, optimizer, scheduler, source):
    """Load a ``training_state`` checkpoint; returns the number of finished epochs."""
    if checkpoint.get("kind") != kind or "optimizer" not in checkpoint:
        raise UserError(f"cannot resume from {source}: it is a {checkpoint.get('kind')} checkpoint without "
                        f"optimizer state, not a {kind} run's checkpoint")
    load_weights(model, checkpoint["model"], source)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_state(checkpoint["rng"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank:  # only rank 0's streams are saved: the others get their own again, fixed by (rank, epoch)
        torch.manual_seed(rank * 1_000_003 + checkpoint["epoch"])
    return checkpoint["epoch"]
