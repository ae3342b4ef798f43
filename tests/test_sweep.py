"""sweep.py: the plan, its names and paths, settings.json as earlier sweeps wrote it, restarting an interrupted
sweep, argument errors, and a real tiny sweep end to end (then summarized)."""
import csv
import io
import json
import runpy
import sys
import traceback
from contextlib import redirect_stderr

import pytest
import torch

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


# ------------------------------------------------------------------------------------- the plan (no training)


def test_plan_names_paths_and_stages(tmp_path, tiny_image_folder, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path / "logs"), "--data_dir", str(tiny_image_folder), "--dry_run"]
    runs = plan(argv)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    # 2 depths x 2 seeds x (pretrain, fine-tune, probe) + a scratch run per seed, seeds outermost.
    assert list(runs) == [f"{stage}_dd{depth}_random_mr0.75_ep2_s{seed}" if stage != "scratch" else f"scratch_s{seed}"
                          for seed in (0, 1) for depth in (1, 2, None) for stage in ("mae", "ft", "lp", "scratch")
                          if (depth is None) == (stage == "scratch")]
    pretrain, finetune = runs["mae_dd2_random_mr0.75_ep2_s1"], runs["ft_dd2_random_mr0.75_ep2_s1"]
    probe, scratch = runs["lp_dd2_random_mr0.75_ep2_s1"], runs["scratch_s1"]
    assert pretrain.checkpoint == folder / "checkpoints" / "mae_dd2_random_mr0.75_ep2_s1.pt"
    assert finetune.checkpoint == folder / "checkpoints" / "ft_dd2_random_mr0.75_ep2_s1_last.pt"
    assert option(finetune.command, "--output_model_path") == str(folder / "checkpoints" /
                                                                   "ft_dd2_random_mr0.75_ep2_s1.pt")
    assert pretrain.log_dir == folder / "mae_dd2_random_mr0.75_ep2_s1"
    for run in (finetune, probe):
        assert option(run.command, "--pretrained_model_path") == str(pretrain.checkpoint)
        assert run.needs is pretrain
    assert "--linear_probe" in probe.command and "--linear_probe" not in finetune.command
    assert "--pretrained_model_path" not in scratch.command and option(scratch.command, "--emb_dim") == "32"
    assert option(pretrain.command, "--run_name") == "sweep_t/mae_dd2_random_mr0.75_ep2_s1"
    assert option(pretrain.command, "--decoder_depth") == "2" and option(pretrain.command, "--seed") == "1"
    assert option(pretrain.command, "--data_dir") == str(tiny_image_folder)

    assert sweep.main(argv) == 0  # the dry run prints every command and writes nothing
    out = capfd.readouterr().out
    assert out.count(": new") == 14 and out.count("--linear_probe") == 4
    assert not (tmp_path / "logs").exists()


def test_no_linear_probe_plans_no_probes_and_warmup_scales(tmp_path, capfd):
    argv = [*STUDY, "--log_dir", str(tmp_path), "--no_linear_probe", "--pretrain_epochs", "40", "--finetune_epochs",
            "100", "--decoder_depth", "8", "8", "--mask_strategy", "blockwise", "--launcher", f"{sys.executable} -u",
            "--dry_run"]
    runs = plan(argv)
    assert list(runs) == ["mae_dd8_blockwise_mr0.75_ep40_s0", "ft_dd8_blockwise_mr0.75_ep40_s0", "scratch_s0",
                          "mae_dd8_blockwise_mr0.75_ep40_s1", "ft_dd8_blockwise_mr0.75_ep40_s1", "scratch_s1"]
    assert all(run.command[:2] == [sys.executable, "-u"] for run in runs.values())  # each script under the launcher
    assert option(runs["mae_dd8_blockwise_mr0.75_ep40_s0"].command, "--warmup_epoch") == "4"  # 10 %
    assert option(runs["scratch_s0"].command, "--warmup_epoch") == "5"                       # 5 %
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    assert "sweep_t: 6 runs" in out and "--linear_probe" not in out


def test_settings_match_what_earlier_sweeps_recorded(tmp_path):
    """settings.json of a sweep started by the earlier sweep.py: the same settings, so it continues, no conflict."""
    argv = ["--name", "old", "--decoder_depth", "2", "--mask_ratio", "0.9", "--pretrain_epochs", "4", "--emb_dim",
            "32", "--finetune_epochs", "3", "--linear_probe_epochs", "5", "--pretrain_args=--norm_pix_loss",
            "--probe_args=--patience 2", "--scratch", "--log_dir", str(tmp_path)]
    pretrain = {"stage": "pretrain", "seed": 0, "dataset": "cifar10", "decoder_depth": 2, "mask_strategy": "random",
                "mask_ratio": 0.9, "pretrain_epochs": 4, "pretrain_batch_size": None, "model_size": {"emb_dim": 32},
                "decoder_heads": None, "pretrain_args": ["--norm_pix_loss"]}
    recorded = {
        "mae_dd2_random_mr0.9_ep4_s0": pretrain,
        "ft_dd2_random_mr0.9_ep4_s0": {**pretrain, "stage": "finetune", "finetune_epochs": 3,
                                       "finetune_batch_size": None, "finetune_args": []},
        "lp_dd2_random_mr0.9_ep4_s0": {**pretrain, "stage": "linear_probe", "linear_probe_epochs": 5,
                                       "finetune_batch_size": None, "probe_args": ["--patience", "2"]},
        "scratch_s0": {"seed": 0, "dataset": "cifar10", "model_size": {"emb_dim": 32}, "stage": "scratch",
                       "finetune_epochs": 3, "finetune_batch_size": None, "finetune_args": []}}
    runs = plan(argv)
    assert list(runs) == list(recorded)
    for name, settings in recorded.items():
        run = runs[name]
        run.log_dir.mkdir(parents=True)
        (run.log_dir / "settings.json").write_text(json.dumps({"run": name, "settings": settings}))
        assert sweep.run_state(run) == ("new", "")
    assert [r.total_epochs for r in runs.values()] == [4, 3, 5, 3]


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
    out = capfd.readouterr().out.splitlines()
    lines = {line.split(":")[0].split("] ")[1]: line for line in out if "] " in line}
    assert "skipped (finished: 2/2 epochs)" in lines["mae_dd1_random_mr0.75_ep2_s0"]
    assert "resuming (1/2 epochs done)" in lines["ft_dd1_random_mr0.75_ep2_s0"]
    assert out[out.index(lines["ft_dd1_random_mr0.75_ep2_s0"]) + 1].endswith("--resume auto")
    assert "restarting" in lines["mae_dd2_random_mr0.75_ep2_s0"]
    assert "FAILED" in lines["mae_dd1_random_mr0.75_ep2_s1"]
    assert "no checkpoint" in lines["mae_dd1_random_mr0.75_ep2_s1"]
    assert "not run" in lines["ft_dd1_random_mr0.75_ep2_s1"]
    assert "other settings (finetune_epochs: 5 then, 2 now)" in lines["scratch_s0"]
    assert "skipped (finished: stopped early (--patience) after 1/2 epochs)" in lines["ft_dd2_random_mr0.75_ep2_s1"]
    assert "new" in lines["scratch_s1"]
    assert not (runs["scratch_s1"].log_dir).exists()  # a dry run writes nothing, not even settings.json


# --------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("extra, flag", [
    (["--decoder_depth", "1", "0"], "--decoder_depth"), (["--mask_ratio", "1"], "--mask_ratio"),
    (["--mask_ratio", "0"], "--mask_ratio"), (["--mask_ratio", "nan"], "--mask_ratio"),
    (["--pretrain_epochs", "0"], "--pretrain_epochs"), (["--finetune_epochs", "1.5"], "--finetune_epochs"),
    (["--linear_probe_epochs", "-1"], "--linear_probe_epochs"), (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0", str(2**32)], "--seeds"), (["--pretrain_batch_size", "0"], "--pretrain_batch_size"),
    (["--finetune_batch_size", "x"], "--finetune_batch_size"),
    (["--max_device_batch_size", "0"], "--max_device_batch_size"), (["--emb_dim", "0"], "--emb_dim"),
    (["--decoder_heads", "0"], "--decoder_heads"), (["--mask_strategy", "checkerboard"], "--mask_strategy"),
    (["--device", "gpu"], "--device"), (["--data_dir", "{tmp}/missing"], "--data_dir"),
    (["--log_dir", "{tmp}/a_file"], "--log_dir"), (["--log_dir", "{tmp}/a_file/below"], "--log_dir"),
    (["--log_dir", ""], "--log_dir"), (["--no_linear_probe", "--linear_probe_epochs", "3"], "--linear_probe_epochs"),
    (["--name", "a/b"], "--name"), (["--launcher", "no_such_launcher --x"], "--launcher"),
    (["--finetune_args", "--seed 3"], "--finetune_args"), (["--probe_args", "--total 3"], "--probe_args"),
    (["--pretrain_args", '--augment "crop'], "--pretrain_args"), (["--dataset", "mnist"], "--dataset"),
])
def test_bad_arguments_exit_2_naming_the_flag_before_anything_is_written(tmp_path, capsys, extra, flag):
    (tmp_path / "a_file").write_text("not a folder")
    argv = [*STUDY, "--log_dir", str(tmp_path / "logs"), *(word.format(tmp=tmp_path) for word in extra)]
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
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


# -------------------------------------------------------------------------------- a real sweep, interrupted


def test_execute_returns_the_exit_code_of_a_real_process():
    assert sweep.execute([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert sweep.execute([sys.executable, "-c", "pass"]) == 0


REAL_CHECK = sweep.check_command


@pytest.fixture(autouse=True)
def checks_in_process(monkeypatch):
    """sweep.check_command without a new Python per check: the script's main, as in its own process."""
    def check_command(script_args):
        script, *argv = script_args
        with monkeypatch.context() as m, redirect_stderr(io.StringIO()) as err:
            m.setattr(sys, "argv", [script, *argv])
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exit:
                return (exit.code if isinstance(exit.code, int) else 1), err.getvalue()
        return 0, err.getvalue()

    monkeypatch.setattr(sweep, "check_command", check_command)


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


def test_sweep_restarts_where_it_stopped_and_summarizes(tiny_image_folder, tmp_path, capfd, in_process):
    """A 2 x 2 sweep (decoder depth x seed) plus scratch runs, on 10 classes x (8 train + 2 test) 16 px images."""
    argv = [*STUDY, "--no_linear_probe", "--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs"),
            "--pretrain_args=--no_compile", "--finetune_args=--no_compile"]  # eager: tiny models, fast
    runs = plan(argv)
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    # Interruptions, made deterministic: one pretraining run stopped after its first epoch (its own command with
    # a 1-epoch schedule leaves exactly that behind), and one whose checkpoint is unreadable, so that it fails.
    interrupted, broken = runs["mae_dd2_random_mr0.75_ep2_s1"], runs["mae_dd1_random_mr0.75_ep2_s1"]
    command = list(interrupted.command)
    command[command.index("--total_epoch") + 1] = "1"
    assert in_process(command) == 0
    first_epoch = read_csv(interrupted.log_dir / "metrics.csv")
    assert len(first_epoch) == 1
    broken.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    broken.checkpoint.write_bytes(b"not a checkpoint")

    assert sweep.main(argv) == 1  # a failed run fails the sweep, but the others still ran
    out = capfd.readouterr().out
    assert f"{interrupted.name}: resuming (1/2 epochs done)" in out
    assert f"{broken.name}: FAILED (exit code 2" in out
    assert "ft_dd1_random_mr0.75_ep2_s1: not run" in out
    assert f"failed: {broken.name}" in out and "8 of 10 runs finished (0 of them already before this call)" in out
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
        setting = f"dd{depth}_random_mr0.75_ep2"
        assert row["n"] == "2"
        assert row["final acc (%)"] == mean_std_text(expected(f"ft_{setting}", "val_acc", lambda v: v[-1]))
        assert row["best acc (%)"] == mean_std_text(expected(f"ft_{setting}", "val_acc", max))
        assert row["pretrain loss"] == mean_std_text(expected(f"mae_{setting}", "loss", lambda v: v[-1]), 1, 4)
    everything = table_after(report, "All settings vs from scratch")
    assert [row["setting"] for row in everything] == ["decoder depth 1", "decoder depth 2", "from scratch"]
    assert everything[2]["final acc (%)"] == mean_std_text(expected("scratch", "val_acc", lambda v: v[-1]))
    assert everything[2]["pretrain loss"] == ""
    assert len(read_csv(tmp_path / "summary" / "runs.csv")) == 10
    for name in ("pretrain_loss_decoder_depth", "finetune_acc_decoder_depth", "finetune_acc_vs_scratch",
                 "accuracy_per_setting"):
        png = (tmp_path / "summary" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
        assert f"({name}.png)" in report


@pytest.mark.parametrize("extra, expected", [
    (["--finetune_args=--mixup nan"], "ft_dd1_random_mr0.75_ep2_s0: train_classifier.py: error: argument --mixup"),
    (["--pretrain_args=--bogus 3"], "unrecognized arguments: --bogus 3"),
    (["--decoder_depth", "1", "--mask_strategy", "grid", "--mask_ratio", "0.3"], "grid masking cannot keep"),
    (["--finetune_batch_size", "1024"], "--batch_size 1024 is larger than the 80 training images"),
], ids=["finetune-option", "unknown-option", "grid-ratio", "finetune-batch-above-data"])
def test_options_a_run_would_refuse_stop_the_sweep_before_anything_runs(tiny_image_folder, tmp_path, capfd,
                                                                         in_process, extra, expected):
    argv = [*STUDY, "--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs"), *extra]
    for dry_run in ([], ["--dry_run"]):
        assert sweep.main(argv + dry_run) == 2
        err = capfd.readouterr().err  # a refusal goes to stderr, as the scripts' own do
        assert "nothing was started; these commands would fail" in err and expected in err
    assert not (tmp_path / "logs").exists()


def test_without_data_dir_a_failed_download_stops_the_sweep_before_any_run(tmp_path, capfd, monkeypatch, in_process):
    def no_network(root, train, download):
        raise OSError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.DATASETS, "cifar10", no_network)
    assert sweep.main([*STUDY, "--log_dir", str(tmp_path / "logs")]) == 2
    err = capfd.readouterr().err
    assert "nothing was started; could not download cifar10" in err and "--data_dir" in err
    assert not list(tmp_path.iterdir())  # no run folder, no settings.json, no empty data/


def test_a_second_copy_of_a_running_sweep_is_refused_before_any_run(tiny_image_folder, tmp_path, capfd, in_process):
    folder = tmp_path / "logs" / "cifar10" / "sweep_t"
    first = utils.RunLock(folder, sweep.SWEEP_LOCK).acquire()  # what the first copy holds while it runs
    assert sweep.main([*STUDY, "--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs")]) == 2
    assert "nothing was started; " + f"{folder} is being run by another sweep.py" in capfd.readouterr().err
    assert [p.name for p in folder.iterdir()] == [sweep.SWEEP_LOCK]  # no run folder, no settings.json
    first.release()


def test_check_args_of_a_real_script_process(tiny_image_folder, tmp_path):
    base = ["--data_dir", str(tiny_image_folder), "--log_dir", str(tmp_path / "logs"), "--device", "cpu",
            "--batch_size", "16"]  # the default 128 is more than the 80 images: refused too
    code, output = REAL_CHECK([str(sweep.HERE / "train_classifier.py"), *base, "--mixup", "-1", "--check_args"])
    assert code == 2 and "argument --mixup" in output
    assert REAL_CHECK([str(sweep.HERE / "train_classifier.py"), *base, "--check_args"])[0] == 0
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------- equal compute (budgets)


def test_a_budget_sweep_splits_each_mae_budget_and_gives_scratch_all_of_it(tmp_path, tiny_image_folder, capfd):
    argv = ["--name", "b", "--decoder_depth", "1", "--seeds", "0", "--time_budget", "10", "30", "--pretrain_share",
            "0.4", "--scratch", "--no_linear_probe", "--device", "cpu", *TINY_MODEL, "--log_dir", str(tmp_path),
            "--data_dir", str(tiny_image_folder), "--dry_run"]
    runs = plan(argv)
    assert list(runs) == ["mae_dd1_random_mr0.75_tb10_s0", "ft_dd1_random_mr0.75_tb10_s0", "scratch_tb10_s0",
                          "mae_dd1_random_mr0.75_tb30_s0", "ft_dd1_random_mr0.75_tb30_s0", "scratch_tb30_s0"]
    minutes = {name: float(option(run.command, "--time_budget")) for name, run in runs.items()}
    assert minutes["mae_dd1_random_mr0.75_tb10_s0"] + minutes["ft_dd1_random_mr0.75_tb10_s0"] == 10
    assert minutes["mae_dd1_random_mr0.75_tb10_s0"] == 4 and minutes["scratch_tb10_s0"] == 10
    assert minutes["scratch_tb30_s0"] == 30
    for run in runs.values():  # the scripts plan the epochs; the sweep sets none
        assert "--total_epoch" not in run.command and "--warmup_epoch" not in run.command
        assert run.total_epochs is None and run.settings["time_budget"] in (10, 30)
    assert sweep.main(argv) == 0  # each script's --check_args accepts the budget
    assert capfd.readouterr().out.count(": new") == 6


@pytest.mark.parametrize("extra", [["--pretrain_epochs", "3"], ["--finetune_epochs", "3"]])
def test_a_budget_sweep_refuses_epoch_counts(tmp_path, extra, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--time_budget", "5", *extra, "--log_dir", str(tmp_path)])
    assert "--time_budget plans every run's epochs" in capsys.readouterr().err


def test_a_budget_run_counts_as_finished_by_the_epochs_it_planned(tmp_path):
    (run,) = [r for r in sweep.plan(sweep.parse_args(["--time_budget", "5", "--scratch", "--no_linear_probe",
                                                       "--log_dir", str(tmp_path)])) if r.name == "scratch_tb5_s0"]
    assert sweep.run_state(run)[0] == "new"
    run.log_dir.mkdir(parents=True)
    run.checkpoint.parent.mkdir(parents=True)
    run.checkpoint.write_bytes(b"x")
    (run.log_dir / "metrics.csv").write_text("epoch,val_acc\n1,0.1\n2,0.2\n")
    assert sweep.run_state(run) == ("resuming", "2/planned epochs done")  # it has not written its plan down yet
    (run.log_dir / "budget.json").write_text(json.dumps({"total_epoch": 2}))
    assert sweep.run_state(run) == ("skipped", "finished: 2/2 epochs")


def test_scratch_only_plans_the_from_scratch_runs_alone(tmp_path):
    runs = plan(["--time_budget", "30", "--seeds", "0", "1", "--scratch_only", "--log_dir", str(tmp_path)])
    assert list(runs) == ["scratch_tb30_s0", "scratch_tb30_s1"]
