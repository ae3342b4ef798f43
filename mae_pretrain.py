"""Self-supervised MAE pretraining of a ViT on CIFAR (random / block / grid / blockwise masking, any decoder depth).

    python mae_pretrain.py                                        # the reference run (meant for a GPU): vit-t-mae.pt
    python mae_pretrain.py --decoder_depth 8 --mask_strategy block
    python mae_pretrain.py --preset small --data_dir DATA          # the CPU-scale model and schedule
    python mae_pretrain.py --preset small --time_budget 5          # as much as fits in 5 minutes
    torchrun --nproc_per_node 4 mae_pretrain.py ...               # the same run on 4 GPUs
"""
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import bookkeeping
import checkpoint as ckpt
import devices
import engine
import run_setup
import utils
from data import Split, normalize
from figures import reconstruction_grid
from model import MASK_STRATEGIES, ModelConfig, build_mae
from probe import evaluate_encoder

# Settings that name a run when they differ from their defaults ("" = use the value itself, e.g. "block").
RUN_NAME_KEYS = {"preset": "", "decoder_depth": "dd", "mask_strategy": "", "mask_ratio": "mr",
                 "decoder_emb_dim": "dw", "norm_pix_loss": "normpix", "patch_size": "p", "emb_dim": "e",
                 "encoder_depth": "ed", "augment": "aug", "total_epoch": "ep", "time_budget": "min",
                 "batch_size": "bs", "base_learning_rate": "lr", "seed": "s"}
IMAGE_EVERY = 10  # the reconstruction grid in TensorBoard every N epochs, and at the first and last
FIELDS = ["loss", "lr", "seconds", "images_per_s", "compile_seconds", "knn_acc", "probe_acc"]  # metrics.csv


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    run_setup.add_arguments(p, "mae_pretrain", batch_size=4096, micro_batch=512, lr=1.5e-4, total_epoch=2000,
                            warmup_epoch=200)  # the reference's
    p.add_argument("--model_path", type=utils.path_text, help="checkpoint; default vit-t-mae.pt or vit-t-<run>.pt")
    p.add_argument("--mask_ratio", type=utils.OPEN_UNIT, default=None, help="default 0.75")
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default=None, help="default random")
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised targets (the paper's)")
    p.add_argument("--knn_every", type=utils.NONNEGATIVE_INT, default=0,
                   help="k-NN (k=20, cls token) test accuracy every K epochs")
    p.add_argument("--probe_epochs", type=utils.NONNEGATIVE_INT, default=0,
                   help="with --knn_every: also train a linear probe on the frozen features for N epochs")
    return p


def parse_args(argv=None):
    p = build_parser()
    args, _ = run_setup.parse(p, argv, "mae_pretrain")
    args.run_name = args.run_name or run_setup.name_run("mae", args, p, RUN_NAME_KEYS)
    args.model_path = args.model_path or ("vit-t-mae.pt" if args.run_name == "mae" else f"vit-t-{args.run_name}.pt")
    utils.check_outputs(p, {"--model_path": args.model_path}, data_dir=args.data_dir)
    return args


def model_config(settings, image_size, resumed=None):
    """The architecture: the defaults, under a resumed checkpoint's, under the sizes given."""
    base = resumed.to_dict() if resumed else ModelConfig().to_dict()
    config = ModelConfig.from_dict({**base, "image_size": image_size, **run_setup.sizes(settings)})
    run_setup.check_model(build_mae, config, decoder=True)
    return config


def measure_the_end(model, run, cfg, schedule):
    """A budgeted run's last epoch ends with the k-NN and probe, which can take a sizeable share of a short budget:
    time them before training on a part of the data (a tenth of CIFAR), scaled up, and keep that time for the end."""
    every = max(1, len(run.train_set.labels) // 5000)
    part = [Split(s.images[::every], s.labels[::every], s.classes) for s in (run.train_set, run.test_set)]
    start = time.perf_counter()
    evaluate_encoder(model.encoder, *part, run.env.device, probe_epochs=cfg.probe_epochs, precision=run.precision)
    schedule.measured_end(every * (time.perf_counter() - start))
    print(f"the k-NN and probe at the end will take about {schedule.end_seconds:.0f} s (timed on 1/{every} of the "
          f"data): the budget keeps that time for them")


def main(argv=None):
    args = parse_args(argv)
    if args.resume is None:  # a new run's shapes, before the data loads
        model_config(args, run_setup.peek_data(args)[0])
    run, resumed = run_setup.start_run(args, [args.model_path], "mae", fixed=("norm_pix_loss",))
    cfg, env, device = run.settings, run.env, run.env.device  # cfg: args, with a resumed run's own values
    config = model_config(cfg, run.image_size, resumed and resumed["config"])
    if resumed:
        ckpt.check_resume_model(resumed, config, run.resume_path)
    model = build_mae(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_learning_rate * cfg.batch_size / 256,
                                  betas=(0.9, 0.95), weight_decay=run_setup.WEIGHT_DECAY, fused=device.type == "cuda")
    done, position = ckpt.restore_training_state(resumed, "mae", model, optimizer, run.resume_path) \
        if resumed else (0, None)
    if resumed and not cfg.time_budget and done >= cfg.total_epoch:
        print(f"{run.resume_path} has finished all {done} of --total_epoch {cfg.total_epoch} epochs: nothing to do "
              f"(a larger --total_epoch continues it)")
        return devices.cleanup_distributed()
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model
    step = engine.make_pretrain_step(train_model, device, run.precision, config.patch_size, cfg.norm_pix_loss,
                                     compile=not cfg.no_compile)
    loader = run_setup.make_loader(run, cfg)
    scaler = devices.grad_scaler(device, run.precision)
    fixed_images = normalize(run.test_set.images[:16].to(device))  # the reference's 16 validation images
    schedule = run_setup.schedule_for(run, cfg, optimizer, resumed)
    book = bookkeeping.Bookkeeping(run, FIELDS, done, position, schedule, model)
    if env.is_main and cfg.knn_every and isinstance(schedule, engine.BudgetSchedule):
        measure_the_end(model, run, cfg, schedule)

    def state(epoch, **extra):
        return ckpt.training_state("mae", model, config, optimizer, epoch, cfg, run_dir=str(run.log_dir),
                                   classes=run.train_set.classes, budget=schedule.record(), **extra)

    for epoch in range(done + 1, book.last_epoch + 1):
        loader.set_epoch(epoch)
        lr = schedule.set_epoch(epoch)
        model.train()
        first = epoch == done + 1  # this process's first epoch holds the compilation: timed apart
        with bookkeeping.EpochTimer(device) as timer:
            result = engine.train_epoch(step, loader, optimizer, run.accum_steps, train_model, progress=book.bar,
                                        after_step=timer.after_step() if first else None, scaler=scaler,
                                        start=position if first else None, stop=book.stop.poll,
                                        before_step=schedule.before_step, rng_state=ckpt.rng_state)
        if book.cut_short(result):  # a stop, or a budget spent before the epoch's first step: save, then exit
            book.save(args.model_path, state(epoch - 1, position=result.stopped_at, ranks_rng=result.ranks_rng))
            break
        last = book.epoch_end(result, epoch)
        monitor = {}
        if env.is_main and cfg.knn_every and (epoch % cfg.knn_every == 0 or last):
            monitor = evaluate_encoder(model.encoder, run.train_set, run.test_set, device,
                                       probe_epochs=cfg.probe_epochs, precision=run.precision)
        book.final = (epoch, {"loss": result.loss, **monitor})  # for the HParams view and the last line
        book.logger.log(epoch, loss=result.loss, lr=lr, seconds=timer.seconds, **monitor,
                        images_per_s=timer.steady_rate(result.images_seen, cfg.batch_size),
                        compile_seconds=timer.first_step_seconds if first and not cfg.no_compile else None)
        if env.is_main and (epoch % IMAGE_EVERY == 0 or epoch == 1 or last):
            book.logger.add_image("mae_image", reconstruction_grid(model, fixed_images), epoch)
        if book.save_and_stop(last, args.model_path, state, epoch, ranks_rng=result.ranks_rng):
            break
    summary = book.final and ", ".join(f"{k} {v:.4f}" for k, v in book.final[1].items() if v is not None)
    return book.finish({**vars(cfg), **config.to_dict()}, book.final and not book.stopping and
                       f"saved {args.model_path} (epoch {book.final[0]}: {summary}); logs in {run.log_dir}")


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
