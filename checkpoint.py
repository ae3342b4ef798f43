"""Checkpoints: save atomically (in the background), load safely, rebuild the model they hold, resume a run.
A checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads (see ``training_state``); older files
without ``config``, and the reference's pickled modules (with --trust_checkpoint), are rebuilt from their shapes."""
import argparse
import io
import math
import pickle
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map_only

from engine import EpochPosition
from model import ModelConfig, build_classifier, build_mae, encoder_state_dict
from utils import UserError, atomic_write, first_line

KINDS = {"mae": "an MAE", "classifier": "a classifier"}
SCRIPTS = {"mae": "mae_pretrain.py", "classifier": "train_classifier.py"}
GUESSABLE = ("encoder_heads", "decoder_heads", "mask_ratio", "mask_strategy")  # not in the weights' shapes
OWN_SETTINGS = "use the run's own settings, or start a new run with --run_name NAME"
# Flags that say where or how a run executes, not what it trains: never taken from a resumed checkpoint.
RUNTIME_FLAGS = {"resume", "run_name", "log_dir", "device", "overwrite", "trust_checkpoint", "typed", "no_compile",
                 "precision", "max_device_batch_size", "model_path", "output_model_path"}


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch_save(state, tmp), "checkpoint")


def torch_save(state, path):
    """Through memory: a failed write then raises the OS's error ("File too large"), not torch's "[enforce fail"."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    Path(path).write_bytes(buffer.getbuffer())


def export_weights(state, target, limit=None):
    """Released weights: the model in bf16 (half the bytes; every script loads them into fp32 models) and what
    rebuilds it, without optimizer state or the run's paths; refused if ``limit`` bytes or more."""
    kept = {k: state[k] for k in ("kind", "config", "epoch", "classes") if k in state}
    kept["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(target, kept)
    size = Path(target).stat().st_size
    if limit and size >= limit:
        Path(target).unlink()
        raise UserError(f"{target} would be {size / 2 ** 20:.1f} MiB, over the {limit / 2 ** 20:.0f} MiB limit")
    return size


class CheckpointWriter:
    """Saves from a copy on the CPU in a background thread, one at a time, so that training does not wait for the disk;
    ``wait()`` (before the next save and at the end of a run) re-raises a failed write in the training thread."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(1, "checkpoint"), None

    def save(self, path, state):
        self.wait()
        host_copy = tree_map_only(torch.Tensor, lambda tensor: tensor.detach().to("cpu", copy=True), state)
        self.pending = self.pool.submit(save_checkpoint, path, host_copy)

    def busy(self):
        return self.pending is not None and not self.pending.done()

    def wait(self):
        if self.pending is not None:
            try:  # busy() until the write ends: a signal meanwhile is told that it will end whole
                self.pending.result()  # a failed write: save_checkpoint's one-line WriteError, once
            finally:
                self.pending = None


def load_checkpoint(path, trust_pickle=False, kind=None, option=None):
    """A dict with ``model``, ``kind`` and (a known kind) ``config`` and ``guessed``. A pickled module can run code
    when unpickled: only with ``trust_pickle``. With ``kind``, the other kind is refused, naming ``option``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # run_cli names the path and the OS's cause
    except Exception as error:  # damaged bytes fail inside the unpickler in many ways (EOFError, IndexError, ...)
        # Only a file that names a class ("Unsupported global", older torch: "class") is a pickled module.
        if not re.search("Unsupported (global|class)", str(error)):
            cause = "not a PyTorch checkpoint" if isinstance(error, pickle.UnpicklingError) else \
                f"{type(error).__name__}: {first_line(error)}"
            raise UserError(f"checkpoint {path} is truncated or corrupt ({cause})") from None
        if not trust_pickle:
            raise UserError(f"checkpoint {path} is a pickled Python object (like the reference's released "
                            f"weights), which can run code when loaded; pass --trust_checkpoint if you trust "
                            f"where it came from") from None
        try:  # the reference pickles `model.MAE_ViT` / `model.ViT_Classifier`: ours have the same names
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise UserError(f"checkpoint {path} could not be unpickled ({first_line(error)})") from None
    if isinstance(checkpoint, torch.nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"model": checkpoint}  # a bare state dict
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path} holds no model weights")
    checkpoint.setdefault("kind", checkpoint_kind(checkpoint["model"]))
    if kind and checkpoint["kind"] != kind:
        raise UserError(f"{path} is {KINDS.get(checkpoint['kind'], 'an unrecognised')} checkpoint; {option} needs "
                        f"{KINDS[kind]} checkpoint (from {SCRIPTS[kind]})")
    if checkpoint["kind"] in KINDS:
        add_config(checkpoint, path)
    return checkpoint


def checkpoint_kind(state_dict):
    classifier = "patchify.weight" in state_dict and {"head.weight", "head.1.weight"} & state_dict.keys()
    return "mae" if any(k.startswith("encoder.") for k in state_dict) else "classifier" if classifier else "unknown"


def add_config(checkpoint, source):
    """Its ModelConfig: its own ``config``, or (older files) inferred from the weights, with ``guessed`` the
    fields that neither the file nor the shapes tell: the defaults stand in, and a flag the user gives may set them."""
    saved, hints = checkpoint.get("config"), checkpoint.get("args") or {}
    checkpoint["guessed"] = () if isinstance(saved, dict) else tuple(k for k in GUESSABLE if hints.get(k) is None)
    try:
        checkpoint["config"] = ModelConfig.from_dict(saved) if isinstance(saved, dict) else \
            infer_config(checkpoint["model"], hints)
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise UserError(f"checkpoint {source} does not describe a model this code can build "
                        f"({first_line(error)})") from None


def infer_config(state_dict, hints=None):
    """The architecture from the weights' shapes; the rest from ``hints`` (saved args) or the reference's defaults."""
    encoder = encoder_state_dict(state_dict)
    count_blocks = lambda weights, prefix: len({k[len(prefix):].split(".")[0] for k in weights if k.startswith(prefix)})
    width, _, patch, _ = encoder["patchify.weight"].shape
    values = {k: v for k, v in (hints or {}).items() if k in GUESSABLE and v is not None}
    values.update(image_size=math.isqrt(encoder["pos_embedding"].shape[0]) * patch, patch_size=patch,
                  emb_dim=width, encoder_depth=count_blocks(encoder, "transformer."))
    if "decoder.mask_token" in state_dict:
        decoder_width = state_dict["decoder.mask_token"].shape[-1]
        values.update(decoder_depth=count_blocks(state_dict, "decoder.transformer."),
                      decoder_emb_dim=None if decoder_width == width else decoder_width)
    head = state_dict.get("head.weight", state_dict.get("head.1.weight"))
    if head is not None:
        values.update(num_classes=head.shape[0], probe_head="head.1.weight" in state_dict)
    return ModelConfig(**values)


def build_model(checkpoint, source, drop_path_rate=0.0):
    config = checkpoint["config"]
    try:
        model = build_mae(config) if checkpoint["kind"] == "mae" else build_classifier(config, drop_path_rate)
    except ValueError as error:
        raise UserError(f"checkpoint {source} describes a model that cannot be built ({error})") from None
    load_weights(model, checkpoint["model"], source)
    return model


def load_weights(module, state_dict, source, optional_prefix=None):
    """``load_state_dict``, one line on a mismatch; ``optional_prefix`` (a new classifier's head) may be missing."""
    own = module.state_dict()
    for name, value in state_dict.items():
        if name in own and own[name].shape != value.shape:
            raise UserError(f"checkpoint {source} does not fit this model: {name} is {tuple(value.shape)} there "
                            f"but {tuple(own[name].shape)} here (another --emb_dim, --patch_size or --image_size?)")
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if not (optional_prefix and name.startswith(optional_prefix))]
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} (another depth or model kind?)")


def rng_state():
    """Every random stream a run draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.copy()), *rest)}
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


def training_state(kind, model, config, optimizer, epoch, settings, position=None, ranks_rng=None, **extra):
    """Everything a run needs to continue exactly where it stopped. ``epoch`` counts finished epochs; ``position``
    (engine.EpochPosition) is where a stop ended the next one, with the random streams of its last step;
    ``settings`` is what the run trained with. The learning rate is not saved: the resumed command's flags set it."""
    return {"kind": kind, "model": model.state_dict(), "config": config.to_dict(),
            "args": {k: v for k, v in vars(settings).items() if k != "typed"}, "epoch": epoch,
            "optimizer": optimizer.state_dict(), "rng": (position and position.rng) or rng_state(),
            "ranks_rng": position.ranks_rng if position else ranks_rng,
            "position": position and position.to_dict(), **extra}


def check_classes(checkpoint, classes, source):
    """The data's classes, names and order, or every label would be shifted silently."""
    saved = checkpoint.get("classes")
    if saved is not None and list(saved) != list(classes):
        raise UserError(f"{source} was trained on the classes {list(saved)}, but the data has {list(classes)}: "
                        f"another data set, or class folders renamed, added or removed")


def check_resume_model(checkpoint, config, source):
    saved = checkpoint["config"].to_dict()
    if changed := [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in config.to_dict().items() if saved.get(k) != v]:
        raise UserError(f"cannot resume {source} with another model ({'; '.join(changed)}); {OWN_SETTINGS}")


def resume_settings(checkpoint, args, fixed, source, log_dir):
    """What a resumed run trains with (``args`` stays as typed): the ``fixed`` flags may not change, a flag left
    out continues with the run's value, a typed change applies from the resumed epoch and is said in one line."""
    owner = checkpoint.get("run_dir")
    if owner is not None and Path(owner).resolve() != Path(log_dir).resolve():
        raise UserError(f"{source} belongs to the run in {owner}, not {log_dir}: resume it with that run's "
                        f"--log_dir / --run_name, or give this run another checkpoint path")
    saved, typed, settings = checkpoint.get("args", {}), set(args.typed), vars(args)
    why = {"time_budget": " (a resumed run keeps its budget; give --total_epoch to train it for a set length instead)"}
    if checkpoint.get("position"):
        why["batch_size"] = " (it stopped in the middle of an epoch; resume with its batch size, then change it)"
    refused = [k for k in fixed if k in saved and (k in typed or k in ("dataset", "data_dir"))]
    if changed := [f"--{k}: {saved.get(k)!r} -> {settings[k]!r}{why.get(k, '')}"
                   for k in refused + [k for k in why if k in typed] if saved.get(k) != settings[k]]:
        raise UserError(f"cannot resume {source} with other settings ({'; '.join(changed)}); {OWN_SETTINGS}")
    moved = {k: v for k, v in saved.items() if k not in RUNTIME_FLAGS and k in settings and v != settings[k]}
    resolved = {**settings, **{k: v for k, v in moved.items() if k not in typed}}  # left out: the run's value
    if "total_epoch" in typed and resolved.get("time_budget"):
        resolved["time_budget"] = None  # a length was typed: the run is no longer driven by its budget
    if applied := [f"--{k} {v!r} -> {settings[k]!r}" for k, v in moved.items() if k in typed]:
        print(f"resuming {source} from epoch {checkpoint['epoch'] + 1} with changed settings, applied from there: "
              f"{', '.join(applied)}")
    return argparse.Namespace(**resolved)


def restore_training_state(checkpoint, kind, model, optimizer, source):
    """-> (finished epochs, the position in the next one or None). The optimizer's hyperparameters stay this
    command's (a changed flag applies). A checkpoint from another number of processes reseeds by (rank, epoch)."""
    if checkpoint.get("kind") != kind or "optimizer" not in checkpoint:
        raise UserError(f"cannot resume from {source}: it is a {checkpoint.get('kind')} checkpoint without "
                        f"optimizer state, not a {kind} run's checkpoint")
    load_weights(model, checkpoint["model"], source)
    wanted = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise UserError(f"cannot resume from {source}: its optimizer state does not fit this run "
                        f"({first_line(error)})") from None
    for group, settings in zip(optimizer.param_groups, wanted):
        group.update(settings)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ranks_rng = checkpoint.get("ranks_rng") or []
    set_rng_state(ranks_rng[rank] if rank and len(ranks_rng) == world else checkpoint["rng"])
    if rank and len(ranks_rng) != world:
        torch.manual_seed(rank * 1_000_003 + checkpoint["epoch"])
    position = checkpoint.get("position")
    return checkpoint["epoch"], EpochPosition(**position) if position else None
