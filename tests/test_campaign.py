"""campaign.py without training: the units and their commands, the dry run, a unit skipped once its rows exist,
and a unit's rows collected from run folders that a fake script run writes."""
import csv
import json
import os
import signal
import sys
import time

import pytest
import torch

import benchmark
import campaign
import mae_pretrain
import train_classifier

SCRIPTS = {"mae_pretrain.py": mae_pretrain, "train_classifier.py": train_classifier, "benchmark.py": benchmark}
SIZE_FLAGS = ("--patch_size", "--emb_dim", "--encoder_depth", "--encoder_heads", "--decoder_emb_dim",
              "--decoder_heads")  # the preset's: a command names --preset or takes the defaults


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def option(words, flag):
    return words[words.index(flag) + 1] if flag in words else None


@pytest.fixture
def root(tmp_path, monkeypatch):
    """The campaign's folder (its results/ and campaign_runs/) in a temporary folder."""
    monkeypatch.setattr(campaign, "ROOT", tmp_path)
    return tmp_path


@pytest.fixture
def fake_runs(root, monkeypatch):
    """campaign.execute without training: each script writes what its run would leave (metrics.csv, budget.json
    for a budgeted run, its checkpoints; the benchmark its CSV). Returns the argv of every script run."""
    calls = []

    def execute(argv):
        calls.append(argv)
        words = argv[1:]
        if words[0] == "benchmark.py":
            augments = words[words.index("--augments") + 1:words.index("--no_baseline")]
            output = root / option(words, "--output")
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w", newline="") as f:
                writer = csv.DictWriter(f, ["workload", "batch", "augment", "images_per_s", "status"])
                writer.writeheader()
                writer.writerows(dict(workload=option(words, "--workloads"), batch=option(words, "--batch_sizes"),
                                      augment=a, images_per_s=1000.0, status="ok") for a in augments)
            return 0
        run = root / option(words, "--log_dir") / "cifar10" / option(words, "--run_name")
        run.mkdir(parents=True)
        mae = words[0] == "mae_pretrain.py"
        with open(run / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["epoch", "loss", "val_acc", "knn_acc", "probe_acc", "seconds", "images_per_s",
                                        "compile_seconds"])
            writer.writeheader()
            for epoch, seconds, acc in ((1, 30.0, 0.30), (2, 10.0, 0.50), (3, 12.0, 0.45)):
                writer.writerow(dict(epoch=epoch, seconds=seconds, images_per_s=50000 / seconds,
                                     compile_seconds=20.0 if epoch == 1 else "", loss=0.5 / epoch if mae else "",
                                     val_acc="" if mae else acc, knn_acc=acc / 2 if mae else "",
                                     probe_acc=acc / 3 if mae else ""))
        if "--time_budget" in words:
            (run / "budget.json").write_text(json.dumps(dict(
                time_budget_minutes=float(option(words, "--time_budget")), total_epoch=3, epochs=2.5, steps=30,
                wall_seconds=[40.0, 20.0], machine="Fake GPU", date="2030-01-01", reproduce="--total_epoch 3")))
        checkpoint = root / option(words, "--model_path" if mae else "--output_model_path")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {"kind": "mae" if mae else "classifier", "config": {"emb_dim": 8}, "epoch": 3, "optimizer": {},
                 "model": {"weight": torch.ones(4, 4), "steps": torch.tensor(3)}}
        for path in (checkpoint, checkpoint.with_name(checkpoint.stem + "_last.pt")) if not mae else (checkpoint,):
            torch.save(state, path)
        return 0

    monkeypatch.setattr(campaign, "execute", execute)
    return calls


def test_the_units_keep_their_order_with_the_few_label_pair_after_the_full_label_pair():
    names = [unit.name for unit in campaign.UNITS]
    assert names[:5] == ["budget_3.5min", "labels50_3.5min", "labels500_3.5min", "budget_7min_mae",
                         "budget_7min_scratch"]
    steps = [unit.step for unit in campaign.UNITS]
    assert list(dict.fromkeys(steps[3:])) == ["budget", "epochs", "tta", "bench", "ablation"]
    assert names[5:7] == ["pretrain_dd4", "finetune"] and names.index("tta_pretrain") < names.index("tta_finetune")
    assert len(names) == len(set(names)) and steps.count("ablation") == 10
    # A few-label unit is the full-label pair with --labels_per_class on both fine-tuning arms: same minutes, seed.
    pair = campaign.UNITS[0]
    for unit, n in zip(campaign.UNITS[1:3], ("50", "500")):
        assert unit.step == "few_labels" and unit.minutes == pair.minutes and unit.info["labels_per_class"] == int(n)
        assert [option(words, "--labels_per_class") for words in unit.commands] == [None, n, n]
        for mine, full in zip(unit.commands, pair.commands):
            flags = [w for w in mine if w not in ("--labels_per_class", n)]
            assert flags == [w.replace("budget_3.5min", f"labels{n}_3.5min") for w in full]
    assert [option(words, "--time_budget") for words in pair.commands] == ["1.75", "1.75", "3.5"]
    assert all(option(words, "--seed") == "0" for words in pair.commands)


def test_every_command_uses_flags_its_script_knows_and_no_spelled_out_sizes():
    runs = [name for unit in campaign.UNITS for name in campaign.runs(unit)]
    assert len(runs) == len(set(runs))  # each run its own folder and checkpoint
    for unit in campaign.UNITS:
        for words in unit.commands:
            parser = SCRIPTS[words[0]].build_parser()
            _, unknown = parser.parse_known_args(campaign.argv(words, "DATA")[1:])
            assert not [w for w in unknown if w.startswith("--")]
            assert not set(SIZE_FLAGS) & set(words)


def test_dry_run_prints_the_first_unit_and_writes_nothing(root, capsys):
    assert campaign.main(["--dry_run", "--data_dir", str(root / "images")]) == 0
    head, command = capsys.readouterr().out.splitlines()
    assert head.startswith("budget_3.5min (about 7.5 min; rows to results/budget/campaign.csv;")
    assert command.startswith("python mae_pretrain.py --seed 0 --time_budget 1.75 ")
    assert command.count(" && python train_classifier.py ") == 2
    assert command.count(f"--data_dir {root / 'images'}") == 3
    assert not list(root.iterdir())


def test_a_unit_with_rows_is_skipped(root, capsys):
    (root / "results" / "budget").mkdir(parents=True)
    with open(root / "results" / "budget" / "campaign.csv", "w", newline="") as f:
        f.write("gpu,key\nSome GPU,budget_3.5min\n")
    assert campaign.main(["--dry_run"]) == 0
    assert capsys.readouterr().out.startswith("labels50_3.5min ")
    assert campaign.main(["--dry_run", "--only", "budget_3.5min"]) == 0
    assert capsys.readouterr().out.startswith("nothing to run")
    assert campaign.main(["--dry_run", "--only", "bench"]) == 0
    assert capsys.readouterr().out.startswith("pretrain_b512_fp32_none ")


def test_a_unit_runs_its_scripts_then_its_rows_weights_and_report(root, fake_runs, capsys):
    data = root / "images"
    assert campaign.main(["--data_dir", str(data)]) == 0
    assert [argv[1] for argv in fake_runs] == ["mae_pretrain.py", "train_classifier.py", "train_classifier.py"]
    assert all(argv[0] == sys.executable and option(argv, "--data_dir") == str(data) for argv in fake_runs)
    rows = {row["arm"]: row for row in read_csv(root / "results" / "budget" / "campaign.csv")}
    assert list(rows["mae"])[:len(campaign.META)] == campaign.META
    for row in rows.values():
        assert (row["key"], row["gpu"], row["torch"], row["budget_minutes"]) == (
            "budget_3.5min", campaign.machine(), torch.__version__, "3.5")
        assert (row["test_acc"], row["finetune_epochs"]) == ("45.00", "3")
        assert row["command"].startswith("python mae_pretrain.py") and "--data_dir DATA " in row["command"]
    assert (rows["mae"]["pretrain_epochs"], rows["scratch"]["pretrain_epochs"]) == ("3", "0")
    assert (rows["mae"]["wall_minutes"], rows["mae"]["machine"]) == ("2.0", "Fake GPU")
    # The MAE arm's two checkpoints, released in bf16 without the optimizer.
    gpu = "".join(c if c.isalnum() else "-" for c in campaign.machine().lower())
    assert sorted(p.name for p in (root / "results" / "weights").iterdir()) == [f"cls_{gpu}_3.5min.pt",
                                                                                f"mae_{gpu}_3.5min.pt"]
    for path in (root / "results" / "weights").iterdir():
        released = torch.load(path, weights_only=True)
        assert set(released) == {"kind", "config", "epoch", "model"}
        assert released["model"]["weight"].dtype == torch.bfloat16 and released["model"]["steps"].dtype == torch.int64
    report = (root / "results" / "REPORT.md").read_text()
    assert "| Fake GPU |" in report and "## Still to run\n\nlabels50_3.5min, labels500_3.5min," in report
    # The next call runs the next unit: the done one is skipped.
    fake_runs.clear()
    assert campaign.main([]) == 0
    assert option(fake_runs[1], "--labels_per_class") == "50"
    assert [r["labels_per_class"] for r in read_csv(root / "results" / "few_labels.csv")] == ["50", "50"]
    assert len(list((root / "results" / "weights").iterdir())) == 2  # the few-label pair releases nothing


def test_rows_of_the_other_steps(root, fake_runs):
    for unit in ("pretrain_dd2", "tta_pretrain", "finetune_b256_auto_default_aug", "dd8_random_s1"):
        assert campaign.main(["--only", unit]) == 0
    epochs = read_csv(root / "results" / "epochs.csv")[0]
    assert (epochs["key"], epochs["epochs"], epochs["seconds_per_epoch"], epochs["compile_s"]) == (
        "pretrain_dd2", "3", "11.0", "20.0")  # the median epoch after the first, which compiles
    tta = read_csv(root / "results" / "tta.csv")[0]
    assert tta["run"] == "tta_mae" and tta["loss"] == str(0.5 / 3)  # its last epoch's
    assert float(tta["encoder_mb"]) == round((root / campaign.ENCODER).stat().st_size / 2 ** 20, 2)
    assert torch.load(root / campaign.ENCODER, weights_only=True)["model"]["weight"].dtype == torch.bfloat16
    bench = read_csv(root / "results" / "bench.csv")
    assert [(r["key"], r["augment"]) for r in bench] == [("finetune_b256_auto_default_aug", a)
                                                          for a in ("none", "crop_flip", "randaug")]
    pretrain, tune = read_csv(root / "results" / "ablation.csv")  # a row per run
    assert (pretrain["run"], pretrain["decoder_depth"], pretrain["seed"], pretrain["knn_acc"]) == (
        "abl_dd8_random_s1", "8", "1", "0.225")
    assert (tune["run"], tune["mask_strategy"], tune["val_acc"]) == ("abl_dd8_random_s1_ft", "random", "0.45")


def test_a_failed_script_ends_the_unit_without_rows(root, fake_runs, monkeypatch, capsys):
    run = campaign.execute
    monkeypatch.setattr(campaign, "execute", lambda argv: 143 if argv[1] == "train_classifier.py" else run(argv))
    assert campaign.main([]) == 143
    assert "train_classifier.py ended with exit code 143" in capsys.readouterr().out
    assert not (root / "results" / "budget").exists()
    assert "## Still to run\n\nbudget_3.5min," in (root / "results" / "REPORT.md").read_text()


def test_a_stop_is_passed_on_to_the_script():
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('stopping', flush=True), sys.exit(143)))\n"
              "print('started', flush=True)\ntime.sleep(30)\n")
    start, alarm = time.monotonic(), signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # SIGTERM to this process alone: the script is in its own session
        assert campaign.execute([sys.executable, "-c", script]) == 143
    finally:
        signal.signal(signal.SIGALRM, alarm)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("extra, flag", [(["--only", "nothing"], "--only"), (["--bogus"], "--bogus")])
def test_bad_arguments_exit_2_before_anything_is_written(root, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_info:
        campaign.main(extra)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not list(root.iterdir())
