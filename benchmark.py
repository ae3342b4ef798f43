"""Training-step throughput of MAE pretraining and fine-tuning, printed as one markdown table.

    python benchmark.py                                        # CUDA: batch 256 ... 4096, bf16, compiled
    python benchmark.py --decoder_depth 8 --mask_strategy block --output bench.csv
    python benchmark.py --device cpu --steps 2 --warmup 1 --batch_sizes 8 --emb_dim 32 --encoder_depth 1
    python benchmark.py --workloads pretrain --batch_sizes 512 --profile profiles    # where does a step go?

A step is what the training scripts run per optimizer step: the forward under ``utils.autocast``, the loss, the
backward and an AdamW step, through ``utils.maybe_compile`` and ``utils.train_epoch``. The data is synthetic and
already on the device, so the numbers measure the model and the optimizer, not the loader.

FLOPs come from ``FlopCounterMode`` on the uncompiled step at a small batch, scaled linearly: every matmul in the
step is linear in the batch size. The count covers matmuls, the patch convolution and attention (forward and
backward); normalisation, activations and the optimizer are left out, as MFU figures usually do.
"""
import argparse
import csv
import gc
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import mae_pretrain
import train_classifier
import utils
from model import MAE_Encoder, MAE_ViT, MASK_STRATEGIES, ViT_Classifier

WORKLOADS = ("pretrain", "finetune")
CUDA_BATCH_SIZES = (256, 512, 1024, 2048, 4096)
CPU_BATCH_SIZES = (8, 16)  # the CPU run is a smoke test: ViT-T/2 does a few images/s there
FLOP_COUNT_BATCH = 2  # enough to count: the count is exactly linear in the batch size
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets; the first name in the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
COLUMNS = ("workload", "batch", "images/s", "TFLOP/s", "% of peak", "peak memory (GiB)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--batch_sizes", nargs="+", type=int, default=None,
                   help=f"default {' '.join(map(str, CUDA_BATCH_SIZES))} on CUDA, "
                        f"{' '.join(map(str, CPU_BATCH_SIZES))} on the CPU")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first; they include the compilation")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile on CUDA")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak for the '%% of peak' column (default: known GPUs' dense bf16 peak)")
    p.add_argument("--output", default=None, help="also write the results: .csv gives CSV, else markdown")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile each row: a Chrome trace and a table of the costliest operators in DIR")
    p.add_argument("--profile_steps", type=int, default=3, help="optimizer steps per profile")
    p.add_argument("--seed", type=int, default=0)
    # The model, with the training scripts' defaults (ViT-T/2 on 32 x 32 images).
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--emb_dim", type=int, default=192)
    p.add_argument("--encoder_depth", type=int, default=12)
    p.add_argument("--encoder_heads", type=int, default=3)
    p.add_argument("--decoder_depth", type=int, default=4)
    p.add_argument("--decoder_heads", type=int, default=3)
    p.add_argument("--decoder_emb_dim", type=int, default=None, help="decoder width (default: the encoder's)")
    p.add_argument("--mask_strategy", choices=MASK_STRATEGIES, default="random")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--num_classes", type=int, default=10)
    return p


# ---------------------------------------------------------------------------------------- models and steps


def build_model(workload, args):
    if workload == "pretrain":
        return MAE_ViT(args.image_size, args.patch_size, args.emb_dim, args.encoder_depth, args.encoder_heads,
                       args.decoder_depth, args.decoder_heads, args.mask_ratio, args.mask_strategy,
                       args.decoder_emb_dim)
    encoder = MAE_Encoder(args.image_size, args.patch_size, args.emb_dim, args.encoder_depth, args.encoder_heads)
    return ViT_Classifier(encoder, args.num_classes)


def make_step(workload, model, device, patch_size):
    """The training scripts' own micro-batch step (reference recipe: no batch regularisers), uncompiled."""
    if workload == "pretrain":
        return mae_pretrain.make_step(model, device, patch_size)
    return train_classifier.make_step(model, device, torch.nn.CrossEntropyLoss())


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
    return train_step_flops(model, make_step(workload, model, device, args.patch_size), images, labels) / len(images)


# ----------------------------------------------------------------------------------------------- timing


def timed_steps(step, model, optimizer, images, labels, steps, device):
    """Seconds for ``steps`` optimizer steps through the scripts' own epoch loop (one device sync, at the end)."""
    with utils.EpochTimer(device) as timer:
        utils.train_epoch(step, [(images, labels)] * steps, optimizer, 1, model)
    return timer.seconds


def measure(workload, batch_size, args, device):
    """(images per second, peak memory in GiB or None) for one workload at one batch size."""
    # A fresh compile per row: dynamo would otherwise recompile the second batch size with a dynamic batch
    # dimension, and time a dynamic-shape graph that training (one fixed batch size) never runs. Dropping the
    # old graphs also frees the previous row's model before this row's peak memory is measured.
    torch.compiler.reset()
    gc.collect()
    model = build_model(workload, args).to(device)
    optimizer = make_optimizer(model, device)
    images, labels = synthetic_batch(batch_size, args, device)
    step = utils.maybe_compile(make_step(workload, model, device, args.patch_size), device, not args.no_compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.warmup:
        timed_steps(step, model, optimizer, images, labels, args.warmup, device)
    seconds = timed_steps(step, model, optimizer, images, labels, args.steps, device)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if args.profile:
        profile_steps(lambda: timed_steps(step, model, optimizer, images, labels, args.profile_steps, device),
                      args.profile_steps, device, Path(args.profile) / f"{workload}_batch{batch_size}")
    return batch_size * args.steps / seconds, memory


def profile_steps(run_steps, steps, device, stem):
    """Profile ``run_steps()`` (``steps`` optimizer steps): ``stem.json``, a Chrome trace (chrome://tracing or
    Perfetto), and ``stem.txt``, the costliest operators. Kernels per step above a few hundred at a small batch
    mean the GPU waits for launches; a gap in the trace's GPU row points at a host sync."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run_steps()
    stem.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(stem.with_suffix(".json")))
    on_gpu = device.type == "cuda"
    kernels = sum(1 for event in profiler.events() if event.device_type == DeviceType.CUDA) if on_gpu else None
    header = (f"{kernels / steps:.0f} GPU kernels per optimizer step\n\n" if on_gpu else "")
    table = profiler.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                          row_limit=25)
    stem.with_suffix(".txt").write_text(header + table + "\n")


def measure_or_oom(workload, batch_size, args, device):
    """``measure``, or None when the batch does not fit in GPU memory (the table says OOM and goes on)."""
    try:
        return measure(workload, batch_size, args, device)
    except torch.cuda.OutOfMemoryError:  # the name older torch 2.x has too
        pass
    # Out of the except block, so the traceback no longer pins the failed step's tensors.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def detect_peak_tflops(device):
    """The dense bf16 peak of a known GPU; None elsewhere (the CPU runs fp32, and has no one peak)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------- results


def result_row(workload, batch_size, measured, flops, peak_tflops):
    row = {"workload": workload, "batch": batch_size, "images_per_s": None, "tflops": None,
           "percent_of_peak": None, "peak_memory_gib": None, "gflop_per_image": flops / 1e9, "status": "OOM"}
    if measured is not None:
        images_per_s, memory = measured
        tflops = images_per_s * flops / 1e12
        row.update(images_per_s=images_per_s, tflops=tflops, peak_memory_gib=memory, status="ok",
                   percent_of_peak=100 * tflops / peak_tflops if peak_tflops else None)
    return row


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        speed = fmt(r["images_per_s"], ".1f") if r["status"] == "ok" else r["status"]
        tflops = None if r["tflops"] is None else float(f"{r['tflops']:.3g}")  # 3 significant digits, any scale
        cells = [r["workload"], str(r["batch"]), speed, fmt(tflops, "g"), fmt(r["percent_of_peak"], ".1f"),
                 fmt(r["peak_memory_gib"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_setup(args, device, flops, peak_tflops):
    if device.type == "cuda":
        precision = "bf16 autocast, " + ("eager" if args.no_compile else "torch.compile")
        where = torch.cuda.get_device_name(device)
    else:
        precision, where = "fp32, eager", "CPU"
    peak = f"{peak_tflops:g} TFLOP/s peak" if peak_tflops else "peak unknown (pass --peak_tflops)"
    lines = [f"{where} ({precision}); {peak}; {args.steps} timed steps after {args.warmup} warm-up steps",
             f"model: ViT patch {args.patch_size}, width {args.emb_dim}, encoder {args.encoder_depth} x "
             f"{args.encoder_heads} heads, decoder {args.decoder_depth} x {args.decoder_heads} heads, "
             f"{args.mask_strategy} mask {args.mask_ratio}"]
    lines += [f"{w}: {flops[w] / 1e9:.3f} GFLOP per image per training step (forward + backward)" for w in flops]
    return "\n".join(f"- {line}" for line in lines)


def write_output(path, rows, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        path.write_text(text + "\n")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    counts = [args.steps, args.profile_steps, *(args.batch_sizes or [])]
    if min(counts) < 1 or args.warmup < 0:
        raise utils.UserError("--steps, --profile_steps and every --batch_sizes must be at least 1, --warmup at "
                              "least 0")
    device = utils.setup_device(args.device).device
    utils.setup_seed(args.seed)
    batch_sizes = args.batch_sizes or (CUDA_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)
    peak_tflops = args.peak_tflops or detect_peak_tflops(device)
    flops = {w: flops_per_image(w, args, device) for w in args.workloads}
    rows = [result_row(w, b, measure_or_oom(w, b, args, device), flops[w], peak_tflops)
            for w in args.workloads for b in batch_sizes]
    text = describe_setup(args, device, flops, peak_tflops) + "\n\n" + markdown_table(rows)
    print(text)
    if args.output:
        write_output(args.output, rows, text)
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
