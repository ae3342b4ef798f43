"""sweep.py: the plan and its commands (dry runs), one study per sweep folder, what a restart finds on disk,
argument errors, and a real tiny sweep, interrupted, continued and summarized."""
import csv
import json
import runpy
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

import data
import summarize
import sweep
import utils
from test_summarize import mean_std_text, table_after

TINY_MODEL = ["--emb_dim", "32", "--encoder_heads", "2", "--decoder_heads", "2", "--encoder_depth", "1",
              "--pretrain_batch_size", "16", "--finetune_batch_size", "16", "--max_device_batch_size", "8"]
STUDY = ["--name", "t", "--decoder_depth", "1", "2", "--seeds", "0", "1", "--pretrain_epochs", "2",
         "--finetune_epochs", "2", "--scratch", "--device", "cpu", *TINY_MODEL]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plan(argv):
    return {run.name: run for run in sweep.plan(sweep.parse_args(argv))}


def option(command, flag):
    return command[command.index(flag) + 1]


def typed(command):
    """The flags a command sets (after the script)."""
    return {word for word in command[2:] if word.startswith("--")}


def fake_run(run, epochs, checkpoint=True):
    """What a run leaves behind after ``epochs`` epochs."""
    run.log_dir.mkdir(parents=True, exist_ok=True)
    (run.log_dir / "metrics.csv").write_text("epoch,loss\n" + "".join(f"{e},0.5\n" for e in range(1, epochs + 1)))
    if checkpoint:
        run.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        run.checkpoint.write_bytes(b"checkpoint")


def save_study(argv):
    args = sweep.parse_args(argv)
    utils.write_text(args.folder / "study.json", json.dumps(sweep.study(args)))


# ------------------------------------------------------------------------------------- the plan (no training)


def test_plan_names_paths_and_stages(tmp_path, tiny_image_folder, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path / "logs"), "--data_dir", str(tiny_image_folder), "--dry_run"]
    runs = plan(argv)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    # 2 depths x 2 seeds x (pretrain, fine-tune, probe) + a scratch run per seed, seeds outermost.
    assert list(runs) == [f"{stage}_dd{depth}_ep2_s{seed}" if depth else f"scratch_s{seed}"
                          for seed in (0, 1) for depth in (1, 2, None) for stage in ("mae", "ft", "lp", "scratch")
                          if (depth is None) == (stage == "scratch")]
    pretrain, finetune, probe, scratch = (runs[name] for name in ("mae_dd2_ep2_s1", "ft_dd2_ep2_s1", "lp_dd2_ep2_s1",
                                                                  "scratch_s1"))
    assert pretrain.checkpoint == folder / "checkpoints" / "mae_dd2_ep2_s1.pt"
    assert finetune.checkpoint == folder / "checkpoints" / "ft_dd2_ep2_s1_last.pt"
    assert option(finetune.command, "--output_model_path") == str(folder / "checkpoints" / "ft_dd2_ep2_s1.pt")
    assert pretrain.log_dir == folder / "mae_dd2_ep2_s1"
    for run in (finetune, probe):
        assert option(run.command, "--pretrained_model_path") == str(pretrain.checkpoint) and run.needs is pretrain
    assert "--linear_probe" in probe.command and "--linear_probe" not in finetune.command
    assert "--pretrained_model_path" not in scratch.command and option(scratch.command, "--emb_dim") == "32"
    assert option(pretrain.command, "--run_name") == "sweep_t/mae_dd2_ep2_s1"
    assert option(pretrain.command, "--decoder_depth") == "2" and option(pretrain.command, "--seed") == "1"
    assert option(pretrain.command, "--data_dir") == str(tiny_image_folder)

    assert sweep.main(argv) == 0  # the dry run prints every command and writes nothing
    out = capfd.readouterr().out
    assert out.count(": new") == 14 and out.count("--linear_probe") == 4
    assert not (tmp_path / "logs").exists()


def test_commands_carry_the_preset_and_only_what_the_sweep_varies_or_was_given(tmp_path):
    own = {"--seed", "--run_name", "--log_dir", "--dataset"}
    runs = plan(["--preset", "small", "--decoder_depth", "1", "2", "--scratch", "--log_dir", str(tmp_path)])
    assert list(runs) == ["mae_dd1_s0", "ft_dd1_s0", "lp_dd1_s0", "mae_dd2_s0", "ft_dd2_s0", "lp_dd2_s0", "scratch_s0"]
    assert {name: typed(run.command) - own for name, run in runs.items() if name.endswith("dd1_s0")} == {
        "mae_dd1_s0": {"--preset", "--decoder_depth", "--model_path"},
        "ft_dd1_s0": {"--preset", "--output_model_path", "--pretrained_model_path"},
        "lp_dd1_s0": {"--preset", "--output_model_path", "--pretrained_model_path", "--linear_probe"}}
    assert typed(runs["scratch_s0"].command) - own == {"--preset", "--output_model_path"}
    assert all(option(run.command, "--preset") == "small" for run in runs.values())

    runs = plan(["--mask_ratio", "0.5", "--emb_dim", "64", "--pretrain_batch_size", "32", "--finetune_epochs", "3",
                 "--scratch", "--no_linear_probe", "--log_dir", str(tmp_path)])
    mae, ft, scratch = runs["mae_mr0.5_s0"], runs["ft_mr0.5_s0"], runs["scratch_s0"]
    assert typed(mae.command) - own == {"--mask_ratio", "--emb_dim", "--batch_size", "--model_path"}
    assert option(mae.command, "--batch_size") == "32" and option(mae.command, "--mask_ratio") == "0.5"
    assert typed(ft.command) - own == {"--total_epoch", "--output_model_path", "--pretrained_model_path"}
    assert typed(scratch.command) - own == {"--total_epoch", "--emb_dim", "--output_model_path"}
    assert option(scratch.command, "--total_epoch") == "3" and option(scratch.command, "--emb_dim") == "64"


def test_labels_per_class_is_varied_for_every_classifier_run_and_never_given_to_pretraining(tmp_path):
    runs = plan(["--labels_per_class", "50", "500", "--scratch", "--log_dir", str(tmp_path)])
    assert list(runs) == ["mae_s0", "ft_lpc50_s0", "lp_lpc50_s0", "ft_lpc500_s0", "lp_lpc500_s0", "scratch_lpc50_s0",
                          "scratch_lpc500_s0"]
    assert "--labels_per_class" not in runs["mae_s0"].command
    for name, run in list(runs.items())[1:]:
        assert option(run.command, "--labels_per_class") == name.split("_lpc")[1][:-3]
        assert run.settings["labels_per_class"] == int(option(run.command, "--labels_per_class"))
    assert runs["ft_lpc50_s0"].needs is runs["ft_lpc500_s0"].needs is runs["mae_s0"]  # one pretraining for both


def test_no_linear_probe(tmp_path, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path), "--no_linear_probe", "--decoder_depth", "8", "8", "--mask_strategy",
            "blockwise", "--dry_run"]
    runs = plan(argv)
    assert list(runs) == ["mae_dd8_blockwise_ep2_s0", "ft_dd8_blockwise_ep2_s0", "scratch_s0",
                          "mae_dd8_blockwise_ep2_s1", "ft_dd8_blockwise_ep2_s1", "scratch_s1"]
    assert all(run.command[0] == sys.executable for run in runs.values())  # this Python runs each script
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    assert "sweep_t: 6 runs" in out and "--linear_probe" not in out


def test_a_budget_sweep_splits_each_mae_budget_and_gives_scratch_all_of_it(tmp_path):
    runs = plan(["--time_budget", "10", "30", "--pretrain_share", "0.4", "--scratch", "--no_linear_probe",
                 "--log_dir", str(tmp_path)])
    assert list(runs) == ["mae_tb10_s0", "ft_tb10_s0", "scratch_tb10_s0", "mae_tb30_s0", "ft_tb30_s0",
                          "scratch_tb30_s0"]
    minutes = {name: float(option(run.command, "--time_budget")) for name, run in runs.items()}
    assert (minutes["mae_tb10_s0"], minutes["ft_tb10_s0"], minutes["scratch_tb10_s0"]) == (4, 6, 10)
    assert minutes["scratch_tb30_s0"] == 30
    for run in runs.values():  # the runs set their own length
        assert "--total_epoch" not in run.command and run.total_epochs is None
        assert run.settings["time_budget"] in (10, 30)
    assert list(plan(["--time_budget", "30", "--seeds", "0", "1", "--scratch_only", "--log_dir", str(tmp_path)])) == [
        "scratch_tb30_s0", "scratch_tb30_s1"]


# ------------------------------------------------------------------------- one study per folder, and restarts


@pytest.fixture
def fake_execute(monkeypatch):
    """sweep.execute that finishes a run at once: 2 epochs logged and its checkpoint written, exit code 0."""
    def execute(command):
        log_dir = Path(option(command, "--log_dir")) / option(command, "--dataset") / option(command, "--run_name")
        checkpoint = option(command, "--model_path") if "--model_path" in command else \
            option(command, "--output_model_path").replace(".pt", "_last.pt")
        fake_run(SimpleNamespace(log_dir=log_dir, checkpoint=Path(checkpoint)), 2)
        return 0

    monkeypatch.setattr(sweep, "execute", execute)


@pytest.mark.parametrize("change, differs", [
    (["--preset", "small"], "preset"), (["--data_dir", "{other}"], "data_dir"), (["--pretrain_epochs", "3"],
                                                                                  "pretrain_epochs"),
    (["--emb_dim", "64"], "emb_dim"), (["--time_budget", "5"], "time_budget"), (["--seeds", "0", "1"], "seeds"),
    (["--finetune_args=--augment flip"], "finetune_args"), (["--labels_per_class", "10"], "labels_per_class"),
])
def test_a_sweep_folder_holds_one_study(tmp_path, tiny_image_folder, fake_execute, cli_error, capsys, change, differs):
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    (other / "test").mkdir()
    argv = ["--name", "s", "--decoder_depth", "1", "--scratch", "--no_linear_probe", "--data_dir",
            str(tiny_image_folder), "--log_dir", str(tmp_path / "logs")]
    assert sweep.main(argv) == 0
    study = tmp_path / "logs" / "cifar10" / "sweep_s" / "study.json"
    assert json.loads(study.read_text())["decoder_depth"] == [1]
    # Where and how it runs may change: the same study, its runs finished.
    assert sweep.main([*argv, "--device", "cpu", "--max_device_batch_size", "8"]) == 0
    assert "3 of 3 runs finished (3 of them already" in capsys.readouterr().out
    before = study.read_text()
    line = cli_error(sweep.main, [*argv, *(word.format(other=other) for word in change)])
    assert f"sweep_s holds another study ({differs}: " in line and "another --name" in line
    line = cli_error(sweep.main, [*argv, *(word.format(other=other) for word in change), "--dry_run"])
    assert f"({differs}: " in line
    assert study.read_text() == before


def test_a_folder_with_runs_of_an_unknown_study_is_refused(tmp_path, cli_error):
    (tmp_path / "cifar10" / "sweep_t" / "mae_dd1_ep2_s0").mkdir(parents=True)
    line = cli_error(sweep.main, [*STUDY, "--log_dir", tmp_path, "--dry_run"])
    assert "holds runs but no study.json" in line


def test_a_restart_continues_from_what_is_on_disk(tmp_path, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path), "--no_linear_probe", "--dry_run"]
    runs = plan(argv)
    save_study(argv)
    fake_run(runs["mae_dd1_ep2_s0"], 2)                      # finished
    fake_run(runs["ft_dd1_ep2_s0"], 1)                       # interrupted after epoch 1
    fake_run(runs["mae_dd2_ep2_s0"], 0, checkpoint=False)    # died in its first epoch
    fake_run(runs["mae_dd1_ep2_s1"], 1, checkpoint=False)    # killed before its first save
    early = runs["ft_dd2_ep2_s1"]                            # --patience ended it after epoch 1: it exited 0
    fake_run(early, 1)
    sweep.write_settings(early, early.command, total_epochs=1)

    assert sweep.main(argv) == 0
    out = capfd.readouterr().out.splitlines()
    lines = {line.split(":")[0].split("] ")[1]: line for line in out if "] " in line}
    assert "skipped (finished: 2/2 epochs)" in lines["mae_dd1_ep2_s0"]
    assert "resuming (1/2 epochs done)" in lines["ft_dd1_ep2_s0"]
    assert out[out.index(lines["ft_dd1_ep2_s0"]) + 1].endswith("--resume auto")
    assert "new" in lines["mae_dd2_ep2_s0"]
    assert "restarting (1 epochs logged but no checkpoint" in lines["mae_dd1_ep2_s1"]  # nothing can continue it
    assert out[out.index(lines["mae_dd1_ep2_s1"]) + 1].endswith("--overwrite")
    assert "new" in lines["ft_dd1_ep2_s1"]
    assert "skipped (finished: 1/1 epochs)" in lines["ft_dd2_ep2_s1"]
    assert "new" in lines["scratch_s1"] and not runs["scratch_s1"].log_dir.exists()  # a dry run writes nothing


def test_a_budget_run_is_finished_once_its_budget_json_says_how_long_it_ran(tmp_path):
    run = plan(["--time_budget", "5", "--scratch_only", "--log_dir", str(tmp_path)])["scratch_tb5_s0"]
    assert sweep.run_state(run)[0] == "new"
    fake_run(run, 2)
    (run.log_dir / "budget.json").write_text(json.dumps({"time_budget_minutes": 5.0, "wall_seconds": [9.0]}))
    assert sweep.run_state(run) == ("resuming", "2/? epochs done")  # it has not ended yet
    (run.log_dir / "budget.json").write_text(json.dumps({"total_epoch": 3, "epochs": 2.5}))
    assert sweep.run_state(run) == ("resuming", "2/3 epochs done")
    fake_run(run, 3)
    assert sweep.run_state(run) == ("skipped", "finished: 3/3 epochs")


# --------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("extra, flag", [
    (["--decoder_depth", "1", "0"], "--decoder_depth"), (["--mask_ratio", "1"], "--mask_ratio"),
    (["--mask_ratio", "nan"], "--mask_ratio"), (["--pretrain_epochs", "0"], "--pretrain_epochs"),
    (["--finetune_epochs", "1.5"], "--finetune_epochs"), (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0", str(2**32)], "--seeds"), (["--labels_per_class", "0"], "--labels_per_class"),
    (["--finetune_batch_size", "x"], "--finetune_batch_size"), (["--emb_dim", "0"], "--emb_dim"),
    (["--mask_strategy", "checkerboard"], "--mask_strategy"), (["--data_dir", "{tmp}/missing"], "--data_dir"),
    (["--log_dir", "{tmp}/a_file"], "--log_dir"), (["--log_dir", "{tmp}/a_file/below"], "--log_dir"),
    (["--log_dir", ""], "--log_dir"), (["--name", "a/b"], "--name"),
    (["--finetune_args", "--seed 3"], "--finetune_args"), (["--finetune_args", "--total 3"], "--finetune_args"),
    (["--pretrain_args", "--preset small"], "--pretrain_args"), (["--pretrain_args", '--augment "crop'],
                                                                 "--pretrain_args"),
    (["--dataset", "mnist"], "--dataset"), (["--time_budget", "5"], "--time_budget"),
])
def test_bad_arguments_exit_2_naming_the_flag_before_anything_is_written(tmp_path, capsys, extra, flag):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*STUDY, "--log_dir", str(tmp_path / "logs"), *(word.format(tmp=tmp_path) for word in extra)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and f"error: argument {flag}: " in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_file_in_place_of_the_sweep_folder_is_refused(tmp_path, capsys):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "sweep_t").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*STUDY, "--log_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "error: argument --name: " in capsys.readouterr().err


def test_without_data_dir_a_failed_download_stops_the_sweep_before_any_run(tmp_path, monkeypatch, cli_error):
    def no_network(root, train, download):
        raise OSError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.DATASETS, "cifar10", no_network)
    line = cli_error(sweep.main, [*STUDY, "--log_dir", tmp_path / "logs"])
    assert "could not download cifar10" in line and "--data_dir" in line
    assert not list(tmp_path.iterdir())  # no run folder, no study.json, no empty data/


def test_a_second_copy_of_a_running_sweep_is_refused_before_any_run(tiny_image_folder, tmp_path, cli_error):
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    first = utils.RunLock(folder, sweep.SWEEP_LOCK).acquire()  # what the first copy holds while it runs
    line = cli_error(sweep.main, [*STUDY, "--data_dir", tiny_image_folder, "--log_dir", tmp_path / "logs"])
    assert f"{folder} is being run by another sweep.py" in line
    assert [p.name for p in folder.iterdir()] == [sweep.SWEEP_LOCK]  # no run folder, no study.json
    first.release()


# -------------------------------------------------------------------------------- a real sweep, interrupted


def test_execute_returns_the_exit_code_of_a_real_process():
    assert sweep.execute([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert sweep.execute([sys.executable, "-c", "pass"]) == 0


@pytest.fixture
def in_process(monkeypatch, one_thread):
    """sweep.execute without a new Python for every run (each would spend seconds importing torch): the script
    runs as __main__ with the run's argv, as in its own process; its exit code is returned."""
    def execute(command):
        script, *argv = command[1:]  # the first word is this Python
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [script, *argv])
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exit:
                return exit.code if isinstance(exit.code, int) else 1
            except Exception:  # what a crashing process would print, and its exit code
                traceback.print_exc()
                return 1
        return 0

    monkeypatch.setattr(sweep, "execute", execute)
    return execute


def test_a_real_sweep_restarts_where_it_stopped_and_summarizes(tiny_image_folder, tmp_path, capfd, in_process):
    """A 2 x 2 sweep (decoder depth x seed) plus scratch runs, on 10 classes x (8 train + 2 test) 16 px images."""
    argv = [*STUDY, "--no_linear_probe", "--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs"),
            "--pretrain_args=--no_compile", "--finetune_args=--no_compile"]  # eager: tiny models, fast
    runs = plan(argv)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    save_study(argv)
    # Interruptions, made deterministic: one pretraining run stopped after its first epoch (its own command with
    # a 1-epoch schedule leaves exactly that behind), and one whose checkpoint is unreadable, so that it fails.
    interrupted, broken = runs["mae_dd2_ep2_s1"], runs["mae_dd1_ep2_s1"]
    command = list(interrupted.command)
    command[command.index("--total_epoch") + 1] = "1"
    assert in_process(command) == 0
    first_epoch = read_csv(interrupted.log_dir / "metrics.csv")
    assert len(first_epoch) == 1
    broken.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    broken.checkpoint.write_bytes(b"not a checkpoint")
    killed = runs["scratch_s0"]  # killed before its first save of the epoch to resume: its best weights are there
    command = list(killed.command)
    command[command.index("--total_epoch") + 1] = "1"
    assert in_process(command) == 0
    killed.checkpoint.unlink()

    assert sweep.main(argv) == 1  # a failed run fails the sweep, but the others still ran
    out = capfd.readouterr().out
    assert f"{interrupted.name}: resuming (1/2 epochs done)" in out
    assert f"{killed.name}: restarting (1 epochs logged but no checkpoint" in out  # started again, over its files
    assert f"{broken.name}: FAILED (exit code 2" in out and "ft_dd1_ep2_s1: not run" in out
    assert f"failed: {broken.name}" in out and "8 of 10 runs finished (0 of them already before this call)" in out
    resumed = read_csv(interrupted.log_dir / "metrics.csv")
    assert len(resumed) == 2 and resumed[0] == first_epoch[0]  # continued, not started again
    finished = [run for name, run in runs.items() if "dd1_ep2_s1" not in name]
    stamps = {run.name: ((run.log_dir / "metrics.csv").stat().st_mtime_ns, run.checkpoint.stat().st_mtime_ns)
              for run in finished}

    broken.checkpoint.unlink()  # what the user does about the error; then the same command again
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    for run in finished:
        assert f"{run.name}: skipped (finished: 2/2 epochs)" in out
        assert ((run.log_dir / "metrics.csv").stat().st_mtime_ns, run.checkpoint.stat().st_mtime_ns) == \
            stamps[run.name]
    assert f"{broken.name}: new" in out and "ft_dd1_ep2_s1: new" in out
    assert "10 of 10 runs finished (8 of them already before this call)" in out
    assert all(len(read_csv(run.log_dir / "metrics.csv")) == 2 for run in runs.values())
    assert json.loads((broken.log_dir / "settings.json").read_text())["settings"] == broken.settings

    summarize.main([str(folder), "--output_dir", str(tmp_path / "summary")])
    report = (tmp_path / "summary" / "results.md").read_text()
    assert report in capfd.readouterr().out

    def expected(prefix, column, pick):
        return [pick([float(row[column]) for row in read_csv(folder / f"{prefix}_s{seed}" / "metrics.csv")])
                for seed in (0, 1)]

    depth_rows = table_after(report, "Decoder depth")
    assert [row["decoder depth"] for row in depth_rows] == ["1", "2"]
    for row, depth in zip(depth_rows, (1, 2)):
        assert row["n"] == "2"
        assert row["final acc (%)"] == mean_std_text(expected(f"ft_dd{depth}_ep2", "val_acc", lambda v: v[-1]))
        assert row["pretrain loss"] == mean_std_text(expected(f"mae_dd{depth}_ep2", "loss", lambda v: v[-1]), 1, 4)
    everything = table_after(report, "All settings vs from scratch")
    assert [row["setting"] for row in everything] == ["decoder depth 1", "decoder depth 2", "from scratch"]
    assert everything[2]["final acc (%)"] == mean_std_text(expected("scratch", "val_acc", lambda v: v[-1]))
    assert everything[2]["pretrain loss"] == ""
    assert len(read_csv(tmp_path / "summary" / "runs.csv")) == 10
    for name in ("pretrain_loss_decoder_depth", "finetune_acc_decoder_depth", "finetune_acc_vs_scratch",
                 "accuracy_per_setting"):
        assert (tmp_path / "summary" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"({name}.png)" in report
