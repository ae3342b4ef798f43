"""benchmark.py: the table it prints, its CSV / markdown output, OOM rows, its presets, and its FLOP count against a
hand count."""
import csv

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import run_setup
from model import ModelConfig

# A tiny ViT: 32 x 32 images in 4 x 4 patches (64 patches), width 64, 2 encoder layers, 1 decoder layer.
TINY = ["--image_size", "32", "--patch_size", "4", "--emb_dim", "64", "--encoder_depth", "2",
        "--encoder_heads", "2", "--decoder_depth", "1", "--decoder_heads", "2"]
# fp32 eager only: the chosen path equals the baseline, so one row per workload and batch (no compile time).
CPU_RUN = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch_sizes", "2", "4", "--precisions", "fp32",
           "--compile_modes", "none", *TINY]


def table_rows(text):
    """The data rows of the markdown table in ``text``, as lists of cells."""
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    assert lines[0] == [head for head, _, _ in benchmark.COLUMNS] and set(lines[1]) == {"---"}
    return lines[2:]


def test_cpu_run_prints_one_row_per_workload_and_batch_size(capsys):
    returned = benchmark.main(CPU_RUN)
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], int(r[1])) for r in rows] == [("pretrain", 2), ("pretrain", 4), ("finetune", 2), ("finetune", 4)]
    for _workload, _, precision, compile_mode, augment, images_per_s, ratio, tflops, percent, memory in rows:
        assert (precision, compile_mode, augment, ratio) == ("fp32", "none", "none", "1.00")
        assert float(images_per_s) > 0 and float(tflops) > 0
        assert percent == "-" and memory == "-"  # no known peak and no CUDA memory stats on the CPU
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in returned)


def test_csv_output_holds_every_column_the_reports_read(tmp_path, capsys):
    out = tmp_path / "deeper" / "bench.csv"  # the folder is made at the write
    benchmark.main([*CPU_RUN, "--batch_sizes", "2", "--workloads", "finetune", "--peak_tflops", "0.5",
                    "--output", str(out)])
    printed = table_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(printed) == len(written) == 1
    row = written[0]
    assert list(row) == ["workload", "batch", "precision", "compile", "augment", "images_per_s", "vs_fp32_eager",
                         "tflops", "percent_of_peak", "peak_memory_gib", "gflop_per_image", "status"]
    assert (row["workload"], row["batch"], row["status"]) == ("finetune", "2", "ok")
    tflops = float(row["images_per_s"]) * float(row["gflop_per_image"]) / 1e3
    assert float(row["tflops"]) == pytest.approx(tflops)
    assert float(row["percent_of_peak"]) == pytest.approx(100 * tflops / 0.5)
    assert printed[0][8] == f"{100 * tflops / 0.5:.1f}"


def test_markdown_output_holds_the_printed_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    benchmark.main([*CPU_RUN, "--batch_sizes", "2", "--workloads", "pretrain", "--output", str(out)])
    assert out.read_text().strip() == capsys.readouterr().out.strip()


def test_augmentation_rows_and_the_ratio_to_fp32_eager():
    rows = benchmark.main([*CPU_RUN, "--batch_sizes", "4", "--workloads", "finetune", "--augments", "none",
                           "crop_flip", "randaug"])
    assert [(r["augment"], r["status"]) for r in rows] == [("none", "ok"), ("crop_flip", "ok"), ("randaug", "ok")]
    assert rows[0]["vs_fp32_eager"] == 1.0 and all(r["vs_fp32_eager"] > 0 for r in rows)


def test_a_batch_that_does_not_fit_is_an_oom_row_and_the_table_goes_on(monkeypatch, capsys):
    measure = benchmark.measure

    def fails_at_4(workload, batch_size, *rest):
        if batch_size == 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return measure(workload, batch_size, *rest)

    monkeypatch.setattr(benchmark, "measure", fails_at_4)
    rows = benchmark.main([*CPU_RUN, "--workloads", "pretrain"])
    assert [(r["batch"], r["status"]) for r in rows] == [(2, "ok"), (4, "OOM")]
    assert rows[1]["images_per_s"] is rows[1]["vs_fp32_eager"] is rows[1]["tflops"] is None
    assert table_rows(capsys.readouterr().out)[1][5:8] == ["OOM", "-", "-"]


def test_a_batch_the_cpu_allocator_refuses_is_an_oom_row():
    rows = benchmark.main([*CPU_RUN, "--batch_sizes", str(10 ** 12), "--workloads", "finetune"])
    assert [r["status"] for r in rows] == ["OOM"]


def test_other_errors_are_not_taken_for_oom(monkeypatch):
    monkeypatch.setattr(benchmark, "measure", lambda *row: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        benchmark.main([*CPU_RUN, "--workloads", "pretrain"])


def test_the_preset_is_the_training_scripts_own_and_typed_flags_win():
    preset = run_setup.PRESETS["small"]
    args = benchmark.parse_args(["--preset", "small", "--encoder_depth", "1"])
    assert args.encoder_depth == 1
    for name, value in {**preset["model"], "decoder_depth": preset["mae_pretrain"]["decoder_depth"]}.items():
        assert name == "encoder_depth" or getattr(args, name) == value
    assert args.decoder_emb_dim == preset["mae_pretrain"]["decoder_emb_dim"]
    assert args.batch_sizes == [preset["mae_pretrain"]["batch_size"]]
    assert benchmark.parse_args([]).emb_dim == ModelConfig.emb_dim and benchmark.parse_args([]).batch_sizes is None


@pytest.mark.parametrize("extra, expected", [
    (["--steps", "0"], "argument --steps"), (["--batch_sizes", "-4"], "argument --batch_sizes"),
    (["--mask_ratio", "1"], "argument --mask_ratio"), (["--warmup", "-1"], "argument --warmup"),
    (["--device", "gpu"], "argument --device"), (["--emb_dim", "33"], "--emb_dim 33 is not divisible"),
    (["--output", "{tmp}"], "could not write")])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, cli_error, extra, expected):
    extra = [word.format(tmp=tmp_path) for word in extra]
    argv = [*CPU_RUN, "--steps", "1", "--warmup", "0", "--batch_sizes", "2", "--workloads", "pretrain", *extra]
    assert expected in cli_error(benchmark.main, argv)


@pytest.mark.parametrize("device_name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                               ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_lookup_by_device_name(monkeypatch, device_name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert benchmark.detect_peak_tflops(torch.device("cuda")) == peak
    assert benchmark.detect_peak_tflops(torch.device("cpu")) is None


# --------------------------------------------------------------------------------------------------- FLOPs


def flops(workload, batch_size=2, *extra):
    config = ModelConfig.from_dict(vars(benchmark.parse_args([*TINY, *extra])))
    return benchmark.flops_per_image(workload, config, torch.device("cpu"), batch_size)


@pytest.mark.parametrize("workload", benchmark.BUILD)
def test_flops_per_image_do_not_depend_on_the_batch_size(workload):
    assert flops(workload, 6) == flops(workload, 2)


def test_flops_do_not_depend_on_the_mask_strategy():
    # Every strategy keeps the same number of patches, so the encoder does the same work.
    counts = {s: flops("pretrain", 2, "--mask_strategy", s) for s in ("random", "block", "grid", "blockwise")}
    assert len(set(counts.values())) == 1, counts


def transformer_step_flops(tokens, width, depth):
    """Forward + backward matmul FLOPs per image of ``depth`` ViT blocks over ``tokens`` tokens, by hand."""
    linear = 2 * 12 * width ** 2 * tokens * depth  # qkv 3 C^2 + proj C^2 + MLP 8 C^2 weights, 2 FLOPs each
    attention = 2 * 2 * tokens ** 2 * width * depth  # q k^T and (softmax) v
    return 3 * (linear + attention)  # the backward costs twice the forward


@pytest.mark.parametrize("workload", benchmark.BUILD)
def test_flops_match_a_hand_count(workload):
    patches = (32 // 4) ** 2
    visible = int(patches * (1 - 0.75))
    if workload == "pretrain":  # encoder on the cls token + visible patches, decoder on cls + all patches
        expected = transformer_step_flops(1 + visible, 64, 2) + transformer_step_flops(1 + patches, 64, 1)
    else:
        expected = transformer_step_flops(1 + patches, 64, 2)
    # The count adds the patch embedding, the heads and the recomputed attention scores of the backward.
    assert expected < flops(workload) < 1.15 * expected


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
