"""Self-supervised MAE pretraining of a ViT on CIFAR (random / block / grid / blockwise masking, any decoder depth).

    python mae_pretrain.py                                        # the reference run, writes vit-t-mae.pt
    python mae_pretrain.py --decoder_depth 8 --mask_strategy block
    python mae_pretrain.py --preset small --data_dir DATA          # the CPU-scale model and schedule
    torchrun --nproc_per_node 4 mae_pretrain.py ...               # the same run on 4 GPUs
"""

import torch
from torch.nn.parallel import DistributedDataParallel

import budget
import checkpoint as ckpt
import engine
import run_setup
import utils
from data import AUGMENTATIONS, normalize
from figures import reconstruction_grid
from model import MASK_STRATEGIES, ModelConfig, build_mae
from probe import evaluate_encoder

# Settings that name a run when they differ from their defaults ("" = use the value itself, e.g. "block").
RUN_NAME_KEYS = {"preset": "", "decoder_depth": "dd", "mask_strategy": "", "mask_ratio": "mr",
                 "decoder_emb_dim": "dw", "norm_pix_loss": "normpix", "patch_size": "p", "emb_dim": "e",
                 "encoder_depth": "ed", "augment": "aug", "total_epoch": "ep", "batch_size": "bs",
                 "base_learning_rate": "lr", "seed": "s"}
# A model and schedule that pretrains on all of CIFAR-10 on a 2-core CPU in minutes (see the README's results).
PRESETS = {"small": dict(patch_size=4, emb_dim=96, encoder_depth=4, encoder_heads=3, decoder_depth=2,
                         decoder_heads=2, decoder_emb_dim=64, batch_size=256, base_learning_rate=1.5e-3,
                         total_epoch=4, warmup_epoch=2, knn_every=4, probe_epochs=10)}


FIELDS = ["loss", "lr", "seconds", "images_per_s", "compile_seconds", "knn_acc", "probe_acc"]  # metrics.csv


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    run_setup.add_schedule_arguments(p, batch_size=4096, max_device_batch_size=512, base_learning_rate=1.5e-4,
                                     total_epoch=2000, warmup_epoch=200)  # the reference's
    p.add_argument("--mask_ratio", type=utils.OPEN_UNIT, default=None, help="default 0.75")
    p.add_argument("--model_path", type=utils.path_text, default=None,
                   help="checkpoint; default vit-t-mae.pt, or vit-t-<run>.pt")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named model size and schedule; options given explicitly still win")
    # Ablations and model size.
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default=None, help="default random")
    run_setup.add_size_arguments(p, decoder=True)
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised targets (the paper's)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    # Monitoring the representation while it trains.
    p.add_argument("--image_every", type=utils.POSITIVE_INT, default=10,
                   help="log the reconstruction grid every N epochs (and at the first and last); each is ~75 KB")
    p.add_argument("--knn_every", type=utils.NONNEGATIVE_INT, default=0,
                   help="log k-NN test accuracy every K epochs (0: off)")
    p.add_argument("--knn_k", type=utils.POSITIVE_INT, default=20)
    p.add_argument("--knn_pool", choices=["cls", "mean"], default="cls", help="cls token or mean patch feature")
    p.add_argument("--probe_epochs", type=utils.NONNEGATIVE_INT, default=0,
                   help="with --knn_every: also train a linear probe on the frozen features for N epochs")
    run_setup.add_run_arguments(p)
    return p


def parse_args(argv=None):
    """Parse, apply a ``--preset`` under what the user typed, name the run, and check every value."""
    parser = build_parser()
    args, _ = run_setup.parse_with_presets(parser, argv, preset=PRESETS)
    defaults = utils.parser_defaults(parser)
    defaults.update({k: v for k, v in ModelConfig().to_dict().items() if defaults.get(k) is None})
    args.run_name = args.run_name or utils.run_name("mae", args, defaults, RUN_NAME_KEYS)
    args.model_path = args.model_path or ("vit-t-mae.pt" if args.run_name == "mae" else f"vit-t-{args.run_name}.pt")
    run_setup.check_run_arguments(parser, args, {"--model_path": args.model_path})
    return args


def model_config(args, image_size, resumed=None):
    """The architecture: the defaults, under a resumed checkpoint's, under the flags given."""
    base = resumed.to_dict() if resumed else ModelConfig().to_dict()
    config = ModelConfig.from_dict({**base, "image_size": image_size, **run_setup.explicit_sizes(args)})
    run_setup.check_shapes(config, decoder=True)
    try:  # what is left (a mask ratio the strategy cannot make, a model too large) fails here, before any file
        run_setup.check_model_size(build_mae, config, decoder=True)
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    return config


def measure_costs(args, run, config, step, model, optimizer, train_model, scaler, fixed_images, steps_per_epoch):
    """--time_budget's trial (budget.py): a few optimizer steps, the monitors this run logs and a save, timed."""
    device = run.env.device

    def monitor():
        evaluate_encoder(model.encoder, run.train_set, run.test_set, device, args.knn_k, args.knn_pool,
                         args.probe_epochs, run.precision)

    with budget.Trial([model], optimizer, scaler):
        step_seconds = budget.step_seconds(step, run.loader, optimizer, run.accum_steps, train_model, device,
                                           args.time_budget, scaler)
        image = budget.timed(lambda: reconstruction_grid(model, fixed_images), device)
        knn = budget.timed(monitor, device) if args.knn_every and run.env.is_main else 0.0
        save = budget.timed(lambda: ckpt.save_to_memory(ckpt.training_state("mae", model, config, optimizer, 0,
                                                                              args)), device)
    periodic = [(image, args.image_every)] + ([(knn, args.knn_every)] if knn else [])
    logging = budget.time_bookkeeping(FIELDS) if run.env.is_main else 0.0
    return budget.Costs(step_seconds, steps_per_epoch, bookkeeping=logging, periodic=tuple(periodic),
                        final=image + knn + save)


def main(argv=None):
    args = parse_args(argv)
    if args.check_args or not ckpt.resolve_resume(args.resume, args.model_path):  # a new run, before the data loads
        model_config(args, run_setup.peek_data(args)[0])
    if args.check_args:
        return run_setup.checked(args)
    run = run_setup.start_run(args, [args.model_path])
    env, device = run.env, run.env.device
    resumed = ckpt.load_checkpoint(run.resume_path, kind="mae", option="--resume") if run.resume_path else None
    if resumed:  # flags left out continue with the run's own values; typed ones are applied (or refused)
        run_setup.settle_resume(run, resumed, args, ("dataset", "data_dir", "norm_pix_loss"))
    config = model_config(args, args.image_size, resumed and resumed["config"])
    if resumed:
        ckpt.check_resume_model(resumed, config, run.resume_path)
    model = build_mae(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.base_learning_rate * args.batch_size / 256,
                                  betas=(0.9, 0.95), weight_decay=args.weight_decay, fused=device.type == "cuda")
    done, position = ckpt.restore_training_state(resumed, "mae", model, optimizer, run.resume_path) \
        if resumed else (0, None)
    if resumed and run_setup.finished_already(run, done, args.total_epoch):
        return utils.cleanup_distributed()
    train_model = DistributedDataParallel(model) if env.world_size > 1 else model
    eager_step = engine.make_pretrain_step(train_model, device, run.precision, config.patch_size, args.norm_pix_loss)
    step = engine.maybe_compile(eager_step, device, not args.no_compile, args.compile_mode)
    run_setup.make_loader(run, args, args.augment, run_setup.trial_step(
        eager_step, model, run.train_set.images.shape[1:], 1, device))
    scaler = engine.grad_scaler(device, run.precision)
    fixed_images = normalize(run.test_set.images[:16].to(device))  # the reference's 16 validation images
    steps_per_epoch = len(run.loader) // run.accum_steps
    if args.time_budget and not resumed:
        run_setup.plan_budget(run, args, measure_costs(args, run, config, step, model, optimizer, train_model,
                                                       scaler, fixed_images, steps_per_epoch))
    schedule = engine.EpochSchedule(optimizer, args.warmup_epoch, args.total_epoch, args.earlier_lengths)
    book = run_setup.Bookkeeping(run, args, FIELDS, done, steps_per_epoch * run.accum_steps, position)
    for epoch in run_setup.epochs_to_train(done, args):
        run.loader.set_epoch(epoch)
        lr = schedule.set_epoch(epoch)
        model.train()
        first = epoch == done + 1  # this process's first epoch holds the compilation: timed apart
        with engine.EpochTimer(device) as timer:
            result = engine.train_epoch(step, run.loader, optimizer, run.accum_steps, train_model, book.bar,
                                        book.first_epoch_hook(timer) if first else None, scaler,
                                        position if first else None, book.stop.poll,
                                        run_setup.steps_cap(args, epoch))
        if result.stopped_at:  # a stop signal: save where this epoch stands, then exit
            book.save_now(args.model_path, ckpt.training_state("mae", model, config, optimizer, epoch - 1, args,
                                                               result.stopped_at, run_dir=str(run.log_dir)))
            break
        book.check_course(epoch, args, timer, schedule)  # a budgeted run: its plan, by the steps timed so far
        book.bar.set_postfix(epoch=epoch, loss=f"{result.loss:.4f}")
        monitor = {}
        if env.is_main and args.knn_every and (epoch % args.knn_every == 0 or epoch == args.total_epoch):
            monitor = evaluate_encoder(model.encoder, run.train_set, run.test_set, device, args.knn_k,
                                       args.knn_pool, args.probe_epochs, run.precision)
        book.final = (epoch, {"loss": result.loss, **monitor})  # for the HParams view: loss, k-NN, probe
        book.logger.log(epoch, loss=result.loss, lr=lr, seconds=timer.seconds, **monitor,
                        images_per_s=timer.steady_rate(result.images_seen, args.batch_size),
                        compile_seconds=timer.first_step_seconds if first and not args.no_compile else None)
        if env.is_main and (epoch % args.image_every == 0 or epoch in (1, args.total_epoch)):
            book.logger.add_image("mae_image", reconstruction_grid(model, fixed_images), epoch)
        if book.save_due(epoch):
            book.writer.save(args.model_path, ckpt.training_state("mae", model, config, optimizer, epoch, args,
                                                                  run_dir=str(run.log_dir)))
        if book.stopping:
            break
    return book.finish({**vars(args), **config.to_dict()})


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
