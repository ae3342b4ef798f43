"""Training-step throughput of MAE pretraining and fine-tuning, printed as one markdown table.

    python benchmark.py                                        # CUDA: batch 256 ... 4096, bf16, compiled
    python benchmark.py --compile_modes default max-autotune-no-cudagraphs --batch_sizes 512 1024 4096
    python benchmark.py --decoder_depth 8 --mask_strategy block --output bench.csv
    python benchmark.py --device cpu --preset small            # the chosen CPU path beside fp32 eager
    python benchmark.py --workloads finetune --augments none crop_flip randaug     # the augmentations' cost
    python benchmark.py --workloads pretrain --batch_sizes 512 --profile profiles    # where does a step go?

A step is what the training scripts run per optimizer step: the forward under ``engine.autocast``, the loss, the
backward and an AdamW step, through ``engine.maybe_compile`` and ``engine.train_epoch``. The data is synthetic and
already on the device, so the numbers measure the model and the optimizer, not the loader; an ``--augments`` row
adds the loader's augmentation of each batch. Every row is also compared with fp32 eager at the same batch
(``vs fp32 eager``), measured in the same run.

FLOPs come from ``FlopCounterMode`` on the uncompiled step at a small batch, scaled linearly: every matmul in the
step is linear in the batch size. The count covers matmuls, the patch convolution and attention (forward and
backward); normalisation, activations and the optimizer are left out, as MFU figures usually do.
"""
import gc
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import engine
import run_setup
import utils
from data import AUGMENTATIONS, normalize, physical_memory
from model import MASK_STRATEGIES, ModelConfig, build_classifier, build_mae

WORKLOADS = ("pretrain", "finetune")
CUDA_BATCH_SIZES = (256, 512, 1024, 2048, 4096)
CPU_BATCH_SIZES = (8, 16)  # the CPU run is a smoke test: ViT-T/2 does a few images/s there
FLOP_COUNT_BATCH = 2  # enough to count: the count is exactly linear in the batch size
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets; the first name in the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
COLUMNS = ("workload", "batch", "precision", "compile", "augment", "images/s", "vs fp32 eager", "TFLOP/s",
           "% of peak", "peak memory (GiB)")
# The CPU-scale model of the training scripts' --preset small.
PRESETS = {"small": dict(patch_size=4, emb_dim=96, encoder_depth=4, encoder_heads=3, decoder_depth=2,
                         decoder_heads=2, decoder_emb_dim=64, batch_sizes=[256])}


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--batch_sizes", nargs="+", type=utils.POSITIVE_INT, default=None,
                   help=f"default {' '.join(map(str, CUDA_BATCH_SIZES))} on CUDA, "
                        f"{' '.join(map(str, CPU_BATCH_SIZES))} on the CPU")
    p.add_argument("--precisions", nargs="+", choices=engine.PRECISIONS, default=["auto"])
    p.add_argument("--compile_modes", nargs="+", choices=(*engine.COMPILE_MODES, "none"), default=["default"],
                   help="'none': eager")
    p.add_argument("--augments", nargs="+", choices=sorted(AUGMENTATIONS), default=["none"],
                   help="fine-tuning rows with the loader's augmentation of every batch")
    p.add_argument("--no_baseline", action="store_true", help="skip the fp32 eager rows the ratio column needs")
    p.add_argument("--steps", type=utils.POSITIVE_INT, default=20, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=utils.NONNEGATIVE_INT, default=5,
                   help="untimed steps first; they include the compilation")
    p.add_argument("--threads", type=utils.POSITIVE_INT, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--peak_tflops", type=utils.POSITIVE_FLOAT, default=None,
                   help="the device's peak for the '%% of peak' column (default: known GPUs' dense bf16 peak)")
    p.add_argument("--output", type=utils.path_text, default=None,
                   help="also write the results: .csv gives CSV, else markdown")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile each row: a Chrome trace and a table of the costliest operators in DIR")
    p.add_argument("--profile_steps", type=utils.POSITIVE_INT, default=3, help="optimizer steps per profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the training scripts' preset model")
    # The model, with the training scripts' defaults (ViT-T/2 on 32 x 32 images).
    defaults = ModelConfig()
    for name in ("image_size", "patch_size", "emb_dim", "encoder_depth", "encoder_heads", "decoder_depth",
                 "decoder_heads", "num_classes"):
        p.add_argument(f"--{name}", type=utils.POSITIVE_INT, default=getattr(defaults, name))
    p.add_argument("--decoder_emb_dim", type=utils.POSITIVE_INT, default=None,
                   help="decoder width (default: the encoder's)")
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default="random")
    p.add_argument("--mask_ratio", type=utils.OPEN_UNIT, default=0.75)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args, _ = run_setup.parse_with_presets(parser, argv, preset=PRESETS)
    utils.check_device(parser, args.device)
    if args.output:
        utils.check_output_file(parser, "--output", args.output)
    if args.profile:
        utils.check_writable_folder(parser, "--profile", args.profile)
    try:  # impossible shapes (heads, ratio and strategy) and absurd sizes fail here, before any row
        for workload in args.workloads:
            pretrain = workload == "pretrain"
            run_setup.check_model_size(build_mae if pretrain else build_classifier, config_of(args), pretrain)
    except ValueError as error:
        parser.error(str(error))
    check_batches_fit(parser, args)
    return args


def check_batches_fit(parser, args):
    """A batch whose input images alone (float32) would not fit in this machine's memory is refused by its flag."""
    memory, largest = physical_memory(), max(args.batch_sizes or CUDA_BATCH_SIZES)
    needed = largest * 3 * args.image_size ** 2 * 4
    if memory and needed > memory:
        parser.error(f"argument --batch_sizes: {largest} images of {args.image_size}x{args.image_size} need "
                     f"{needed / 2 ** 30:,.0f} GiB as float32 input alone, more than this machine's "
                     f"{memory / 2 ** 30:,.0f} GiB")


# ---------------------------------------------------------------------------------------- models and steps


def config_of(args):
    return ModelConfig.from_dict(vars(args))


def build_model(workload, args):
    return build_mae(config_of(args)) if workload == "pretrain" else build_classifier(config_of(args))


def make_step(workload, model, device, precision, patch_size):
    """The training scripts' own micro-batch step (reference recipe: no batch regularisers), uncompiled."""
    if workload == "pretrain":
        return engine.make_pretrain_step(model, device, precision, patch_size)
    return engine.make_classifier_step(model, device, precision, torch.nn.CrossEntropyLoss())


def synthetic_batch(batch_size, args, device):
    images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    return images, torch.randint(0, args.num_classes, (batch_size,), device=device)


def make_optimizer(model, device):
    # A small lr: random data must not drive the loss to NaN, which train_epoch would stop on.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")


# ------------------------------------------------------------------------------------------------ FLOPs


def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    """Forward attention: scores = q k^T and out = softmax(scores) v, two batched matmuls."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (dim + value_shape[-1])


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    """Backward: recompute q k^T, then dP, dV, dQ and dK: five matmuls, as FlopCounterMode counts the CUDA kernels."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (3 * dim + 2 * value_shape[-1])


def cpu_attention_formulas():
    """FlopCounterMode knows the CUDA fused-attention kernels but not the CPU flash kernel that timm's
    ``F.scaled_dot_product_attention`` runs on the CPU, so a CPU count would silently drop attention. These give
    that kernel the same matmul counts (empty where this torch has no such op)."""
    aten = torch.ops.aten
    formulas = {"_scaled_dot_product_flash_attention_for_cpu": attention_flops,
                "_scaled_dot_product_flash_attention_for_cpu_backward": attention_backward_flops}
    return {getattr(aten, name): formula for name, formula in formulas.items() if hasattr(aten, name)}


def train_step_flops(model, step, images, labels):
    """FLOPs of one forward + backward of ``step`` on this batch; leaves ``model``'s gradients cleared.

    ``step`` must be uncompiled: FlopCounterMode sees the aten ops of eager mode, not a compiled graph's kernels.
    Attention backward counts the recomputed scores (five matmuls, not four), as the fused kernels really do.
    """
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        loss = step(images, labels)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def flops_per_image(workload, args, device):
    model = build_model(workload, args).to(device)
    images, labels = synthetic_batch(FLOP_COUNT_BATCH, args, device)
    step = make_step(workload, model, device, "fp32", args.patch_size)
    return train_step_flops(model, step, images, labels) / len(images)


# ----------------------------------------------------------------------------------------------- timing


def timed_steps(step, model, optimizer, batches, device, scaler=None):
    """Seconds for one optimizer step per batch through the scripts' own epoch loop (one device sync, at the end)."""
    with engine.EpochTimer(device) as timer:
        engine.train_epoch(step, batches, optimizer, 1, model, scaler=scaler)
    return timer.seconds


class AugmentedBatches:
    """``steps`` fresh augmentations of one uint8 batch, made as the loader makes them: their cost lands in the row."""

    def __init__(self, augment, batch_size, steps, args, device):
        self.augment, self.steps = AUGMENTATIONS[augment], steps
        self.images = torch.randint(0, 256, (batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                    device=device)
        self.labels = torch.randint(0, args.num_classes, (batch_size,), device=device)

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield normalize(self.augment(self.images)), self.labels


def measure(workload, batch_size, path, args, device):
    """(images per second, peak memory in GiB or None) for one workload at one batch size on one path.

    ``path`` is (precision, compile mode or "none", augmentation).
    """
    precision, mode, augment = path
    # A fresh compile per row: dynamo would otherwise recompile the second batch size with a dynamic batch
    # dimension, and time a dynamic-shape graph that training (one fixed batch size) never runs. Dropping the
    # old graphs also frees the previous row's model before this row's peak memory is measured.
    torch.compiler.reset()
    gc.collect()
    model = build_model(workload, args).to(device)
    optimizer = make_optimizer(model, device)
    scaler = engine.grad_scaler(device, precision)
    step = engine.maybe_compile(make_step(workload, model, device, precision, args.patch_size), device,
                                mode != "none", mode)
    fixed = synthetic_batch(batch_size, args, device)
    batches = (lambda n: [fixed] * n) if augment == "none" else (
        lambda n: AugmentedBatches(augment, batch_size, n, args, device))
    run_steps = lambda n: timed_steps(step, model, optimizer, batches(n), device, scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.warmup:
        run_steps(args.warmup)
    seconds = run_steps(args.steps)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if args.profile:
        name = f"{workload}_batch{batch_size}_{precision}_{mode}" + (f"_{augment}" if augment != "none" else "")
        profile_steps(lambda: run_steps(args.profile_steps), args.profile_steps, device, Path(args.profile) / name)
    return batch_size * args.steps / seconds, memory


def profile_steps(run_steps, steps, device, stem):
    """Profile ``run_steps()`` (``steps`` optimizer steps): ``stem.json``, a Chrome trace (chrome://tracing or
    Perfetto), and ``stem.txt``, the costliest operators. Kernels per step above a few hundred at a small batch
    mean the GPU waits for launches; a gap in the trace's GPU row points at a host sync."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run_steps()
    utils.atomic_write(stem.with_suffix(".json"), lambda tmp: profiler.export_chrome_trace(str(tmp)), "trace")
    on_gpu = device.type == "cuda"
    kernels = sum(1 for event in profiler.events() if event.device_type == DeviceType.CUDA) if on_gpu else None
    header = (f"{kernels / steps:.0f} GPU kernels per optimizer step\n\n" if on_gpu else "")
    table = profiler.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                          row_limit=25)
    utils.write_text(stem.with_suffix(".txt"), header + table + "\n")


def measure_or_oom(workload, batch_size, path, args, device):
    """``measure``, or None when the batch does not fit in GPU memory (the table says OOM and goes on)."""
    try:
        return measure(workload, batch_size, path, args, device)
    except torch.cuda.OutOfMemoryError:  # the name older torch 2.x has too
        pass
    # Out of the except block, so the traceback no longer pins the failed step's tensors.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def detect_peak_tflops(device):
    """The dense bf16 peak of a known GPU; None elsewhere (the CPU has no one peak)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def measured_matmul_tflops(device, precision, size=None, repeats=10):
    """What a large square matmul really reaches here: spec sheets overstate the peak a step can get."""
    size = size or (8192 if device.type == "cuda" else 1024)
    dtype = engine.AUTOCAST_DTYPES.get(precision, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    (a @ b).sum()  # warm-up (and cuBLAS's heuristics)
    with engine.EpochTimer(device) as timer:
        for _ in range(repeats):
            a @ b
    return 2 * size ** 3 * repeats / timer.seconds / 1e12


# ---------------------------------------------------------------------------------------------- results


def result_row(workload, batch_size, path, measured, flops, peak_tflops):
    precision, mode, augment = path
    row = {"workload": workload, "batch": batch_size, "precision": precision, "compile": mode, "augment": augment,
           "images_per_s": None, "vs_fp32_eager": None, "tflops": None, "percent_of_peak": None,
           "peak_memory_gib": None, "gflop_per_image": flops / 1e9, "status": "OOM"}
    if measured is not None:
        images_per_s, memory = measured
        tflops = images_per_s * flops / 1e12
        row.update(images_per_s=images_per_s, tflops=tflops, peak_memory_gib=memory, status="ok",
                   percent_of_peak=100 * tflops / peak_tflops if peak_tflops else None)
    return row


def add_ratios(rows):
    """Each row's speed over the fp32 eager row of the same workload and batch (no augmentation)."""
    baseline = {(r["workload"], r["batch"]): r["images_per_s"] for r in rows
                if (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none") and r["images_per_s"]}
    for r in rows:
        base = baseline.get((r["workload"], r["batch"]))
        r["vs_fp32_eager"] = r["images_per_s"] / base if base and r["images_per_s"] else None
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        speed = fmt(r["images_per_s"], ".1f") if r["status"] == "ok" else r["status"]
        tflops = None if r["tflops"] is None else float(f"{r['tflops']:.3g}")  # 3 significant digits, any scale
        cells = [r["workload"], str(r["batch"]), r["precision"], r["compile"], r["augment"], speed,
                 fmt(r["vs_fp32_eager"], ".2f"), fmt(tflops, "g"), fmt(r["percent_of_peak"], ".1f"),
                 fmt(r["peak_memory_gib"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_setup(args, device, flops, peak_tflops, matmul_tflops):
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else "Apple MPS" if device.type == "mps"
             else f"CPU, {torch.get_num_threads()} threads")
    peak = f"{peak_tflops:g} TFLOP/s spec peak" if peak_tflops else "spec peak unknown (pass --peak_tflops)"
    lines = [f"{where}; torch {torch.__version__}; {peak}; a large matmul measures "
             + ", ".join(f"{v:.3g} TFLOP/s in {k}" for k, v in matmul_tflops.items()),
             f"{args.steps} timed steps after {args.warmup} warm-up steps (the warm-up includes compilation)",
             f"model: ViT patch {args.patch_size}, width {args.emb_dim}, encoder {args.encoder_depth} x "
             f"{args.encoder_heads} heads, decoder {args.decoder_depth} x {args.decoder_heads} heads"
             f"{f' of width {args.decoder_emb_dim}' if args.decoder_emb_dim else ''}, "
             f"{args.mask_strategy} mask {args.mask_ratio}"]
    lines += [f"{w}: {flops[w] / 1e9:.3f} GFLOP per image per training step (forward + backward)" for w in flops]
    return "\n".join(f"- {line}" for line in lines)


def write_output(path, rows, text):
    if Path(path).suffix.lower() != ".csv":
        utils.write_text(path, text + "\n")
    else:
        utils.write_csv(path, list(rows[0]), rows)


def paths_for(workload, args, device):
    """(precision, compile mode, augmentation) rows for one workload: the fp32 eager baseline first."""
    chosen = [(engine.resolve_precision(p, device), m if engine.compiler_available(device) else "none")
              for p in args.precisions for m in args.compile_modes]
    baseline = [] if args.no_baseline else [("fp32", "none")]
    augments = args.augments if workload == "finetune" else ["none"]
    paths = [(p, m, "none") for p, m in baseline + chosen]
    paths += [(p, m, a) for p, m in chosen for a in augments if a != "none"]
    return list(dict.fromkeys(paths))  # a path asked for twice (or equal to the baseline) runs once


def main(argv=None):
    args = parse_args(argv)
    device = utils.setup_device(args.device, args.threads).device
    utils.setup_seed(args.seed)
    batch_sizes = args.batch_sizes or (CUDA_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)
    peak_tflops = args.peak_tflops or detect_peak_tflops(device)
    precisions = {engine.resolve_precision(p, device) for p in args.precisions}
    matmul = {p: measured_matmul_tflops(device, p) for p in sorted(precisions | {"fp32"})}
    flops = {w: flops_per_image(w, args, device) for w in args.workloads}
    rows = [result_row(w, b, path, measure_or_oom(w, b, path, args, device), flops[w], peak_tflops)
            for w in args.workloads for b in batch_sizes for path in paths_for(w, args, device)]
    text = describe_setup(args, device, flops, peak_tflops, matmul) + "\n\n" + markdown_table(add_ratios(rows))
    print(text)
    if args.output:
        write_output(args.output, rows, text)
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
