"""--time_budget: the learning rate follows the share of the budget spent (a fake clock), the run ends within its
budget, and its record trains the same steps again to the bit (--time_budget BUDGET_JSON)."""
import json
import subprocess
import sys
import time

import pytest
import torch

import engine
import mae_pretrain
import train_classifier
import utils
from conftest import NUM_CLASSES, REPO, SUBPROCESS_ENV, load_state, read_metrics, run_dirs, write_image_folder
from test_resume_and_stop import same_weights, without

pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(monkeypatch, minutes=1.0, warmup_share=0.25, **kwargs):
    now = [100.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: now[0])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return engine.BudgetSchedule(optimizer, minutes, warmup_share, clock_start=100.0, **kwargs), now, optimizer


def test_the_share_spent_drives_the_lr_and_the_end(monkeypatch):
    budget, now, optimizer = schedule(monkeypatch)
    lrs = []
    while budget.before_step():
        lrs.append(optimizer.param_groups[0]["lr"])
        now[0] += 0.5
    # 60 s, less 5 % for the end (until measured) and 1.5 s for the exit: 55.5 s of half-second steps.
    assert len(lrs) == 111 and budget.shares == sorted(budget.shares) and budget.shares[-1] < 1
    peak = lrs.index(max(lrs))
    assert 0.2 < budget.shares[peak] < 0.26 and lrs[-1] < 0.01  # warm-up to a quarter, cosine to zero
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))


def test_a_measured_end_shortens_the_training_and_replay_repeats_it(monkeypatch):
    budget, now, optimizer = schedule(monkeypatch)
    budget.measured_end(20.0)
    steps = 0
    while budget.before_step():
        steps, now[0] = steps + 1, now[0] + 0.5
    assert steps == 77  # 60 - 20 - 1.5 s
    replay, _, replayed = schedule(monkeypatch, replay=budget.shares)
    lrs = []
    while replay.before_step():
        lrs.append(replayed.param_groups[0]["lr"])  # the clock stands still: only the record counts
    assert len(lrs) == steps and replay.shares == budget.shares


def test_a_budget_spent_by_the_set_up_is_one_error_line(monkeypatch):
    budget, now, _ = schedule(monkeypatch)
    now[0] += 61
    with pytest.raises(utils.UserError, match="was spent by the set-up .* give at least 2.2 minutes"):
        budget.before_step()  # twice the 61 s spent and the 3 s its end needs until measured (5 % of a minute)


def budget_argv(argv_builder, workdir, minutes, *extra):
    return without(argv_builder(workdir, *extra), "--total_epoch", "--warmup_epoch") + ["--time_budget", str(minutes)]


def test_a_budgeted_run_records_its_steps_and_replays_to_the_bit(tmp_path, cls_argv, short_budgets):
    assert train_classifier.main(budget_argv(cls_argv, tmp_path / "b", 0.1, "--run_name", "r")) == 0
    run_dir = tmp_path / "b" / "logs" / "cifar10" / "r"
    record = json.loads((run_dir / "budget.json").read_text())
    assert record["time_budget_minutes"] == 0.1 and record["steps"] == len(record["shares"]) >= 3
    assert record["total_epoch"] == len(read_metrics(run_dir)[1]) and len(record["wall_seconds"]) == 1
    assert f"--time_budget {run_dir / 'budget.json'}" in record["reproduce"]
    replay = without(cls_argv(tmp_path / "r", "--run_name", "r"), "--total_epoch", "--warmup_epoch")
    assert train_classifier.main([*replay, "--time_budget", str(run_dir / "budget.json")]) == 0
    assert same_weights(load_state(tmp_path / "b" / "cls_last.pt")["model"],
                        load_state(tmp_path / "r" / "cls_last.pt")["model"])


def test_a_real_process_ends_within_its_budget(tmp_path, cls_argv):
    """A fresh interpreter, so the budget counts Python's and torch's imports too."""
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    images = write_image_folder(tmp_path / "images", classes, classes, train_per_class=64)
    minutes = 0.25
    argv = budget_argv(cls_argv, tmp_path, minutes, "--run_name", "r", "--data_dir", images)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "train_classifier.py"), *argv], cwd=tmp_path,
                            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "logs" / "cifar10" / "r" / "budget.json").read_text())
    assert 0.9 * minutes * 60 <= wall <= minutes * 60 * 1.05, (wall, record["wall_seconds"])
    (run_dir,) = run_dirs(tmp_path / "logs")
    assert len(read_metrics(run_dir)[1]) == record["total_epoch"] >= 2
    assert "test accuracy" in result.stdout.splitlines()[-1]


def test_a_presets_warmup_becomes_its_share_of_a_budget(tmp_path, cli_error):
    args = mae_pretrain.parse_args(["--preset", "small", "--time_budget", "2.5", "--device", "cpu"])
    assert (args.time_budget, args.warmup_epoch / args.total_epoch) == (2.5, 0.5)  # the preset's 2 of 4 epochs
    line = cli_error(mae_pretrain.main, ["--preset", "small", "--time_budget", "0.1", "--log_dir", tmp_path])
    assert "--time_budget: 0.1 minutes is too short" in line and "at least 0.2" in line
    line = cli_error(mae_pretrain.main, ["--time_budget", "3", "--total_epoch", "4", "--log_dir", tmp_path])
    assert "cannot be combined with --total_epoch" in line


def test_a_budgeted_pretraining_times_its_monitors_before_it_trains(tiny_image_folder, capsys):
    """The k-NN and probe end the last epoch; a short budget's first epoch may be its last, so their cost is timed
    before training (on a part of the data, scaled up) and kept for the end."""
    from types import SimpleNamespace

    import data
    from model import ModelConfig, build_mae

    train, test = data.load_dataset("cifar10", tiny_image_folder)
    run = SimpleNamespace(train_set=train, test_set=test, env=SimpleNamespace(device=torch.device("cpu")),
                          precision="fp32")
    model = build_mae(ModelConfig(image_size=16, patch_size=4, emb_dim=32, encoder_depth=1, encoder_heads=2,
                                  decoder_depth=1, decoder_heads=2))
    schedule = engine.BudgetSchedule(torch.optim.SGD(model.parameters(), lr=0.1), 1, 0.0, time.monotonic())
    mae_pretrain.measure_the_end(model, run, SimpleNamespace(probe_epochs=2), schedule)
    assert schedule.measured and 0 < schedule.end_seconds < 30
    assert "the k-NN and probe at the end will take about" in capsys.readouterr().out


def test_a_budgeted_fine_tuning_times_its_evaluation_before_it_trains(tiny_image_folder):
    """A short budget's first evaluation may be its last: it is timed before training (one batch per model, after a
    pass that compiles), scaled to the test set, and kept for the end."""
    from types import SimpleNamespace

    import data
    from model import ModelConfig, build_classifier

    test = data.load_dataset("cifar10", tiny_image_folder)[1]
    loader = data.GpuLoader(test, 8, torch.device("cpu"), train=False)
    model = build_classifier(ModelConfig(image_size=16, patch_size=4, emb_dim=32, encoder_depth=1, encoder_heads=2))
    run = SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu")), precision="fp32")
    schedule = engine.BudgetSchedule(torch.optim.SGD(model.parameters(), lr=0.1), 1, 0.0, time.monotonic())
    train_classifier.time_the_evaluation([(model, model), (model, model)], loader, run, schedule)
    assert schedule.measured and 0 < schedule.end_seconds < 30 and len(loader) > 1


def test_two_processes_train_the_same_budgeted_steps(tmp_path, cls_argv):
    """Under torchrun each process has its own clock: rank 0's share of the budget is every process's, so all stop
    at the same step and end at the same epoch (a process that went on alone would wait forever) with the same lr."""
    argv = [*budget_argv(cls_argv, tmp_path, 0.2, "--run_name", "r"), "--no_compile"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(REPO / "train_classifier.py"), *argv], cwd=tmp_path, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "logs" / "cifar10" / "r" / "budget.json").read_text())
    assert record["steps"] >= 3 and record["wall_seconds"][0] <= 0.2 * 60 * 1.05


def test_a_json_that_no_budgeted_run_wrote_is_refused_at_parsing(tmp_path, cls_argv, cli_error):
    (tmp_path / "other.json").write_text('{"steps": 3}')
    line = cli_error(train_classifier.main, [*without(cls_argv(tmp_path), "--total_epoch", "--warmup_epoch"),
                                             "--time_budget", tmp_path / "other.json"])
    assert "other.json is not a budget.json a run wrote (KeyError: 'time_budget_minutes')" in line
    assert not (tmp_path / "logs").exists()
