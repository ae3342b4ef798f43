"""Self-supervised MAE pretraining of a ViT on CIFAR (random / block / grid masking, any decoder depth).

    python mae_pretrain.py                                        # the reference run, writes vit-t-mae.pt
    python mae_pretrain.py --decoder_depth 8 --mask_strategy block
    torchrun --nproc_per_node 4 mae_pretrain.py ...               # the same run on 4 GPUs
"""
import argparse

import torch
from torch.nn.parallel import DistributedDataParallel

import utils
from data import AUGMENTATIONS, GpuLoader, load_dataset, normalize
from model import MAE_ViT, MASK_STRATEGIES, mae_loss
from probe import evaluate_encoder
from visualize_predictions import reconstruction_grid

# Settings that name a run when they differ from their defaults ("" = use the value itself, e.g. "block").
RUN_NAME_KEYS = {"decoder_depth": "dd", "mask_strategy": "", "mask_ratio": "mr", "decoder_emb_dim": "dw",
                 "norm_pix_loss": "normpix", "patch_size": "p", "emb_dim": "e", "encoder_depth": "ed",
                 "augment": "aug", "total_epoch": "ep", "batch_size": "bs", "base_learning_rate": "lr",
                 "seed": "s"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The reference's arguments and defaults.
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--max_device_batch_size", type=int, default=512, help="micro-batch; gradients accumulate")
    p.add_argument("--base_learning_rate", type=float, default=1.5e-4, help="lr = base * batch_size / 256")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--total_epoch", type=int, default=2000)
    p.add_argument("--warmup_epoch", type=int, default=200)
    p.add_argument("--model_path", default=None, help="checkpoint; default vit-t-mae.pt, or vit-t-<run>.pt")
    # Ablations and model size.
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default="random")
    p.add_argument("--decoder_depth", type=int, default=4)
    p.add_argument("--decoder_heads", type=int, default=3)
    p.add_argument("--decoder_emb_dim", type=int, default=None, help="decoder width (default: the encoder's)")
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--emb_dim", type=int, default=192)
    p.add_argument("--encoder_depth", type=int, default=12)
    p.add_argument("--encoder_heads", type=int, default=3)
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised targets (the paper's)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    # Monitoring the representation while it trains.
    p.add_argument("--image_every", type=int, default=10,
                   help="log the reconstruction grid every N epochs (and at the first and last); each is ~75 KB")
    p.add_argument("--knn_every", type=int, default=0, help="log k-NN test accuracy every K epochs (0: off)")
    p.add_argument("--knn_k", type=int, default=20)
    p.add_argument("--knn_pool", choices=["cls", "mean"], default="cls", help="cls token or mean patch feature")
    p.add_argument("--probe_epochs", type=int, default=0,
                   help="with --knn_every: also train a linear probe on the frozen features for N epochs")
    utils.add_run_arguments(p)
    return p


def make_step(model, device, patch_size, norm_pix_loss=False):
    """One micro-batch: the masked forward under autocast and the loss on the masked patches -> (loss,)."""
    def step(images, _labels):
        with utils.autocast(device):
            predicted, mask = model(images)
        return (mae_loss(predicted, images, mask, patch_size, norm_pix_loss),)

    return step


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run_name = args.run_name or utils.run_name("mae", args, utils.parser_defaults(parser), RUN_NAME_KEYS)
    args.model_path = args.model_path or ("vit-t-mae.pt" if args.run_name == "mae" else f"vit-t-{args.run_name}.pt")
    env = utils.setup_device(args.device)
    utils.setup_seed(args.seed + env.rank)  # each process draws its own masks and augmentations
    resume_path = utils.resolve_resume(args.resume, args.model_path)
    log_dir = utils.prepare_run_dir(f"{args.log_dir}/{args.dataset}/{args.run_name}", args.resume, env.is_main)

    train_set, test_set = load_dataset(args.dataset, args.data_dir)
    args.image_size = train_set.images.shape[-1]  # recorded in checkpoints, so that readers can rebuild the model
    micro_batch, accum_steps = utils.split_batch(args.batch_size, args.max_device_batch_size, env.world_size)
    loader = GpuLoader(train_set, micro_batch, env.device, augment=AUGMENTATIONS[args.augment], seed=args.seed,
                       rank=env.rank, world_size=env.world_size)
    model = MAE_ViT(train_set.images.shape[-1], args.patch_size, args.emb_dim, args.encoder_depth,
                    args.encoder_heads, args.decoder_depth, args.decoder_heads, args.mask_ratio,
                    args.mask_strategy, args.decoder_emb_dim).to(env.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.base_learning_rate * args.batch_size / 256,
                                  betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, utils.warmup_cosine(args.warmup_epoch,
                                                                                  args.total_epoch))
    done = 0
    if resume_path:
        done = utils.restore_training_state(utils.load_checkpoint(resume_path), "mae", model, optimizer,
                                            scheduler, resume_path)
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model

    step = utils.maybe_compile(make_step(train_model, env.device, args.patch_size, args.norm_pix_loss), env.device,
                               not args.no_compile)
    fixed_images = normalize(test_set.images[:16].to(env.device))  # the reference's 16 validation images
    logger = utils.RunLogger(log_dir, ["loss", "lr", "seconds", "images_per_s", "knn_acc", "probe_acc"], done + 1,
                             env.is_main)
    stop = utils.StopFlag().install()
    steps_per_epoch = len(loader) // accum_steps * accum_steps
    bar = utils.progress_bar(args.total_epoch * steps_per_epoch, done * steps_per_epoch, env.is_main)
    for epoch in range(done + 1, args.total_epoch + 1):
        loader.set_epoch(epoch)
        model.train()
        with utils.EpochTimer(env.device) as timer:
            loss, _, images_seen = utils.train_epoch(step, loader, optimizer, accum_steps, train_model, bar)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        monitor = {}
        if env.is_main and args.knn_every and (epoch % args.knn_every == 0 or epoch == args.total_epoch):
            monitor = evaluate_encoder(model.encoder, train_set, test_set, env.device, args.knn_k, args.knn_pool,
                                       args.probe_epochs)
        logger.log(epoch, loss=loss, lr=lr, seconds=timer.seconds, images_per_s=images_seen / timer.seconds,
                   **monitor)
        if env.is_main and (epoch % args.image_every == 0 or epoch in (1, args.total_epoch)):
            logger.add_image("mae_image", reconstruction_grid(model, fixed_images), epoch)
        if env.is_main and (epoch % args.save_every == 0 or epoch == args.total_epoch or stop.requested):
            utils.save_checkpoint(args.model_path, utils.training_state("mae", model, optimizer, scheduler,
                                                                        epoch, args))
        if stop.requested:
            break
    bar.close()
    logger.close()
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main)
