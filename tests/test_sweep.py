"""sweep.py and summarize.py: the plan, restarting an interrupted sweep, and the tables and figures of its runs."""
import csv
import json
import subprocess
from itertools import takewhile

import numpy as np
import pytest
import torch

import summarize
import sweep

TINY_MODEL = ["--emb_dim", "32", "--encoder_heads", "2", "--decoder_heads", "2", "--encoder_depth", "1",
              "--pretrain_batch_size", "16", "--finetune_batch_size", "16", "--max_device_batch_size", "8"]
STUDY = ["--name", "t", "--decoder_depth", "1", "2", "--seeds", "0", "1", "--pretrain_epochs", "2",
         "--finetune_epochs", "2", "--scratch", "--device", "cpu", *TINY_MODEL]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plan(argv, with_probe=False):
    return {run.name: run for run in sweep.Planner(sweep.parse_args(argv), with_probe).plan()}


def table_after(markdown, heading):
    """The markdown table under ``## heading`` as a list of {column: cell}."""
    lines = markdown.split(f"## {heading}\n", 1)[1].strip().splitlines()
    table = list(takewhile(lambda line: line.startswith("|"), lines))
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]


def mean_std_text(values, scale=100.0, digits=2):
    """What the tables should show, computed here with numpy: mean ± sample std."""
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


# ------------------------------------------------------------------------------------- the plan (no training)


def test_plan_names_paths_and_stages(tmp_path, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path / "logs"), "--data_dir", "somewhere", "--dry_run"]
    runs = plan(argv, with_probe=True)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    # 2 depths x 2 seeds x (pretrain, fine-tune, probe) + a scratch run per seed.
    assert len(runs) == 14
    pretrain, finetune = runs["mae_dd2_random_mr0.75_ep2_s1"], runs["ft_dd2_random_mr0.75_ep2_s1"]
    probe, scratch = runs["lp_dd2_random_mr0.75_ep2_s1"], runs["scratch_s1"]
    assert pretrain.checkpoint == folder / "checkpoints" / "mae_dd2_random_mr0.75_ep2_s1.pt"
    assert finetune.checkpoint == folder / "checkpoints" / "ft_dd2_random_mr0.75_ep2_s1_last.pt"
    assert pretrain.log_dir == folder / "mae_dd2_random_mr0.75_ep2_s1"
    for run in (finetune, probe):
        options = run.command()
        assert options[options.index("--pretrained_model_path") + 1] == str(pretrain.checkpoint)
        assert run.needs is pretrain
    assert "--linear_probe" in probe.command() and "--linear_probe" not in finetune.command()
    assert "--pretrained_model_path" not in scratch.command() and "--emb_dim" in scratch.command()
    command = pretrain.command()
    assert command[command.index("--run_name") + 1] == "sweep_t/mae_dd2_random_mr0.75_ep2_s1"
    assert command[command.index("--decoder_depth") + 1] == "2" and command[command.index("--seed") + 1] == "1"

    assert sweep.main(argv) == 0  # the dry run prints every command and writes nothing
    out = capfd.readouterr().out
    assert out.count(": new") == 14 and "--linear_probe" in out
    assert not (tmp_path / "logs").exists()


def test_probe_stage_only_when_the_classifier_has_it(tmp_path, monkeypatch, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path), "--dry_run"]
    monkeypatch.setattr(sweep, "classifier_has_linear_probe", lambda: False)
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("    ")]
    assert "sweep_t: 10 runs" in out and len(commands) == 10
    assert not any("--linear_probe" in command for command in commands)


def test_plan_follows_what_is_on_disk(tmp_path, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path), "--no_linear_probe", "--dry_run"]
    runs = plan(argv)

    def fake_run(run, epochs, checkpoint):
        run.log_dir.mkdir(parents=True, exist_ok=True)
        (run.log_dir / "metrics.csv").write_text("epoch,loss\n" + "".join(f"{e},0.5\n" for e in range(1, epochs + 1)))
        if checkpoint:
            run.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            run.checkpoint.write_bytes(b"checkpoint")

    fake_run(runs["mae_dd1_random_mr0.75_ep2_s0"], 2, checkpoint=True)   # finished
    fake_run(runs["ft_dd1_random_mr0.75_ep2_s0"], 1, checkpoint=True)    # interrupted after epoch 1
    fake_run(runs["mae_dd2_random_mr0.75_ep2_s0"], 0, checkpoint=False)  # died in its first epoch
    fake_run(runs["mae_dd1_random_mr0.75_ep2_s1"], 1, checkpoint=False)  # logged, but its checkpoint is gone
    early = runs["ft_dd2_random_mr0.75_ep2_s1"]                         # --patience ended it after epoch 1
    fake_run(early, 1, checkpoint=False)
    torch.save({"kind": "classifier", "epoch": 1, "stopped_early": True}, early.checkpoint)
    changed = runs["scratch_s0"]
    sweep.write_settings(changed, [])
    settings = json.loads((changed.log_dir / "settings.json").read_text())
    settings["settings"]["finetune_epochs"] = 5
    (changed.log_dir / "settings.json").write_text(json.dumps(settings))

    assert sweep.main(argv) == 1  # a dry run also says when something needs the user
    lines = {line.split(":")[0].split("] ")[1]: line for line in capfd.readouterr().out.splitlines() if "] " in line}
    assert "skipped (finished: 2/2 epochs)" in lines["mae_dd1_random_mr0.75_ep2_s0"]
    assert "resuming (1/2 epochs done)" in lines["ft_dd1_random_mr0.75_ep2_s0"]
    assert "restarting" in lines["mae_dd2_random_mr0.75_ep2_s0"]
    assert "FAILED" in lines["mae_dd1_random_mr0.75_ep2_s1"]
    assert "no checkpoint" in lines["mae_dd1_random_mr0.75_ep2_s1"]
    assert "not run" in lines["ft_dd1_random_mr0.75_ep2_s1"]
    assert "other settings (finetune_epochs: 5 then, 2 now)" in lines["scratch_s0"]
    assert "skipped (finished: stopped early (--patience) after 1/2 epochs)" in lines["ft_dd2_random_mr0.75_ep2_s1"]
    assert "new" in lines["scratch_s1"]
    resumed = runs["ft_dd1_random_mr0.75_ep2_s0"]
    assert resumed.command(resume=True)[-2:] == ["--resume", "auto"]


def test_free_form_options_may_not_take_over_the_sweeps_own(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*STUDY, "--log_dir", str(tmp_path), "--finetune_args", "--augment crop_flip --seed 3"])
    assert exit_info.value.code == 2


# -------------------------------------------------------------------------------- a real sweep, interrupted


def test_sweep_restarts_where_it_stopped_and_summarizes(tiny_image_folder, tmp_path, capfd, monkeypatch):
    """A 2 x 2 sweep (decoder depth x seed) plus scratch runs, on 10 classes x (8 train + 2 test) 16 px images."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs inherit it: tiny models are fastest on one thread
    argv = [*STUDY, "--no_linear_probe", "--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs")]
    runs = plan(argv)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    # Interruptions, made deterministic: one pretraining run stopped after its first epoch (its own command with
    # a 1-epoch schedule leaves exactly that behind), and one whose checkpoint is unreadable, so that it fails.
    interrupted, broken = runs["mae_dd2_random_mr0.75_ep2_s1"], runs["mae_dd1_random_mr0.75_ep2_s1"]
    command = interrupted.command()
    command[command.index("--total_epoch") + 1] = "1"
    subprocess.run(command, check=True, capture_output=True)
    first_epoch = read_csv(interrupted.log_dir / "metrics.csv")
    assert len(first_epoch) == 1
    broken.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    broken.checkpoint.write_bytes(b"not a checkpoint")

    assert sweep.main(argv) == 1  # a failed run fails the sweep, but the others still ran
    out = capfd.readouterr().out
    assert f"{interrupted.name}: resuming (1/2 epochs done)" in out
    assert f"{broken.name}: FAILED (exit code 2" in out
    assert "ft_dd1_random_mr0.75_ep2_s1: not run" in out
    assert f"failed: {broken.name}" in out
    resumed = read_csv(interrupted.log_dir / "metrics.csv")
    assert len(resumed) == 2 and resumed[0] == first_epoch[0]  # continued, not started again
    finished = [run for name, run in runs.items() if "dd1_random_mr0.75_ep2_s1" not in name]
    stamps = {run.name: ((run.log_dir / "metrics.csv").stat().st_mtime_ns, run.checkpoint.stat().st_mtime_ns)
              for run in finished}

    broken.checkpoint.unlink()  # what the user does about the error; then the same command again
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    for run in finished:
        assert f"{run.name}: skipped (finished: 2/2 epochs)" in out
        assert ((run.log_dir / "metrics.csv").stat().st_mtime_ns, run.checkpoint.stat().st_mtime_ns) == \
            stamps[run.name]
    assert f"{broken.name}: new" in out and "ft_dd1_random_mr0.75_ep2_s1: new" in out
    assert all(len(read_csv(run.log_dir / "metrics.csv")) == 2 for run in runs.values())

    summarize.main([str(folder), "--output_dir", str(tmp_path / "summary")])
    report = (tmp_path / "summary" / "results.md").read_text()
    assert report in capfd.readouterr().out

    def expected(prefix, column, pick):
        return [pick([float(row[column]) for row in read_csv(folder / f"{prefix}_s{seed}" / "metrics.csv")])
                for seed in (0, 1)]

    depth_rows = table_after(report, "Decoder depth")
    assert [row["decoder depth"] for row in depth_rows] == ["1", "2"]
    for row, depth in zip(depth_rows, (1, 2)):
        setting = f"dd{depth}_random_mr0.75_ep2"
        assert row["n"] == "2"
        assert row["final acc (%)"] == mean_std_text(expected(f"ft_{setting}", "val_acc", lambda v: v[-1]))
        assert row["best acc (%)"] == mean_std_text(expected(f"ft_{setting}", "val_acc", max))
        assert row["pretrain loss"] == mean_std_text(expected(f"mae_{setting}", "loss", lambda v: v[-1]), 1, 4)
    everything = table_after(report, "All settings vs from scratch")
    assert [row["setting"] for row in everything] == ["decoder depth 1", "decoder depth 2", "from scratch"]
    assert everything[2]["final acc (%)"] == mean_std_text(expected("scratch", "val_acc", lambda v: v[-1]))
    assert everything[2]["pretrain loss"] == ""
    for name in ("pretrain_loss_decoder_depth", "finetune_acc_decoder_depth", "finetune_acc_vs_scratch"):
        png = (tmp_path / "summary" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
        assert f"({name}.png)" in report


# ------------------------------------------------------------------------------ summarize.py on made-up runs


def write_run(folder, stage, seed, rows, **settings):
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"settings": {"stage": stage, "seed": seed, **settings},
                                                      "total_epochs": 2}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *rows[0]])
        writer.writeheader()
        writer.writerows({"epoch": i + 1, **row} for i, row in enumerate(rows))


def test_summary_keeps_ablations_apart_and_counts_seeds(tmp_path, capfd):
    """Two ablated settings at once (depth x strategy): each table compares one, the other held fixed."""
    accuracies = {}
    for depth in (1, 2):
        for strategy in ("block", "random"):
            seeds = (0,) if (depth, strategy) == (2, "block") else (0, 1, 2)
            for seed in seeds:
                grid = dict(decoder_depth=depth, mask_strategy=strategy, mask_ratio=0.75, pretrain_epochs=2)
                name = f"dd{depth}_{strategy}_s{seed}"
                final = 0.1 * depth + 0.01 * seed + (0.05 if strategy == "block" else 0)
                accuracies.setdefault((depth, strategy), []).append(final)
                write_run(tmp_path / f"mae_{name}", "pretrain", seed,
                          [{"loss": 0.5, "seconds": 10}, {"loss": 0.4 - 0.01 * seed, "seconds": 10}], **grid)
                write_run(tmp_path / f"ft_{name}", "finetune", seed,
                          [{"val_acc": final + 0.2, "seconds": 1}, {"val_acc": final, "seconds": 1}],
                          **grid, finetune_epochs=2)
    write_run(tmp_path / "ft_unfinished", "finetune", 5, [{"val_acc": 0.9, "seconds": 1}], decoder_depth=8,
              mask_strategy="grid", mask_ratio=0.75, pretrain_epochs=2, finetune_epochs=2)

    summarize.main([str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    depth_rows = table_after(report, "Decoder depth")
    assert [(r["mask strategy"], r["decoder depth"], r["n"]) for r in depth_rows] == [
        ("block", "1", "3"), ("block", "2", "1"), ("random", "1", "3"), ("random", "2", "3")]
    assert depth_rows[0]["final acc (%)"] == mean_std_text(accuracies[1, "block"])
    assert depth_rows[0]["best acc (%)"] == mean_std_text(np.add(accuracies[1, "block"], 0.2))
    assert depth_rows[1]["final acc (%)"] == f"{accuracies[2, 'block'][0] * 100:.2f} ± -"  # one seed: no std
    assert depth_rows[0]["pretrain loss"] == mean_std_text([0.4, 0.39, 0.38], 1, 4)
    assert depth_rows[0]["time / seed"] == "22.0 s"  # 2 x 10 s pretraining + 2 x 1 s fine-tuning
    strategy_rows = table_after(report, "Mask strategy")
    assert [(r["decoder depth"], r["mask strategy"]) for r in strategy_rows] == [
        ("1", "block"), ("1", "random"), ("2", "block"), ("2", "random")]
    assert "dd8" not in report and "ft_unfinished (1/2 epochs)" in report  # unfinished runs are left out, named
    for axis in ("decoder_depth", "mask_strategy"):
        assert (tmp_path / f"finetune_acc_{axis}.png").stat().st_size > 1000
    assert not (tmp_path / "finetune_acc_vs_scratch.png").exists()


def test_summary_without_runs_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        summarize.utils.run_cli(summarize.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no finished runs" in capsys.readouterr().err
