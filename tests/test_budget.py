"""--time_budget: the planning arithmetic (a fake clock), the trial that leaves no trace, and tiny real runs that
plan, reproduce with --total_epoch, resume with their plan and end within the budget."""
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch

import budget
import mae_pretrain
import train_classifier
from conftest import NUM_CLASSES, REPO, SUBPROCESS_ENV, load_state, read_metrics, run_dirs, write_image_folder
from test_resume_and_stop import same_weights, without
from utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ arithmetic


def test_the_plan_fits_the_epochs_and_the_end_into_what_is_left():
    costs = budget.Costs(step=0.5, steps_per_epoch=10, evaluation=1.0, periodic=((2.0, 4),), final=3.0)
    assert costs.epoch == pytest.approx(budget.EPOCH_MARGIN * (0.5 * 10 + 1.0 + 2.0 / 4))
    plan = budget.plan_epochs(1.0, elapsed=10.0, costs=costs, warmup_share=0.25)
    # 60 s less the exit's 2.5 s (more than 2 % of a minute), the 10 s already spent and the 3 s end: 44.5 s,
    # 6 epochs of 6.7 s, and in the 4.3 s left a partial epoch: its evaluation and monitors (1.5 s) and 5 steps.
    assert (plan.total_epoch, plan.last_epoch_steps, plan.warmup_epoch) == (7, 5, 2)  # warm-up: 1/4 of 6 whole
    assert plan.epochs == 6.5 and costs.part_of_epoch(5) <= 44.5 - 6 * costs.epoch < costs.part_of_epoch(6)
    assert plan.setup_seconds == 10.0 and plan.final_seconds == 3.0
    assert "budget 1 min -> 6.50 epochs (6 + 5 of 10 steps), warm-up 2" in plan.describe()


@pytest.mark.parametrize("elapsed, last_steps", [(12.5, 0),  # 1.8 s left: not one step
                                                 (11.5, 2), (14.0, 0)])  # 2 steps: 1/5 of an epoch; 0: none fits
def test_a_partial_last_epoch_is_planned_only_when_a_tenth_of_one_fits(elapsed, last_steps):
    costs = budget.Costs(step=0.5, steps_per_epoch=10, evaluation=1.0, periodic=((2.0, 4),), final=3.0)
    plan = budget.plan_epochs(1.0, elapsed=elapsed, costs=costs, warmup_share=0.0)
    assert plan.last_epoch_steps == last_steps and plan.total_epoch == 6 + bool(last_steps)
    many = budget.Costs(step=0.01, steps_per_epoch=1000, evaluation=1.0)  # 99 steps left: under a tenth
    assert budget.plan_epochs(1.0, 57.5 - 3 * many.epoch - many.part_of_epoch(99), many, 0.0).last_epoch_steps == 0


def test_the_plan_is_corrected_after_epoch_1_by_its_measured_step_time():
    costs = budget.Costs(step=0.5, steps_per_epoch=10, evaluation=1.0, final=3.0)
    plan = budget.plan_epochs(1.0, elapsed=10.0, costs=costs, warmup_share=0.25)  # 7 epochs of 6.18 s, warm-up 2
    assert plan.length() == (7, 2, 0)
    # Epoch 1's steps took 5 s as the trial said: of the 41.5 s the budget leaves after it, less the end (3 s) and
    # its evaluation (1.03 s), 6 more epochs fit; steps half as fast leave room for 3 and 3 steps of a partial one,
    # steps twice as fast for 10 and a partial one.
    elapsed = 10.0 + 5.0
    assert budget.on_course(plan, costs, elapsed, 1, 0.5, 9).length() == (7, 2, 0)
    slower = budget.on_course(plan, costs, elapsed, 1, 1.0, 9)
    assert slower.length() == (5, 2, 3) and slower.trial_step_seconds == 0.5 and slower.step_seconds == 1.0
    assert slower.corrections == ((1, 5, 3),)
    measured = dataclasses.replace(costs, step=1.0)
    left = budget.seconds_left(1.0, elapsed) - costs.final - measured.part_of_epoch(0)
    assert 3 * measured.epoch + measured.part_of_epoch(3) <= left < 3 * measured.epoch + measured.part_of_epoch(4)
    assert budget.on_course(plan, costs, elapsed, 1, 0.25, 9).total_epoch == 12
    assert ("planned again after epoch 1 -> 4.30 epochs (4 + 3 of 10 steps) (1.000 s a step measured over 9 "
            "steps, the trial's 0.500") in slower.describe()
    # Far slower: no whole epoch after the first fits, then not one step; a plan of one epoch is left as it is.
    assert budget.on_course(plan, costs, elapsed, 1, 10.0, 9).length() == (2, 2, 3)  # a partial epoch of 3 steps
    assert budget.on_course(plan, costs, elapsed, 1, 40.0, 9).length() == (1, 2, 0)
    one = budget.plan_epochs(0.22, elapsed=1.0, costs=costs, warmup_share=0.0)
    assert one.total_epoch == 1 and budget.on_course(one, costs, 7.0, 1, 5.0, 9) is one


def test_later_the_plan_changes_only_when_it_would_miss_the_budget():
    """After epoch 3 of the 7: on course, the plan stands through small drifts of the step time; when the rest
    would end past the budget by over half the reserve (2.5 s), or leave more than the reserve unused, it is
    planned again and the correction is listed after epoch 1's."""
    costs = budget.Costs(step=0.5, steps_per_epoch=10, evaluation=1.0, final=3.0)
    plan = budget.plan_epochs(1.0, elapsed=10.0, costs=costs, warmup_share=0.25)
    elapsed = 10.0 + 3 * costs.epoch - costs.part_of_epoch(0)  # the third epoch's steps just ended
    for step in (0.48, 0.5, 0.52):
        assert budget.on_course(plan, costs, elapsed, 3, step, 29) is plan
    slower = budget.on_course(dataclasses.replace(plan, corrections=((1, 7, 0),)), costs, elapsed, 3, 0.6, 29)
    assert slower.length() == (7, 2, 5) and slower.corrections == ((1, 7, 0), (3, 7, 5))
    assert "planned again after epoch 3 -> 6.50 epochs (6 + 5 of 10 steps)" in slower.describe()
    assert budget.on_course(plan, costs, elapsed, 3, 0.4, 29).length() == (8, 2, 0)
    assert budget.on_course(plan, costs, elapsed, 7, 0.1, 69) is plan  # the last epoch: nothing left to plan


def test_a_typed_warmup_is_kept_when_it_fits_and_refused_when_not():
    costs = budget.Costs(step=1.0, steps_per_epoch=1)
    assert budget.plan_epochs(1.0, 0.0, costs, 0.1, typed_warmup=5).warmup_epoch == 5
    with pytest.raises(UserError, match="--warmup_epoch 100 is longer than the 55 epochs"):
        budget.plan_epochs(1.0, 0.0, costs, 0.1, typed_warmup=100)


def test_a_budget_too_short_for_one_epoch_is_one_error_line():
    with pytest.raises(UserError, match="too short: the set-up and trial took 50 s, one epoch takes 20.6 s"):
        budget.plan_epochs(1.0, elapsed=50.0, costs=budget.Costs(step=2.0, steps_per_epoch=10), warmup_share=0.1)


def test_the_process_start_is_before_now_and_after_boot():
    start = budget.process_start()
    assert start <= time.monotonic()
    assert start <= budget._IMPORTED_AT + 1e-3  # this process started before it imported budget.py


def test_a_long_run_is_said_once_and_a_short_one_not():
    assert budget.long_run_warning_steps(1000, 1.0) is None
    warning = budget.long_run_warning_steps(200_000, 1.0)
    assert "2.3 days" in warning and "--preset small" in warning and "--time_budget" in warning


def test_the_long_run_check_measures_the_second_step_and_chains_its_hook(capsys):
    calls = []
    check = budget.LongRunCheck(10 ** 15, torch.device("cpu"), lambda: calls.append(1))
    for _ in range(4):
        check()
    assert len(calls) == 4
    assert capsys.readouterr().out.count("days on this machine") == 1


def test_the_trial_leaves_weights_optimizer_and_random_streams_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = torch.rand(3)
    torch.manual_seed(0)
    torch.nn.Linear(4, 2)  # the same draws as above, so the stream stands where it stood
    with budget.Trial([model], optimizer):
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
    assert same_weights(before, model.state_dict())
    assert optimizer.state_dict()["state"] == {}
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture
def process_starts_now(monkeypatch):
    """In-process runs: the budget counts from the call, not from when pytest started, and keeps nothing back for
    an interpreter's exit (there is none)."""
    start = time.monotonic()
    monkeypatch.setattr(budget, "process_start", lambda: start)
    monkeypatch.setattr(budget, "EXIT_SECONDS", 0.0)


def budget_argv(argv_builder, workdir, minutes, *extra):
    return without(argv_builder(workdir, *extra), "--total_epoch", "--warmup_epoch") + ["--time_budget", str(minutes)]


def test_a_budgeted_run_records_its_plan_and_total_epoch_reproduces_it(tmp_path, mae_argv, process_starts_now,
                                                                        monkeypatch, capsys):
    """The trial is made to think steps 3x slower than they are, so the plan is corrected after epoch 1; held on
    course after that (the later checks, tested apart, see a noisy clock), --total_epoch N reproduces the run to
    the bit."""
    monkeypatch.setattr(budget, "SAFETY", 0.5)  # half the budget kept back: a shorter test
    trial_step_seconds, measured_course = budget.step_seconds, budget.on_course
    monkeypatch.setattr(budget, "step_seconds", lambda *a, **k: 3 * trial_step_seconds(*a, **k))
    monkeypatch.setattr(budget, "on_course", lambda plan, costs, elapsed, epochs_done, *measured: measured_course(
        plan, costs, elapsed, epochs_done, *measured) if epochs_done == 1 else plan)
    assert mae_pretrain.main(budget_argv(mae_argv, tmp_path / "budget", 0.1, "--run_name", "r")) == 0
    out = capsys.readouterr().out
    plan_line, corrected = (line for line in out.splitlines() if line.startswith("budget 0.1 min"))
    checkpoint = load_state(tmp_path / "budget" / "mae.pt")
    epochs, warmup, last = (checkpoint["args"][k] for k in ("total_epoch", "warmup_epoch", "last_epoch_steps"))
    length = f"-> {epochs} epochs" if not last else f"({epochs - 1} + {last} of "
    assert plan_line.startswith("budget 0.1 min -> ") and f"warm-up {warmup} (" in plan_line
    assert corrected.startswith("budget 0.1 min, planned again after epoch 1 -> ") and length in corrected
    assert length not in plan_line and epochs >= 2
    record = json.loads((tmp_path / "budget" / "logs" / "cifar10" / "r" / "budget.json").read_text())
    assert record["time_budget_minutes"] == 0.1 and record["total_epoch"] == epochs
    assert record["last_epoch_steps"] == last and record["corrections"] == [[1, epochs, last]]
    assert record["trial_step_seconds"] > record["step_seconds"]  # 3x the trial's steps, the loader's added to these
    assert len(record["wall_seconds"]) == 1 and "wall time" in out
    assert len(read_metrics(tmp_path / "budget" / "logs" / "cifar10" / "r")[1]) == epochs

    # The same run by its epoch count: the trial left no trace, so the weights are the same to the bit.
    mae_pretrain.main(without(mae_argv(tmp_path / "epochs", "--run_name", "r"), "--total_epoch", "--warmup_epoch")
                      + ["--total_epoch", str(epochs), "--warmup_epoch", str(warmup), "--last_epoch_steps", str(last)])
    assert same_weights(checkpoint["model"], load_state(tmp_path / "epochs" / "mae.pt")["model"])


def test_a_run_corrected_later_is_reproduced_by_the_flags_its_record_gives(tmp_path, cls_argv, process_starts_now,
                                                                         monkeypatch):
    """A correction after epoch 2 (forced: the plan loses two epochs there; on course after it) changes the
    learning rates from epoch 3 on: --total_epoch alone does not give the run again, the flags budget.json
    records do, to the bit."""
    monkeypatch.setattr(budget, "SAFETY", 0.5)
    measured_course = budget.on_course

    def two_epochs_shorter_after_epoch_2(plan, costs, elapsed, epochs_done, *measured):
        if epochs_done == 1:
            return measured_course(plan, costs, elapsed, epochs_done, *measured)
        if epochs_done > 2:
            return plan
        total = plan.total_epoch - 2
        return dataclasses.replace(plan, total_epoch=total, last_epoch_steps=0,
                                   corrections=(*plan.corrections, (2, total, 0)))

    monkeypatch.setattr(budget, "on_course", two_epochs_shorter_after_epoch_2)
    # No warm-up: epoch 2's learning rate is then the cosine's, which depends on the length (a warm-up's may not).
    argv = budget_argv(cls_argv, tmp_path / "budget", 0.06, "--run_name", "r") + ["--warmup_epoch", "0"]
    assert train_classifier.main(argv) == 0
    record = json.loads((tmp_path / "budget" / "logs" / "cifar10" / "r" / "budget.json").read_text())
    total, warmup = record["total_epoch"], record["warmup_epoch"]
    assert total >= 3 and record["reproduce"] == (f"--total_epoch {total} --warmup_epoch {warmup} "
                                                  f"--last_epoch_steps 0 --earlier_lengths 2:{total + 2}")
    budgeted = load_state(tmp_path / "budget" / "cls_last.pt")
    assert budgeted["args"]["earlier_lengths"] == [[2, total + 2]]
    weights = {}
    for name, flags in (("replayed", record["reproduce"].split()), ("length_only", flags_of(total, warmup))):
        argv = without(cls_argv(tmp_path / name, "--run_name", "r"), "--total_epoch", "--warmup_epoch") + flags
        assert train_classifier.main(argv) == 0
        weights[name] = load_state(tmp_path / name / "cls_last.pt")["model"]
    assert same_weights(budgeted["model"], weights["replayed"])
    assert not same_weights(budgeted["model"], weights["length_only"])


def flags_of(total, warmup):
    return ["--total_epoch", str(total), "--warmup_epoch", str(warmup)]


def test_a_resumed_budgeted_run_keeps_its_plan(tmp_path, cls_argv, process_starts_now, stop_after_epoch, capsys):
    argv = budget_argv(cls_argv, tmp_path, 0.06, "--run_name", "r")
    with stop_after_epoch(1):
        train_classifier.main(argv)
    planned = load_state(tmp_path / "cls_last.pt")["args"]["total_epoch"]
    capsys.readouterr()
    train_classifier.main(argv + ["--resume", "auto"])  # even long after: no new plan, the same epochs
    out = capsys.readouterr().out
    assert "budget 0.06 min ->" not in out
    assert load_state(tmp_path / "cls_last.pt")["epoch"] == planned
    record = json.loads((tmp_path / "logs" / "cifar10" / "r" / "budget.json").read_text())
    assert record["total_epoch"] == planned and len(record["wall_seconds"]) == 2


def test_time_budget_with_a_typed_total_epoch_is_refused(tmp_path, mae_argv, cli_error):
    line = cli_error(mae_pretrain.main, mae_argv(tmp_path, "--time_budget", 5))  # the tiny argv types 2 epochs
    assert "--time_budget: 5.0 cannot be combined with --total_epoch 2" in line
    argv = without(mae_argv(tmp_path), "--total_epoch", "--warmup_epoch") + ["--time_budget", "5"]
    line = cli_error(mae_pretrain.main, argv + ["--last_epoch_steps", "3"])
    assert "--time_budget: 5.0 cannot be combined with --last_epoch_steps 3" in line
    line = cli_error(mae_pretrain.main, argv + ["--earlier_lengths", "2:5"])
    assert "--time_budget: 5.0 cannot be combined with --earlier_lengths [[2, 5]]" in line
    assert not (tmp_path / "logs").exists()


def test_last_epoch_steps_ends_the_last_epoch_early(tmp_path, cls_argv):
    """Two epochs, the last stopped after one optimizer step: the optimizer counts the steps that ran, the first
    epoch is the same as in a whole run and the last one differs."""
    for name, extra in (("whole", ()), ("short", ("--last_epoch_steps", 1))):
        assert train_classifier.main(cls_argv(tmp_path / name, "--run_name", "r", *extra)) == 0
    steps = {name: max(int(s["step"]) for s in load_state(tmp_path / name / "cls_last.pt")["optimizer"]["state"]
                       .values()) for name in ("whole", "short")}
    per_epoch = steps["whole"] // 2
    assert per_epoch >= 2 and steps["short"] == per_epoch + 1
    rows = {name: read_metrics(tmp_path / name / "logs" / "cifar10" / "r")[1] for name in ("whole", "short")}
    same = ("train_loss", "val_acc")
    assert len(rows["short"]) == 2 and [rows["short"][0][k] for k in same] == [rows["whole"][0][k] for k in same]
    assert rows["short"][1]["train_loss"] != rows["whole"][1]["train_loss"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "20000"])
def test_time_budget_out_of_range_is_refused(tmp_path, mae_argv, cli_error, value):
    line = cli_error(mae_pretrain.main, without(mae_argv(tmp_path), "--total_epoch") + ["--time_budget", value])
    assert "argument --time_budget" in line


def test_a_real_process_ends_within_its_budget(tmp_path, cls_argv):
    """A fresh interpreter, so the budget counts Python's and torch's imports too: well under a minute, and the
    process (start to exit, timed from outside) ends within the budget plus 5 %. Epochs of 40 optimizer steps, as
    a real run's have hundreds, so that the run checks its course by steps that are not all noise."""
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
    assert record["total_epoch"] >= 3
    said = [line[line.index("budget"):] for line in result.stdout.splitlines() if "budget" in line]
    assert wall <= minutes * 60 * 1.05, (f"{wall:.2f} s from outside", said, {k: record[k] for k in (
        "setup_seconds", "step_seconds", "trial_step_seconds", "corrections", "wall_seconds") if k in record})
    assert record["wall_seconds"][0] <= wall
    (run_dir,) = run_dirs(tmp_path / "logs")
    assert len(read_metrics(run_dir)[1]) == record["total_epoch"]


def test_a_main_called_from_python_counts_its_budget_from_the_call(tmp_path, cls_argv, monkeypatch):
    """In a process an hour old (a notebook's kernel), a 0.1-minute budget still plans, and the run's wall time is
    counted from the call; run as a script, the process's start counts (test_a_real_process_ends_within_its_budget)."""
    monkeypatch.setattr(budget, "process_start", lambda: time.monotonic() - 3600)
    assert train_classifier.main(budget_argv(cls_argv, tmp_path, 0.1, "--run_name", "r")) == 0
    record = json.loads((tmp_path / "logs" / "cifar10" / "r" / "budget.json").read_text())
    assert record["total_epoch"] >= 2 and record["setup_seconds"] < 6 and record["wall_seconds"][0] < 60


def test_a_presets_length_gives_way_to_a_budget():
    args = mae_pretrain.parse_args(["--preset", "small", "--time_budget", "5", "--device", "cpu"])
    assert args.time_budget == 5.0
    assert args.warmup_share == 2 / 4  # the preset's warm-up share (2 of its 4 epochs)
    args = train_classifier.parse_args(["--preset", "small", "--time_budget", "5", "--device", "cpu"])[0]
    assert args.warmup_share == 0.0
