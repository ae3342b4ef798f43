"""train_classifier.py end to end: checkpoints and logs, run names, resume, patience, bad checkpoints, torchrun."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import run_setup
import train_classifier
import utils
from conftest import REPO, SUBPROCESS_ENV, TINY_ENCODER, assert_one_line_error, load_state, read_metrics, run_dirs
from model import MAE_Encoder, MAE_ViT, ViT_Classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- end to end


def test_finetuning_writes_best_and_last_checkpoints_and_csv(classifier_run, mae_run):
    header, rows = read_metrics(classifier_run.run_dir)
    assert header[0] == "epoch" and {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(header)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    val_accs = [float(row["val_acc"]) for row in rows]
    assert all(0 <= acc <= 1 for acc in val_accs)

    best, last = load_state(classifier_run.best), load_state(classifier_run.last)  # weights_only=True
    assert best["kind"] == last["kind"] == "classifier"
    assert best["val_acc"] == max(val_accs)
    assert best["epoch"] == 1 + val_accs.index(max(val_accs))  # the first epoch that reached the best
    assert best["classes"] == [f"class{i}" for i in range(10)]
    assert last["epoch"] == 2 and {"optimizer", "rng", "best", "position"} <= set(last)
    assert last["best"] == {"val_acc": best["val_acc"], "epoch": best["epoch"]}
    assert last["model"]["head.weight"].shape == (10, 32)
    # The encoder came from the pretraining checkpoint, and fine-tuning moved it.
    pretrained = load_state(mae_run.checkpoint)["model"]["encoder.patchify.weight"]
    assert last["model"]["patchify.weight"].shape == pretrained.shape
    assert not torch.equal(last["model"]["patchify.weight"], pretrained)


def test_the_run_records_its_settings_and_final_metrics_for_the_hparams_view(classifier_run):
    from conftest import read_hparams

    settings, metrics = read_hparams(classifier_run.run_dir)
    assert settings["pretrained_model_path"].endswith("mae.pt") and settings["batch_size"] == 16
    val_accs = [float(row["val_acc"]) for row in read_metrics(classifier_run.run_dir)[1]]
    assert metrics == pytest.approx({"val_acc": val_accs[-1], "best_val_acc": max(val_accs)})


def test_pretrained_encoder_is_loaded_without_size_flags(tmp_path, cls_argv, mae_run):
    # lr 1e-30: an update below fp32's resolution, so the weights show what was loaded. No size flags: the
    # encoder's shape is the checkpoint's own (emb 32, depth 1), recorded in the new checkpoint's config.
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_run.checkpoint, "--total_epoch", 1,
                    "--base_learning_rate", 1e-30)
    start = argv.index(TINY_ENCODER[0])
    del argv[start:start + len(TINY_ENCODER)]
    train_classifier.main(argv)
    pretrained = load_state(mae_run.checkpoint)["model"]
    finetuned = load_state(tmp_path / "cls.pt")
    assert (finetuned["config"]["emb_dim"], finetuned["config"]["encoder_depth"]) == (32, 1)
    for name in ("cls_token", "pos_embedding", "patchify.weight", "transformer.0.attn.qkv.weight",
                 "layer_norm.weight"):
        assert torch.equal(finetuned["model"][name], pretrained[f"encoder.{name}"]), name


def test_size_flags_that_contradict_the_pretrained_checkpoint_are_refused(tmp_path, cls_argv, cli_error, mae_run):
    line = cli_error(train_classifier.main, cls_argv(tmp_path, "--pretrained_model_path", mae_run.checkpoint,
                                                     "--emb_dim", 64, "--encoder_depth", 2))
    assert "brings its own architecture" in line and "--emb_dim 64 (it has 32)" in line
    assert "--encoder_depth 2 (it has 1)" in line
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------------ run names


def test_default_names_from_scratch_and_from_a_checkpoint():
    args, _, last = train_classifier.parse_args([])
    assert last == "vit-t-cls_scratch_last.pt"
    assert (args.run_name, args.output_model_path) == ("cls_scratch", "vit-t-cls_scratch.pt")


def test_scratch_and_pretrained_runs_log_to_different_folders(tmp_path, cls_argv, mae_run):
    train_classifier.main(cls_argv(tmp_path, "--total_epoch", 1, model_name="scratch.pt"))
    train_classifier.main(cls_argv(tmp_path, "--total_epoch", 1, "--pretrained_model_path", mae_run.checkpoint,
                                   model_name="pretrained.pt"))
    names = [d.name for d in run_dirs(tmp_path / "logs")]
    assert len(names) == 2
    assert any(n.startswith("cls_scratch") for n in names) and any(n.startswith("cls_from-mae") for n in names)


def test_second_fresh_run_into_the_same_folder_fails(tmp_path, cls_argv, cli_error):
    argv = cls_argv(tmp_path, "--total_epoch", 1)
    train_classifier.main(argv)
    (run_dir,) = run_dirs(tmp_path / "logs")
    before = (run_dir / "metrics.csv").read_bytes(), (tmp_path / "cls_last.pt").read_bytes()
    assert "already holds a run" in cli_error(train_classifier.main, argv)
    assert ((run_dir / "metrics.csv").read_bytes(), (tmp_path / "cls_last.pt").read_bytes()) == before


def test_overwrite_drops_an_older_budget_record_but_only_once_the_folder_is_its_own(tmp_path, cls_argv, cli_error):
    run_dir = tmp_path / "logs" / "cifar10" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "budget.json").write_text("{}")  # a budgeted run's record
    argv = cls_argv(tmp_path, "--total_epoch", 1, "--run_name", "r", "--overwrite")
    held = utils.RunLock(run_dir).acquire()  # that run is still alive
    assert "in use by another running copy" in cli_error(train_classifier.main, argv)
    assert (run_dir / "budget.json").exists()
    held.release()
    assert train_classifier.main(argv) == 0
    assert not (run_dir / "budget.json").exists()


# ------------------------------------------------------------------------------------- resume and patience


@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "pretrained"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, cls_argv, mae_run, stop_after_epoch,
                                                                  pretrained):
    extra = ["--total_epoch", 3, "--base_learning_rate", 0.01]  # a large lr, so every epoch changes the weights
    if pretrained:
        extra += ["--pretrained_model_path", mae_run.checkpoint]
    train_classifier.main(cls_argv(tmp_path / "full", *extra))

    argv = cls_argv(tmp_path / "split", *extra)
    with stop_after_epoch(2) as flags:
        train_classifier.main(argv)
    assert len(flags) == 1
    assert load_state(tmp_path / "split" / "cls_last.pt")["epoch"] == 2
    (run_dir,) = run_dirs(tmp_path / "split" / "logs")
    assert [row["epoch"] for row in read_metrics(run_dir)[1]] == ["1", "2"]

    train_classifier.main(argv + ["--resume", "auto"])
    full, resumed = load_state(tmp_path / "full" / "cls_last.pt"), load_state(tmp_path / "split" / "cls_last.pt")
    assert full["epoch"] == resumed["epoch"] == 3
    assert same_weights(full["model"], resumed["model"])
    assert full["best"] == resumed["best"]
    (full_dir,) = run_dirs(tmp_path / "full" / "logs")
    rows, full_rows = read_metrics(run_dir)[1], read_metrics(full_dir)[1]
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]  # no duplicates
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]
    assert [r["val_acc"] for r in rows] == [r["val_acc"] for r in full_rows]


def test_logged_lr_is_the_heads_under_layer_decay(tmp_path, cls_argv, mae_run):
    # Layer decay gives the embeddings the smallest lr; the CSV shows the largest, the head's, which is the
    # scheduled lr itself (1e-3 * batch / 256 in the warm-up epoch, which runs at the peak).
    train_classifier.main(cls_argv(tmp_path, "--pretrained_model_path", mae_run.checkpoint, "--layer_decay", 0.65,
                                   "--total_epoch", 1, "--warmup_epoch", 1, "--base_learning_rate", 1e-3))
    (run_dir,) = run_dirs(tmp_path / "logs")
    batch_size = load_state(tmp_path / "cls_last.pt")["args"]["batch_size"]
    assert float(read_metrics(run_dir)[1][0]["lr"]) == pytest.approx(1e-3 * batch_size / 256)


def test_model_ema_is_evaluated_saved_as_best_and_resumed(tmp_path, cls_argv, stop_after_epoch):
    extra = ["--total_epoch", 3, "--base_learning_rate", 0.01, "--model_ema", 0.5]
    train_classifier.main(cls_argv(tmp_path / "full", *extra))
    (full_dir,) = run_dirs(tmp_path / "full" / "logs")
    header, full_rows = read_metrics(full_dir)
    assert {"val_loss_ema", "val_acc_ema"} <= set(header)
    full = load_state(tmp_path / "full" / "cls_last.pt")
    assert not same_weights(full["ema"], full["model"])  # an average of the weights, not the weights
    best = load_state(tmp_path / "full" / "cls.pt")
    # The best checkpoint holds the EMA weights, chosen by the EMA's accuracy.
    ema_accs = [float(row["val_acc_ema"]) for row in full_rows]
    assert best["val_acc"] == max(ema_accs) and best["epoch"] == 1 + ema_accs.index(max(ema_accs))
    train_classifier.main(cls_argv(tmp_path / "one", "--total_epoch", 1, "--model_ema", 0.5))
    one_best, one_last = load_state(tmp_path / "one" / "cls.pt"), load_state(tmp_path / "one" / "cls_last.pt")
    assert same_weights(one_best["model"], one_last["ema"])

    argv = cls_argv(tmp_path / "split", *extra)
    with stop_after_epoch(2):
        train_classifier.main(argv)
    train_classifier.main(argv + ["--resume", "auto"])
    resumed = load_state(tmp_path / "split" / "cls_last.pt")
    assert same_weights(resumed["ema"], full["ema"]) and same_weights(resumed["model"], full["model"])
    (split_dir,) = run_dirs(tmp_path / "split" / "logs")
    assert [r["val_acc_ema"] for r in read_metrics(split_dir)[1]] == [r["val_acc_ema"] for r in full_rows]


def test_resuming_with_model_ema_needs_a_run_that_had_it(tmp_path, cls_argv, cli_error):
    train_classifier.main(cls_argv(tmp_path, "--total_epoch", 1, "--run_name", "cls"))
    line = cli_error(train_classifier.main, cls_argv(tmp_path, "--total_epoch", 2, "--model_ema", 0.9,
                                                     "--run_name", "cls", "--resume", str(tmp_path / "cls_last.pt")))
    assert "cannot resume" in line and "--model_ema: None -> 0.9" in line


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, mae_run, classifier_run):
    """Files that --pretrained_model_path must refuse, each with a one-line reason."""
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    files = {name: folder / f"{name}.pt" for name in ("missing", "truncated", "random-bytes", "text",
                                                        "other-patch-size", "other-depth", "pickled-module")}
    files["classifier"] = classifier_run.best
    real = mae_run.checkpoint.read_bytes()
    files["truncated"].write_bytes(real[:len(real) // 2])
    files["random-bytes"].write_bytes(b"junk" + np.random.default_rng(0).bytes(50_000))
    files["text"].write_text("hello, these are not weights\n")
    torch.manual_seed(0)
    # A bare state dict of an MAE with 4 x 4 patches: 16 patches, not the 64 that --patch_size 2 makes here.
    torch.save(MAE_ViT(16, 4, 32, 1, 2, 1, 2).state_dict(), files["other-patch-size"])
    # A checkpoint dict without "args" (so the model is built from the command line) and two encoder blocks.
    torch.save({"kind": "mae", "model": MAE_ViT(16, 2, 32, 2, 2, 1, 2).state_dict()}, files["other-depth"])
    # The reference's released weights are a whole pickled module.
    torch.save(MAE_ViT(16, 2, 32, 1, 2, 1, 2), files["pickled-module"])
    return files


def data_must_not_load(*args, **kwargs):
    raise AssertionError("the data set was loaded before the error")


@pytest.mark.parametrize("case, extra, expected", [
    ("missing", [], "is not a checkpoint file"),
    ("truncated", [], "truncated or corrupt"),
    ("random-bytes", [], "truncated or corrupt"),
    ("random-bytes", ["--trust_checkpoint"], "truncated or corrupt"),
    ("text", [], "truncated or corrupt"),
    ("classifier", [], "is a classifier checkpoint; --pretrained_model_path needs an MAE"),
    ("other-patch-size", ["--patch_size", 2], "brings its own architecture; leave out --patch_size 2 (it has 4)"),
    ("other-depth", [], "brings its own architecture; leave out --encoder_depth 1 (it has 2)"),
    ("pickled-module", [], "--trust_checkpoint"),
], ids=["missing", "truncated", "random-bytes", "random-bytes-trusted", "text", "classifier", "other-patch-size",
        "other-depth", "pickled-module"])
def test_bad_pretrained_checkpoints_fail_with_one_line(tmp_path, cls_argv, cli_error, bad_checkpoints, case,
                                                       extra, expected, monkeypatch):
    monkeypatch.setattr(run_setup, "load_dataset", data_must_not_load)  # the file is judged before the data loads
    line = cli_error(train_classifier.main, cls_argv(tmp_path, "--pretrained_model_path", bad_checkpoints[case],
                                                     *extra))
    assert expected in line
    assert str(bad_checkpoints[case]) in line
    if case == "random-bytes":
        assert "--trust_checkpoint" not in line  # never advise trusting a damaged file
    assert not list(tmp_path.glob("*.pt"))


def test_pickled_module_loads_with_trust_checkpoint(tmp_path, cls_argv, bad_checkpoints):
    path = bad_checkpoints["pickled-module"]
    train_classifier.main(cls_argv(tmp_path, "--pretrained_model_path", path, "--trust_checkpoint",
                                   "--total_epoch", 1, "--base_learning_rate", 1e-30))
    module = torch.load(path, weights_only=False)
    finetuned = load_state(tmp_path / "cls.pt")["model"]
    assert torch.equal(finetuned["patchify.weight"], module.encoder.patchify.weight.detach())
    assert torch.equal(finetuned["pos_embedding"], module.encoder.pos_embedding.detach())


def test_micro_batch_that_does_not_divide_the_batch(tmp_path, cls_argv, cli_error):
    line = cli_error(train_classifier.main, cls_argv(tmp_path, "--batch_size", 16, "--max_device_batch_size", 6))
    assert "--max_device_batch_size 6" in line


def test_truncated_checkpoint_from_the_command_line(tmp_path, cls_argv, bad_checkpoints, run_script):
    argv = cls_argv(tmp_path, "--pretrained_model_path", bad_checkpoints["truncated"])
    result = run_script("train_classifier.py", *argv, cwd=tmp_path)
    assert result.returncode == 2
    assert "truncated or corrupt" in assert_one_line_error(result.stderr)


# ------------------------------------------------------------------------------------------------- torchrun


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, cls_argv):
    # From scratch, no augmentation: the only randomness is the data order, which both runs share, so each
    # optimizer step sees the same 16 images (8 per process vs 2 micro-batches of 8) and the weights agree.
    extra = ["--total_epoch", 2, "--base_learning_rate", 0.01, "--augment", "none", "--seed", 3]
    train_classifier.main(cls_argv(tmp_path / "single", *extra))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(REPO / "train_classifier.py"), *cls_argv(tmp_path / "ddp", *extra)],
                            cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = (load_state(tmp_path / name / "cls_last.pt")["model"] for name in ("single", "ddp"))
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-4, rtol=0, msg=name)
    # Training moved the weights much further than the tolerance, so the agreement means something.
    torch.manual_seed(3)
    initial = ViT_Classifier(MAE_Encoder(16, 2, 32, 1, 2), 10).state_dict()
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3
    csvs = list((tmp_path / "ddp" / "logs").rglob("metrics.csv"))
    assert len(csvs) == 1  # only rank 0 logs
    ddp_rows, single_rows = read_metrics(csvs[0].parent)[1], read_metrics(run_dirs(tmp_path / "single" / "logs")[0])[1]
    assert [r["epoch"] for r in ddp_rows] == ["1", "2"]
    assert [float(r["train_loss"]) for r in ddp_rows] == pytest.approx(
        [float(r["train_loss"]) for r in single_rows], rel=1e-4)
    assert [r["val_acc"] for r in ddp_rows] == [r["val_acc"] for r in single_rows]  # every test image counted once


# -------------------------------------------------------------------------------------------- few labels


def test_labels_per_class_gives_both_arms_of_a_seed_the_same_images(tmp_path, cls_argv, mae_run, cli_error,
                                                                     tiny_image_folder):
    def subset(name, seed, *extra):
        assert train_classifier.main(cls_argv(tmp_path / name, "--labels_per_class", 3, "--seed", seed,
                                              "--total_epoch", 1, "--warmup_epoch", 0, *extra)) == 0
        (row,) = read_metrics(run_dirs(tmp_path / name / "logs")[0])[1]
        assert row["labels"] == "30"  # 3 of each of the 10 classes; the test set stays whole
        return row["subset"]

    scratch = subset("scratch", 5)
    assert subset("mae", 5, "--pretrained_model_path", mae_run.checkpoint) == scratch
    train = data.load_dataset("cifar10", tiny_image_folder)[0]
    assert train_classifier.labelled_subset(train, 3, 5)[1]["subset"] == scratch
    assert train_classifier.labelled_subset(train, 3, 6)[1]["subset"] != scratch  # another seed, other images
    line = cli_error(train_classifier.main, cls_argv(tmp_path / "too_many", "--labels_per_class", 9))
    assert "--labels_per_class 9: class class0 has only 8 training images" in line


def test_resuming_on_data_whose_classes_changed_is_refused(tmp_path, cls_argv, tiny_image_folder, cli_error):
    import shutil

    data = shutil.copytree(tiny_image_folder, tmp_path / "data")
    argv = [*cls_argv(tmp_path, "--total_epoch", 1, "--run_name", "r"), "--data_dir", data]
    assert train_classifier.main(argv) == 0
    for split in ("train", "test"):
        (data / split / "class5").rename(data / split / "class55")  # the order is the same, one name is not
    line = cli_error(train_classifier.main, [*cls_argv(tmp_path, "--total_epoch", 2, "--run_name", "r"),
                                             "--data_dir", data, "--resume", "auto"])
    assert "cls_last.pt was trained on the classes" in line and "'class55'" in line
    assert len(read_metrics(run_dirs(tmp_path / "logs")[0])[1]) == 1  # nothing trained on the shifted labels
