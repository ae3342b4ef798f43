"""summarize.py on made-up runs: tables of mean ± std computed from the CSVs written here, several sweep folders
at once, the per-run CSV, the figures, argument errors, and that it needs no torch."""
import csv
import json
import re
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

import numpy as np
import pytest

import summarize

REPO = Path(__file__).resolve().parent.parent
GRID = dict(dataset="cifar10", mask_ratio=0.75, pretrain_epochs=2, model_size={}, pretrain_args=[])


def write_run(folder, stage, seed, rows, total_epochs=2, **settings):
    """A run folder as sweep.py leaves it: settings.json and a metrics.csv of ``rows`` (None: an empty cell)."""
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"settings": {"stage": stage, "seed": seed, **settings},
                                                      "total_epochs": total_epochs}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *rows[0]])
        writer.writeheader()
        writer.writerows({"epoch": i + 1, **{k: "" if v is None else v for k, v in row.items()}}
                         for i, row in enumerate(rows))


def write_chain(folder, depth, strategy, seed, final, knn=None, probe=None, **grid):
    """Pretraining (loss, k-NN and probe accuracy on its last epoch only), fine-tuning and linear probe runs."""
    grid = {**GRID, "decoder_depth": depth, "mask_strategy": strategy, **grid}
    name = f"dd{depth}_{strategy}_s{seed}"
    write_run(folder / f"mae_{name}", "pretrain", seed, [
        {"loss": 0.5, "seconds": 10, "knn_acc": None, "probe_acc": None},
        {"loss": 0.4 - 0.01 * seed, "seconds": 10, "knn_acc": knn, "probe_acc": probe}], **grid)
    write_run(folder / f"ft_{name}", "finetune", seed, [{"val_acc": final + 0.2, "seconds": 1},
                                                        {"val_acc": final, "seconds": 1}], **grid, finetune_epochs=2)
    write_run(folder / f"lp_{name}", "linear_probe", seed, [{"val_acc": final / 2, "seconds": 1},
                                                            {"val_acc": final / 3, "seconds": 1}],
              **grid, linear_probe_epochs=2, probe_args=[])


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


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_import_needs_no_torch():
    check = "import summarize, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True, timeout=60)


def test_tables_keep_ablations_apart_and_count_seeds(tmp_path, capsys):
    """Two ablated settings at once (depth x strategy): each table compares one, the other held fixed."""
    accuracies, knn, probe = {}, {}, {}
    for depth in (1, 2):
        for strategy in ("block", "random"):
            for seed in (0,) if (depth, strategy) == (2, "block") else (0, 1, 2):
                final = 0.1 * depth + 0.01 * seed + (0.05 if strategy == "block" else 0)
                accuracies.setdefault((depth, strategy), []).append(final)
                knn.setdefault((depth, strategy), []).append(final - 0.05)
                probe.setdefault((depth, strategy), []).append(final - 0.02)
                write_chain(tmp_path, depth, strategy, seed, final, knn=final - 0.05, probe=final - 0.02)
    write_run(tmp_path / "ft_unfinished", "finetune", 5, [{"val_acc": 0.9, "seconds": 1}],
              **GRID, decoder_depth=8, mask_strategy="grid", finetune_epochs=2)

    summarize.main([str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    assert report in capsys.readouterr().out
    depth_rows = table_after(report, "Decoder depth")
    assert [(r["mask strategy"], r["decoder depth"], r["n"]) for r in depth_rows] == [
        ("block", "1", "3"), ("block", "2", "1"), ("random", "1", "3"), ("random", "2", "3")]
    row, key = depth_rows[0], (1, "block")
    assert row["final acc (%)"] == mean_std_text(accuracies[key])
    assert row["linear probe (%)"] == mean_std_text(np.divide(accuracies[key], 3))
    assert row["k-NN (%)"] == mean_std_text(knn[key])              # the last non-empty value of each seed
    assert row["pretraining probe (%)"] == mean_std_text(probe[key])
    assert row["pretrain loss"] == mean_std_text([0.4, 0.39, 0.38], 1, 4)
    assert row["time / seed"] == "24.0 s"  # 2 x 10 s pretraining + 2 x 1 s fine-tuning + 2 x 1 s probe
    assert depth_rows[1]["final acc (%)"] == f"{accuracies[2, 'block'][0] * 100:.2f} ± -"  # one seed: no std
    strategy_rows = table_after(report, "Mask strategy")
    assert [(r["decoder depth"], r["mask strategy"]) for r in strategy_rows] == [
        ("1", "block"), ("1", "random"), ("2", "block"), ("2", "random")]
    assert [r["setting"] for r in table_after(report, "All settings")] == [
        "decoder depth 1, mask strategy block", "decoder depth 1, mask strategy random",
        "decoder depth 2, mask strategy block", "decoder depth 2, mask strategy random"]
    # Unfinished runs are left out, and named.
    assert "dd8" not in report and "ft_unfinished (not finished: 1/2 epochs)" in report

    runs = read_csv(tmp_path / "runs.csv")
    assert len(runs) == 3 * 10 and not any(r["run"] == "ft_unfinished" for r in runs)
    ft = next(r for r in runs if r["run"] == "ft_dd1_block_s2")
    assert (ft["stage"], ft["seed"], ft["decoder_depth"], ft["mask_strategy"], ft["finetune_epochs"]) == (
        "finetune", "2", "1", "block", "2")
    assert float(ft["val_acc"]) == pytest.approx(accuracies[1, "block"][2])
    assert "best_val_acc" not in ft  # picked on the test set, it would flatter
    mae = next(r for r in runs if r["run"] == "mae_dd1_block_s2")
    assert float(mae["knn_acc"]) == pytest.approx(knn[1, "block"][2]) and mae["val_acc"] == ""
    for name in ("finetune_acc_decoder_depth", "finetune_acc_mask_strategy", "pretrain_loss_decoder_depth",
                 "knn_acc_mask_strategy", "accuracy_per_setting"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"({name}.png)" in report
    assert not (tmp_path / "finetune_acc_vs_scratch.png").exists()


@pytest.fixture
def figure_texts(monkeypatch):
    """{file name: {"title", "axes": [(x label, y label, [legend entries])]}} of every figure saved."""
    from matplotlib.figure import Figure

    texts, savefig = {}, Figure.savefig

    def recording_savefig(self, path, **kwargs):
        legends = [ax.get_legend() or (self.legends or [None])[0] for ax in self.axes]  # the axes' or the figure's
        legends = [[t.get_text() for t in legend.get_texts()] if legend else [] for legend in legends]
        # Saved as a hidden temporary file beside the figure (utils.atomic_write): keyed by the figure's name.
        name = re.sub(r"^\.(.*)\.tmp\d+(\.\w+)$", r"\1\2", Path(path).name)
        texts[name] = {"title": self.get_suptitle() or self.axes[0].get_title(), "axes": [
            (ax.get_xlabel(), ax.get_ylabel(), legend) for ax, legend in zip(self.axes, legends)]}
        return savefig(self, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return texts


def test_several_sweeps_combine_and_settings_that_differ_become_rows(tmp_path, capsys, figure_texts):
    """Two sweep folders (one with --norm_pix_loss), a from-scratch run, the same folder named twice."""
    first, second = tmp_path / "logs" / "sweep_a", tmp_path / "logs" / "sweep_b"
    for seed in (0, 1):
        write_chain(first, 4, "random", seed, 0.5 + 0.1 * seed)
        write_chain(second, 4, "random", seed, 0.6 + 0.1 * seed, pretrain_args=["--norm_pix_loss"])
        write_run(first / f"scratch_s{seed}", "scratch", seed, [{"val_acc": 0.3, "seconds": 1},
                                                                {"val_acc": 0.2 + 0.1 * seed, "seconds": 1}],
                  dataset="cifar10", model_size={}, finetune_epochs=2)
    out = tmp_path / "results"
    summarize.main([str(first), str(second), str(tmp_path / "logs"), "--output_dir", str(out)])
    report = (out / "results.md").read_text()
    rows = table_after(report, "All settings vs from scratch")
    assert [(r["setting"], r["n"]) for r in rows] == [
        ("pretrain args --norm_pix_loss", "2"), ("pretrain args none", "2"), ("from scratch", "2")]
    assert rows[0]["final acc (%)"] == mean_std_text([0.6, 0.7]) and rows[1]["final acc (%)"] == mean_std_text(
        [0.5, 0.6])
    assert rows[2]["final acc (%)"] == mean_std_text([0.2, 0.3]) and rows[2]["linear probe (%)"] == ""
    assert "decoder depth 4" in report.split("## All settings")[0]  # what all share is said once
    assert len(read_csv(out / "runs.csv")) == 2 * 2 * 3 + 2  # each run once, though named twice
    assert {r["sweep"] for r in read_csv(out / "runs.csv")} == {"sweep_a", "sweep_b"}
    for name in ("finetune_acc_pretrain_args", "finetune_acc_vs_scratch", "accuracy_per_setting"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert figure_texts["finetune_acc_vs_scratch.png"]["axes"] == [("epoch", "fine-tuning test accuracy (%)", [
        "pretrain args --norm_pix_loss (n=2)", "pretrain args none (n=2)", "from scratch (n=2)"])]
    assert figure_texts["pretrain_loss_pretrain_args.png"]["axes"][0][2] == ["pretrain args --norm_pix_loss (n=2)",
                                                                             "pretrain args none (n=2)"]
    (_, ylabel, legend), = figure_texts["accuracy_per_setting.png"]["axes"]
    assert ylabel == "test accuracy (%)" and legend == ["final acc", "linear probe"]


def test_one_setting_over_seeds_still_gets_its_curves(tmp_path, capsys):
    for seed in (0, 1):
        write_chain(tmp_path, 4, "random", seed, 0.5)
    summarize.main([str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    assert table_after(report, "All settings")[0]["setting"] == "MAE + fine-tuning"
    assert (tmp_path / "finetune_acc.png").is_file() and (tmp_path / "pretrain_loss.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing"], "argument folders: "), (["{tmp}/a_file"], "argument folders: "),
    (["{tmp}", "--output_dir", "{tmp}/a_file"], "argument --output_dir: "),
    (["{tmp}", "--output_dir", "{tmp}/a_file/below"], "argument --output_dir: "),
    (["{tmp}", "--output_dir", "/proc/out"], "argument --output_dir: /proc/out is not writable"),
    (["{tmp}"], "error: no finished runs"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([word.format(tmp=tmp_path) for word in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and message in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("settings_text, metrics_text, why", [
    ("{not json", None, "unreadable: JSONDecodeError"),
    ("[1, 2]", None, "unreadable: AttributeError"),
    (None, "epoch,val_acc\n1,abc\n2,xyz\n", "unreadable: ValueError"),  # a value that is not a number
    (json.dumps({"settings": {"stage": "finetune", "seed": 0}}), None, "not finished: 2/? epochs"),  # length unknown
    (None, "epoch,val_acc\n1,0.5\n", "not finished: 1/2 epochs"),
])
def test_an_unreadable_or_unfinished_run_is_left_out_by_name_and_the_rest_summarized(tmp_path, settings_text,
                                                                                   metrics_text, why):
    write_chain(tmp_path / "sweep", 2, "random", 0, 0.5)
    broken = tmp_path / "sweep" / "ft_broken"
    write_run(broken, "finetune", 1, [{"val_acc": 0.4}, {"val_acc": 0.5}], **GRID, decoder_depth=2,
              mask_strategy="random", finetune_epochs=2)
    if settings_text is not None:
        (broken / "settings.json").write_text(settings_text)
    if metrics_text is not None:
        (broken / "metrics.csv").write_text(metrics_text)
    summarize.main([str(tmp_path / "sweep")])
    report = (tmp_path / "sweep" / "results.md").read_text()
    assert f"ft_broken ({why}" in report
    assert [row["run"] for row in read_csv(tmp_path / "sweep" / "runs.csv")] == [
        "ft_dd2_random_s0", "lp_dd2_random_s0", "mae_dd2_random_s0"]


def test_a_non_finite_value_is_shown_as_such_and_its_run_named(tmp_path, capsys):
    """A NaN loss at the end is the run's loss (not an earlier finite one), apart from the blank of a value
    never measured."""
    for seed in (0, 1):
        write_chain(tmp_path, 2, "random", seed, 0.5 + 0.1 * seed, probe=0.3 if seed == 0 else None)
    mae = tmp_path / "mae_dd2_random_s1"
    (mae / "metrics.csv").write_text("epoch,loss,seconds,knn_acc,probe_acc\n1,0.5,10,,\n2,nan,10,,\n")
    summarize.main([str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    (row,) = table_after(report, "All settings")
    assert row["pretrain loss"] == "nan in 1 of 2"
    assert row["pretraining probe (%)"] == "30.00 ± - (n=1)"  # seed 1 never measured it
    assert "k-NN (%)" not in row  # nobody measured it: no column
    assert "Non-finite results (shown as such, never averaged): mae_dd2_random_s1 (loss=nan)" in report
    runs = {r["run"]: r for r in read_csv(tmp_path / "runs.csv")}
    assert (runs["mae_dd2_random_s1"]["loss"], runs["mae_dd2_random_s1"]["non_finite"]) == ("nan", "loss=nan")
    assert (runs["mae_dd2_random_s1"]["probe_acc"], runs["mae_dd2_random_s0"]["non_finite"]) == ("", "")


def test_accuracy_against_labels_per_class_for_both_arms(tmp_path, figure_texts):
    accuracy, grid = {}, {**GRID, "decoder_depth": 2, "mask_strategy": "random"}
    for seed in (0, 1):
        write_run(tmp_path / f"mae_s{seed}", "pretrain", seed, [{"loss": 0.5, "seconds": 1}] * 2, **grid)
        for labels in (50, 500):
            for arm, stage in (("ft", "finetune"), ("scratch", "scratch")):
                final = accuracy.setdefault((labels, arm), [])
                final.append(labels / 1000 + (0.2 if arm == "ft" else 0) + 0.01 * seed)
                write_run(tmp_path / f"{arm}_lpc{labels}_s{seed}", stage, seed, [{"val_acc": final[-1],
                          "seconds": 1, "labels": 10 * labels, "subset": f"{labels}{seed}ab"}] * 2,  # as logged
                          labels_per_class=labels, **(grid if arm == "ft" else {}))
    summarize.main([str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    assert [r["setting"] for r in table_after(report, "All settings vs from scratch")] == [
        "labels per class 50", "labels per class 500", "from scratch, labels per class 50",
        "from scratch, labels per class 500"]
    rows = table_after(report, "Accuracy against labels per class")
    assert [(r["labels per class"], r["setting"], r["n"]) for r in rows] == [
        ("50", "MAE + fine-tuning", "2"), ("50", "from scratch", "2"), ("500", "MAE + fine-tuning", "2"),
        ("500", "from scratch", "2")]
    assert [r["final acc (%)"] for r in rows] == [mean_std_text(accuracy[labels, arm])
                                                      for labels in (50, 500) for arm in ("ft", "scratch")]
    assert figure_texts["accuracy_vs_labels.png"]["axes"] == [("labels per class", "test accuracy (%)",
                                                                ["MAE + fine-tuning", "from scratch"])]
    assert "(accuracy_vs_labels.png)" in report and not (tmp_path / "budget.csv").exists()


# ------------------------------------------------------------------------------- accuracy against the budget


def write_budget_run(folder, stage, seed, final, epochs, wall, minutes, **settings):
    """A --time_budget run: its length unknown to the sweep, in budget.json once it ended."""
    write_run(folder, stage, seed, [{"val_acc": final - 0.1, "seconds": 1}] * (epochs - 1) +
              [{"val_acc": final, "seconds": 1}], total_epochs=None, time_budget=minutes, **settings)
    (folder / "budget.json").write_text(json.dumps({
        "time_budget_minutes": minutes, "total_epoch": epochs, "epochs": epochs - 0.5, "steps": 10 * epochs,
        "wall_seconds": wall, "machine": "test CPU", "date": "2026-11-30", "reproduce": "--total_epoch 3"}))


def test_budget_runs_give_a_table_a_csv_and_a_figure_of_accuracy_against_minutes(tmp_path):
    grid = {**GRID, "decoder_depth": 2, "mask_strategy": "random", "pretrain_share": 0.5}
    for minutes in (10, 20):
        for seed, (mae, scratch) in enumerate([(0.60, 0.55), (0.62, 0.54)]):
            mae += minutes / 100
            name = f"tb{minutes}_s{seed}"
            write_budget_run(tmp_path / f"mae_{name}", "pretrain", seed, 0.0, 3, [minutes * 30.0], minutes, **grid)
            write_budget_run(tmp_path / f"ft_{name}", "finetune", seed, mae, 2, [minutes * 29.0], minutes, **grid,
                             finetune_epochs=None)
            write_budget_run(tmp_path / f"scratch_{name}", "scratch", seed, scratch, 4, [minutes * 59.0, 1.0],
                             minutes, dataset="cifar10", model_size={}, finetune_epochs=None)
    write_run(tmp_path / "scratch_tb30_s0", "scratch", 0, [{"val_acc": 0.1, "seconds": 1}], total_epochs=None,
              time_budget=30, dataset="cifar10", model_size={})  # still running: left out, named
    (tmp_path / "scratch_tb30_s0" / "budget.json").write_text(json.dumps({"time_budget_minutes": 30}))
    summarize.main([str(tmp_path), "--output_dir", str(tmp_path / "out")])
    rows = read_csv(tmp_path / "out" / "budget.csv")
    assert [(r["budget_minutes"], r["arm"], r["seed"]) for r in rows] == [
        ("10", "mae", "0"), ("10", "mae", "1"), ("10", "scratch", "0"), ("10", "scratch", "1"),
        ("20", "mae", "0"), ("20", "mae", "1"), ("20", "scratch", "0"), ("20", "scratch", "1")]
    first = rows[0]
    assert float(first["test_acc"]) == 70.0 and (first["pretrain_epochs"], first["finetune_epochs"]) == ("2.5", "1.5")
    assert float(first["wall_minutes"]) == round((300 + 290) / 60, 2) and first["machine"] == "test CPU"
    assert float(rows[2]["wall_minutes"]) == round((590 + 1) / 60, 2)  # a resumed run's processes add up
    report = (tmp_path / "out" / "results.md").read_text()
    table = table_after(report, "Accuracy against the time budget (equal compute)")
    assert [(r["time budget (min)"], r["setting"]) for r in table] == [
        ("10", "MAE + fine-tuning"), ("10", "from scratch"), ("20", "MAE + fine-tuning"), ("20", "from scratch")]
    assert table[0]["final acc (%)"] == mean_std_text([0.70, 0.72]) and table[0]["n"] == "2"
    assert table[0]["time / seed"] == "5.0 s"  # 3 epochs of pretraining, 2 of fine-tuning
    assert (tmp_path / "out" / "accuracy_vs_budget.png").stat().st_size > 1000
    assert "scratch_tb30_s0 (not finished: 1/? epochs)" in report
