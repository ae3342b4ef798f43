"""Supervised training of the ViT classifier: from scratch, or fine-tuning a pretrained MAE encoder.

    python train_classifier.py                                          # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pt     # from our pretraining checkpoint
    python train_classifier.py --pretrained_model_path vit-t-mae.pt --trust_checkpoint   # the reference's pickle
"""
import hashlib
import time
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import bookkeeping
import checkpoint as ckpt
import devices
import engine
import run_setup
import utils
from data import GpuLoader, Split, random_erasing
from model import ModelConfig, build_classifier, encoder_state_dict

# The MAE / DeiT fine-tuning recipe at CIFAR scale (layer decay: with a pretrained encoder only).
RECIPES = {"strong": dict(augment="randaug", mixup=0.8, cutmix=1.0, label_smoothing=0.1, layer_decay=0.65,
                          drop_path=0.1, reprob=0.25, batch_size=512, max_device_batch_size=512)}
RUN_NAME_KEYS = {"preset": "", "linear_probe": "probe", "recipe": "", "augment": "aug", "mixup": "mix",
                 "label_smoothing": "ls", "layer_decay": "ld", "model_ema": "ema", "labels_per_class": "l",
                 "total_epoch": "ep", "time_budget": "min", "batch_size": "bs", "base_learning_rate": "lr",
                 "patch_size": "p", "emb_dim": "e", "encoder_depth": "ed", "seed": "s"}
FIXED_ON_RESUME = ("pretrained_model_path", "linear_probe", "model_ema", "labels_per_class")  # else another run


def build_model(args, typed_sizes, image_size, num_classes):
    """A classifier and its config: from scratch, or around the encoder of ``--pretrained_model_path``."""
    if not args.pretrained_model_path:
        config = ModelConfig.from_dict({**run_setup.sizes(args), "image_size": image_size, "num_classes": num_classes})
        run_setup.check_model(build_classifier, config)
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
    """AdamW as in the reference; with ``--layer_decay``, timm's per-layer groups (embeddings get the smallest lr),
    each group's lr set here, so the schedule scales every layer's by the same factor."""
    lr = args.base_learning_rate * args.batch_size / 256
    if args.layer_decay and args.pretrained_model_path and not args.linear_probe:
        groups = param_groups_layer_decay(model, run_setup.WEIGHT_DECAY, model.no_weight_decay(),
                                          layer_decay=args.layer_decay)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=run_setup.WEIGHT_DECAY, fused=fused)


def batch_regularizers(args, num_classes):
    """``prepare(images, labels) -> (images, targets)`` (random erasing, mixup / cutmix on the device: soft targets,
    with timm's Mixup folding in the label smoothing) and the matching loss."""
    mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                num_classes=num_classes) if args.mixup > 0 or args.cutmix > 0 else None

    def prepare(images, labels):
        if args.reprob > 0:
            images = random_erasing(images, args.reprob)
        return mix(images, labels) if mix else (images, labels)

    return prepare, SoftTargetCrossEntropy() if mix else torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def labelled_subset(train_set, per_class, seed):
    """A class-balanced subset of ``per_class`` images per class, drawn by a generator of its own from ``seed``:
    every run with this seed (MAE and scratch arms alike) sees the same images. -> (subset, record)."""
    if per_class is None:
        return train_set, {}
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, name in enumerate(train_set.classes):
        members = (train_set.labels == label).nonzero().flatten()
        if len(members) < per_class:
            raise utils.UserError(f"--labels_per_class {per_class}: class {name} has only {len(members)} training "
                                  f"images")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(chosen).sort().values
    digest = hashlib.sha256(index.numpy().tobytes()).hexdigest()[:12]
    subset = Split(train_set.images[index], train_set.labels[index], train_set.classes)
    return subset, {"labels": len(index), "subset": digest}


def time_the_evaluation(evaluated, test_loader, run, schedule):
    """A budgeted run keeps time for its last evaluation: one test batch per model, timed after a first pass that
    compiles, scaled to the test set (the EMA's evaluation counted too)."""
    batch = [next(iter(test_loader))]
    for _pass in ("compiling", "timed"):
        start = time.perf_counter()
        for model, forward in evaluated:
            engine.evaluate(model, batch, run.env.device, run.precision, forward)
    schedule.measured_end((time.perf_counter() - start) * len(test_loader))


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    run_setup.add_arguments(p, "train_classifier", batch_size=128, micro_batch=256, lr=1e-3, total_epoch=100,
                            warmup_epoch=5)  # the reference's
    p.add_argument("--pretrained_model_path", type=utils.path_text, default=None,
                   help="an MAE pretraining checkpoint (default: scratch)")
    p.add_argument("--output_model_path", type=utils.path_text, default=None,
                   help="the best epoch's weights (default vit-t-<run>.pt); the latest epoch, to resume from, goes "
                        "to <its stem>_last.pt")
    p.add_argument("--labels_per_class", type=utils.POSITIVE_INT, default=None,
                   help="fine-tune on a class-balanced subset of N labelled images per class, the same for every "
                        "run with this --seed (an epoch repeats it to at least 10,000 images)")
    # The accuracy recipe: everything off by default so that the reference run stays reproducible.
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named set of the options below, --augment and the batch sizes; typed options still win")
    p.add_argument("--mixup", type=utils.NONNEGATIVE_FLOAT, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--label_smoothing", type=utils.ranged(float, 0, 1, high_open=True), default=0.0)
    p.add_argument("--layer_decay", type=utils.ranged(float, 0, 1, low_open=True), default=None,
                   help="layer-wise lr decay, e.g. 0.65")
    p.add_argument("--model_ema", type=utils.ranged(float, 0, 1, high_open=True), default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999); it is evaluated "
                        "every epoch and is what the best checkpoint holds")
    p.add_argument("--linear_probe", action="store_true",
                   help="freeze the pretrained encoder; train only a BatchNorm + linear head")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow loading a pickled whole-module checkpoint (the reference's released weights)")
    p.set_defaults(cutmix=0.0, drop_path=0.0, reprob=0.0)  # no flags of their own: off, unless the recipe sets them
    return p


def parse_args(argv=None):
    """-> the arguments, and the size flags the user typed (a pretrained encoder must not contradict those)."""
    p = build_parser()
    args, typed = run_setup.parse(p, argv, "train_classifier", recipe=RECIPES)
    if args.linear_probe and not args.pretrained_model_path:
        p.error("--linear_probe needs --pretrained_model_path (a frozen random encoder says little)")
    source = f"from-{Path(args.pretrained_model_path).stem}" if args.pretrained_model_path else "scratch"
    args.run_name = args.run_name or run_setup.name_run(f"cls_{source}", args, p, RUN_NAME_KEYS)
    args.output_model_path = args.output_model_path or f"vit-t-{args.run_name}.pt"
    last_path = str(Path(args.output_model_path).with_suffix("")) + "_last.pt"
    utils.check_outputs(p, {"--output_model_path": args.output_model_path,
                            "--output_model_path (its last-epoch file)": last_path},
                        {"--pretrained_model_path": args.pretrained_model_path}, args.data_dir)
    return args, run_setup.sizes(typed), last_path


def main(argv=None):
    args, typed_sizes, last_path = parse_args(argv)
    build_model(args, typed_sizes, *run_setup.peek_data(args))  # the encoder file and shapes, before the data loads
    run, resumed = run_setup.start_run(args, [last_path, args.output_model_path], "classifier", FIXED_ON_RESUME)
    cfg, env, device, classes = run.settings, run.env, run.env.device, run.train_set.classes
    run.train_set, subset = labelled_subset(run.train_set, cfg.labels_per_class, cfg.seed)
    test_loader = GpuLoader(run.test_set, 1000, device, train=False, rank=env.rank, world_size=env.world_size)
    model, config = build_model(cfg, typed_sizes, run.image_size, len(classes))
    if resumed:
        ckpt.check_resume_model(resumed, config, run.resume_path)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    ema = ModelEmaV3(model, decay=cfg.model_ema) if cfg.model_ema else None
    done, position = ckpt.restore_training_state(resumed, "classifier", model, optimizer, run.resume_path) \
        if resumed else (0, None)
    if ema and resumed:  # a run trained without it is refused by resume_settings: --model_ema is fixed on resume
        ckpt.load_weights(ema.module, resumed.get("ema") or {}, run.resume_path)
    best = resumed["best"] if resumed else {"val_acc": -1.0, "epoch": 0}
    if resumed and not cfg.time_budget and done >= cfg.total_epoch:
        print(f"{run.resume_path} has finished all {done} of --total_epoch {cfg.total_epoch} epochs: nothing to do "
              f"(a larger --total_epoch continues it)")
        return devices.cleanup_distributed()
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model
    prepare, criterion = batch_regularizers(cfg, len(classes))
    step = engine.make_classifier_step(train_model, device, run.precision, criterion, prepare, not cfg.no_compile)
    loader = run_setup.make_loader(run, cfg)
    if subset:  # a small subset: an epoch (and its evaluation) every 10,000 images, not every few steps
        loader.repeats = -(-10_000 // len(run.train_set.labels))
    scaler = devices.grad_scaler(device, run.precision)
    evaluated = [(m, devices.maybe_compile(m, device, not cfg.no_compile))
                 for m in (model, *([ema.module] if ema else []))]
    kept = ema.module if ema else model  # what the best checkpoint holds, chosen by its own accuracy
    fields = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s", "compile_seconds",
              *(["val_loss_ema", "val_acc_ema"] if ema else []), *subset]  # metrics.csv
    schedule = run_setup.schedule_for(run, cfg, optimizer, resumed)
    book = bookkeeping.Bookkeeping(run, fields, done, position, schedule, model)
    if isinstance(schedule, engine.BudgetSchedule):
        time_the_evaluation(evaluated, test_loader, run, schedule)

    def state(epoch, **extra):
        return ckpt.training_state("classifier", model, config, optimizer, epoch, cfg, best=best, classes=classes,
                                   run_dir=str(run.log_dir), ema=ema.module.state_dict() if ema else None,
                                   budget=schedule.record(), **extra)

    for epoch in range(done + 1, book.last_epoch + 1):
        loader.set_epoch(epoch)
        lr = schedule.set_epoch(epoch)  # with layer decay: the head's, the largest
        model.train()
        first = epoch == done + 1  # this process's first epoch holds the compilation: timed apart
        with bookkeeping.EpochTimer(device) as timer:
            update_ema = (lambda: ema.update(model)) if ema else None
            result = engine.train_epoch(step, loader, optimizer, run.accum_steps, train_model, progress=book.bar,
                                        after_step=timer.after_step(update_ema) if first else update_ema,
                                        scaler=scaler, start=position if first else None, stop=book.stop.poll,
                                        before_step=schedule.before_step, rng_state=ckpt.rng_state)
        if book.cut_short(result):  # a stop, or a budget spent before the epoch's first step: save, then exit
            book.save(last_path, state(epoch - 1, position=result.stopped_at, ranks_rng=result.ranks_rng))
            break
        last = book.epoch_end(result, epoch)
        (correct,), scores = result.extras, {}
        for suffix, (evaluated_model, forward) in zip(("", "_ema"), evaluated):  # the EMA's too, if it has one
            scores[f"val_loss{suffix}"], scores[f"val_acc{suffix}"] = engine.evaluate(
                evaluated_model, test_loader, device, run.precision, forward)
        book.bar.set_postfix(epoch=epoch, loss=f"{result.loss:.4f}", val_acc=f"{scores['val_acc']:.4f}")
        book.logger.log(epoch, train_loss=result.loss, train_acc=correct / result.images_seen, lr=lr,
                        seconds=timer.seconds, images_per_s=timer.steady_rate(result.images_seen, cfg.batch_size),
                        compile_seconds=timer.first_step_seconds if first and not cfg.no_compile else None,
                        **scores, **subset)
        kept_acc = scores["val_acc_ema" if ema else "val_acc"]
        if kept_acc > best["val_acc"]:
            best = {"val_acc": kept_acc, "epoch": epoch}
            book.save(args.output_model_path, {"kind": "classifier", "model": kept.state_dict(), "epoch": epoch,
                                               "config": config.to_dict(), "args": vars(cfg), "val_acc": kept_acc,
                                               "classes": classes})
        book.final = (epoch, {"val_acc": scores["val_acc"], "best_val_acc": best["val_acc"]})
        if book.save_and_stop(last, last_path, state, epoch, ranks_rng=result.ranks_rng):
            break
    return book.finish({**vars(cfg), **config.to_dict()}, book.final and not book.stopping and (
        f"test accuracy {book.final[1]['val_acc']:.4f} after epoch {book.final[0]}; best {best['val_acc']:.4f} "
        f"(epoch {best['epoch']}) saved to {args.output_model_path}, the latest epoch (to resume) to {last_path}; "
        f"logs in {run.log_dir}"))


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
