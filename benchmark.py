"""Training-step throughput of MAE pretraining and fine-tuning, as one markdown table.

    python benchmark.py                                        # CUDA: batch 256 ... 4096, bf16, compiled
    python benchmark.py --compile_modes default max-autotune-no-cudagraphs --batch_sizes 512 1024 4096
    python benchmark.py --decoder_depth 8 --mask_strategy block --output bench.csv
    python benchmark.py --device cpu --preset small            # the chosen CPU path beside fp32 eager
    python benchmark.py --workloads finetune --augments none crop_flip randaug     # the augmentations' cost

A step is the training scripts' own (forward under autocast, loss, backward, AdamW, through engine.train_epoch)
on synthetic data already on the device; an --augments row adds the loader's augmentation. Each row is compared
with fp32 eager at its batch in the same run. FLOPs: FlopCounterMode on the eager step (matmuls, patch convolution,
attention; forward and backward). A batch that does not fit in memory is a row that says OOM.
"""
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

import engine
import run_setup
import utils
from data import AUGMENTATIONS, normalize
from model import MASK_STRATEGIES, ModelConfig, build_classifier, build_mae

BUILD = {"pretrain": build_mae, "finetune": build_classifier}
BATCH_SIZES = {True: [256, 512, 1024, 2048, 4096], False: [8, 16]}  # on CUDA or not: ViT-T/2 is slow on a CPU
# Dense bf16 tensor-core peaks from NVIDIA's data sheets; the first name found in the device's name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
COLUMNS = (("workload", "workload", ""), ("batch", "batch", ""), ("precision", "precision", ""),  # heading, CSV, format
           ("compile", "compile", ""), ("augment", "augment", ""), ("images/s", "images_per_s", ".1f"),
           ("vs fp32 eager", "vs_fp32_eager", ".2f"), ("TFLOP/s", "tflops", ".3g"),
           ("% of peak", "percent_of_peak", ".1f"), ("peak memory (GiB)", "peak_memory_gib", ".2f"))


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--workloads", nargs="+", choices=BUILD, default=list(BUILD))
    p.add_argument("--batch_sizes", nargs="+", type=utils.POSITIVE_INT,
                   help="default: 256 to 4096 on CUDA, else 8 16; with --preset, its pretraining batch")
    p.add_argument("--precisions", nargs="+", choices=engine.PRECISIONS, default=["auto"])
    p.add_argument("--compile_modes", nargs="+", choices=(*engine.COMPILE_MODES, "none"), default=["default"])
    p.add_argument("--augments", nargs="+", choices=sorted(AUGMENTATIONS), default=["none"],
                   help="fine-tuning rows with the loader's augmentation of every batch")
    p.add_argument("--no_baseline", action="store_true", help="skip the fp32 eager rows (and so the ratio)")
    p.add_argument("--steps", type=utils.POSITIVE_INT, default=20, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=utils.NONNEGATIVE_INT, default=5, help="untimed steps first (and the compile)")
    p.add_argument("--threads", type=utils.POSITIVE_INT, help="CPU threads (default: torch's)")
    p.add_argument("--peak_tflops", type=utils.POSITIVE_FLOAT, help="default: a known GPU's dense bf16 peak")
    p.add_argument("--output", type=utils.path_text, help="also write the results: .csv as CSV, else the markdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(run_setup.PRESETS), help="the training scripts' preset model")
    for name in ("image_size", "patch_size", "emb_dim", "encoder_depth", "encoder_heads", "decoder_depth",
                 "decoder_heads", "decoder_emb_dim", "num_classes"):  # decoder_emb_dim: None, the encoder's
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT, default=getattr(ModelConfig, name))
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default=ModelConfig.mask_strategy)
    p.add_argument("--mask_ratio", type=utils.OPEN_UNIT, default=ModelConfig.mask_ratio)
    return p


def parse_args(argv=None):
    p = build_parser()
    preset = run_setup.PRESETS.get(p.parse_known_args(argv)[0].preset)
    if preset:  # its sizes become the defaults; what is typed still wins
        pretrain = preset["mae_pretrain"]
        p.set_defaults(**preset["model"], **{k: v for k, v in pretrain.items() if k.startswith("decoder_")},
                       batch_sizes=[pretrain["batch_size"]])
    args = p.parse_args(argv)
    utils.check_device(p, args.device)
    return args


def make_step(workload, model, device, precision, patch_size, mode="none"):
    """The training scripts' own step (reference recipe, no batch regularisers), compiled as they compile it."""
    if workload == "pretrain":
        step = engine.make_pretrain_step(model, device, precision, patch_size)
        return engine.maybe_compile(step, device, mode != "none", mode)
    return engine.make_classifier_step(model, device, precision, torch.nn.CrossEntropyLoss(), None,
                                       mode != "none", mode)


def cpu_attention_formulas():
    """FlopCounterMode counts the CUDA attention kernels but not the CPU one that timm's attention runs there: the
    same matmuls for it. Forward q k^T and softmax(scores) v; the backward recomputes q k^T, then dP, dV, dQ, dK."""
    name, aten = "_scaled_dot_product_flash_attention_for_cpu", torch.ops.aten
    flops = lambda q, k, v, scores, values: 2 * q[0] * q[1] * q[2] * k[-2] * (scores * q[-1] + values * v[-1])
    formulas = {name: lambda q, k, v, *_, **__: flops(q, k, v, 1, 1),
                f"{name}_backward": lambda grad_out, q, k, v, *_, **__: flops(q, k, v, 3, 2)}
    return {getattr(aten, n): f for n, f in formulas.items() if hasattr(aten, n)}


def flops_per_image(workload, config, device, batch_size=2):
    model = BUILD[workload](config).to(device)  # eager: a compiled graph hides its aten ops from the counter
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        step = make_step(workload, model, device, "fp32", config.patch_size)
        step(images, torch.zeros(batch_size, dtype=torch.long, device=device))[0].backward()
    return counter.get_total_flops() / batch_size


def measure(workload, batch_size, precision, mode, augment, args, config, device):
    """(images per second, peak GiB on CUDA else None) of one row."""
    # A fresh compile per row: dynamo would recompile the next batch size as a dynamic shape, which training (one
    # fixed batch) never runs. Dropping the old graphs (and a failed row's tensors) frees memory before measuring.
    torch.compiler.reset()
    gc.collect()
    model = BUILD[workload](config).to(device)
    # A small lr: random data must not drive the loss to NaN, on which train_epoch stops.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    step = make_step(workload, model, device, precision, config.patch_size, mode)
    scaler = engine.grad_scaler(device, precision)
    images = torch.randint(0, 256, (batch_size, 3, config.image_size, config.image_size), dtype=torch.uint8,
                           device=device)
    augment, labels = AUGMENTATIONS[augment], torch.randint(0, config.num_classes, (batch_size,), device=device)
    if augment:  # each step augments the uint8 batch as the loader does, so that the cost lands in the row
        step = lambda images, labels, train=step: train(normalize(augment(images)), labels)
    batch = (images if augment else normalize(images), labels)
    run = lambda steps: engine.train_epoch(step, [batch] * steps, optimizer, 1, model, scaler=scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.warmup:
        run(args.warmup)
    with engine.EpochTimer(device) as timer:  # one device sync, at the end
        run(args.steps)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return batch_size * args.steps / timer.seconds, memory


def result_row(workload, batch_size, path, args, config, device, flops, peak):
    """One row: its measurement, or OOM when the batch does not fit in memory (and the table goes on)."""
    try:
        speed, memory = measure(workload, batch_size, *path, args, config, device)
    except RuntimeError as error:  # a GPU's OutOfMemoryError, or the CPU allocator's refusal
        if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        speed = memory = None
    tflops = speed and speed * flops / 1e12
    return dict(workload=workload, batch=batch_size, precision=path[0], compile=path[1], augment=path[2],
                images_per_s=speed, vs_fp32_eager=None, tflops=tflops,
                percent_of_peak=tflops and peak and 100 * tflops / peak, peak_memory_gib=memory,
                gflop_per_image=flops / 1e9, status="OOM" if speed is None else "ok")


def detect_peak_tflops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""  # the CPU has no one peak
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def paths_for(workload, args, device):
    """(precision, compile mode, augment) of one workload's rows, the fp32 eager baseline first, each once."""
    chosen = [(engine.resolve_precision(p, device), "none" if engine.why_eager(device) else m)
              for p in args.precisions for m in args.compile_modes]
    paths = [(p, m, "none") for p, m in ([] if args.no_baseline else [("fp32", "none")]) + chosen]
    augments = [a for a in args.augments if a != "none"] if workload == "finetune" else []
    return list(dict.fromkeys(paths + [(p, m, a) for p, m in chosen for a in augments]))


def markdown(rows, device, flops, peak):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    about = f"{device.type} ({where}), torch {torch.__version__}, " + (
        f"peak {peak:g} TFLOP/s" if peak else "peak unknown (give --peak_tflops)")
    gflops = ", ".join(f"{w} {f / 1e9:.3f}" for w, f in flops.items())
    cell = lambda r, key, spec: (r["status"] if key == "images_per_s" and r["status"] != "ok" else
                                 "-" if r[key] is None else format(r[key], spec))
    lines = [[head for head, _, _ in COLUMNS], ["---"] * len(COLUMNS),
             *([cell(r, key, spec) for _, key, spec in COLUMNS] for r in rows)]
    return f"{about}; GFLOP per image and step: {gflops}\n\n" + "\n".join(f"| {' | '.join(c)} |" for c in lines)


def main(argv=None):
    args = parse_args(argv)
    config = ModelConfig.from_dict(vars(args))
    for workload in args.workloads:  # shapes that cannot make a model fail here, before any row
        run_setup.check_model(BUILD[workload], config, decoder=workload == "pretrain")
    device = utils.setup_device(args.device, args.threads).device
    utils.setup_seed(args.seed)
    peak = args.peak_tflops or detect_peak_tflops(device)
    flops = {w: flops_per_image(w, config, device) for w in args.workloads}
    rows = [result_row(w, b, path, args, config, device, flops[w], peak) for w in args.workloads
            for b in args.batch_sizes or BATCH_SIZES[device.type == "cuda"] for path in paths_for(w, args, device)]
    base = {(r["workload"], r["batch"]): r["images_per_s"] for r in rows
            if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")}
    for r in rows:  # the speed over fp32 eager at the same workload and batch, without augmentation
        fp32_eager = base.get((r["workload"], r["batch"]))
        r["vs_fp32_eager"] = r["images_per_s"] / fp32_eager if fp32_eager and r["images_per_s"] else None
    print(text := markdown(rows, device, flops, peak))
    if args.output and args.output.lower().endswith(".csv"):
        utils.write_csv(args.output, list(rows[0]), rows)
    elif args.output:
        utils.write_text(args.output, text + "\n")
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
