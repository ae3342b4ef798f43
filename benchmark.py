"""Training-step throughput of MAE pretraining and fine-tuning as a markdown table, each row beside fp32 eager at its
batch. A step is the training scripts' own on synthetic data on the device (an --augments row adds the loader's
augmentation). A batch that does not fit is an OOM row. CPU threads: OMP_NUM_THREADS.

    python benchmark.py                                        # CUDA: batch 256 ... 4096, bf16, compiled
    python benchmark.py --device cpu --preset small            # the chosen CPU path beside fp32 eager
    python benchmark.py --workloads finetune --augments none crop_flip randaug --output bench.csv
"""
import gc

import torch

import bookkeeping
import devices
import engine
import run_setup
import utils
from data import AUGMENTATIONS, normalize
from model import MASK_STRATEGIES, ModelConfig, build_classifier, build_mae

BUILD = {"pretrain": build_mae, "finetune": build_classifier}
BATCH_SIZES = {True: [256, 512, 1024, 2048, 4096], False: [8, 16]}  # on CUDA or not: ViT-T/2 is slow on a CPU
COLUMNS = (("workload", "workload", ""), ("batch", "batch", ""), ("precision", "precision", ""),  # heading, CSV, format
           ("compile", "compile", ""), ("augment", "augment", ""), ("images/s", "images_per_s", ".1f"),
           ("vs fp32 eager", "vs_fp32_eager", ".2f"), ("peak memory (GiB)", "peak_memory_gib", ".2f"))


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--workloads", nargs="+", choices=BUILD, default=list(BUILD))
    p.add_argument("--batch_sizes", nargs="+", type=utils.POSITIVE_INT, help="default: 256 to 4096 on CUDA, else 8 16")
    p.add_argument("--precisions", nargs="+", choices=devices.PRECISIONS, default=["auto"])
    p.add_argument("--compile_modes", nargs="+", choices=("default", "none"), default=["default"])
    p.add_argument("--augments", nargs="+", choices=sorted(AUGMENTATIONS), default=["none"], help="fine-tuning's")
    p.add_argument("--no_baseline", action="store_true", help="skip the fp32 eager rows (and so the ratio)")
    p.add_argument("--steps", type=utils.POSITIVE_INT, default=20, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=utils.NONNEGATIVE_INT, default=5, help="untimed steps first (and the compile)")
    p.add_argument("--output", type=utils.path_text, help="also write the rows as CSV")
    p.add_argument("--preset", choices=sorted(run_setup.PRESETS), help="the training scripts' preset model")
    for name in ("image_size", *run_setup.SIZE_FLAGS, *run_setup.DECODER_FLAGS, "num_classes"):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT, default=getattr(ModelConfig, name))
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default=ModelConfig.mask_strategy)
    p.add_argument("--mask_ratio", type=utils.OPEN_UNIT, default=ModelConfig.mask_ratio)
    return p


def parse_args(argv=None):
    p = build_parser()
    if preset := run_setup.PRESETS.get(p.parse_known_args(argv)[0].preset):  # its sizes: defaults, typed ones win
        pretrain = preset["mae_pretrain"]
        p.set_defaults(**preset["model"], **{k: v for k, v in pretrain.items() if k.startswith("decoder_")},
                       batch_sizes=[pretrain["batch_size"]])
    args = p.parse_args(argv)
    devices.check_device(p, args.device)
    return args


def measure(workload, batch_size, precision, mode, augment, args, config, device):  # (images/s, peak CUDA GiB or None)
    # A fresh compile per row: dynamo would recompile the next batch size as a dynamic shape, which training (one
    # fixed batch) never runs. Dropping the old graphs (and a failed row's tensors) frees memory before measuring.
    torch.compiler.reset()
    gc.collect()
    model = BUILD[workload](config).to(device)
    # A small lr: random data must not drive the loss to NaN, on which train_epoch stops.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if workload == "pretrain":  # the training scripts' own steps (no batch regularisers), compiled as they do it
        step = engine.make_pretrain_step(model, device, precision, config.patch_size, compile=mode != "none")
    else:
        step = engine.make_classifier_step(model, device, precision, torch.nn.CrossEntropyLoss(), None, mode != "none")
    images = torch.randint(0, 256, (batch_size, 3, config.image_size, config.image_size), dtype=torch.uint8,
                           device=device)
    augment, labels = AUGMENTATIONS[augment], torch.randint(0, config.num_classes, (batch_size,), device=device)
    if augment:  # each step augments the uint8 batch as the loader does, so that the cost lands in the row
        step = lambda images, labels, train=step: train(normalize(augment(images)), labels)
    batch, scaler = (images if augment else normalize(images), labels), devices.grad_scaler(device, precision)
    run = lambda steps: engine.train_epoch(step, [batch] * steps, optimizer, 1, model, scaler=scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.warmup:
        run(args.warmup)
    with bookkeeping.EpochTimer(device) as timer:  # one device sync, at the end
        run(args.steps)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return batch_size * args.steps / timer.seconds, memory


def result_row(workload, batch_size, path, args, config, device):  # measured, or OOM if the batch does not fit memory
    try:
        speed, memory = measure(workload, batch_size, *path, args, config, device)
    except RuntimeError as error:  # a GPU's OutOfMemoryError, or the CPU allocator's refusal
        if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        speed = memory = None
    return dict(workload=workload, batch=batch_size, precision=path[0], compile=path[1], augment=path[2],
                images_per_s=speed, vs_fp32_eager=None, peak_memory_gib=memory, status="OOM" if speed is None else "ok")


def paths_for(workload, args, device):  # (precision, compile, augment) of its rows, fp32 eager first, each once
    chosen = [(devices.resolve_precision(p, device), "none" if devices.why_eager(device) else m)
              for p in args.precisions for m in args.compile_modes]
    augments = [a for a in args.augments if a != "none"] if workload == "finetune" else []
    return list(dict.fromkeys([(p, m, "none") for p, m in [("fp32", "none")] * (not args.no_baseline) + chosen] +
                              [(p, m, a) for p, m in chosen for a in augments]))


def main(argv=None):
    args = parse_args(argv)
    config = ModelConfig.from_dict(vars(args))
    for workload in args.workloads:  # shapes that cannot make a model fail here, before any row
        run_setup.check_model(BUILD[workload], config, decoder=workload == "pretrain")
    device = devices.setup_device(args.device).device
    torch.manual_seed(0)
    rows = [result_row(w, b, path, args, config, device) for w in args.workloads
            for b in args.batch_sizes or BATCH_SIZES[device.type == "cuda"] for path in paths_for(w, args, device)]
    base = {(r["workload"], r["batch"]): r["images_per_s"] for r in rows
            if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")}
    for r in rows:  # the speed over fp32 eager at the same workload and batch, without augmentation
        fp32_eager = base.get((r["workload"], r["batch"]))
        r["vs_fp32_eager"] = r["images_per_s"] / fp32_eager if fp32_eager and r["images_per_s"] else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    cell = lambda r, key, spec: (r["status"] if key == "images_per_s" and r["status"] != "ok" else
                                 "-" if r[key] is None else format(r[key], spec))
    print(f"{device.type} ({where}), torch {torch.__version__}\n\n" + utils.markdown(
        [head for head, _, _ in COLUMNS], [[cell(r, key, spec) for _, key, spec in COLUMNS] for r in rows]), end="")
    if args.output:
        utils.write_csv(args.output, list(rows[0]), rows)
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
