"""utils.py: argument checks, run names, locks, logging, seeding and the command-line wrapper."""
import csv

import pytest

import devices
import utils
from utils import UserError

TINY = dict(image_size=16, patch_size=2, emb_dim=32, encoder_layer=1, encoder_head=2, decoder_layer=1,
            decoder_head=2)


# --------------------------------------------------------------------------------------------- small helpers


@pytest.mark.parametrize("batch, max_device, world, expected", [
    (4096, 512, 1, (512, 8)), (128, 256, 1, (128, 1)), (4096, 512, 4, (512, 2)), (256, 512, 2, (128, 1))])
def test_split_batch(batch, max_device, world, expected):
    assert devices.split_batch(batch, max_device, world) == expected


def test_split_batch_rejects_uneven_splits():
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        devices.split_batch(128, 64, 3)
    with pytest.raises(UserError, match=r"per process \(96\) is not divisible by --max_device_batch_size 64"):
        devices.split_batch(96, 64, 1)


def test_run_cli_turns_user_errors_into_one_line_and_exit_code_2(capsys):
    def main(argv):
        raise UserError("mask ratio must lie strictly between 0 and 1")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: mask ratio must lie strictly between 0 and 1\n"


# ------------------------------------------------------------------------------------------------------ logging


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_run_logger_writes_a_header_then_one_row_per_epoch(tmp_path):
    logger = utils.RunLogger(tmp_path / "run", ["train_loss", "lr"], start_epoch=1)
    for epoch in (1, 2, 3):
        logger.log(epoch, train_loss=1.0 / epoch, lr=0.1)
    logger.close()
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert rows[0] == ["epoch", "train_loss", "lr"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3"]
    assert float(rows[2][1]) == pytest.approx(0.5)
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_run_logger_resume_drops_rows_from_the_restart_epoch_on(tmp_path):
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=1)
    for epoch in (1, 2, 3, 4):
        logger.log(epoch, loss=float(epoch))
    logger.close()
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=3)  # resuming after epoch 2's checkpoint
    logger.log(3, loss=30.0)
    logger.close()
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows == [["epoch", "loss"], ["1", "1.0"], ["2", "2.0"], ["3", "30.0"]]


def test_hparams_keep_scalar_settings_in_the_run_folder_itself(tmp_path):
    from conftest import read_hparams

    logger = utils.RunLogger(tmp_path, ["loss"])
    logger.log(1, loss=0.5)
    logger.log_hparams({"lr": 0.1, "depth": 4, "name": "x", "flag": True, "resume": None, "sizes": [1, 2]},
                       {"loss": 0.25, "knn_acc": None}, epoch=1)
    logger.close()
    settings, metrics = read_hparams(tmp_path)  # exactly one events file: no timestamped subfolder
    assert settings == {"lr": 0.1, "depth": 4, "name": "x", "flag": 1, "resume": "none"}
    assert metrics == {"loss": 0.25} and [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = utils.RunLogger(tmp_path / "run", ["loss"], enabled=False)
    logger.log(1, loss=1.0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_tags_group_by_prefix():
    assert utils.tensorboard_tag("train_loss") == "train/loss"
    assert utils.tensorboard_tag("knn_acc") == "knn/acc"
    assert utils.tensorboard_tag("lr") == "lr"




def test_run_logger_keeps_rows_and_columns_when_a_resume_logs_other_monitors(tmp_path):
    logger = utils.RunLogger(tmp_path, ["loss", "val_acc_ema"], start_epoch=1)
    for epoch in (1, 2):
        logger.log(epoch, loss=float(epoch), val_acc_ema=0.5)
    logger.close()
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=3)  # resumed without the EMA
    logger.log(3, loss=3.0)
    logger.close()
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows == [["epoch", "loss", "val_acc_ema"], ["1", "1.0", "0.5"], ["2", "2.0", "0.5"], ["3", "3.0", ""]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_run_logger_writes_no_header_only_csv_before_the_first_row(tmp_path):
    logger = utils.RunLogger(tmp_path / "run", ["loss"], start_epoch=1)
    logger.close()  # a first epoch that failed
    assert not (tmp_path / "run" / "metrics.csv").exists()
    assert utils.logged_rows(tmp_path / "run" / "metrics.csv") == 0


def test_a_run_started_again_from_epoch_1_replaces_the_old_csv_and_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    old = utils.RunLogger(tmp_path, ["loss", "val_acc_ema"], start_epoch=1)
    for epoch in (1, 2, 3):
        old.log(epoch, loss=10.0, val_acc_ema=0.5)
    old.close()
    (tmp_path / "notes.txt").write_text("kept")
    new = utils.RunLogger(tmp_path, ["loss"], start_epoch=1)  # --overwrite: the same folder, a new run
    new.log(1, loss=1.0)
    new.close()
    assert read_rows(tmp_path / "metrics.csv") == [["epoch", "loss"], ["1", "1.0"]]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0)]
    assert (tmp_path / "notes.txt").read_text() == "kept"  # only the logger's own files go


def test_run_lock_refuses_a_second_holder_and_is_released_with_the_process(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(utils.__file__)!r}"
                               f".rsplit('/', 1)[0]); import utils, time; "
                               f"lock = utils.RunLock({str(tmp_path)!r}).acquire(); "
                               f"print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use by another running copy"):
            utils.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert utils.RunLock(tmp_path).acquire().file is not None  # a dead process holds nothing


def test_run_cli_reports_os_errors_with_the_path(capsys):
    def main(argv):
        raise PermissionError(13, "Permission denied", "/read-only/metrics.csv")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: /read-only/metrics.csv: Permission denied\n"


@pytest.mark.parametrize("code", [0, 130, 143])
def test_run_cli_exits_with_the_code_main_returns(code):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(lambda argv: code, [])
    assert exit_info.value.code == code


def test_a_checkpoint_lock_refuses_a_second_writer_of_the_same_file(tmp_path):
    first = utils.RunLock.for_file(tmp_path / "model.pt").acquire()
    with pytest.raises(utils.UserError, match="model.pt is being written by another running run"):
        utils.RunLock.for_file(tmp_path / "model.pt").acquire()
    utils.RunLock.for_file(tmp_path / "other.pt").acquire()  # another output is free
    assert first.path == tmp_path / ".model.pt.lock"
    first.file.close()  # the holder ends: the file is free again
    utils.RunLock.for_file(tmp_path / "model.pt").acquire()
