"""Resume and stop semantics, end to end on tiny runs: a stop takes effect at the next optimizer step and resumes
bit for bit; a resumed run trains with the schedule its command line says (applied changes, inherited flags)."""
import pytest
import torch

import engine
import mae_pretrain
import train_classifier
from conftest import load_state, read_metrics, run_dirs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stop_at_step(monkeypatch):
    """``stop_at_step(n)``: the run behaves as if SIGTERM arrived before the ``n``-th ``StopFlag.poll`` of the
    process (one after every micro-batch but an epoch's last), as when the signal handler has run."""
    def arm(step):
        polls = []
        poll = engine.StopFlag.poll

        def counting_poll(self):
            polls.append(1)
            if len(polls) == step:
                self.requested, self.exit_code = True, 143
            return poll(self)

        monkeypatch.setattr(engine.StopFlag, "poll", counting_poll)
        return polls

    return arm


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 80 training images, batch 16 in micro-batches of 8: 5 optimizer steps an epoch, 10 micro-batches. A stop after
# the 4th micro-batch of epoch 2 ends its 2nd step; after the 3rd, it drops the half-accumulated step, which the
# resumed run trains again.
@pytest.mark.parametrize("poll, steps", [(13, 2), (12, 1)])
def test_pretraining_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, mae_argv, stop_at_step, poll, steps):
    mae_pretrain.main(mae_argv(tmp_path / "full", "--total_epoch", 2))
    argv = mae_argv(tmp_path / "split", "--total_epoch", 2)
    stop_at_step(poll)  # 9 polls in epoch 1 (its last micro-batch ends the epoch anyway)
    assert mae_pretrain.main(argv) == 143
    stopped = load_state(tmp_path / "split" / "mae.pt")
    assert stopped["epoch"] == 1 and stopped["position"]["optimizer_steps"] == steps
    assert stopped["position"]["micro_batches"] == 2 * steps
    (run_dir,) = run_dirs(tmp_path / "split" / "logs")
    assert [row["epoch"] for row in read_metrics(run_dir)[1]] == ["1"]  # the stopped epoch is not logged

    stop_at_step(10 ** 9)  # no stop this time
    assert mae_pretrain.main(argv + ["--resume", "auto"]) == 0
    full, resumed = load_state(tmp_path / "full" / "mae.pt"), load_state(tmp_path / "split" / "mae.pt")
    assert resumed["epoch"] == full["epoch"] == 2 and resumed["position"] is None
    assert same_weights(full["model"], resumed["model"])
    (full_dir,) = run_dirs(tmp_path / "full" / "logs")
    assert [r["loss"] for r in read_metrics(run_dir)[1]] == [r["loss"] for r in read_metrics(full_dir)[1]]


def test_finetuning_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, cls_argv, stop_at_step):
    extra = ["--total_epoch", 2, "--base_learning_rate", 0.01, "--model_ema", 0.9, "--augment", "crop_flip"]
    train_classifier.main(cls_argv(tmp_path / "full", *extra))
    argv = cls_argv(tmp_path / "split", *extra)
    stop_at_step(6)  # after 6 micro-batches of the first epoch: nothing was saved before, the stop saves
    assert train_classifier.main(argv) == 143
    stopped = load_state(tmp_path / "split" / "cls_last.pt")
    assert stopped["epoch"] == 0 and stopped["position"]["optimizer_steps"] == 3

    stop_at_step(10 ** 9)
    assert train_classifier.main(argv + ["--resume", "auto"]) == 0
    full, resumed = load_state(tmp_path / "full" / "cls_last.pt"), load_state(tmp_path / "split" / "cls_last.pt")
    assert same_weights(full["model"], resumed["model"]) and same_weights(full["ema"], resumed["ema"])
    (run_dir,), (full_dir,) = run_dirs(tmp_path / "split" / "logs"), run_dirs(tmp_path / "full" / "logs")
    rows, full_rows = read_metrics(run_dir)[1], read_metrics(full_dir)[1]
    for column in ("train_loss", "train_acc", "val_acc", "val_acc_ema"):
        assert [r[column] for r in rows] == [r[column] for r in full_rows]


def test_a_batch_size_change_in_the_middle_of_an_epoch_is_refused(tmp_path, mae_argv, stop_at_step, cli_error):
    argv = mae_argv(tmp_path, "--total_epoch", 2, "--run_name", "r")  # the batch size would name another run
    stop_at_step(2)
    mae_pretrain.main(argv)
    line = cli_error(mae_pretrain.main, argv + ["--resume", "auto", "--batch_size", 8])
    assert "middle of an epoch" in line


def without(argv, *flags):
    """``argv`` with every occurrence of each flag and its value left out."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            kept.append(word)
    return kept


def lrs(run_dir):
    return [float(row["lr"]) for row in read_metrics(run_dir)[1]]


@pytest.mark.parametrize("change", [["--total_epoch", 5], ["--total_epoch", 5, "--base_learning_rate", 3e-3]],
                         ids=["longer", "longer-and-new-lr"])
def test_a_resumed_run_trains_with_the_schedule_of_its_new_settings(tmp_path, mae_argv, change, capsys):
    """Resumed with a longer schedule (and a new lr), every remaining epoch's lr is that of an uninterrupted
    run with the new settings: no epoch at the old schedule's lr of 0, no old peak."""
    base = ["--warmup_epoch", 1, "--run_name", "r"]  # the run keeps its name (by default it names its settings)
    mae_pretrain.main(mae_argv(tmp_path / "reference", *base, *change))
    argv = mae_argv(tmp_path / "extended", *base, "--total_epoch", 2)
    mae_pretrain.main(argv)  # finished: its last lr was the end of a 2-epoch cosine
    capsys.readouterr()
    mae_pretrain.main(without(argv, "--total_epoch") + [*map(str, change), "--resume", "auto"])
    assert "--total_epoch 2 -> 5" in capsys.readouterr().out.split("applied from there: ")[1]
    (reference,), (extended,) = run_dirs(tmp_path / "reference" / "logs"), run_dirs(tmp_path / "extended" / "logs")
    assert lrs(extended)[2:] == lrs(reference)[2:]
    assert min(lrs(extended)[2:]) > 0


def test_resume_auto_alone_continues_the_run_as_it_was(tmp_path, mae_argv, stop_after_epoch, capsys):
    """Flags left off a resume keep the run's own values: a run started with --total_epoch 3 and a custom lr,
    resumed with only --resume auto and its paths, still runs 3 epochs at that lr."""
    typed = ["--total_epoch", 3, "--base_learning_rate", 3e-3, "--run_name", "r"]
    mae_pretrain.main(mae_argv(tmp_path / "reference", *typed))
    argv = mae_argv(tmp_path / "run", *typed)
    with stop_after_epoch(1):
        mae_pretrain.main(argv)
    mae_pretrain.main(without(argv, "--total_epoch", "--base_learning_rate", "--warmup_epoch") + ["--resume", "auto"])
    assert "changed settings" not in capsys.readouterr().out
    assert load_state(tmp_path / "run" / "mae.pt")["epoch"] == 3
    assert lrs(tmp_path / "run" / "logs" / "cifar10" / "r") == lrs(tmp_path / "reference" / "logs" / "cifar10" / "r")
