"""Supervised training of the ViT classifier: from scratch, or fine-tuning a pretrained MAE encoder.

    python train_classifier.py                                          # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pt     # from our pretraining checkpoint
    python train_classifier.py --pretrained_model_path vit-t-mae.pt --trust_checkpoint   # the reference's pickle
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import utils
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from data import AUGMENTATIONS, GpuLoader, load_dataset, random_erasing
from model import MAE_Encoder, ViT_Classifier, encoder_state_dict

# Fine-tuning a small ViT on CIFAR: crop/flip + RandAugment, mixup/cutmix, label smoothing, layer decay (which only
# applies with a pretrained encoder), drop path and random erasing, in the spirit of the MAE / DeiT recipes.
RECIPES = {"strong": dict(augment="randaug", mixup=0.8, cutmix=1.0, label_smoothing=0.1, layer_decay=0.65,
                          drop_path=0.1, reprob=0.25, batch_size=512, max_device_batch_size=512)}
RUN_NAME_KEYS = {"linear_probe": "probe", "recipe": "", "augment": "aug", "mixup": "mix", "cutmix": "cut",
                 "label_smoothing": "ls", "layer_decay": "ld", "drop_path": "dp", "reprob": "re", "model_ema": "ema",
                 "total_epoch": "ep", "batch_size": "bs", "base_learning_rate": "lr", "patch_size": "p",
                 "emb_dim": "e", "encoder_depth": "ed", "seed": "s"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The reference's arguments and defaults.
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--max_device_batch_size", type=int, default=256, help="micro-batch; gradients accumulate")
    p.add_argument("--base_learning_rate", type=float, default=1e-3, help="lr = base * batch_size / 256")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--total_epoch", type=int, default=100)
    p.add_argument("--warmup_epoch", type=int, default=5)
    p.add_argument("--pretrained_model_path", default=None, help="an MAE pretraining checkpoint (default: scratch)")
    p.add_argument("--output_model_path", default=None, help="best checkpoint; default vit-t-<run>.pt")
    # Model size: only used from scratch; a pretrained encoder brings its own.
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--emb_dim", type=int, default=192)
    p.add_argument("--encoder_depth", type=int, default=12)
    p.add_argument("--encoder_heads", type=int, default=3)
    # The accuracy recipe: everything off by default so that the reference run stays reproducible.
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a preset of the options below; options given explicitly still win")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.65")
    p.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the last block")
    p.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    p.add_argument("--model_ema", type=float, default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999); it is evaluated "
                        "every epoch and is what the best checkpoint holds")
    p.add_argument("--linear_probe", action="store_true",
                   help="freeze the pretrained encoder; train only a BatchNorm + linear head")
    p.add_argument("--patience", type=int, default=None, help="stop when val accuracy has not improved for N epochs")
    p.add_argument("--eval_batch_size", type=int, default=1000)
    utils.add_run_arguments(p)
    return p


def parse_args(argv):
    """Parse twice: a ``--recipe`` replaces the defaults, and what the user typed still overrides it."""
    parser = build_parser()
    recipe = parser.parse_known_args(argv)[0].recipe
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
    return parser.parse_args(argv), parser


def name_run(args, parser):
    source = f"from-{Path(args.pretrained_model_path).stem}" if args.pretrained_model_path else "scratch"
    args.run_name = args.run_name or utils.run_name(f"cls_{source}", args, utils.parser_defaults(parser),
                                                    RUN_NAME_KEYS)
    args.output_model_path = args.output_model_path or f"vit-t-{args.run_name}.pt"
    return str(Path(args.output_model_path).with_suffix("")) + "_last.pt"


def build_model(args, image_size, num_classes):
    """A classifier, its encoder loaded from ``--pretrained_model_path`` when given."""
    if not args.pretrained_model_path:
        if args.linear_probe:
            raise utils.UserError("--linear_probe needs --pretrained_model_path (a frozen random encoder says little)")
        encoder = MAE_Encoder(image_size, args.patch_size, args.emb_dim, args.encoder_depth, args.encoder_heads,
                              drop_path_rate=args.drop_path)
        return ViT_Classifier(encoder, num_classes)
    path = args.pretrained_model_path
    checkpoint = utils.load_checkpoint(path, args.trust_checkpoint, "mae", "--pretrained_model_path")
    for name in ("patch_size", "emb_dim", "encoder_depth", "encoder_heads"):  # the encoder's shape is its own
        setattr(args, name, checkpoint.get("args", {}).get(name, getattr(args, name)))
    encoder = MAE_Encoder(image_size, args.patch_size, args.emb_dim, args.encoder_depth, args.encoder_heads,
                          drop_path_rate=0.0 if args.linear_probe else args.drop_path)
    utils.load_weights(encoder, encoder_state_dict(checkpoint["model"]), path)
    model = ViT_Classifier(encoder, num_classes, probe_head=args.linear_probe)
    if args.linear_probe:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("head.")
    return model


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


def make_step(model, device, criterion, prepare=None, compile=False):
    """One micro-batch -> (loss, number correct). ``prepare`` (mixup, erasing) runs eagerly before the compiled
    forward: timm's Mixup draws its mixing weight on the host, which a compiled graph would bake in."""
    def forward_loss(images, targets, labels):
        with utils.autocast(device):
            logits = model(images)
        return criterion(logits.float(), targets), (logits.argmax(-1) == labels).sum()

    forward_loss = utils.maybe_compile(forward_loss, device, compile)

    def step(images, labels):
        return forward_loss(*(prepare(images, labels) if prepare else (images, labels)), labels)

    return step


@torch.no_grad()
def evaluate(model, loader, device, forward):
    """Mean loss and accuracy over the whole split, summed on the device and synced once."""
    model.eval()
    totals = torch.zeros(3, device=device)
    for images, labels in loader:
        with utils.autocast(device):
            logits = forward(images)
        totals += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"),
                               (logits.argmax(-1) == labels).sum().float(), torch.tensor(len(labels), device=device)])
    loss_sum, correct, count = utils.all_reduce_sum(totals).tolist()
    return loss_sum / count, correct / count


def resume(path, model, optimizer, scheduler, ema):
    """Restore a run from its last checkpoint -> (finished epochs, best so far, whether --patience ended it)."""
    checkpoint = utils.load_checkpoint(path)
    done = utils.restore_training_state(checkpoint, "classifier", model, optimizer, scheduler, path)
    if ema:
        if checkpoint.get("ema") is None:
            raise utils.UserError(f"cannot resume {path} with --model_ema: it was trained without it")
        utils.load_weights(ema.module, checkpoint["ema"], path)
    return done, checkpoint["best"], checkpoint.get("stopped_early", False)


def main(argv=None):
    args, parser = parse_args(argv)
    last_path = name_run(args, parser)
    env = utils.setup_device(args.device)
    utils.setup_seed(args.seed + env.rank)  # each process draws its own masks and augmentations
    resume_path = utils.resolve_resume(args.resume, last_path)
    log_dir = utils.prepare_run_dir(f"{args.log_dir}/{args.dataset}/{args.run_name}", args.resume, env.is_main)

    train_set, test_set = load_dataset(args.dataset, args.data_dir)
    args.image_size = train_set.images.shape[-1]  # recorded in checkpoints, so that readers can rebuild the model
    micro_batch, accum_steps = utils.split_batch(args.batch_size, args.max_device_batch_size, env.world_size)
    loader = GpuLoader(train_set, micro_batch, env.device, augment=AUGMENTATIONS[args.augment], seed=args.seed,
                       rank=env.rank, world_size=env.world_size)
    test_loader = GpuLoader(test_set, args.eval_batch_size, env.device, train=False, rank=env.rank,
                            world_size=env.world_size)
    model = build_model(args, train_set.images.shape[-1], len(train_set.classes)).to(env.device)
    optimizer = build_optimizer(model, args, fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, utils.warmup_cosine(args.warmup_epoch,
                                                                                  args.total_epoch))
    ema = ModelEmaV3(model, decay=args.model_ema) if args.model_ema else None
    done, best, stopped_early = resume(resume_path, model, optimizer, scheduler, ema) if resume_path else (
        0, {"val_acc": -1.0, "epoch": 0}, False)
    if stopped_early:
        print(f"{resume_path} ended early at epoch {done} (--patience): nothing to resume")
        return utils.cleanup_distributed()
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model

    prepare, criterion = batch_regularizers(args, len(train_set.classes))
    step = make_step(train_model, env.device, criterion, prepare, compile=not args.no_compile)
    forward = utils.maybe_compile(model, env.device, not args.no_compile)
    ema_forward = utils.maybe_compile(ema.module, env.device, not args.no_compile) if ema else None
    kept = ema.module if ema else model  # what the best checkpoint holds, chosen by its own accuracy
    logger = utils.RunLogger(log_dir, ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                                       "images_per_s", *(["val_loss_ema", "val_acc_ema"] if ema else [])],
                             done + 1, env.is_main)
    stop = utils.StopFlag().install()
    steps_per_epoch = len(loader) // accum_steps * accum_steps
    bar = utils.progress_bar(args.total_epoch * steps_per_epoch, done * steps_per_epoch, env.is_main)
    for epoch in range(done + 1, args.total_epoch + 1):
        loader.set_epoch(epoch)
        model.train()
        with utils.EpochTimer(env.device) as timer:
            train_loss, (correct,), images_seen = utils.train_epoch(step, loader, optimizer, accum_steps,
                                                                    train_model, bar,
                                                                    (lambda: ema.update(model)) if ema else None)
        lr = max(group["lr"] for group in optimizer.param_groups)  # with layer decay: the head's, the largest
        scheduler.step()
        scores = dict(zip(("val_loss", "val_acc"), evaluate(model, test_loader, env.device, forward)))
        if ema:
            scores.update(zip(("val_loss_ema", "val_acc_ema"), evaluate(ema.module, test_loader, env.device,
                                                                        ema_forward)))
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", val_acc=f"{scores['val_acc']:.4f}")
        logger.log(epoch, train_loss=train_loss, train_acc=correct / images_seen, lr=lr, seconds=timer.seconds,
                   images_per_s=images_seen / timer.seconds, **scores)
        kept_acc = scores["val_acc_ema" if ema else "val_acc"]
        if kept_acc > best["val_acc"]:
            best = {"val_acc": kept_acc, "epoch": epoch}
            if env.is_main:
                utils.save_checkpoint(args.output_model_path, {"kind": "classifier", "model": kept.state_dict(),
                                                               "args": vars(args), "epoch": epoch,
                                                               "val_acc": kept_acc, "classes": train_set.classes})
        patience_over = args.patience is not None and epoch - best["epoch"] >= args.patience
        if env.is_main and (epoch % args.save_every == 0 or epoch == args.total_epoch or stop.requested
                            or patience_over):
            utils.save_checkpoint(last_path, utils.training_state(
                "classifier", model, optimizer, scheduler, epoch, args, best=best, classes=train_set.classes,
                stopped_early=patience_over, ema=ema.module.state_dict() if ema else None))
        if patience_over:
            print(f"\nval accuracy has not improved for {args.patience} epochs (best {best['val_acc']:.4f} at "
                  f"epoch {best['epoch']}); stopping early")
        if stop.requested or patience_over:
            break
    bar.close()
    logger.close()
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main)
