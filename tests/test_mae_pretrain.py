"""mae_pretrain.py end to end: checkpoint and logs, run names, determinism, resume, SIGTERM, errors, torchrun."""
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import mae_pretrain
import run_setup
import utils
from conftest import REPO, SUBPROCESS_ENV, assert_one_line_error, load_state, read_metrics, run_dirs, write_image_folder
from model import MAE_ViT

MAE_COLUMNS = ["epoch", "loss", "lr", "seconds", "images_per_s"]
pytestmark = pytest.mark.usefixtures("one_thread")


def losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir)[1]]


# ---------------------------------------------------------------------------------------------- end to end


def test_pretraining_writes_checkpoint_csv_and_tensorboard(mae_run):
    checkpoint = load_state(mae_run.checkpoint)  # weights_only=True
    assert checkpoint["kind"] == "mae"
    assert checkpoint["epoch"] == 2 == checkpoint["args"]["total_epoch"]
    assert {"optimizer", "rng", "position"} <= set(checkpoint) and checkpoint["position"] is None
    model = MAE_ViT(16, 2, 32, 1, 2, 1, 2)
    model.load_state_dict(checkpoint["model"])  # the tiny model's exact layout

    header, rows = read_metrics(mae_run.run_dir)
    assert header[:len(MAE_COLUMNS)] == MAE_COLUMNS
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(math.isfinite(float(row["loss"])) and float(row["loss"]) > 0 for row in rows)
    assert all(float(row["images_per_s"]) > 0 for row in rows)
    # The warm-up epoch runs at the peak lr (1.5e-4 * 16 / 256), then the cosine lowers it.
    assert float(rows[0]["lr"]) == pytest.approx(1.5e-4 * 16 / 256)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = mae_run.run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = accumulator.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([float(row["loss"]) for row in rows], rel=1e-6)
    assert [i.step for i in accumulator.Images("mae_image")] == [1, 2]


def test_the_run_records_its_settings_and_final_metrics_for_the_hparams_view(mae_run):
    from conftest import read_hparams

    settings, metrics = read_hparams(mae_run.run_dir)
    assert settings["mask_ratio"] == pytest.approx(0.75) and settings["mask_strategy"] == "random"  # the model's
    assert settings["emb_dim"] == 32 and settings["decoder_emb_dim"] == "none"
    assert settings["total_epoch"] == 2 and settings["resume"] == "none"
    assert metrics == {"loss": pytest.approx(float(read_metrics(mae_run.run_dir)[1][-1]["loss"]), rel=1e-6)}


def test_reconstruction_grid_is_logged_every_n_epochs_and_at_both_ends(tmp_path, mae_argv, monkeypatch):
    monkeypatch.setattr(mae_pretrain, "IMAGE_EVERY", 2)
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 5, "--warmup_epoch", 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = run_dirs(tmp_path / "logs")
    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [i.step for i in accumulator.Images("mae_image")] == [1, 2, 4, 5]


# ------------------------------------------------------------------------------------------------ run names


def chosen_names(monkeypatch, argv):
    """The log folder and checkpoint path ``main`` picks for ``argv``, without training anything."""
    args = mae_pretrain.parse_args(argv)
    return {"log_dir": f"{args.log_dir}/{args.dataset}/{args.run_name}", "model_path": args.model_path}


def test_default_settings_name_the_run_mae(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository
    seen = chosen_names(monkeypatch, ["--log_dir", "logs", "--device", "cpu"])
    assert seen == {"log_dir": "logs/cifar10/mae", "model_path": "vit-t-mae.pt"}
    seen = chosen_names(monkeypatch, ["--log_dir", "logs", "--device", "cpu", "--decoder_depth", "8",
                                      "--mask_strategy", "block"])
    assert seen == {"log_dir": "logs/cifar10/mae_dd8_block", "model_path": "vit-t-mae_dd8_block.pt"}


def test_ablation_settings_get_their_own_folder(tmp_path, mae_argv):
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1))
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, "--decoder_depth", 8, "--mask_strategy", "block",
                               model_name="ablation.pt"))
    baseline, ablation = sorted(run_dirs(tmp_path / "logs"), key=lambda p: "block" in p.name)
    assert "dd8" in ablation.name and "block" in ablation.name
    assert "dd8" not in baseline.name and "block" not in baseline.name
    assert [len(read_metrics(d)[1]) for d in (baseline, ablation)] == [1, 1]
    checkpoint = load_state(tmp_path / "ablation.pt")
    assert (checkpoint["args"]["decoder_depth"], checkpoint["args"]["mask_strategy"]) == (8, "block")
    assert "decoder.transformer.7.attn.qkv.weight" in checkpoint["model"]


def test_second_fresh_run_into_the_same_folder_fails(tmp_path, mae_argv, run_script):
    argv = mae_argv(tmp_path, "--total_epoch", 1)
    mae_pretrain.main(argv)
    (run_dir,) = run_dirs(tmp_path / "logs")
    csv_before, checkpoint_before = (run_dir / "metrics.csv").read_bytes(), (tmp_path / "mae.pt").read_bytes()
    result = run_script("mae_pretrain.py", *argv, cwd=tmp_path)
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr)
    assert "already holds a run" in line and "--resume auto" in line
    assert (run_dir / "metrics.csv").read_bytes() == csv_before  # nothing was overwritten
    assert (tmp_path / "mae.pt").read_bytes() == checkpoint_before


# -------------------------------------------------------------------------------- determinism and resume


def test_same_seed_gives_identical_losses(tmp_path, mae_argv):
    for name in ("a", "b"):
        mae_pretrain.main(mae_argv(tmp_path / name))
    mae_pretrain.main(mae_argv(tmp_path / "other_seed", "--seed", 1))
    (a,), (b,), (other,) = (run_dirs(tmp_path / name / "logs") for name in ("a", "b", "other_seed"))
    assert losses(a) == losses(b)  # the exact strings: bit-identical on the CPU
    assert losses(a) != losses(other)
    weights_a, weights_b = (load_state(tmp_path / name / "mae.pt")["model"] for name in ("a", "b"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, mae_argv, stop_after_epoch):
    mae_pretrain.main(mae_argv(tmp_path / "full", "--total_epoch", 3))

    argv = mae_argv(tmp_path / "split", "--total_epoch", 3)  # the same schedule: it depends on total_epoch
    with stop_after_epoch(2) as flags:
        mae_pretrain.main(argv)
    assert len(flags) == 1
    (run_dir,) = run_dirs(tmp_path / "split" / "logs")
    assert [row["epoch"] for row in read_metrics(run_dir)[1]] == ["1", "2"]
    assert load_state(tmp_path / "split" / "mae.pt")["epoch"] == 2

    mae_pretrain.main(argv + ["--resume", "auto"])
    full, resumed = load_state(tmp_path / "full" / "mae.pt"), load_state(tmp_path / "split" / "mae.pt")
    assert resumed["epoch"] == full["epoch"] == 3
    assert full["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    (full_dir,) = run_dirs(tmp_path / "full" / "logs")
    assert [row["epoch"] for row in read_metrics(run_dir)[1]] == ["1", "2", "3"]  # no duplicates
    assert losses(run_dir) == losses(full_dir)


def test_sigterm_finishes_the_epoch_saves_and_exits_143(tmp_path, mae_argv):
    # Long enough never to finish on its own; checkpoints only at the end, so a checkpoint proves the stop saved.
    argv = mae_argv(tmp_path, "--total_epoch", 1000, "--warmup_epoch", 1)  # saves after 5 minutes
    process = subprocess.Popen([sys.executable, str(REPO / "mae_pretrain.py"), *argv], cwd=tmp_path,
                               env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        csv_path = None
        while time.monotonic() < deadline and process.poll() is None:
            found = list((tmp_path / "logs").glob("*/*/metrics.csv"))
            if found and len(found[0].read_text().splitlines()) >= 2:  # header and the first epoch
                csv_path = found[0]
                break
            time.sleep(0.05)
        assert csv_path is not None, process.communicate(timeout=5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr  # stopping is not success
    assert "SIGTERM" in stderr
    checkpoint = load_state(tmp_path / "mae.pt")
    assert checkpoint["kind"] == "mae"
    rows = read_metrics(csv_path.parent)[1]
    assert 1 <= checkpoint["epoch"] < 1000
    assert [int(row["epoch"]) for row in rows] == list(range(1, checkpoint["epoch"] + 1))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("extra, message", [
    (["--mask_ratio", 1.5], "argument --mask_ratio: 1.5 is not allowed: it must be in (0, 1)"),
    (["--mask_ratio", 0], "argument --mask_ratio: 0 is not allowed: it must be in (0, 1)"),
    (["--patch_size", 3], "--patch_size 3 does not divide the 16 px images"),
    (["--emb_dim", 33], "--emb_dim 33 is not divisible by --encoder_heads 2"),
    (["--decoder_emb_dim", 7], "the decoder width 7 is not divisible by --decoder_heads 2"),
    # 8 x 8 patches, ratio 0.82 keeps int(64 * 0.18) = 11: a prime larger than the side, so no r x c rectangle.
    (["--mask_strategy", "block", "--mask_ratio", 0.82], "cannot keep 11 of 64 patches"),
    (["--mask_strategy", "grid", "--mask_ratio", 0.82], "cannot keep 11 of 64 patches"),
    (["--batch_size", 16, "--max_device_batch_size", 6], "not divisible by --max_device_batch_size 6"),
    (["--batch_size", 1024, "--max_device_batch_size", 8], "--batch_size 1024 is larger than the 80 training images"),
], ids=["ratio-above-1", "ratio-0", "patch-size", "width-heads", "decoder-width-heads", "block-ratio", "grid-ratio",
        "micro-batch", "batch-above-data"])
def test_bad_settings_fail_with_one_line(tmp_path, mae_argv, cli_error, extra, message, monkeypatch):
    def data_must_not_load(*args, **kwargs):  # shapes and ratios are judged before the data set loads
        raise AssertionError("the data set was loaded before the error")

    monkeypatch.setattr(run_setup, "load_dataset", data_must_not_load)
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, *extra))
    assert message in line
    assert not (tmp_path / "mae.pt").exists()


def test_a_ratio_the_grid_can_make_trains(tmp_path, mae_argv):
    # The counterpart of the case above: 0.9 keeps int(64 * 0.1) = 6 = 2 x 3 patches, which block and grid can.
    mae_pretrain.main(mae_argv(tmp_path, "--mask_strategy", "grid", "--mask_ratio", 0.9, "--total_epoch", 1))
    assert load_state(tmp_path / "mae.pt")["args"]["mask_ratio"] == 0.9


def test_bad_settings_from_the_command_line(tmp_path, mae_argv, run_script):
    result = run_script("mae_pretrain.py", *mae_argv(tmp_path, "--mask_ratio", 1.5), cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --mask_ratio: 1.5" in assert_one_line_error(result.stderr)
    assert not list(tmp_path.glob("logs/*/*/*"))  # refused before any file


@pytest.mark.parametrize("case", ["empty", "class-mismatch", "missing"])
def test_bad_image_folders_fail_with_one_line(tmp_path, mae_argv, cli_error, case):
    folder = tmp_path / "images"
    if case == "empty":
        for split in ("train", "test"):
            (folder / split / "cat").mkdir(parents=True)
        expected = "holds no images"
    elif case == "class-mismatch":
        write_image_folder(folder, ["cat", "dog"], ["cat", "frog"], train_per_class=8, test_per_class=1)
        expected = "differ from train classes"
    else:
        expected = "is not a folder"
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--data_dir", folder))
    assert expected in line


def test_failed_download_says_to_pass_data_dir(tmp_path, mae_argv, cli_error, monkeypatch):
    def no_network(root, train, download):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.DATASETS, "cifar10", no_network)
    argv = mae_argv(tmp_path)
    at = argv.index("--data_dir")
    del argv[at:at + 2]
    line = cli_error(mae_pretrain.main, argv)
    assert "could not download cifar10" in line and "--data_dir" in line


# ------------------------------------------------------------------------------------------------- torchrun


def torchrun(workdir, argv):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(REPO / "mae_pretrain.py"), *argv], cwd=workdir, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_stopped_and_resumed_train_the_same_weights(tmp_path, mae_argv):
    """Under torchrun each process draws its own masks: a stop saves every process's random streams, and the
    resumed run (stopped by SIGTERM to the launcher, which passes it on) ends with the uninterrupted run's weights."""
    argv = {name: mae_argv(tmp_path / name, "--total_epoch", 16, "--warmup_epoch", 1) for name in ("whole", "stopped")}
    for name in argv:
        (tmp_path / name).mkdir()
    whole = torchrun(tmp_path / "whole", argv["whole"])
    stopped = torchrun(tmp_path / "stopped", argv["stopped"])
    try:
        deadline, csv = time.monotonic() + 120, tmp_path / "stopped" / "logs"
        while time.monotonic() < deadline and not any(len(read_metrics(c.parent)[1]) >= 1 for c in
                                                      csv.rglob("metrics.csv")):
            time.sleep(0.05)
        stopped.send_signal(signal.SIGTERM)
        stopped.communicate(timeout=120)
        assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]
    finally:
        for process in (whole, stopped):
            if process.poll() is None:
                process.kill()
    assert 1 <= load_state(tmp_path / "stopped" / "mae.pt")["epoch"] < 16  # it stopped, and saved
    resumed = torchrun(tmp_path / "stopped", [*argv["stopped"], "--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    ends = [load_state(tmp_path / name / "mae.pt") for name in argv]
    assert ends[0]["epoch"] == ends[1]["epoch"] == 16
    for key, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][key]), key
    csvs = list((tmp_path / "whole" / "logs").rglob("metrics.csv"))
    assert len(csvs) == 1  # only rank 0 logs
    assert [int(row["epoch"]) for row in read_metrics(csvs[0].parent)[1]] == list(range(1, 17))
    assert len(list(csvs[0].parent.glob("events.out.tfevents.*"))) == 1


def test_resume_with_another_mask_strategy_is_refused(tmp_path, mae_argv, cli_error):
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, "--run_name", "r"))
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--total_epoch", 2, "--run_name", "r",
                                                 "--mask_strategy", "grid", "--resume", "auto"))
    assert "cannot resume" in line and "mask_strategy: 'random' -> 'grid'" in line


def test_a_finished_checkpoint_is_not_replaced_by_a_new_run(tmp_path, mae_argv, cli_error):
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1))
    before = (tmp_path / "mae.pt").read_bytes()
    other_logs = ["--log_dir", str(tmp_path / "other_logs")]  # same name, another --log_dir
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--total_epoch", 1, *other_logs))
    assert "already exists" in line and "--overwrite" in line
    assert (tmp_path / "mae.pt").read_bytes() == before
    assert mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, *other_logs, "--overwrite")) == 0


def test_resuming_another_runs_checkpoint_is_refused(tmp_path, mae_argv, cli_error):
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1))
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--total_epoch", 2, "--resume", "auto",
                                                 "--log_dir", str(tmp_path / "other_logs")))
    assert "belongs to the run in" in line


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, mae_argv, capsys):
    mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, "--run_name", "r"))
    run_dir = tmp_path / "logs" / "cifar10" / "r"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    checkpoint = (tmp_path / "mae.pt").read_bytes()
    assert not mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, "--run_name", "r", "--resume", "auto"))
    assert "has finished all 1 of --total_epoch 1 epochs: nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert (tmp_path / "mae.pt").read_bytes() == checkpoint


def test_two_runs_may_not_write_one_checkpoint_at_the_same_time(tmp_path, mae_argv, cli_error):
    held = utils.RunLock.for_file(tmp_path / "mae.pt").acquire()  # another live run writing mae.pt
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--total_epoch", 1, "--log_dir", str(tmp_path / "b")))
    assert "mae.pt is being written by another running run" in line
    assert not (tmp_path / "mae.pt").exists()
    held.file.close()
