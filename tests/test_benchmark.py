"""benchmark.py: the table it prints, its CSV output, the ratio to fp32 eager, OOM rows and its presets."""
import csv

import pytest
import torch

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
    for _workload, _, precision, compile_mode, augment, images_per_s, ratio, memory in rows:
        assert (precision, compile_mode, augment, ratio) == ("fp32", "none", "none", "1.00")
        assert float(images_per_s) > 0 and memory == "-"  # no CUDA memory stats on the CPU
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in returned)


def test_csv_output_holds_every_column_the_reports_read(tmp_path, capsys):
    out = tmp_path / "deeper" / "bench.csv"  # the folder is made at the write
    benchmark.main([*CPU_RUN, "--batch_sizes", "2", "--workloads", "finetune", "--output", str(out)])
    printed = table_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(printed) == len(written) == 1
    row = written[0]
    assert list(row) == ["workload", "batch", "precision", "compile", "augment", "images_per_s", "vs_fp32_eager",
                         "peak_memory_gib", "status"]
    assert (row["workload"], row["batch"], row["status"], row["vs_fp32_eager"]) == ("finetune", "2", "ok", "1.0")
    assert printed[0][5] == f"{float(row['images_per_s']):.1f}"


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
    assert rows[1]["images_per_s"] is rows[1]["vs_fp32_eager"] is rows[1]["peak_memory_gib"] is None
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
