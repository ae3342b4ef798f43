"""campaign.py: the whole campaign on the CPU (tiny model, tiny data) in several parts, with a run stopped at the
end of a part and resumed in the next; the report; the dry run; one step in real processes; the deadline's
SIGTERM / SIGKILL; argument errors."""
import csv
import gc
import runpy
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime

import pytest
import torch

import budget
import campaign
import engine
import utils

STEP_KEYS = {
    "budget": {"budget_0.1min"},
    "bench": {"pretrain_b8_fp32_none", "finetune_b8_fp32_none_aug"},
    "epochs": set(campaign.SPEED_RUNS),
    "tta": {"tta_pretrain", "tta_finetune", "tta_scratch"},
    "ablation": {f"dd{d}_{s}_s{seed}" for seed in (0, 1) for d, s in campaign.ABLATIONS}}


def step_csv(results, step):
    return results / ("budget/campaign.csv" if step == "budget" else f"{step}.csv")


def argv(tmp_path, images, *extra):
    return ["--tiny", "--data_dir", str(images), "--results_dir", str(tmp_path / "results"),
            "--work_dir", str(tmp_path / "work"), *map(str, extra)]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def option(words, flag):
    return words[words.index(flag) + 1] if flag in words else None


@pytest.fixture
def in_process(monkeypatch, one_thread):
    """campaign.execute without a new Python per run (each would spend seconds importing torch): the script runs
    as __main__ with the run's argv. Past ``stop_at`` a run is stopped as SIGTERM stops it (its StopFlag is set:
    it finishes the epoch, saves, exits 143); so is the run named ``interrupt`` after its first epoch, as if the
    part had ended there. Returns the commands run."""
    calls, flags, state = [], [], {"interrupt": None, "stop_at": float("inf")}
    install, log = engine.StopFlag.install, utils.RunLogger.log

    def recording_install(self):
        flags.append(self)
        return install(self)

    def log_then_maybe_stop(self, epoch, **values):
        log(self, epoch, **values)
        if time.monotonic() > state["stop_at"] or self.log_dir.name == state["interrupt"]:
            state["interrupt"] = None
            for flag in flags:
                flag.requested, flag.exit_code = True, 128 + signal.SIGTERM

    def execute(command, output, stop_at, kill_at):
        calls.append(command)
        flags.clear()
        state["stop_at"] = stop_at
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", command[1:])
            started = time.monotonic()
            m.setattr(budget, "process_start", lambda: started)  # a run's budget counts from its start here,
            m.setattr(budget, "EXIT_SECONDS", 0.0)  # and no interpreter exits at its end
            m.setattr(engine.StopFlag, "install", recording_install)
            m.setattr(utils.RunLogger, "log", log_then_maybe_stop)
            try:
                runpy.run_path(str(campaign.HERE / command[1]), run_name="__main__")
            except SystemExit as exit:
                return exit.code if isinstance(exit.code, int) else 1
            except Exception:
                traceback.print_exc()
                return 1
            finally:
                for s, handler in saved.items():
                    signal.signal(s, handler)
                gc.collect()  # a process's end releases its run folder's lock; here the collector must
        return 0

    monkeypatch.setattr(campaign, "execute", execute)
    return calls, state


def test_the_whole_campaign_in_parts_resumes_skips_and_reports(tmp_path, tiny_image_folder, in_process, capsys):
    calls, state = in_process
    results, work = tmp_path / "results", tmp_path / "work"
    state["interrupt"] = "tta_mae_dd2_ep3"  # the time-to-accuracy pretraining: stopped after epoch 1 of 3
    recorded, reports, limit_s = [], [], 12
    # The equal-compute pair first, in a part of its own: a budgeted run is never cut short (on a GPU its unit
    # fits a part by construction; tiny parts here are shorter than it).
    assert campaign.main(argv(tmp_path, tiny_image_folder, "--only", "budget", "--time_limit", 1)) == 0
    while not recorded or "Nothing: every unit has its row." not in reports[-1]:
        assert len(recorded) < 40, "the campaign does not finish"
        start = time.monotonic()
        assert campaign.main(argv(tmp_path, tiny_image_folder, "--time_limit", limit_s / 60)) == 0
        assert time.monotonic() - start < limit_s + 5  # a part ends within its time (one run may be one epoch over)
        recorded.append({step: [r["key"] for r in read_csv(step_csv(results, step))] for step in STEP_KEYS
                         if step_csv(results, step).is_file()})
        reports.append((results / "REPORT.md").read_text())
    out = capsys.readouterr().out
    assert len(recorded) >= 3 and "stopped at the end of the part; the next part continues it" in out
    # Each unit ran once and was skipped afterwards: one row per key (a benchmark unit: one per augmentation).
    final = recorded[-1]
    assert {step: set(keys) for step, keys in final.items()} == STEP_KEYS
    assert final["bench"].count("finetune_b8_fp32_none_aug") == 3
    assert final["budget"].count("budget_0.1min") == 2  # a row per arm
    assert all(len(keys) == len(set(keys)) for step, keys in final.items() if step not in ("bench", "budget"))
    for earlier, later in zip(recorded, recorded[1:]):
        assert all(later[step][:len(keys)] == keys for step, keys in earlier.items())  # only appended to
    # A run started again only to continue (a run still going at the end of a part is stopped there too).
    runs = {}
    for command in calls:
        runs.setdefault(option(command, "--run_name") or option(command, "--output"), []).append(command)
    for commands in runs.values():
        assert [option(c, "--resume") for c in commands] == [None] + ["auto"] * (len(commands) - 1)
    # The interrupted run went on where it stopped: resumed from its checkpoint, every epoch logged once.
    assert len(runs["tta_mae_dd2_ep3"]) >= 2 and "--overwrite" in runs["tta_mae_dd2_ep3"][0]
    metrics = read_csv(work / "logs" / "cifar10" / "tta_mae_dd2_ep3" / "metrics.csv")
    assert [int(r["epoch"]) for r in metrics] == [1, 2, 3]
    # Every row carries the machine, the torch version, the commit, the date and the command.
    def known_commit(name):  # others may commit while this test runs: any commit of this repository
        return name == "unknown" or subprocess.run(["git", "cat-file", "-e", f"{name}^{{commit}}"],
                                                   cwd=campaign.HERE, capture_output=True).returncode == 0

    for step in STEP_KEYS:
        rows = read_csv(step_csv(results, step))
        assert list(rows[0])[:len(campaign.META)] == campaign.META
        for row in rows:
            assert (row["gpu"], row["torch"]) == ("CPU", torch.__version__) and known_commit(row["commit"])
            assert datetime.fromisoformat(row["date"]).utcoffset().total_seconds() == 0
            assert row["command"].startswith("python ") and "DATA" in row["command"] or step == "bench"
            assert float(row["wall_s"]) >= 0  # 0: its runs had ended when the part before stopped
    epochs = {r["key"]: r for r in read_csv(results / "epochs.csv")}
    assert all(int(r["epochs"]) == 2 and float(r["images_per_s"]) > 0 for r in epochs.values())
    assert "--recipe strong" in epochs["finetune_strong"]["command"]
    # The encoder traveled as a small bf16 file, and fine-tuning started from it.
    encoder = torch.load(results / "tta_mae_cpu.pt", weights_only=True)
    assert encoder["kind"] == "mae" and encoder["config"]["emb_dim"] == 32 and encoder["epoch"] == 3
    assert all(v.dtype == torch.bfloat16 for v in encoder["model"].values() if v.is_floating_point())
    assert (results / "tta_mae_cpu.pt").stat().st_size < campaign.ENCODER_LIMIT
    tta = {r["key"]: r for r in read_csv(results / "tta.csv")}
    assert float(tta["tta_pretrain"]["encoder_mb"]) > 0 and int(tta["tta_pretrain"]["epochs"]) == 3
    assert f"--pretrained_model_path {results / 'tta_mae_cpu.pt'}" in tta["tta_finetune"]["command"]
    assert 0 <= float(tta["tta_finetune"]["val_acc"]) <= 1 and tta["tta_scratch"]["epochs"] == "2"
    # Equal compute: each arm the same minutes; the MAE arm's weights released in bf16 and loadable.
    budget = {r["arm"]: r for r in read_csv(step_csv(results, "budget"))}
    assert budget["mae"]["budget_minutes"] == budget["scratch"]["budget_minutes"] == "0.1"
    assert int(budget["mae"]["pretrain_epochs"]) >= 1 and int(budget["scratch"]["finetune_epochs"]) >= 1
    assert 0 <= float(budget["mae"]["test_acc"]) <= 100 and budget["scratch"]["weights"] == ""
    assert "--time_budget 0.05" in budget["mae"]["command"] and "--time_budget 0.1" in budget["scratch"]["command"]
    for name in budget["mae"]["weights"].split():
        released = torch.load(results / name, weights_only=True)
        assert set(released) == {"kind", "config", "epoch", "model"} | ({"classes"} if "cls_" in name else set())
        assert all(v.dtype == torch.bfloat16 for v in released["model"].values() if v.is_floating_point())
    ablation = read_csv(results / "ablation.csv")
    assert {(r["pretrain_epochs"], r["finetune_epochs"]) for r in ablation} == {("2", "1")}  # one schedule
    assert all(r["knn_acc"] and r["probe_acc"] and r["val_acc"] for r in ablation)
    # The report: what is missing before the end, nothing after; every table filled.
    assert "## Still to be measured on CPU" in reports[0] and "- ablation: dd2_random_s0" in reports[0]
    report = reports[-1]
    assert "(no rows yet)" not in report and "- ablation" not in report
    assert "## MAE against training from scratch at equal compute" in report and "| CPU | 0.1 | mae | " in report
    for key in [*STEP_KEYS["epochs"], *STEP_KEYS["tta"]]:
        assert f"| CPU | {key} | " in report
    for key, reference in (("pretrain_dd4", 3760), ("finetune", 2080)):  # the ratio to the reference's speed
        cells = report.split("## Epoch times")[1].split(f"| CPU | {key} | ")[1].split(" | ")
        assert cells[3] == f"{float(epochs[key]['images_per_s']) / reference:.2f}"
    depth_rows = [line for line in report.split("## Ablation: decoder depth")[1].split("##")[0].splitlines()
                  if line.startswith("| CPU")]
    assert [line.split(" | ")[1] for line in depth_rows] == ["2", "4", "8"]
    assert all(line.split(" | ")[2] == "2" and " ± " in line.split(" | ")[3] for line in depth_rows)
    assert report.count("`python ") == 1 + sum(len(set(keys)) for keys in final.values())  # one note per unit
    # Once everything is measured, another call runs nothing.
    before = len(calls)
    assert campaign.main(argv(tmp_path, tiny_image_folder)) == 0
    assert len(calls) == before


def test_dry_run_prints_the_plan_in_parts_and_writes_nothing(tmp_path, tiny_image_folder, capsys):
    assert campaign.main(argv(tmp_path, tiny_image_folder, "--dry_run", "--time_limit", "0.5")) == 0
    out = capsys.readouterr().out
    parts = [line for line in out.splitlines() if line.startswith("part ")]
    assert len(parts) >= 2 and all(line.endswith(" min") for line in parts)
    for step, keys in STEP_KEYS.items():
        for key in keys:
            assert f"  {step} {key} (~" in out
    assert "python mae_pretrain.py" in out and "--data_dir DATA" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_estimates_of_untimed_variants_follow_the_measured_default_command(tmp_path, tiny_image_folder, capsys):
    def estimates():
        assert campaign.main(argv(tmp_path, tiny_image_folder, "--dry_run", "--only", "epochs")) == 0
        return {line.split()[1]: float(line.split("(~")[1].split(" s)")[0])
                for line in capsys.readouterr().out.splitlines() if line.startswith("  epochs ")}

    guessed = estimates()
    (tmp_path / "results").mkdir()
    with open(tmp_path / "results" / "epochs.csv", "w", newline="") as f:  # pretrain_dd4 timed: 3 epochs of 10 s
        writer = csv.DictWriter(f, campaign.COLUMNS["epochs"])
        writer.writeheader()
        writer.writerow(dict(gpu="CPU", key="pretrain_dd4", wall_s=50, epochs=3, seconds_per_epoch=10))
    measured = estimates()
    assert "pretrain_dd4" not in measured and measured != guessed
    overhead, per_epoch = 50 - 3 * 12, 12  # 1.2 x the epoch: evaluation, logging, the checkpoint
    epochs = campaign.PROFILES["tiny"]["speed_epochs"]
    assert measured["pretrain_block"] == pytest.approx(overhead + epochs * per_epoch, abs=1)
    assert measured["pretrain_dd8"] == pytest.approx(overhead + epochs * per_epoch * campaign.DEPTH_COST[
        "pretrain_dd8"], abs=1)
    assert measured["finetune"] == guessed["finetune"]  # another workload: still the guess


def test_only_bench_runs_that_step_in_real_processes(tmp_path, tiny_image_folder, capsys):
    assert campaign.main(argv(tmp_path, tiny_image_folder, "--only", "bench", "--time_limit", 2)) == 0
    rows = read_csv(tmp_path / "results" / "bench.csv")
    assert {r["key"] for r in rows} == STEP_KEYS["bench"]
    assert {r["augment"] for r in rows} == {"none", "crop_flip", "randaug"}
    assert all(r["status"] == "ok" and float(r["images_per_s"]) > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["REPORT.md", "bench.csv"]
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "- epochs: pretrain_dd4" in report and "- bench" not in report
    assert campaign.main(argv(tmp_path, tiny_image_folder, "--only", "bench")) == 0  # all there: skipped
    assert len(read_csv(tmp_path / "results" / "bench.csv")) == len(rows)


def test_a_benchmark_that_a_whole_part_cannot_finish_is_recorded_as_a_timeout(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(campaign, "execute", lambda command, *_: calls.append(command) or -signal.SIGTERM)
    for _ in range(2):  # each part: its first unit runs to the deadline, so it is not tried again
        assert campaign.main(argv(tmp_path, tmp_path, "--only", "bench", "--data_dir", "")) == 0
    rows = read_csv(tmp_path / "results" / "bench.csv")
    assert [(r["key"], r["status"], r["images_per_s"]) for r in rows] == [
        ("pretrain_b8_fp32_none", "timeout", ""), ("finetune_b8_fp32_none_aug", "timeout", "")]
    assert len(calls) == 2 and "| pretrain | 8 | fp32 | none | none | timeout |" in \
        (tmp_path / "results" / "REPORT.md").read_text()


def test_the_deadline_sends_sigterm_then_sigkill(tmp_path):
    graceful = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
                "print('started', flush=True); time.sleep(60)")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); " \
               "time.sleep(60)"
    for code, expected in ((graceful, 143), (stubborn, -signal.SIGKILL)):
        output = tmp_path / "out.txt"
        start = time.monotonic()
        assert campaign.execute([sys.executable, "-c", code], output, start + 1, start + 3) == expected
        assert time.monotonic() - start < 10 and "started" in output.read_text()


@pytest.mark.parametrize("extra, flag", [(["--time_limit", "0"], "--time_limit"),
                                         (["--time_limit", "x"], "--time_limit"),
                                         (["--only", "nothing"], "--only"), (["--device", "gpu"], "--device"),
                                         (["--data_dir", "missing"], "--data_dir"), (["--bogus"], "--bogus"),
                                         (["--time_limit", "1e9"], "--time_limit"), (["--work_dir", ""], "--work_dir"),
                                         (["--results_dir", "/proc/results"], "--results_dir")])
def test_bad_arguments_exit_2_before_anything_is_written(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_info:
        campaign.main(["--results_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work"), *extra])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
