"""Resume and stop semantics, end to end on tiny runs: a stop takes effect at the next optimizer step and resumes
bit for bit; a resumed run trains with the schedule its command line says (applied changes, inherited flags)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import bookkeeping
import mae_pretrain
import train_classifier
from conftest import REPO, SUBPROCESS_ENV, load_state, read_metrics, run_dirs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stop_at_step(monkeypatch):
    """``stop_at_step(n)``: the run behaves as if SIGTERM arrived before the ``n``-th ``StopFlag.poll`` of the
    process (one after every micro-batch but an epoch's last), as when the signal handler has run."""
    def arm(step):
        polls = []
        poll = bookkeeping.StopFlag.poll

        def counting_poll(self):
            polls.append(1)
            if len(polls) == step:
                self.requested, self.exit_code = True, 143
            return poll(self)

        monkeypatch.setattr(bookkeeping.StopFlag, "poll", counting_poll)
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


def test_finetuning_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, cls_argv, stop_at_step, capsys):
    extra = ["--total_epoch", 2, "--base_learning_rate", 0.01, "--model_ema", 0.9, "--augment", "crop_flip"]
    train_classifier.main(cls_argv(tmp_path / "full", *extra))
    argv = cls_argv(tmp_path / "split", *extra)
    stop_at_step(6)  # after 6 micro-batches of the first epoch: nothing was saved before, the stop saves
    assert train_classifier.main(argv) == 143
    stopped = load_state(tmp_path / "split" / "cls_last.pt")
    assert stopped["epoch"] == 0 and stopped["position"]["optimizer_steps"] == 3
    assert run_dirs(tmp_path / "split" / "logs") == []  # nothing logged yet: no empty run for TensorBoard to list
    assert f"stopped; {tmp_path / 'split' / 'cls_last.pt'} holds where the run stands" in capsys.readouterr().out

    stop_at_step(10 ** 9)
    assert train_classifier.main(argv + ["--resume", "auto"]) == 0
    full, resumed = load_state(tmp_path / "full" / "cls_last.pt"), load_state(tmp_path / "split" / "cls_last.pt")
    assert same_weights(full["model"], resumed["model"]) and same_weights(full["ema"], resumed["ema"])
    (run_dir,), (full_dir,) = run_dirs(tmp_path / "split" / "logs"), run_dirs(tmp_path / "full" / "logs")
    rows, full_rows = read_metrics(run_dir)[1], read_metrics(full_dir)[1]
    for column in ("train_loss", "train_acc", "val_acc", "val_acc_ema"):
        assert [r[column] for r in rows] == [r[column] for r in full_rows]


def test_a_budgeted_run_killed_and_resumed_with_its_preset_keeps_its_budget(tmp_path, cls_argv, stop_at_step,
                                                                           short_budgets):
    """As a sweep resumes a run killed at a session's end: its own command (a preset in it), no budget record
    written. The budget goes on (the preset's length once ended it), and the record counts the time before."""
    argv = without(cls_argv(tmp_path, "--preset", "small", "--run_name", "r"), "--total_epoch", "--warmup_epoch")
    argv += ["--time_budget", "0.1"]
    stop_at_step(3)
    assert train_classifier.main(argv) == 143
    run_dir = tmp_path / "logs" / "cifar10" / "r"
    (run_dir / "budget.json").unlink(missing_ok=True)  # a hard kill writes none
    stopped = load_state(tmp_path / "cls_last.pt")
    stop_at_step(10 ** 9)
    assert train_classifier.main(argv + ["--resume", "auto"]) == 0
    record = json.loads((run_dir / "budget.json").read_text())
    assert record["steps"] > len(stopped["budget"]["shares"]) and record["epochs"] > 0
    assert len(record["wall_seconds"]) == 2 and record["wall_seconds"][0] == pytest.approx(
        stopped["budget"]["spent_seconds"], abs=0.01)


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


def test_more_signals_during_the_stops_save_wait_for_it_and_keep_the_exit_code(tmp_path, mae_argv):
    """A real process: SIGTERM stops the run, and two more arrive while its checkpoint's temporary file is being
    written (made slow here). The write ends whole, no temporary file is left, and the exit code stays 143."""
    argv = mae_argv(tmp_path, "--total_epoch", 1000, "--warmup_epoch", 1)
    code = f"""import sys, time
sys.path.insert(0, {str(REPO)!r})
import checkpoint, mae_pretrain, utils
fast = checkpoint.torch_save
def slow(state, path):
    fast(state, path)
    print("writing", flush=True)
    time.sleep(3)
checkpoint.torch_save = slow
utils.run_cli(mae_pretrain.main, {argv!r}, resumable=True)
"""
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=SUBPROCESS_ENV, text=True,
                                   stdout=subprocess.PIPE, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(len(read_metrics(c.parent)[1]) >= 1 for c in
                                                          (tmp_path / "logs").rglob("metrics.csv")):
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert any("writing" in line for line in process.stdout)  # the stop's save is under way
            for _ in range(2):
                process.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    errors = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 143, errors[-2000:]
    assert "a checkpoint is being written; it will end whole" in errors and "Traceback" not in errors
    assert load_state(tmp_path / "mae.pt")["kind"] == "mae"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_gpu_schedule_on_a_cpu_says_so_before_its_first_step(tmp_path, mae_argv, stop_at_step, capsys):
    stop_at_step(1)  # 16 million images: the run stops after its first micro-batch
    assert mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 200_000, "--warmup_epoch", 1)) == 143
    out = capsys.readouterr().out
    assert "200000 epochs at batch 16 are meant for a GPU: here they would take at least" in out
    assert "use --preset small, or --time_budget MINUTES" in out
