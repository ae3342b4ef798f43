"""Supervised training of the ViT classifier: from scratch, or fine-tuning a pretrained MAE encoder.

    python train_classifier.py                                          # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pt     # from our pretraining checkpoint
    python train_classifier.py --pretrained_model_path vit-t-mae.pt --trust_checkpoint   # the reference's pickle
"""
import os
from functools import partial
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import budget
import checkpoint as ckpt
import engine
import run_setup
import utils
from data import AUGMENTATIONS, GpuLoader, random_erasing
from model import ModelConfig, build_classifier, encoder_state_dict

# Fine-tuning a small ViT on CIFAR: crop/flip + RandAugment, mixup/cutmix, label smoothing, layer decay (which only
# applies with a pretrained encoder), drop path and random erasing, in the spirit of the MAE / DeiT recipes.
RECIPES = {"strong": dict(augment="randaug", mixup=0.8, cutmix=1.0, label_smoothing=0.1, layer_decay=0.65,
                          drop_path=0.1, reprob=0.25, batch_size=512, max_device_batch_size=512)}
# The CPU-scale model (from scratch; a pretrained encoder brings its own) and schedule, as mae_pretrain.py's. Its
# fine-tuning was tuned for short runs, which underfit (results/cpu_budget30/tuning.csv): batch 64 (twice the
# steps of 128, at the same lr per image) and a flip alone beat batch 128 with crop and flip.
PRESETS = {"small": dict(patch_size=4, emb_dim=96, encoder_depth=4, encoder_heads=3, batch_size=64,
                         base_learning_rate=2e-3, total_epoch=2, warmup_epoch=0, augment="flip")}
RUN_NAME_KEYS = {"preset": "", "linear_probe": "probe", "recipe": "", "augment": "aug", "mixup": "mix",
                 "cutmix": "cut", "label_smoothing": "ls", "layer_decay": "ld", "drop_path": "dp", "reprob": "re",
                 "model_ema": "ema", "total_epoch": "ep", "batch_size": "bs", "base_learning_rate": "lr",
                 "patch_size": "p", "emb_dim": "e", "encoder_depth": "ed", "seed": "s"}
# Changing these on resume would make it another run.
FIXED_ON_RESUME = ("dataset", "data_dir", "pretrained_model_path", "linear_probe", "model_ema")


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    run_setup.add_schedule_arguments(p, batch_size=128, max_device_batch_size=256, base_learning_rate=1e-3,
                                     total_epoch=100, warmup_epoch=5)  # the reference's
    p.add_argument("--pretrained_model_path", type=utils.path_text, default=None,
                   help="an MAE pretraining checkpoint (default: scratch)")
    p.add_argument("--output_model_path", type=utils.path_text, default=None,
                   help="best checkpoint; default vit-t-<run>.pt")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named model size and schedule; options given explicitly still win")
    # Model size: only from scratch; a pretrained encoder brings its own (a flag that contradicts it is an error).
    run_setup.add_size_arguments(p)
    # The accuracy recipe: everything off by default so that the reference run stays reproducible.
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a preset of the options below; options given explicitly still win")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    p.add_argument("--mixup", type=utils.NONNEGATIVE_FLOAT, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=utils.NONNEGATIVE_FLOAT, default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--label_smoothing", type=utils.ranged(float, 0, 1, high_open=True), default=0.0)
    p.add_argument("--layer_decay", type=utils.ranged(float, 0, 1, low_open=True), default=None,
                   help="layer-wise lr decay, e.g. 0.65")
    p.add_argument("--drop_path", type=utils.ranged(float, 0, 1, high_open=True), default=0.0,
                   help="stochastic depth rate of the last block")
    p.add_argument("--reprob", type=utils.PROBABILITY, default=0.0, help="random erasing probability")
    p.add_argument("--model_ema", type=utils.ranged(float, 0, 1, high_open=True), default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999); it is evaluated "
                        "every epoch and is what the best checkpoint holds")
    p.add_argument("--linear_probe", action="store_true",
                   help="freeze the pretrained encoder; train only a BatchNorm + linear head")
    p.add_argument("--patience", type=utils.POSITIVE_INT, default=None,
                   help="stop when val accuracy has not improved for N epochs")
    p.add_argument("--eval_batch_size", type=utils.POSITIVE_INT, default=1000)
    run_setup.add_run_arguments(p)
    return p


def parse_args(argv=None):
    """Parse twice: a ``--recipe`` or ``--preset`` replaces the defaults, and what the user typed still overrides
    it. Returns the arguments and the size flags the user typed (a pretrained encoder must not contradict those)."""
    parser = build_parser()
    args, typed = run_setup.parse_with_presets(parser, argv, recipe=RECIPES, preset=PRESETS)
    typed_sizes = run_setup.explicit_sizes(typed)  # as typed, before a preset filled the size flags in
    if args.linear_probe and not args.pretrained_model_path:
        parser.error("--linear_probe needs --pretrained_model_path (a frozen random encoder says little)")
    if args.pretrained_model_path and not Path(args.pretrained_model_path).is_file():
        parser.error(f"argument --pretrained_model_path: {args.pretrained_model_path} is not a checkpoint file")
    if args.output_model_path is not None and (os.path.isdir(args.output_model_path) or  # never an OSError
                                                not Path(args.output_model_path).name.strip(".")):
        parser.error(f"argument --output_model_path: {args.output_model_path} is a folder; give a file name")
    last_path = name_run(args, parser)
    run_setup.check_run_arguments(
        parser, args, {"--output_model_path": args.output_model_path,
                       "--output_model_path (its last-epoch file)": last_path},
        {"--pretrained_model_path": args.pretrained_model_path})
    return args, typed_sizes, last_path


def name_run(args, parser):
    """The run's name and checkpoint paths: the best model, and ``<best>_last.pt`` to resume from."""
    source = f"from-{Path(args.pretrained_model_path).stem}" if args.pretrained_model_path else "scratch"
    defaults = utils.parser_defaults(parser)
    defaults.update({k: v for k, v in ModelConfig().to_dict().items() if defaults.get(k) is None})
    args.run_name = args.run_name or utils.run_name(f"cls_{source}", args, defaults, RUN_NAME_KEYS)
    args.output_model_path = args.output_model_path or f"vit-t-{args.run_name}.pt"
    return str(Path(args.output_model_path).with_suffix("")) + "_last.pt"


def build_model(args, typed_sizes, image_size, num_classes):
    """A classifier and its config: from scratch, or around the encoder of ``--pretrained_model_path``."""
    if not args.pretrained_model_path:
        sizes = {k: v for k, v in run_setup.explicit_sizes(args).items() if k in ModelConfig.ENCODER_FIELDS}
        config = ModelConfig.from_dict({**sizes, "image_size": image_size, "num_classes": num_classes})
        run_setup.check_shapes(config)
        run_setup.check_model_size(build_classifier, config)
        return build_classifier(config, args.drop_path), config
    path = args.pretrained_model_path
    checkpoint = ckpt.load_checkpoint(path, args.trust_checkpoint, "mae", "--pretrained_model_path")
    guessed = {k: v for k, v in typed_sizes.items() if k in checkpoint["guessed"]}  # an older file's unknowns
    encoder = ModelConfig.from_dict({**checkpoint["config"].to_dict(), **guessed})
    contradictions = [f"--{k} {v} (it has {getattr(encoder, k)})" for k, v in typed_sizes.items()
                      if k in ModelConfig.ENCODER_FIELDS and getattr(encoder, k) != v]
    if contradictions:
        raise utils.UserError(f"{path} brings its own architecture; leave out {', '.join(contradictions)}")
    if encoder.image_size != image_size:
        raise utils.UserError(f"{path} was pretrained on {encoder.image_size} px images; this data set's are "
                              f"{image_size} px")
    config = ModelConfig.from_dict({**encoder.to_dict(), "num_classes": num_classes,
                                    "probe_head": args.linear_probe})
    model = build_classifier(config, 0.0 if args.linear_probe else args.drop_path)
    ckpt.load_weights(model, encoder_state_dict(checkpoint["model"]), path, optional_prefix="head.")
    if args.linear_probe:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("head.")
    return model, config


def build_optimizer(model, args, fused):
    """AdamW as in the reference; with ``--layer_decay``, timm's per-layer groups (embeddings get the smallest lr).

    Each group's lr is set here, so the per-epoch schedule scales every layer's lr by the same factor.
    """
    lr = args.base_learning_rate * args.batch_size / 256
    if args.layer_decay and args.pretrained_model_path and not args.linear_probe:
        groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                          layer_decay=args.layer_decay)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay, fused=fused)


def batch_regularizers(args, num_classes):
    """Random erasing and mixup / cutmix, applied to a normalised batch on the device before the forward pass.

    Returns ``prepare(images, labels) -> (images, targets)`` and the matching loss. Targets are soft label
    distributions when mixing; timm's Mixup also folds in the label smoothing.
    """
    mixing = args.mixup > 0 or args.cutmix > 0
    mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                num_classes=num_classes) if mixing else None

    def prepare(images, labels):
        if args.reprob > 0:
            images = random_erasing(images, args.reprob)
        return mix(images, labels) if mix else (images, labels)

    if mixing:
        return prepare, SoftTargetCrossEntropy()
    return prepare, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def resume(run, checkpoint, model, optimizer, ema):
    """Restore a run from its last checkpoint -> (finished epochs, position inside the next, best so far)."""
    done, position = ckpt.restore_training_state(checkpoint, "classifier", model, optimizer, run.resume_path)
    if ema:
        if checkpoint.get("ema") is None:
            raise utils.UserError(f"cannot resume {run.resume_path} with --model_ema: it was trained without it")
        ckpt.load_weights(ema.module, checkpoint["ema"], run.resume_path)
    return done, position, checkpoint["best"]


def measure_costs(args, run, step, model, optimizer, train_model, scaler, ema, evaluations, steps_per_epoch,
                  fields):
    """--time_budget's trial (budget.py): a few optimizer steps and the per-epoch evaluation, timed.

    ``evaluations`` are the per-epoch test passes (the model's, an EMA's) as functions of a list of batches:
    timed on a few batches once they are compiled, and scaled to the whole test set."""
    device, test_batches = run.env.device, list(run.test_loader)
    with budget.Trial([model, ema.module if ema else None], optimizer, scaler):
        step_seconds = budget.step_seconds(step, run.loader, optimizer, run.accum_steps, train_model, device,
                                           args.time_budget, scaler, (lambda: ema.update(model)) if ema else None)
        sample = test_batches[1:4] or test_batches
        evaluation = 0.0
        for evaluate in evaluations:
            evaluate(test_batches[:1])  # the first call compiles
            evaluation += budget.timed(partial(evaluate, sample), device) * len(test_batches) / len(sample)
        save = budget.timed(lambda: ckpt.save_to_memory({"model": model.state_dict(),
                                                         "optimizer": optimizer.state_dict()}), device)
    kept = ema.module if ema else model  # a better epoch saves it: its host copy is on this thread
    logging = budget.time_bookkeeping(fields, lambda: ckpt.to_host(kept.state_dict())) if run.env.is_main else 0.0
    return budget.Costs(step_seconds, steps_per_epoch, evaluation=evaluation, bookkeeping=logging, final=2 * save)


def main(argv=None):
    args, typed_sizes, last_path = parse_args(argv)
    build_model(args, typed_sizes, *run_setup.peek_data(args))  # the encoder file and shapes, before the data loads
    if args.check_args:
        return run_setup.checked(args)
    run = run_setup.start_run(args, [last_path, args.output_model_path])
    env, device, classes = run.env, run.env.device, run.train_set.classes
    run.test_loader = GpuLoader(run.test_set, args.eval_batch_size, device, train=False, rank=env.rank,
                                world_size=env.world_size)
    resumed = ckpt.load_checkpoint(run.resume_path, kind="classifier", option="--resume") if run.resume_path \
        else None
    if resumed and resumed.get("stopped_early"):
        print(f"{run.resume_path} ended early at epoch {resumed['epoch']} (--patience): nothing to resume")
        return utils.cleanup_distributed()
    if resumed:  # flags left out continue with the run's own values; typed ones are applied (or refused)
        run_setup.settle_resume(run, resumed, args, FIXED_ON_RESUME)
    model, config = build_model(args, typed_sizes, args.image_size, len(classes))
    if resumed:
        ckpt.check_resume_model(resumed, config, run.resume_path)
    model = model.to(device)
    optimizer = build_optimizer(model, args, fused=device.type == "cuda")
    ema = ModelEmaV3(model, decay=args.model_ema) if args.model_ema else None
    done, position, best = resume(run, resumed, model, optimizer, ema) if resumed \
        else (0, None, {"val_acc": -1.0, "epoch": 0})
    if resumed and run_setup.finished_already(run, done, args.total_epoch):
        return utils.cleanup_distributed()
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model

    prepare, criterion = batch_regularizers(args, len(classes))
    step = engine.make_classifier_step(train_model, device, run.precision, criterion, prepare,
                                       not args.no_compile, args.compile_mode)
    run_setup.make_loader(run, args, args.augment, run_setup.trial_step(
        engine.make_classifier_step(train_model, device, run.precision, torch.nn.CrossEntropyLoss()), model,
        run.train_set.images.shape[1:], len(classes), device))
    scaler = engine.grad_scaler(device, run.precision)
    forward = engine.maybe_compile(model, device, not args.no_compile, args.compile_mode)
    ema_forward = engine.maybe_compile(ema.module, device, not args.no_compile, args.compile_mode) if ema else None
    evaluations = [lambda batches, m=m, f=f: engine.evaluate(m, batches, device, run.precision, f)
                   for m, f in ((model, forward), *(((ema.module, ema_forward),) if ema else ()))]
    kept = ema.module if ema else model  # what the best checkpoint holds, chosen by its own accuracy
    steps_per_epoch = len(run.loader) // run.accum_steps
    fields = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s", "compile_seconds",
              *(["val_loss_ema", "val_acc_ema"] if ema else [])]  # metrics.csv
    if args.time_budget and not resumed:
        run_setup.plan_budget(run, args, measure_costs(args, run, step, model, optimizer, train_model, scaler, ema,
                                                       evaluations, steps_per_epoch, fields))
    schedule = engine.EpochSchedule(optimizer, args.warmup_epoch, args.total_epoch, args.earlier_lengths)
    book = run_setup.Bookkeeping(run, args, fields, done, steps_per_epoch * run.accum_steps, position)

    def training_state(epoch, position=None, stopped_early=False):
        return ckpt.training_state("classifier", model, config, optimizer, epoch, args, position, best=best,
                                   classes=classes, stopped_early=stopped_early, run_dir=str(run.log_dir),
                                   ema=ema.module.state_dict() if ema else None)

    for epoch in run_setup.epochs_to_train(done, args):
        run.loader.set_epoch(epoch)
        lr = schedule.set_epoch(epoch)  # with layer decay: the head's, the largest
        model.train()
        first = epoch == done + 1  # this process's first epoch holds the compilation: timed apart
        with engine.EpochTimer(device) as timer:
            update_ema = (lambda: ema.update(model)) if ema else None
            result = engine.train_epoch(step, run.loader, optimizer, run.accum_steps, train_model, book.bar,
                                        book.first_epoch_hook(timer, update_ema) if first else update_ema, scaler,
                                        position if first else None, book.stop.poll,
                                        run_setup.steps_cap(args, epoch))
        if result.stopped_at:  # a stop signal: save where this epoch stands, then exit
            book.save_now(last_path, training_state(epoch - 1, result.stopped_at))
            break
        book.check_course(epoch, args, timer, schedule)  # a budgeted run: its plan, by the steps timed so far
        (correct,) = result.extras
        scores = dict(zip(("val_loss", "val_acc"), evaluations[0](run.test_loader)))
        if ema:
            scores.update(zip(("val_loss_ema", "val_acc_ema"), evaluations[1](run.test_loader)))
        book.bar.set_postfix(epoch=epoch, loss=f"{result.loss:.4f}", val_acc=f"{scores['val_acc']:.4f}")
        book.logger.log(epoch, train_loss=result.loss, train_acc=correct / result.images_seen, lr=lr,
                        seconds=timer.seconds, images_per_s=timer.steady_rate(result.images_seen, args.batch_size),
                        compile_seconds=timer.first_step_seconds if first and not args.no_compile else None, **scores)
        kept_acc = scores["val_acc_ema" if ema else "val_acc"]
        if kept_acc > best["val_acc"]:
            best = {"val_acc": kept_acc, "epoch": epoch}
            if env.is_main:
                book.writer.save(args.output_model_path, {"kind": "classifier", "model": kept.state_dict(),
                                                          "config": config.to_dict(), "args": vars(args),
                                                          "epoch": epoch, "val_acc": kept_acc, "classes": classes})
        book.final = (epoch, {"val_acc": scores["val_acc"], "best_val_acc": best["val_acc"]})  # best: the kept one
        patience_over = args.patience is not None and epoch - best["epoch"] >= args.patience
        if book.save_due(epoch, ended_early=patience_over):
            book.writer.save(last_path, training_state(epoch, stopped_early=patience_over))
        if patience_over:
            print(f"\nval accuracy has not improved for {args.patience} epochs (best {best['val_acc']:.4f} at "
                  f"epoch {best['epoch']}); stopping early")
        if book.stopping or patience_over:
            break
    return book.finish({**vars(args), **config.to_dict()})


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
