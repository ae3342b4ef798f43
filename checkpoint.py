"""Checkpoints: save atomically (in the background), load safely, rebuild the model they hold, resume a run.

A checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads:
``{"kind": "mae" | "classifier", "model": state_dict, "config": ModelConfig as a dict, "args": vars(args),
"epoch": ..., "optimizer": ..., "rng": ...}``, plus ``"position"`` when a stop ended an epoch early. Older
checkpoints without ``config`` (and the reference's pickled modules, behind ``--trust_checkpoint``) are rebuilt
from their weights' shapes.
"""
import argparse
import math
import pickle
import random
import re
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import EpochPosition
from model import ModelConfig, build_classifier, build_mae, encoder_state_dict
from utils import UserError, atomic_write, first_line

KIND_NAMES = {"mae": "an MAE pretraining checkpoint (from mae_pretrain.py)",
              "classifier": "a classifier checkpoint (from train_classifier.py)"}


# ------------------------------------------------------------------------------------------------- saving


def save_checkpoint(path, state):
    """Write through a temporary file in the same folder, then rename: a reader never sees half a checkpoint, and
    a failed write (a full disk) leaves the one before it (see utils.atomic_write)."""
    atomic_write(path, lambda tmp: torch_save(state, tmp), "checkpoint")


def torch_save(state, path):
    """``torch.save``, failing with the disk's own error ("No space left on device", "File too large") rather than
    the one torch's writer makes of it ("[enforce fail at inline_container.cc] unexpected pos ...")."""
    with open(path, "wb") as file:
        recorder = _WriteRecorder(file)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        return self.file.flush()


def bf16(state_dict):
    """The floating-point tensors of a state dict in bf16 (released weights are half the bytes)."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}


def export_weights(state, target, limit=None):
    """Released weights: the model in bf16 (half the bytes; fine-tuning and inference cast them back) with what
    rebuilds it (kind, config, classes, epoch), without optimizer state or the run's paths; refused if larger than
    ``limit`` bytes. Every script loads the file: load_checkpoint reads bf16 weights into fp32 models."""
    kept = {k: state[k] for k in ("kind", "config", "epoch", "classes") if k in state}
    save_checkpoint(target, {**kept, "model": bf16(state["model"])})
    size = Path(target).stat().st_size
    if limit and size >= limit:
        Path(target).unlink()
        raise UserError(f"{target} would be {size / 2 ** 20:.1f} MiB, over the {limit / 2 ** 20:.0f} MiB limit")
    return size


def to_host(value):
    """A copy of ``value`` with every tensor on the CPU: what a background writer may hold while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


class CheckpointWriter:
    """Saves in a background thread from a host copy, so the training loop does not wait for the disk.

    One write at a time; ``wait()`` (called before the next save and at the end of a run) re-raises a failed
    write in the training thread.
    """

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, path, state):
        self.wait()
        host_state = to_host(state)
        self.thread = threading.Thread(target=self._write, args=(path, host_state), daemon=False)
        self.thread.start()

    def _write(self, path, state):
        try:
            save_checkpoint(path, state)
        except Exception as error:  # reported in the training thread by wait()
            self.error = error if isinstance(error, UserError) else UserError(
                f"could not write checkpoint {path} ({first_line(error)})")

    def busy(self):
        return self.thread is not None and self.thread.is_alive()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


# ------------------------------------------------------------------------------------------------- loading


def load_checkpoint(path, trust_pickle=False, kind=None, option=None):
    """A checkpoint dict with at least ``model``, ``kind`` ("mae" or "classifier") and ``config``.

    Ours load with ``weights_only=True``. A whole pickled module (the reference's released weights) can run
    code when unpickled, so it is loaded only with ``trust_pickle``. With ``kind``, a checkpoint of the other
    kind is refused, naming the command-line ``option`` that took it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
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
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read (permission denied)") from None
    except Exception as error:  # damaged bytes fail inside the unpickler in many ways (EOFError, IndexError, ...)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: "
                        f"{first_line(error)})") from None
    if isinstance(checkpoint, dict) and "model" not in checkpoint and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"model": checkpoint}  # a bare state dict
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path} holds no model weights")
    checkpoint.setdefault("kind", checkpoint_kind(checkpoint["model"]))
    if kind and checkpoint["kind"] != kind:
        what = {"mae": "an MAE", "classifier": "a classifier"}.get(checkpoint["kind"], "an unrecognised")
        raise UserError(f"{path} is {what} checkpoint; {option} needs {KIND_NAMES[kind]}")
    if checkpoint["kind"] in KIND_NAMES:
        checkpoint["guessed"] = guessed_fields(checkpoint)
        checkpoint["config"] = checkpoint_config(checkpoint, path)
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


# ---------------------------------------------------------------------------------- the model a file holds


def count_blocks(state_dict, prefix):
    ids = {int(m.group(1)) for k in state_dict for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def infer_config(state_dict, hints=None):
    """The architecture from the weights' shapes; what shapes cannot tell (heads, masking) comes from ``hints``
    (an older checkpoint's saved arguments) or the reference's defaults."""
    hints = hints or {}
    encoder = encoder_state_dict(state_dict)
    width, _, patch, _ = encoder["patchify.weight"].shape
    values = {name: hints[name] for name in ("encoder_heads", "decoder_heads", "mask_ratio", "mask_strategy")
              if hints.get(name) is not None}
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


GUESSABLE = ("encoder_heads", "decoder_heads", "mask_ratio", "mask_strategy")


def guessed_fields(checkpoint):
    """The config fields an older checkpoint did not record and its weights cannot tell: the defaults stand in
    for them, and a flag the user gives may set them."""
    if isinstance(checkpoint.get("config"), dict):
        return ()
    hints = checkpoint.get("args") or {}
    return tuple(name for name in GUESSABLE if hints.get(name) is None)


def checkpoint_config(checkpoint, source):
    """The ModelConfig of a checkpoint: its own ``config``, or (older files) inferred from its weights."""
    try:
        if isinstance(checkpoint.get("config"), dict):
            return ModelConfig.from_dict(checkpoint["config"])
        return infer_config(checkpoint["model"], checkpoint.get("args"))
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise UserError(f"checkpoint {source} does not describe a model this code can build "
                        f"({first_line(error)})") from None


def build_model(checkpoint, source, drop_path_rate=0.0):
    """The model a loaded checkpoint holds, built from its config and loaded with its weights."""
    config = checkpoint["config"]
    try:
        model = build_mae(config) if checkpoint["kind"] == "mae" else build_classifier(config, drop_path_rate)
    except ValueError as error:
        raise UserError(f"checkpoint {source} describes a model that cannot be built ({error})") from None
    load_weights(model, checkpoint["model"], source)
    return model


def load_weights(module, state_dict, source, strict=True, optional_prefix=None):
    """``load_state_dict`` with a one-line explanation when the checkpoint is another model's shape.

    Weights under ``optional_prefix`` (a new classifier's head) may be missing from the checkpoint.
    """
    own = module.state_dict()
    for name, value in state_dict.items():
        if name in own and own[name].shape != value.shape:
            raise UserError(f"checkpoint {source} does not fit this model: {name} is {tuple(value.shape)} there "
                            f"but {tuple(own[name].shape)} here (another --emb_dim, --patch_size or --image_size?)")
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if optional_prefix:
        missing = [name for name in missing if not name.startswith(optional_prefix)]
    if strict and (missing or unexpected):
        raise UserError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} (another depth or model kind?)")


# -------------------------------------------------------------------------------------------------- resume


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


def training_state(kind, model, config, optimizer, epoch, settings, **extra):
    """Everything a run needs to continue exactly where it stopped; loadable with ``weights_only=True``.

    ``epoch`` counts finished epochs; ``position`` (engine.EpochPosition) is where a stop ended the next one.
    ``settings`` is what the run trained with (a resumed run's own values for the flags left out). The learning
    rate is not saved: it is computed from the resumed command's flags."""
    position = extra.pop("position", None)
    settings = {k: v for k, v in vars(settings).items() if k != "typed"}
    return {"kind": kind, "model": model.state_dict(), "config": config.to_dict(), "args": settings,
            "epoch": epoch, "optimizer": optimizer.state_dict(), "rng": position.rng if position and position.rng
            else rng_state(),
            "position": position.to_dict() if position else None, **extra}


def check_classes(checkpoint, classes, source):
    """A checkpoint's classes must be the data's, names and order: else every label would be shifted silently."""
    saved = checkpoint.get("classes")
    if saved is not None and list(saved) != list(classes):
        raise UserError(f"{source} was trained on the classes {list(saved)}, but the data has {list(classes)}: "
                        f"another data set, or class folders renamed, added or removed")


def check_resume_model(checkpoint, config, source):
    """A resumed run must build the model its checkpoint holds: one error line lists the differences."""
    saved = checkpoint["config"].to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in config.to_dict().items() if saved.get(k) != v]
    if changed:
        raise UserError(f"cannot resume {source} with another model ({'; '.join(changed)}); use the run's own "
                        f"settings, or start a new run with --run_name NAME")


def resume_settings(checkpoint, args, fixed, source, log_dir):
    """What a resumed run trains with, flag by flag, so that it trains as its command line says (``args`` stays
    as the user gave it): the ``fixed`` flags may not change; a flag left out continues with the run's own value;
    a typed change is applied from the resumed epoch (the schedule is recomputed from it) and said in one line."""
    from run_setup import RUNTIME_FLAGS

    owner = checkpoint.get("run_dir")
    if owner is not None and Path(owner).resolve() != Path(log_dir).resolve():
        raise UserError(f"{source} belongs to the run in {owner}, not {log_dir}: resume it with that run's "
                        f"--log_dir / --run_name, or give this run another checkpoint path")
    saved, typed, settings = checkpoint.get("args", {}), set(args.typed), vars(args)
    changed = [f"--{k}: {saved[k]!r} -> {settings[k]!r}" for k in fixed if k in saved and saved[k] != settings[k]
               and (k in typed or k in ("dataset", "data_dir"))]
    if checkpoint.get("position") and "batch_size" in typed and saved.get("batch_size") != args.batch_size:
        changed.append(f"--batch_size: {saved.get('batch_size')!r} -> {args.batch_size!r} (it stopped in the middle "
                       f"of an epoch; resume with its batch size, then change it)")
    if "time_budget" in typed and saved.get("time_budget") != args.time_budget:
        changed.append(f"--time_budget: {saved.get('time_budget')!r} -> {args.time_budget!r} (a resumed run "
                       f"keeps its budget; give --total_epoch to train it for a fixed length instead)")
    if changed:
        raise UserError(f"cannot resume {source} with other settings ({'; '.join(changed)}); use the run's own "
                        f"settings, or start a new run with --run_name NAME")
    resolved, applied = dict(settings), []
    for key, value in saved.items():
        if key in RUNTIME_FLAGS or key not in settings or value == settings[key]:
            continue
        if key in typed:
            applied.append(f"--{key} {value!r} -> {settings[key]!r}")
        else:
            resolved[key] = value  # left out: the run's own value
    if "total_epoch" in typed and resolved.get("time_budget"):
        resolved["time_budget"] = None  # a length was typed: the run is no longer driven by its budget
    if applied:
        print(f"resuming {source} from epoch {checkpoint['epoch'] + 1} with changed settings, applied from there: "
              f"{', '.join(applied)}")
    return argparse.Namespace(**resolved)


def restore_training_state(checkpoint, kind, model, optimizer, source):
    """Load a ``training_state`` checkpoint -> (finished epochs, the position inside the next one or None).

    The optimizer's moments and step counts are restored; its hyperparameters (lr, weight decay, betas) stay
    those this command built it with, so a changed flag is applied, not overwritten by the saved value.
    """
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
    set_rng_state(checkpoint["rng"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank:  # only rank 0's streams are saved: the others get their own again, fixed by (rank, epoch)
        torch.manual_seed(rank * 1_000_003 + checkpoint["epoch"])
    position = checkpoint.get("position")
    return checkpoint["epoch"], EpochPosition(**position) if position else None
