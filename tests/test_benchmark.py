"""benchmark.py: the table it prints, its CSV / markdown output, and its FLOP count against a hand count."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import benchmark

# A tiny ViT: 32 x 32 images in 4 x 4 patches (64 patches), width 64, 2 encoder layers, 1 decoder layer.
TINY = ["--image_size", "32", "--patch_size", "4", "--emb_dim", "64", "--encoder_depth", "2",
        "--encoder_heads", "2", "--decoder_depth", "1", "--decoder_heads", "2"]
# fp32 eager only: the chosen path equals the baseline, so one row per workload and batch (no compile time).
CPU_RUN = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch_sizes", "2", "4", "--precisions", "fp32",
           "--compile_modes", "none", *TINY]


def table_rows(text):
    """The data rows of the markdown table in ``text``, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(benchmark.COLUMNS)
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_cpu_run_prints_one_row_per_workload_and_batch_size(capsys):
    returned = benchmark.main(CPU_RUN)
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], int(r[1])) for r in rows] == [("pretrain", 2), ("pretrain", 4), ("finetune", 2), ("finetune", 4)]
    for _workload, _, precision, compile_mode, augment, images_per_s, ratio, tflops, percent, memory in rows:
        assert (precision, compile_mode, augment, ratio) == ("fp32", "none", "none", "1.00")
        assert float(images_per_s) > 0 and float(tflops) > 0
        assert percent == "-" and memory == "-"  # no known peak and no CUDA memory stats on the CPU
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in returned)


def test_peak_column_and_csv_output(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    benchmark.main([*CPU_RUN, "--batch_sizes", "2", "--workloads", "finetune", "--peak_tflops", "0.5",
                    "--output", str(out)])
    printed = table_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(printed) == len(written) == 1
    row = written[0]
    assert row["workload"] == "finetune" and row["batch"] == "2"
    tflops = float(row["images_per_s"]) * float(row["gflop_per_image"]) / 1e3
    assert float(row["tflops"]) == pytest.approx(tflops)
    assert float(row["percent_of_peak"]) == pytest.approx(100 * tflops / 0.5)
    assert printed[0][4] != "-"


def test_markdown_output_holds_the_printed_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    benchmark.main([*CPU_RUN, "--batch_sizes", "2", "--workloads", "pretrain", "--output", str(out)])
    assert out.read_text().strip() == capsys.readouterr().out.strip()


def test_profile_writes_a_trace_and_a_table_per_row(tmp_path, capsys):
    benchmark.main([*CPU_RUN, "--workloads", "pretrain", "--profile", str(tmp_path / "prof"), "--profile_steps", "1"])
    assert sorted(f.name for f in (tmp_path / "prof").iterdir()) == [
        "pretrain_batch2_fp32_none.json", "pretrain_batch2_fp32_none.txt", "pretrain_batch4_fp32_none.json",
        "pretrain_batch4_fp32_none.txt"]
    table = (tmp_path / "prof" / "pretrain_batch4_fp32_none.txt").read_text()
    assert "Self CPU" in table and "aten::" in table  # the operators of the step, with their times
    trace = json.loads((tmp_path / "prof" / "pretrain_batch4_fp32_none.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


@pytest.mark.parametrize("extra", [["--steps", "0"], ["--batch_sizes", "-4"], ["--mask_ratio", "1"],
                                   ["--warmup", "-1"], ["--device", "gpu"], ["--emb_dim", "33"]])
def test_bad_arguments_exit_2_naming_the_flag(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([*CPU_RUN, *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in error and (extra[0] in error or "divisible" in error)


def test_augmentation_rows_and_the_ratio_to_fp32_eager(capsys):
    rows = benchmark.main([*CPU_RUN, "--batch_sizes", "4", "--workloads", "finetune", "--augments", "none",
                           "crop_flip", "randaug"])
    assert [(r["augment"], r["status"]) for r in rows] == [("none", "ok"), ("crop_flip", "ok"), ("randaug", "ok")]
    assert rows[0]["vs_fp32_eager"] == 1.0 and all(r["vs_fp32_eager"] > 0 for r in rows)
    assert "a large matmul measures" in capsys.readouterr().out


@pytest.mark.parametrize("device_name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                               ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_lookup_by_device_name(monkeypatch, device_name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert benchmark.detect_peak_tflops(torch.device("cuda")) == peak
    assert benchmark.detect_peak_tflops(torch.device("cpu")) is None


# --------------------------------------------------------------------------------------------------- FLOPs


def tiny_args(*extra):
    return benchmark.build_parser().parse_args([*TINY, *extra])


def step_flops(workload, batch_size, args):
    cpu = torch.device("cpu")
    model = benchmark.build_model(workload, args)
    images, labels = benchmark.synthetic_batch(batch_size, args, cpu)
    step = benchmark.make_step(workload, model, cpu, "fp32", args.patch_size)
    return benchmark.train_step_flops(model, step, images, labels)


@pytest.mark.parametrize("workload", benchmark.WORKLOADS)
def test_flops_scale_linearly_with_batch_size(workload):
    args = tiny_args()
    assert step_flops(workload, 6, args) == 3 * step_flops(workload, 2, args)


def test_flops_do_not_depend_on_the_mask_strategy():
    # Every strategy keeps the same number of patches, so the encoder does the same work.
    counts = {s: step_flops("pretrain", 2, tiny_args("--mask_strategy", s))
              for s in ("random", "block", "grid", "blockwise")}
    assert len(set(counts.values())) == 1, counts


def transformer_step_flops(tokens, width, depth):
    """Forward + backward matmul FLOPs per image of ``depth`` ViT blocks over ``tokens`` tokens, by hand."""
    linear = 2 * 12 * width ** 2 * tokens * depth  # qkv 3 C^2 + proj C^2 + MLP 8 C^2 weights, 2 FLOPs each
    attention = 2 * 2 * tokens ** 2 * width * depth  # q k^T and (softmax) v
    return 3 * (linear + attention)  # the backward costs twice the forward


@pytest.mark.parametrize("workload", benchmark.WORKLOADS)
def test_flops_match_a_hand_count(workload):
    args = tiny_args()
    patches = (32 // 4) ** 2
    visible = int(patches * (1 - args.mask_ratio))
    if workload == "pretrain":  # encoder on the cls token + visible patches, decoder on cls + all patches
        expected = transformer_step_flops(1 + visible, 64, 2) + transformer_step_flops(1 + patches, 64, 1)
    else:
        expected = transformer_step_flops(1 + patches, 64, 2)
    counted = step_flops(workload, 2, args) / 2
    # The count adds the patch embedding, the heads and the recomputed attention scores of the backward.
    assert expected < counted < 1.15 * expected


def test_cpu_attention_is_counted():
    # FlopCounterMode has no formula for the CPU flash-attention kernel; benchmark supplies one.
    b, h, t, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=benchmark.cpu_attention_formulas()) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    forward = counter.get_total_flops()
    assert forward == 2 * 2 * b * h * t * t * d
    with FlopCounterMode(display=False, custom_mapping=benchmark.cpu_attention_formulas()) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * forward // 2  # scores recomputed, then four gradient matmuls
